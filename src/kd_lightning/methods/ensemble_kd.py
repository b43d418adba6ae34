"""Ensemble distillation: one student from several named teachers (Hinton, Vinyals, Dean 2015, §3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.ensemble import EnsembleKDLoss, ensemble_log_probs
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class EnsembleKD(ClassificationDistillation):
    """Ensemble KD: ``w_CE·CE + w_KD·τ²·KL(Σ_k w_k p_k^τ ‖ p_S^τ)`` over named teachers.

    The soft target is the ensemble's prediction — the weighted mean of the teachers' softened distributions —
    as in the paper's ensemble experiments (:class:`~kd_lightning.losses.ensemble.EnsembleKDLoss`). Each teacher
    is frozen, kept in eval mode and loaded from its own checkpoint (``teacher_ckpt: {name: path}``); ``kd fit``
    trains the missing ones first, each cached under its own key. Evaluation reports the ensemble as "the
    teacher" (``val/teacher_acc``, agreement and KL to the ensemble at τ = 1). With one teacher this is
    :class:`~kd_lightning.methods.VanillaKD`. Defaults are the KD recipe of this library (τ 4, CE 0.1, KD 0.9);
    the paper's ensemble numbers are on speech and MNIST, not reproduced here.

    Args:
        teachers: ``{name: network}``; at least one.
        temperature: τ.
        ce_weight: w_CE.
        kd_weight: w_KD.
        teacher_weights: ``{name: w_k}`` (normalised); ``None``: equal weights.
        student, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: dict[str, nn.Module],
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        teacher_weights: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teachers=teachers, **kwargs)
        if teacher_weights is not None and set(teacher_weights) != set(self.teachers):
            raise KDConfigError(
                "teacher_weights", f"names {sorted(teacher_weights)} but the teachers are {sorted(self.teachers)}"
            )
        weights = None if teacher_weights is None else [teacher_weights[name] for name in self.teachers]
        self.criterion = EnsembleKDLoss(temperature, ce_weight, kd_weight, weights)

    def teacher_forward(self, x: Tensor) -> Tensor:
        """Every teacher's logits, stacked ``[K, B, C]`` in the order of ``teachers``."""
        return torch.stack([self.run_teacher(x, name=name) for name in self.teachers])

    def eval_extra(self, x: Tensor, y: Tensor, logits: Tensor, stage: str) -> None:
        if self.fidelity:
            with torch.no_grad():
                ensemble = ensemble_log_probs(self.teacher_forward(x), 1.0, self.criterion.teacher_weights)
            self.eval_with_teacher(y, logits, ensemble, stage)
