"""Logit standardisation in KD (Sun, Ren, Li, Wang, Cao; CVPR 2024; arXiv 2403.01427)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.losses import LogitStandardKDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class LogitStandardKD(ClassificationDistillation):
    """KD+LS: KD on z-scored logits, ``w_CE·CE(z_S, y) + w_KD·τ_b²·KL(σ(Z(z_T)/τ_b) ‖ σ(Z(z_S)/τ_b))``.

    ``Z(z) = (z − mean z)/(std z + 1e-7)`` per sample (unbiased std); CE on the raw logits.
    Official defaults: τ_b = 2, w_KD = 9, w_CE = 0.1. Verified against the official code
    (sunshangquan/logit-standardization-KD).

    Args:
        temperature: base temperature τ_b.
        ce_weight: w_CE.
        kd_weight: w_KD.
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 2.0,
        ce_weight: float = 0.1,
        kd_weight: float = 9.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.criterion = LogitStandardKDLoss(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)
