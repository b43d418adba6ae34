"""PKD for detectors: feature distillation through the Pearson correlation coefficient (Cao, Zhang, Gao, Cheng,
Cheng, Cheng; NeurIPS 2022; arXiv 2207.02039)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kd_lightning.losses.dense import pearson_feature_loss
from kd_lightning.losses.terms import check_weights
from kd_lightning.methods.tasks.detection import DetectionContext, DetectionDistillation
from kd_lightning.models.detection import LevelAdapters

__all__ = ["DetPKD"]


class DetPKD(DetectionDistillation):
    """``L = weight · Σ_levels ½·mean((norm(A_l(S_l)) − norm(T_l))²)``, ``norm`` standardising each channel over
    the batch and positions jointly (unbiased std + 1e-6): ``Σ_l mean_c (1 − r_c)`` up to ``(M−1)/M``, with ``r_c``
    the Pearson correlation of channel ``c`` (:func:`~kd_lightning.losses.dense.pearson_feature_loss`).

    Defaults as mmrazor's released PKD configs (``configs/distill/mmdet/pkd``; dense_baselines.md §2): the first
    four neck outputs (RetinaNet/FCOS P3..P6, Faster R-CNN P2..P5), ``weight = 10`` for RetinaNet/FCOS students
    (6 for Faster R-CNN R101 -> R50). No temperature, no mask; statistics are per process (per-GPU batch), never
    per image. PKD itself has no adapter (its detectors share 256-wide FPNs); when the widths differ a 1x1 conv
    ``A_l`` maps the student to the teacher's width — our extension, off when they match.

    Args:
        student, teacher: detectors (see :class:`~kd_lightning.methods.tasks.detection.DetectionDistillation`).
        weight: weight of the summed per-level term.
        resize_student: when spatial sizes differ, resize the student's map to the teacher's (else the reverse).
        **kwargs: ``task_weight``, ``distill_levels``, ``map_backend`` and the core's arguments.

    Logged term: ``pkd`` (weighted).
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, weight: float = 10.0, resize_student: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_weights(weight=weight)
        self.weight = weight
        self.resize_student = resize_student
        self.adapters: LevelAdapters | None = None

    def default_distill_levels(self, student_levels: list[str]) -> list[str]:
        return list(student_levels)[:4]

    def build_parts(self, student_channels: dict[str, int], teacher_channels: dict[str, int]) -> None:
        self.adapters = LevelAdapters(student_channels, teacher_channels, mode="auto")

    def distill_terms(
        self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], context: DetectionContext
    ) -> dict[str, Tensor]:
        assert self.adapters is not None
        total = sum(
            pearson_feature_loss(self.adapters(level, s), teacher_feats[level], self.resize_student)
            for level, s in student_feats.items()
        )
        return {"pkd": self.weight * total}
