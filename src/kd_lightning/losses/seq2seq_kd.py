"""Word-level knowledge distillation for sequence-to-sequence models (Kim & Rush, EMNLP 2016, "Sequence-Level
Knowledge Distillation", §3.1 word-level KD; Hinton et al. 2015 for the temperature).

Per valid target token ``t`` (teacher forcing on the reference)::

    ℓ_t = w_CE · CE_ε(z^S_t, y_t) + w_KD · τ² · KL(softmax(z^T_t/τ) ‖ softmax(z^S_t/τ))

summed over the valid tokens (the seq2seq task normalises by their count). Plain torch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = ["WordLevelKDLoss", "token_ce_sum", "token_kl_sum"]


def token_ce_sum(logits: Tensor, targets: Tensor, mask: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``Σ_{mask} CE_ε(z_t, y_t)`` over ``[B, T, V]`` logits and ``[B, T]`` targets (float32 or wider)."""
    flat = upcast(logits).reshape(-1, logits.shape[-1])
    safe = targets.masked_fill(~mask, 0).reshape(-1)
    ce = F.cross_entropy(flat, safe, reduction="none", label_smoothing=label_smoothing).reshape(targets.shape)
    return (ce * mask.to(ce.dtype)).sum()


def token_kl_sum(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """``Σ_{mask} KL(p_T^τ ‖ p_S^τ)`` (no τ² factor); the teacher side carries no gradient."""
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_logits).detach() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (kl * mask.to(kl.dtype)).sum()


class WordLevelKDLoss(nn.Module):
    """Word-level KD token sums ``{"loss", "ce", "kd"}`` (see the module docstring).

    Args:
        temperature: τ of the softened distributions (> 0).
        ce_weight: weight of the label cross-entropy.
        kd_weight: weight of ``τ²·KL(p_T ‖ p_S)``.
        label_smoothing: ε of the cross-entropy term, in [0, 1).
        scale_by_temperature_squared: multiply the KL by τ² (Hinton et al.'s gradient-scale correction).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        ce_weight: float = 0.5,
        kd_weight: float = 0.5,
        label_smoothing: float = 0.0,
        scale_by_temperature_squared: bool = True,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        if not 0.0 <= label_smoothing < 1.0:
            raise KDConfigError("label_smoothing", f"must be in [0, 1), got {label_smoothing}")
        self.temperature = temperature
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.label_smoothing = label_smoothing
        self.scale_by_temperature_squared = scale_by_temperature_squared

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, mask: Tensor
    ) -> dict[str, Tensor]:
        """Sums over the tokens of ``mask`` (logits ``[B, T, V]``, targets/mask ``[B, T]``)."""
        terms: dict[str, Tensor] = {}
        if active(self.ce_weight):
            terms["ce"] = token_ce_sum(student_logits, targets, mask, self.label_smoothing)
        if active(self.kd_weight):
            scale = self.temperature**2 if self.scale_by_temperature_squared else 1.0
            terms["kd"] = scale * token_kl_sum(student_logits, teacher_logits, mask, self.temperature)
        return weighted_terms(terms, {"ce": self.ce_weight, "kd": self.kd_weight})
