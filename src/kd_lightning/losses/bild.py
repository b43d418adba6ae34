"""Logit-difference distillation: BiLD (Li, Zhou, Song; COLING 2025) and a DBiLD-style reconstruction.

BiLD (arXiv 2406.13555) keeps the top-k logits of a *leader* (teacher or student), forms every
pairwise difference among them and matches the two models' distributions over those pairs::

    idx   = topk(z_leader, k)                          (indices; no gradient)
    d_ij  = (z[idx_i] − z[idx_j]) / τ                  for i < j: k(k−1)/2 pairs
    L_LD  = KL( softmax(d^T) ‖ softmax(d^S) )          (over the pairs; no τ² factor)
    BiLD  = L_LD(leader = teacher)  [t-LD]  +  L_LD(leader = student)  [s-LD]

Verified against the official ``fpcsong/BiLD`` (``distil_losses/BILD.py``, ``trainers/custom_trainer.py``):
official k = 8, τ = 3, no CE term (its trainer adds a T=1 KL on prompt tokens, not reproduced here).

DBiLD (Switch-KD, arXiv 2604.14629) has no released training code; :class:`DBiLDLoss` is a
**RECONSTRUCTION** from the abstract ("dynamic", "bidirectional", "reverse KL"): see its docstring.

Logits may be ``[B, C]`` or ``[..., V]`` (tokens); ``mask`` (leading shape, boolean) selects the items
that count. Computed in at least float32; teacher logits are detached.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import Reduction, forward_kl, mixed_kl, reduce_items, reverse_kl
from kd_lightning.losses.terms import active, check_weights, weighted_terms

Leader = Literal["teacher", "student"]
#: The two branches of BiLD, in the order their terms are summed: t-LD, then s-LD.
LEADERS: tuple[Leader, Leader] = ("teacher", "student")

__all__ = [
    "BiLDLoss",
    "DBiLDLoss",
    "dynamic_k",
    "dynamic_logit_difference_kl",
    "logit_difference_kl",
    "pair_differences",
]


def pair_differences(values: Tensor) -> Tensor:
    """All pairwise differences ``values[..., i] − values[..., j]`` for ``i < j``.

    ``[..., k] → [..., k(k−1)/2]``, pairs in the row-major order of ``torch.triu_indices(k, k, 1)``:
    (0,1), (0,2), …, (0,k−1), (1,2), …
    """
    k = values.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1, device=values.device)
    return values[..., i] - values[..., j]


def _check_k(k: int, name: str, minimum: int = 2) -> None:
    if k < minimum:
        raise KDConfigError(f"{name} must be >= {minimum} (the pairs of {minimum} logits at least), got {k}.")


def _check_k_fits(k: int, num_classes: int, name: str) -> None:
    if k > num_classes:
        raise KDConfigError(
            f"{name}={k} is larger than the {num_classes} classes of the logits: use {name} <= {num_classes} "
            f"({name}={num_classes} compares every pair of classes)."
        )


def _leader_logits(student_logits: Tensor, teacher_logits: Tensor, leader: Leader) -> Tensor:
    if leader == "teacher":
        return teacher_logits
    if leader == "student":
        return student_logits
    raise KDConfigError(f"leader must be 'teacher' or 'student', got {leader!r}.")


def _gather_top(student_logits: Tensor, teacher_logits: Tensor, k: int, leader: Leader) -> tuple[Tensor, Tensor]:
    """Student and (detached) teacher logits at the leader's top-``k`` classes, largest first."""
    s, t = upcast(student_logits), upcast(teacher_logits).detach()
    idx = _leader_logits(s, t, leader).detach().topk(k, dim=-1).indices
    return s.gather(-1, idx), t.gather(-1, idx)


def _directed_kl(
    student: Tensor,
    teacher: Tensor,
    reverse_weight: float,
    temperature: float,
    mask: Tensor | None,
    reduction: Reduction,
) -> Tensor:
    if reverse_weight == 0.0:
        return forward_kl(student, teacher, temperature, mask, reduction)
    if reverse_weight == 1.0:
        return reverse_kl(student, teacher, temperature, mask, reduction)
    return mixed_kl(student, teacher, reverse_weight, temperature, mask, reduction)


