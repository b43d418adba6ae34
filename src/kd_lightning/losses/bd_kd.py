"""BD-KD: Balancing the Divergences for online KD (Amara et al.; arXiv 2212.12965) — pure torch.

**RECONSTRUCTION / UNVERIFIED.** The paper states (abstract level) that the student's KL term is a
per-sample weighted combination of forward KL ``KL(p_T‖p_S)`` and reverse KL ``KL(p_S‖p_T)`` guided
by the teacher-student entropy gap, and that the teacher is regularised by a reverse KL. The exact
weighting rule and weights below are a reconstruction (no official code; paper body not read); every
uncertain choice is an argument.

With ``p = softmax(z/τ)``, ``Δ_i = H(p_S,i) − H(p_T,i)`` (from detached probabilities)::

    hard:     w_r,i = λ_r if Δ_i > 0 else λ_0        w_f,i = λ_f if Δ_i ≤ 0 else λ_0
    sigmoid:  w_r,i = λ_r·σ(κ·Δ_i)                    w_f,i = λ_f·(1 − σ(κ·Δ_i))
    L_S = w_CE·CE(z_S, y) + α·τ²·(1/B) Σ_i [w_f,i·KL(p_T,i‖p_S,i) + w_r,i·KL(p_S,i‖p_T,i)]   (p_T detached)
    L_T = w_CE·CE(z_T, y) + β·τ²·(1/B) Σ_i KL_teacher,i                                   (p_S detached)

A student less confident than its teacher (Δ > 0) gets the mode-seeking reverse KL, an
over-confident one (Δ ≤ 0) the mean-seeking forward KL. ``KL_teacher`` is ``KL(p_S‖p_T)``
(``teacher_kl="reverse"``, the library's reverse-KL convention with the teacher as the optimised
argument; the spec's default) or ``KL(p_T‖p_S)`` (``"forward"``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import entropy, forward_kl, reverse_kl
from kd_lightning.losses.terms import check_weights, weighted_terms

Weighting = Literal["hard", "sigmoid"]

__all__ = ["BDKDLoss", "bd_kd_weights"]


def bd_kd_weights(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    weighting: Weighting = "hard",
    forward_weight: float = 1.0,
    reverse_weight: float = 1.0,
    other_weight: float = 0.0,
    sharpness: float = 5.0,
) -> tuple[Tensor, Tensor]:
    """Per-item ``(w_f, w_r)`` of BD-KD from the entropy gap ``Δ = H(p_S) − H(p_T)`` at ``temperature``.

    Computed without gradient (the weights are constants of the loss). ``forward_weight`` = λ_f,
    ``reverse_weight`` = λ_r, ``other_weight`` = λ_0 (the weight of the divergence that is switched
    off by the hard rule), ``sharpness`` = κ of the sigmoid rule (λ_0 unused there). Shapes: the
    leading shape of the logits.
    """
    check_temperature(temperature)
    if weighting not in ("hard", "sigmoid"):
        raise KDConfigError(f"weighting must be 'hard' or 'sigmoid', got {weighting!r}.")
    with torch.no_grad():
        gap = entropy(student_logits.detach(), temperature, reduction="none") - entropy(
            teacher_logits.detach(), temperature, reduction="none"
        )
        if weighting == "hard":
            student_less_confident = gap > 0
            lam_f, lam_r, lam_0 = (gap.new_tensor(w) for w in (forward_weight, reverse_weight, other_weight))
            w_r = torch.where(student_less_confident, lam_r, lam_0)
            w_f = torch.where(student_less_confident, lam_0, lam_f)
        else:
            share = torch.sigmoid(sharpness * gap)
            w_r = reverse_weight * share
            w_f = forward_weight * (1.0 - share)
    return w_f, w_r


class BDKDLoss(nn.Module):
    """BD-KD loss of both networks (online KD); **RECONSTRUCTION / UNVERIFIED** (see the module docstring).

    Called as ``loss(student_logits, teacher_logits, target)``: both logits carry gradients (both
    networks train). The student terms treat the teacher as a constant and the teacher terms the
    student, so back-propagating ``"loss"`` (= L_S + L_T) gives each network exactly the gradient
    of its own objective. Returns ``{"loss", "ce", "kd_forward", "kd_reverse", "teacher_ce",
    "teacher_kl"}``: weighted terms, the first three sum to L_S, the last two to L_T (terms of weight 0
    are left out).

    Args:
        temperature: τ of the divergences and of the entropies.
        kd_weight: α, weight of the student's balanced KL.
        teacher_kd_weight: β, weight of the teacher's KL regulariser.
        ce_weight: w_CE of both networks' cross-entropy.
        weighting: ``"hard"`` switch on the sign of Δ, or the smooth ``"sigmoid"`` variant (a design
            choice, not from the paper).
        forward_weight: λ_f.
        reverse_weight: λ_r.
        other_weight: λ_0 (hard rule only).
        sharpness: κ (sigmoid rule only).
        teacher_kl: ``"reverse"``: ``KL(p_S‖p_T)``; ``"forward"``: ``KL(p_T‖p_S)`` (both with p_S detached).
    """

    def __init__(
        self,
        temperature: float = 4.0,
        kd_weight: float = 1.0,
        teacher_kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        weighting: Weighting = "hard",
        forward_weight: float = 1.0,
        reverse_weight: float = 1.0,
        other_weight: float = 0.0,
        sharpness: float = 5.0,
        teacher_kl: Literal["reverse", "forward"] = "reverse",
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        if weighting not in ("hard", "sigmoid"):
            raise KDConfigError(f"weighting must be 'hard' or 'sigmoid', got {weighting!r}.")
        if teacher_kl not in ("reverse", "forward"):
            raise KDConfigError(f"teacher_kl must be 'reverse' or 'forward', got {teacher_kl!r}.")
        for name, value in (
            ("forward_weight", forward_weight),
            ("reverse_weight", reverse_weight),
            ("other_weight", other_weight),
        ):
            if value < 0:
                raise KDConfigError(f"{name} must be >= 0, got {value}.")
        check_weights(kd_weight=kd_weight, teacher_kd_weight=teacher_kd_weight, ce_weight=ce_weight)
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.teacher_kd_weight = teacher_kd_weight
        self.ce_weight = ce_weight
        self.weighting = weighting
        self.forward_weight = forward_weight
        self.reverse_weight = reverse_weight
        self.other_weight = other_weight
        self.sharpness = sharpness
        self.teacher_kl = teacher_kl

    def weights(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Per-item ``(w_f, w_r)`` (no gradient); see :func:`bd_kd_weights`."""
        return bd_kd_weights(
            student_logits,
            teacher_logits,
            self.temperature,
            self.weighting,
            self.forward_weight,
            self.reverse_weight,
            self.other_weight,
            self.sharpness,
        )

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target)
        tau, scale = self.temperature, self.temperature**2
        s = upcast(student_logits.reshape(-1, student_logits.shape[-1]))
        t = upcast(teacher_logits.reshape(-1, teacher_logits.shape[-1]))
        y = target.reshape(-1)
        s_const, t_const = s.detach(), t.detach()
        w_f, w_r = self.weights(s_const, t_const)
        # Student: the teacher is a constant.
        fkl = forward_kl(s, t_const, tau, reduction="none")
        rkl = reverse_kl(s, t_const, tau, reduction="none")
        kd_forward, kd_reverse = (w_f * fkl).mean(), (w_r * rkl).mean()
        ce = F.cross_entropy(s, y)
        # Teacher: the student is a constant.
        divergence = reverse_kl if self.teacher_kl == "reverse" else forward_kl  # KL(p_S‖p_T) or KL(p_T‖p_S)
        teacher_kl = divergence(s_const, t, tau)
        terms = {
            "ce": ce,
            "kd_forward": kd_forward,
            "kd_reverse": kd_reverse,
            "teacher_ce": F.cross_entropy(t, y),
            "teacher_kl": teacher_kl,
        }
        kd = self.kd_weight * scale
        weights = {"kd_forward": kd, "kd_reverse": kd, "teacher_kl": self.teacher_kd_weight * scale}
        return weighted_terms(terms, {"ce": self.ce_weight, "teacher_ce": self.ce_weight, **weights})
