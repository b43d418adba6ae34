"""Distillation from an ensemble of teachers (Hinton, Vinyals, Dean 2015, §3), pure torch.

The paper's main setting distils "the knowledge in an ensemble of models into a single model": the soft target
is the ensemble's prediction, the (weighted) arithmetic mean of the teachers' softened distributions,

    p̄ = Σ_k w_k · softmax(z_k / τ),   Σ_k w_k = 1,
    L = w_CE·CE(z_S, y) + w_KD·τ²·KL(p̄ ‖ softmax(z_S / τ)).

``log p̄`` is computed as a log-sum-exp over teachers (no ``log`` of a probability that can underflow). With one
teacher this is :class:`~kd_lightning.losses.logit.KDLoss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import reduce_items
from kd_lightning.losses.terms import check_weights, weighted_terms

__all__ = ["EnsembleKDLoss", "ensemble_log_probs"]


def ensemble_log_probs(
    teacher_logits: Tensor, temperature: float = 1.0, weights: Sequence[float] | None = None
) -> Tensor:
    """``log Σ_k w_k softmax(z_k/τ)`` of stacked teacher logits ``[K, ..., C]`` (weights normalised; default equal)."""
    check_temperature(temperature)
    if teacher_logits.dim() < 3:
        raise KDConfigError(
            "teacher_logits", f"must be stacked per teacher, [K, batch, classes], got {tuple(teacher_logits.shape)}"
        )
    k = teacher_logits.shape[0]
    if weights is None:
        log_w = torch.full((k,), -math.log(k), dtype=torch.float64)
    else:
        if len(weights) != k:
            raise KDConfigError("teacher_weights", f"gives {len(weights)} weights for {k} teachers")
        w = torch.as_tensor(list(weights), dtype=torch.float64)
        log_w = (w / w.sum()).log()
    log_p = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    shape = (k,) + (1,) * (log_p.dim() - 1)
    return torch.logsumexp(log_p + log_w.to(log_p).reshape(shape), dim=0)


class EnsembleKDLoss(nn.Module):
    """Ensemble KD: ``w_CE·CE(z_S, y) + w_KD·τ²·KL(p̄ ‖ p_S^τ)`` with ``p̄`` the teachers' mean distribution.

    Called as ``loss(student_logits [B, C], teacher_logits [K, B, C], target [B])``; returns ``{"loss", "ce", "kd"}``.

    Args:
        temperature: τ (the same for every teacher).
        ce_weight: w_CE.
        kd_weight: w_KD.
        teacher_weights: ``w_k`` per teacher, in the order of the stacked logits (normalised to sum to 1);
            ``None``: equal weights.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        teacher_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        if teacher_weights is not None and (
            any(not (math.isfinite(w) and w >= 0) for w in teacher_weights) or sum(teacher_weights) <= 0
        ):
            raise KDConfigError("teacher_weights", f"must be finite, >= 0 and not all 0, got {list(teacher_weights)}")
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.teacher_weights = None if teacher_weights is None else [float(w) for w in teacher_weights]

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        if teacher_logits.dim() != student_logits.dim() + 1:
            raise KDConfigError(
                "teacher_logits",
                f"must be stacked per teacher, [K, *student shape], got {tuple(teacher_logits.shape)} for a student "
                f"{tuple(student_logits.shape)}",
            )
        check_logits(student_logits, teacher_logits[0], target)
        tau = self.temperature
        log_target = ensemble_log_probs(teacher_logits.detach(), tau, self.teacher_weights)
        log_q = F.log_softmax(upcast(student_logits) / tau, dim=-1)
        kd = reduce_items((log_target.exp() * (log_target - log_q)).sum(-1)) * tau**2
        flat = upcast(student_logits).reshape(-1, student_logits.shape[-1])
        ce = F.cross_entropy(flat, target.reshape(-1))
        return weighted_terms({"ce": ce, "kd": kd}, {"ce": self.ce_weight, "kd": self.kd_weight})
