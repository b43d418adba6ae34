"""Plackett-Luce Distillation (Bassam, Zhu, Bian; NeurIPS 2025; arXiv 2506.12542)."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from kd_lightning.losses import PLDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class PLD(ClassificationDistillation):
    """PLD: the student's Plackett-Luce likelihood of the teacher-optimal ranking, teacher-weighted.

    ``L = (1/B) Σ_i Σ_k α_k (log Σ_{l≥k} exp(s_{π*_l}) − s_{π*_k})`` with π* = (label, then the
    other classes by descending teacher logit) and ``α_k = softmax(z_T/τ_T)[π*_k]``. Replaces CE +
    KD: no separate CE, no mixing weight; student logits are not temperature-scaled.
    Verified against the paper text and its Appendix C code (no official repository exists).

    Args:
        temperature: τ_T of the teacher weights (1.0: the paper's ImageNet optimum; its CIFAR
            section uses 4.0).
        weighting: ``"teacher"`` (PLD) or ``"uniform"`` (ListMLE ablation).
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 1.0,
        weighting: Literal["teacher", "uniform"] = "teacher",
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.criterion = PLDLoss(temperature=temperature, weighting=weighting)
