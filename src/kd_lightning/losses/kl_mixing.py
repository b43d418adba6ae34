"""KL mixing (Zhao et al. 2026, "Decoupling KL and Trajectories", arXiv 2605.16826), pure torch.

The paper decouples the *prefix source* of sequence distillation (teacher or student trajectories)
from the *KL direction* of the per-token loss, and mixes the two directions:
``L_λ = λ·KL(q_θ ‖ p_T) + (1 − λ)·KL(p_T ‖ q_θ)`` (λ = reverse weight). Only this loss transfers to
classification; prefix sources and the entropy-gated length curriculum are sequence-generation
concepts. The divergences are :func:`kd_lightning.losses.divergences.mixed_kl`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import mixed_kl, reduce_items
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = ["MixedKLLoss"]


class MixedKLLoss(nn.Module):
    """``w_CE·CE(z_S, y) + w_KD·τ²·[λ·KL(p_S^τ ‖ p_T^τ) + (1 − λ)·KL(p_T^τ ‖ p_S^τ)]``.

    ``λ = 0`` is Hinton KD's soft-target term (forward KL, :class:`~kd_lightning.losses.KDLoss`),
    ``λ = 1`` the reverse (mode-seeking, on-policy-distillation) KL. The paper finds a forward-heavy
    mix (small λ) keeps most of reverse KL's accuracy with a higher student entropy; its λ grid is
    not reported (only curves), so the default λ = 0.25 is the spec's suggestion **[UNVERIFIED]**.
    The τ² factor and the CE term are this library's classification choices (the paper distils LMs
    at τ = 1 without labels: use ``temperature=1, ce_weight=0`` there).

    Logits are ``[..., C]`` (a ``[B, C]`` batch or ``[B, T, V]`` tokens); every term is averaged
    over the items selected by ``mask`` (all items without one). The teacher logits are detached.
    Returns ``{"loss", "ce", "kd"}`` with the weighted terms (``ce + kd = loss``; without ``ce`` when there is
    no target or ``ce_weight = 0``).

    Args:
        reverse_weight: λ in ``[0, 1]``, the weight of the reverse KL.
        temperature: τ, applied to both distributions.
        ce_weight: w_CE, weight of the cross-entropy on the labels (0 needs no labels).
        kd_weight: w_KD, weight of the mixed KL.
    """

    def __init__(
        self, reverse_weight: float = 0.25, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9
    ) -> None:
        super().__init__()
        if not 0.0 <= reverse_weight <= 1.0:
            raise KDConfigError(f"reverse_weight must be in [0, 1], got {reverse_weight}.")
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        self.reverse_weight = reverse_weight
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target)
        if target is None and self.ce_weight != 0:
            raise KDConfigError(f"MixedKLLoss with ce_weight={self.ce_weight} needs a target (or set ce_weight=0).")
        tau = self.temperature
        terms = {"kd": mixed_kl(student_logits, teacher_logits.detach(), self.reverse_weight, tau, mask)}
        if target is not None and active(self.ce_weight):
            flat = upcast(student_logits.reshape(-1, student_logits.shape[-1]))
            per_item = F.cross_entropy(flat, target.reshape(-1), reduction="none").reshape(target.shape)
            terms = {"ce": reduce_items(per_item, mask), **terms}
        return weighted_terms(terms, {"ce": self.ce_weight, "kd": self.kd_weight * tau**2})

    def extra_repr(self) -> str:
        return (
            f"reverse_weight={self.reverse_weight}, temperature={self.temperature}, "
            f"ce_weight={self.ce_weight}, kd_weight={self.kd_weight}"
        )
