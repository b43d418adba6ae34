"""MGD for detectors: Masked Generative Distillation (Yang, Li, Shao, Shi, Yuan, Yuan; ECCV 2022; arXiv 2205.01529)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.dense import MGDLoss
from kd_lightning.losses.terms import check_weights
from kd_lightning.methods.tasks.detection import DetectionContext, DetectionDistillation
from kd_lightning.models.detection import detector_family

__all__ = ["DetMGD"]


class DetMGD(DetectionDistillation):
    """``L = Σ_levels α · Σ_{n,c,h,w} (G_l(A_l(S_l) · M) − T_l)² / N`` with ``M`` a random spatial mask that drops
    each position with probability ``λ`` (shared over channels), ``A_l`` a 1x1 align conv when the widths differ
    and ``G_l`` = Conv3x3 → ReLU → Conv3x3 generating the teacher's map (:class:`~kd_lightning.losses.dense.MGDLoss`;
    align and generators are trained with the student and dropped at export).

    Defaults from the official configs (yzd-v/MGD ``det/configs/distillers/mgd``; dense_baselines.md §3):
    one-stage students (RetinaNet, FCOS) ``alpha = 2e-5``, ``lambda_mask = 0.65`` on all five levels P3..P7; for
    Faster R-CNN the configs use ``alpha = 5e-7``, ``lambda_mask = 0.45`` on P2..P5 (the first four levels, the
    default here for that family — set alpha and lambda_mask yourself). α is tiny because the loss sums over
    ``C·H·W``; rescale it when maps are much smaller (our digit-scenes configs do). The official one-stage
    numbers also use the "inheriting strategy" (teacher neck + head copied into the student) and grad-norm
    clipping 35 (``--trainer.gradient_clip_val 35``); neither is applied here.

    Args:
        student, teacher: detectors (see :class:`~kd_lightning.methods.tasks.detection.DetectionDistillation`).
        alpha: weight α of the summed squared error (per level).
        lambda_mask: drop probability λ of each spatial position.
        mask_on_channel: mmrazor's variant masking whole channels instead of positions.
        **kwargs: ``task_weight``, ``distill_levels``, ``map_backend`` and the core's arguments.

    Logged term: ``mgd`` (weighted).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        alpha: float = 2e-5,
        lambda_mask: float = 0.65,
        mask_on_channel: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_weights(alpha=alpha)
        if not 0.0 <= lambda_mask < 1.0:
            raise KDConfigError("lambda_mask", f"must be in [0, 1), got {lambda_mask}", "0.65 is the one-stage default")
        self.alpha = alpha
        self.lambda_mask = lambda_mask
        self.mask_on_channel = mask_on_channel
        self.generators: nn.ModuleDict | None = None

    def default_distill_levels(self, student_levels: list[str]) -> list[str]:
        two_stage = detector_family(self.student) == "faster_rcnn"
        return list(student_levels)[:4] if two_stage else list(student_levels)

    def build_parts(self, student_channels: dict[str, int], teacher_channels: dict[str, int]) -> None:
        self.generators = nn.ModuleDict(
            {
                level: MGDLoss(c_s, teacher_channels[level], self.alpha, self.lambda_mask, self.mask_on_channel)
                for level, c_s in student_channels.items()
            }
        )

    def distill_terms(
        self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], context: DetectionContext
    ) -> dict[str, Tensor]:
        assert self.generators is not None
        total = sum(self.generators[level](s, teacher_feats[level]) for level, s in student_feats.items())
        return {"mgd": total}
