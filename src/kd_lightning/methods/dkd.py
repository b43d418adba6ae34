"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang; CVPR 2022; arXiv 2203.08679)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.losses import DKDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class DKD(ClassificationDistillation):
    """DKD: ``w_CE·CE + min(epoch/warmup, 1)·(α·TCKD + β·NCKD)``.

    TCKD is the KL of the binary target/non-target distributions, NCKD the KL among the
    non-target classes (:func:`kd_lightning.losses.dkd_terms`). The warm-up factor counts epochs
    from 1, as mdistiller does (epoch 1 → 1/warmup); it is a schedule of :class:`~kd_lightning.losses.DKDLoss`.
    Defaults are mdistiller's CIFAR-100 values (α = 1, β = 8, τ = 4, warm-up 20, w_CE = 1); per-pair β is in
    the configs. Verified against mdistiller ``DKD.py``. ``standardize=True`` gives DKD+LS (Sun et al. 2024).

    Args:
        alpha: α, weight of TCKD.
        beta: β, weight of NCKD.
        temperature: τ.
        ce_weight: w_CE.
        warmup_epochs: epochs of the linear ramp of the KD terms (0 disables it).
        standardize: z-score both logits before the KD terms (DKD+LS).
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        warmup_epochs: int = 20,
        standardize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.criterion = DKDLoss(alpha, beta, temperature, ce_weight, standardize, warmup_epochs)
