"""Vanilla knowledge distillation (Hinton, Vinyals, Dean 2015; arXiv 1503.02531)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.losses import KDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class VanillaKD(ClassificationDistillation):
    """Hinton KD: ``w_CE·CE(z_S, y) + w_KD·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``.

    KL summed over classes, averaged over the batch, scaled by τ². Defaults follow mdistiller's
    CIFAR-100 recipe (τ = 4, w_CE = 0.1, w_KD = 0.9). Verified against mdistiller ``KD.py``.

    Args:
        temperature: τ.
        ce_weight: w_CE, weight of the cross-entropy on the labels.
        kd_weight: w_KD, weight of the soft-target term.
        student, teacher, **kwargs: ``teacher_ckpt``, ``optimizer``, ``lr_scheduler`` and the other
            arguments of :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.criterion = KDLoss(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)
