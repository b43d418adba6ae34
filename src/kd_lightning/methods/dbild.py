"""DBiLD-style distillation (Switch-KD, Sun et al.; CVPR Findings 2026; arXiv 2604.14629) — a RECONSTRUCTION."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.bild import DBiLDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class DBiLD(ClassificationDistillation):
    """DBiLD-style: BiLD with a per-sample dynamic k and reverse KL — **RECONSTRUCTION, UNVERIFIED**.

    Switch-KD's repository (haoyi199815/Switch-KD) releases no training or loss code; its abstract
    and README say only that DBiLD "adaptively aligns informative probability regions" with
    bidirectional supervision using reverse KL. Reconstructed as
    ``L = w_CE·CE + w_KD·(LD_ρ(teacher-led) + LD_ρ(student-led))`` where each branch keeps, per
    sample, the smallest k whose top-k softmax mass reaches ρ (clipped to ``[k_min, k_max]``; pairs
    beyond k left out) and ``LD_ρ = λ·KL(p_S‖p_T) + (1−λ)·KL(p_T‖p_S)`` on the pair-difference
    distributions (:class:`~kd_lightning.losses.bild.DBiLDLoss`). Every such choice is an argument.
    Switch-KD's Visual-Switch distillation (VLM-specific) is not part of this. Logs the mean dynamic
    k of each branch as ``train/k_teacher`` and ``train/k_student``.

    Args:
        loss: the DBiLD loss (``mass`` ρ, ``k_min``, ``k_max``, ``temperature``, ``reverse_weight`` λ,
            ``mass_temperature``, ``k_source``, ``kd_weight``, ``ce_weight``: all UNVERIFIED choices, see
            :class:`~kd_lightning.losses.bild.DBiLDLoss`); ``None``: its defaults
            (ρ 0.9, k 3..16, τ 3, λ 1) with the CE term on (w_CE = 1).
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    object_arguments = (*ClassificationDistillation.object_arguments, "loss")

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: DBiLDLoss | None = None, **kwargs: Any) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.criterion = loss if loss is not None else DBiLDLoss(ce_weight=1.0)

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        if self.criterion.k_min > int(self.num_classes):
            raise KDConfigError(
                "model.init_args.loss.init_args.k_min",
                f"is {self.criterion.k_min} but there are only {self.num_classes} classes",
                f"set k_min <= {self.num_classes}",
            )

    def distillation_loss(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        parts = self.criterion(student_logits, teacher_logits, target)
        if self._trainer is not None:
            with torch.no_grad():
                k_teacher = self.criterion.dynamic_k(teacher_logits).float().mean()
                source = student_logits if self.criterion.k_source == "leader" else teacher_logits
                k_student = self.criterion.dynamic_k(source).float().mean()
            batch_size = target.numel()
            self.log("train/k_teacher", k_teacher, on_step=False, on_epoch=True, batch_size=batch_size)
            self.log("train/k_student", k_student, on_step=False, on_epoch=True, batch_size=batch_size)
        return parts