def logit_difference_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    top_k: int = 8,
    temperature: float = 3.0,
    leader: Leader = "teacher",
    reverse_weight: float = 0.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """One logit-difference (LD) term of BiLD: t-LD for ``leader="teacher"``, s-LD for ``"student"``.

    ``KL(softmax(d^T/τ) ‖ softmax(d^S/τ))`` over the ``k(k−1)/2`` pairwise differences of the logits
    at the leader's top-``k`` classes, per item (no τ²). ``reverse_weight`` λ mixes in the reverse
    direction, ``λ·KL(S‖T) + (1−λ)·KL(T‖S)`` (0: BiLD's forward KL). ``top_k`` may equal the class
    count (every pair); larger is an error.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    _check_k(top_k, "top_k")
    _check_k_fits(top_k, student_logits.shape[-1], "top_k")
    if not 0.0 <= reverse_weight <= 1.0:
        raise KDConfigError(f"reverse_weight must be in [0, 1], got {reverse_weight}.")
    s, t = _gather_top(student_logits, teacher_logits, top_k, leader)
    return _directed_kl(pair_differences(s), pair_differences(t), reverse_weight, temperature, mask, reduction)


def dynamic_k(logits: Tensor, mass: float = 0.9, k_min: int = 3, k_max: int = 16, temperature: float = 1.0) -> Tensor:
    """Per item, the smallest ``k`` whose top-``k`` softmax mass reaches ``mass``, clipped to ``[k_min, k_max]``.

    ``k = min{k : Σ_{i≤k} sort↓(softmax(z/τ_m))_i ≥ ρ}``; ``k_max`` is capped at the class count.
    Returns a ``long`` tensor of the leading shape. No gradient.
    """
    if not 0.0 < mass <= 1.0:
        raise KDConfigError(f"mass must be in (0, 1], got {mass}.")
    check_temperature(temperature, "mass_temperature")
    _check_k(k_min, "k_min")
    if k_max < k_min:
        raise KDConfigError(f"k_max must be >= k_min, got k_max={k_max} and k_min={k_min}.")
    num_classes = logits.shape[-1]
    _check_k_fits(k_min, num_classes, "k_min")
    k_cap = min(k_max, num_classes)
    probs = F.softmax(upcast(logits).detach() / temperature, dim=-1)
    top_mass = probs.topk(k_cap, dim=-1).values.cumsum(-1)
    k = (top_mass < mass).sum(-1) + 1  # k_cap + 1 when the top k_cap never reach the mass: clipped below
    return k.clamp(min=k_min, max=k_cap)


def _masked_pair_log_softmax(diffs: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """``log_softmax(diffs/τ)`` over the valid pairs only; 0 (not −inf) at invalid pairs."""
    log_p = F.log_softmax((diffs / temperature).masked_fill(~valid, float("-inf")), dim=-1)
    return torch.where(valid, log_p, torch.zeros_like(log_p))


def dynamic_logit_difference_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    leader: Leader = "teacher",
    mass: float = 0.9,
    k_min: int = 3,
    k_max: int = 16,
    temperature: float = 3.0,
    mass_temperature: float = 1.0,
    k_source: Literal["leader", "teacher"] = "leader",
    reverse_weight: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """LD term with a per-item ``k`` (:func:`dynamic_k`): pairs beyond an item's ``k`` are left out.

    The leader's top ``min(k_max, C)`` classes are gathered; pair ``(i, j)`` (``i < j`` in the
    leader's order) takes part iff ``j < k_item``, and both pair distributions are normalised over
    the pairs that take part, so the others contribute nothing (value and gradient).
    ``k_source="leader"`` takes each branch's ``k`` from its leader's distribution,
    ``"teacher"`` from the teacher's in both branches. ``reverse_weight`` 1 is ``KL(S‖T)``, 0 ``KL(T‖S)``.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    if not 0.0 <= reverse_weight <= 1.0:
        raise KDConfigError(f"reverse_weight must be in [0, 1], got {reverse_weight}.")
    if k_source not in ("leader", "teacher"):
        raise KDConfigError(f"k_source must be 'leader' or 'teacher', got {k_source!r}.")
    source = _leader_logits(student_logits, teacher_logits, leader) if k_source == "leader" else teacher_logits
    k_item = dynamic_k(source, mass, k_min, k_max, mass_temperature)
    k_cap = min(k_max, student_logits.shape[-1])
    s, t = _gather_top(student_logits, teacher_logits, k_cap, leader)
    _, j = torch.triu_indices(k_cap, k_cap, offset=1, device=s.device)
    valid = j < k_item.unsqueeze(-1)  # [..., pairs]
    log_s = _masked_pair_log_softmax(pair_differences(s), valid, temperature)
    log_t = _masked_pair_log_softmax(pair_differences(t), valid, temperature)
    zero = torch.zeros((), dtype=log_s.dtype, device=log_s.device)
    per_item = zero
    if reverse_weight < 1.0:  # KL(T ‖ S); p = 0 at invalid pairs, whose logs are 0
        per_item = per_item + (1.0 - reverse_weight) * (torch.where(valid, log_t.exp(), zero) * (log_t - log_s)).sum(-1)
    if reverse_weight > 0.0:  # KL(S ‖ T)
        per_item = per_item + reverse_weight * (torch.where(valid, log_s.exp(), zero) * (log_s - log_t)).sum(-1)
    return reduce_items(per_item, mask, reduction)


