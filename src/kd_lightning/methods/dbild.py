"""DBiLD-style distillation (Switch-KD, Sun et al.; CVPR Findings 2026; arXiv 2604.14629) — a RECONSTRUCTION."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.bild import DBiLDLoss
from kd_lightning.methods.base import DistillationModule


class DBiLD(DistillationModule):
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
        mass: ρ (UNVERIFIED).
        k_min: smallest k, ≥ 2 and at most the class count (UNVERIFIED; 3 because k = 2 leaves one
            pair, a constant distribution, so such samples would contribute 0).
        k_max: largest k, capped at the class count (UNVERIFIED).
        temperature: τ of the pair distributions (BiLD's 3; UNVERIFIED for DBiLD).
        reverse_weight: λ, 1 = reverse KL (the README), 0 = forward KL as in BiLD.
        mass_temperature: temperature of the softmax read by the mass rule (UNVERIFIED).
        k_source: ``"leader"`` (each branch's k from its leader) or ``"teacher"`` (UNVERIFIED).
        kd_weight: w_KD.
        ce_weight: w_CE, cross-entropy on the labels (our addition for classification; 0 disables it).
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        mass: float = 0.9,
        k_min: int = 3,
        k_max: int = 16,
        temperature: float = 3.0,
        reverse_weight: float = 1.0,
        mass_temperature: float = 1.0,
        k_source: Literal["leader", "teacher"] = "leader",
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)
        try:
            self.criterion = DBiLDLoss(
                mass=mass,
                k_min=k_min,
                k_max=k_max,
                temperature=temperature,
                reverse_weight=reverse_weight,
                mass_temperature=mass_temperature,
                k_source=k_source,
                kd_weight=kd_weight,
                ce_weight=ce_weight,
            )
        except ValueError as err:
            raise KDConfigError(f"model.init_args.{err}") from None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.criterion.k_min > int(self.num_classes):
            raise KDConfigError(
                f"model.init_args.k_min={self.criterion.k_min} exceeds the {self.num_classes} classes: "
                f"set k_min <= {self.num_classes}."
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
