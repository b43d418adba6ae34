"""FPN feature imitation for detectors: FitNets' hint loss on every FPN level (Romero et al., ICLR 2015,
arXiv 1412.6550, applied to detector necks as in the FPN-imitation baselines of FGD/MGD/CWD)."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.terms import check_weights
from kd_lightning.methods.tasks.detection import DetectionContext, DetectionDistillation
from kd_lightning.models.detection import LevelAdapters

__all__ = ["DetFPNImitation"]


class DetFPNImitation(DetectionDistillation):
    """``L = weight · Σ_levels mean_{n,c,h,w} (A_l(S_l) − T_l)²`` on the FPN levels (all, or ``distill_levels``).

    ``A_l`` is a 1×1 convolution per level (FitNets' regressor; with ``adapter="auto"`` only where the student's
    and teacher's FPN widths differ). Teacher features are targets (no gradient). Plus the student's own
    detection losses (``task_weight``).

    Args:
        student, teacher: detectors (see :class:`~kd_lightning.methods.tasks.detection.DetectionDistillation`).
        weight: weight of the imitation term (default 1.0, a plain mean-squared error per level: not from a
            paper; FitNets tunes it per setting).
        adapter: ``"always"`` (a 1×1 conv per level, FitNets) or ``"auto"`` (identity where the channels match).
        **kwargs: ``task_weight``, ``distill_levels``, ``map_backend`` and the core's arguments.

    Logged term: ``fpn_imitation`` (weighted).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        weight: float = 1.0,
        adapter: Literal["always", "auto"] = "always",
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_weights(weight=weight)
        if adapter not in ("always", "auto"):
            raise KDConfigError("adapter", f"must be 'always' or 'auto', got {adapter!r}")
        self.weight = weight
        self.adapter = adapter
        self.adapters: LevelAdapters | None = None

    def build_parts(self, student_channels: dict[str, int], teacher_channels: dict[str, int]) -> None:
        self.adapters = LevelAdapters(student_channels, teacher_channels, mode=self.adapter)

    def distill_terms(
        self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], context: DetectionContext
    ) -> dict[str, Tensor]:
        assert self.adapters is not None
        total = sum(
            F.mse_loss(self.adapters(level, s).float(), teacher_feats[level].float().detach())
            for level, s in student_feats.items()
        )
        return {"fpn_imitation": self.weight * total}