def _masked_cross_entropy(student_logits: Tensor, target: Tensor | None, mask: Tensor | None) -> Tensor:
    if target is None:
        raise KDConfigError("target is required when ce_weight != 0 (set ce_weight=0 to train without labels).")
    check_logits(student_logits, None, target)
    flat = upcast(student_logits).reshape(-1, student_logits.shape[-1])
    ce = F.cross_entropy(flat, target.reshape(-1), reduction="none").reshape(target.shape)
    return reduce_items(ce, mask)


class _BidirectionalLD(nn.Module):
    """``w_KD·(t-LD + s-LD) + w_CE·CE`` for a subclass's per-leader term :meth:`leader_kl`."""

    kd_weight: float
    ce_weight: float

    def leader_kl(
        self, student_logits: Tensor, teacher_logits: Tensor, leader: Leader, mask: Tensor | None, reduction: Reduction
    ) -> Tensor:
        raise NotImplementedError

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        terms = {
            f"{leader[0]}_ld": self.leader_kl(student_logits, teacher_logits, leader, mask, "mean")
            for leader in LEADERS
        }
        if active(self.ce_weight):
            terms["ce"] = _masked_cross_entropy(student_logits, target, mask)
        return weighted_terms(terms, {"t_ld": self.kd_weight, "s_ld": self.kd_weight, "ce": self.ce_weight})

    def token_sum(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
        """``w_KD·Σ_items (t-LD + s-LD)`` over the items of ``mask`` (no CE): a token objective of LMDistill."""
        sums = {
            leader: self.leader_kl(student_logits, teacher_logits, leader, mask, "none").sum() for leader in LEADERS
        }
        return weighted_terms(sums, dict.fromkeys(LEADERS, self.kd_weight))["loss"]


class BiLDLoss(_BidirectionalLD):
    """BiLD (COLING 2025): ``w_KD·(t-LD + s-LD) + w_CE·CE``; see :func:`logit_difference_kl`.

    Args:
        top_k: k, logits kept per leader (official 8); ``≤`` the class count (an error otherwise).
            k = 2 leaves a single pair, whose distribution is constant: the LD terms are then 0.
        temperature: τ of the pair distributions (official 3); no τ² factor.
        kd_weight: w_KD, weight of t-LD and s-LD.
        ce_weight: w_CE of a cross-entropy on the labels. The paper uses none (0, the default here);
            classification runs want one.

    ``forward(student_logits, teacher_logits, target=None, mask=None)`` returns
    ``{"loss", "t_ld", "s_ld"}`` plus ``"ce"`` when ``ce_weight != 0`` (weighted parts).
    """

    def __init__(self, top_k: int = 8, temperature: float = 3.0, kd_weight: float = 1.0, ce_weight: float = 0.0):
        super().__init__()
        _check_k(top_k, "top_k")
        check_temperature(temperature)
        check_weights(kd_weight=kd_weight, ce_weight=ce_weight)
        self.top_k = top_k
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight

    def leader_kl(
        self, student_logits: Tensor, teacher_logits: Tensor, leader: Leader, mask: Tensor | None, reduction: Reduction
    ) -> Tensor:
        """One LD term: :func:`logit_difference_kl` with this loss's k and τ."""
        return logit_difference_kl(
            student_logits, teacher_logits, self.top_k, self.temperature, leader, 0.0, mask, reduction
        )


class DBiLDLoss(_BidirectionalLD):
    """DBiLD-style loss — **RECONSTRUCTION**, not the Switch-KD authors' code (none is released).

    Switch-KD (Sun et al., CVPR Findings 2026, arXiv 2604.14629) names "Dynamic Bi-directional
    Logits Difference" loss, aligning "informative probability regions" with bidirectional
    supervision and reverse KL. Reconstructed here as BiLD with (i) a per-item dynamic ``k``
    (:func:`dynamic_k`: the smallest k whose top-k softmax mass reaches ρ, clipped to
    ``[k_min, k_max]``; pairs beyond k left out) and (ii) reverse KL on the pair distributions::

        L = w_KD·(LD_ρ(leader=T) + LD_ρ(leader=S)) + w_CE·CE,
        LD_ρ = λ·KL(softmax(d^S/τ) ‖ softmax(d^T/τ)) + (1−λ)·KL(softmax(d^T/τ) ‖ softmax(d^S/τ))

    Every choice below is UNVERIFIED and an argument: ρ, k_min, k_max, τ, the temperature of the
    mass rule, whose distribution sets k, and the KL direction/mix.

    Args:
        mass: ρ, the softmax mass the top-k must reach.
        k_min: smallest k (≥ 2). 3 by default: an item with k = 2 has a single pair, a constant
            distribution, and contributes 0 — with ρ = 0.9 a confident leader would otherwise
            silence most samples.
        k_max: largest k; capped at the class count.
        temperature: τ of the pair distributions (BiLD's 3 by default).
        reverse_weight: λ; 1 = reverse KL (the README's word), 0 = BiLD's forward KL.
        mass_temperature: temperature of the softmax that the mass rule reads.
        k_source: ``"leader"`` (each branch's k from its own leader) or ``"teacher"`` (both from the teacher).
        kd_weight: w_KD.
        ce_weight: w_CE (0: no labels needed).

    Returns ``{"loss", "t_ld", "s_ld"}`` plus ``"ce"`` when ``ce_weight != 0``.
    """

    def __init__(
        self,
        mass: float = 0.9,
        k_min: int = 3,
        k_max: int = 16,
        temperature: float = 3.0,
        reverse_weight: float = 1.0,
        mass_temperature: float = 1.0,
        k_source: Literal["leader", "teacher"] = "leader",
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 < mass <= 1.0:
            raise KDConfigError(f"mass must be in (0, 1], got {mass}.")
        _check_k(k_min, "k_min")
        if k_max < k_min:
            raise KDConfigError(f"k_max must be >= k_min, got k_max={k_max} and k_min={k_min}.")
        check_temperature(temperature)
        check_temperature(mass_temperature, "mass_temperature")
        if not 0.0 <= reverse_weight <= 1.0:
            raise KDConfigError(f"reverse_weight must be in [0, 1], got {reverse_weight}.")
        if k_source not in ("leader", "teacher"):
            raise KDConfigError(f"k_source must be 'leader' or 'teacher', got {k_source!r}.")
        check_weights(kd_weight=kd_weight, ce_weight=ce_weight)
        self.mass = mass
        self.k_min = k_min
        self.k_max = k_max
        self.temperature = temperature
        self.reverse_weight = reverse_weight
        self.mass_temperature = mass_temperature
        self.k_source = k_source
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight

    def dynamic_k(self, logits: Tensor) -> Tensor:
        """The per-item k this loss uses for a leader's ``logits``."""
        return dynamic_k(logits, self.mass, self.k_min, self.k_max, self.mass_temperature)

    def leader_kl(
        self, student_logits: Tensor, teacher_logits: Tensor, leader: Leader, mask: Tensor | None, reduction: Reduction
    ) -> Tensor:
        """One LD term: :func:`dynamic_logit_difference_kl` with this loss's settings."""
        return dynamic_logit_difference_kl(
            student_logits,
            teacher_logits,
            leader,
            self.mass,
            self.k_min,
            self.k_max,
            self.temperature,
            self.mass_temperature,
            self.k_source,
            self.reverse_weight,
            mask,
            reduction,
        )
