"""Signal knowledge distillation, SKD (Hou et al., "ClST ... by Knowledge Distillation", IEEE TWC 2024;
arXiv 2312.17446)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.skd import SKDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class SKD(ClassificationDistillation):
    """SKD: ``α·CE(z_S, y) + (1 − α)·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ))`` from a frozen ClST teacher.

    RECONSTRUCTION (unverified): the paper's abstract names soft targets and a "hybrid loss that also
    preserves teacher knowledge"; its loss formula, τ and α could not be checked (no paper body, no
    official code). This is Hinton KD with weights ``α`` / ``1 − α`` (:class:`~kd_lightning.losses.skd.SKDLoss`);
    τ = 4 and α = 0.3 are guesses. The paper's students are KD-CNN and KD-MobileNet
    (:mod:`kd_lightning.models.radioml`, also placeholders). Batches may carry the SNR as a third element
    (RadioML); it is ignored by the loss (see :class:`kd_lightning.callbacks.snr.SNREvaluation`).

    Args:
        temperature: τ.
        alpha: α in [0, 1], weight of the hard-label cross-entropy.
        student, teacher, **kwargs: ``teacher_ckpt``, ``optimizer``, ``lr_scheduler`` and the other
            arguments of :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        alpha: float = 0.3,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise KDConfigError(f"model.init_args.alpha must be in [0, 1], got {alpha}.")
        if not temperature > 0:
            raise KDConfigError(f"model.init_args.temperature must be > 0, got {temperature}.")
        self.criterion = SKDLoss(temperature=temperature, alpha=alpha)
