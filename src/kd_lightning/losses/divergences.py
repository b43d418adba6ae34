"""Divergences between categorical distributions given as logits, per item or reduced (pure torch).

An *item* is one distribution: a sample of a ``[B, C]`` batch or a token of a ``[B, T, V]`` batch
(any ``[..., C]`` shape works). Every function computes in at least float32 and takes an optional
boolean ``mask`` of the leading shape: reduced values average (``"mean"``) or add up (``"sum"``, for
normalisations over several batches, e.g. language-model tokens over gradient accumulation) over the
items where it is true (tokens of padding, for instance, are left out). Teacher logits are *not*
detached here: these are building blocks; the losses that use them decide what is a constant.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast

Reduction = Literal["mean", "sum", "none"]

__all__ = [
    "entropy",
    "forward_kl",
    "kl_divergence",
    "mixed_kl",
    "reduce_items",
    "reverse_kl",
]


def reduce_items(values: Tensor, mask: Tensor | None = None, reduction: Reduction = "mean") -> Tensor:
    """Average (or sum) per-item ``values`` (shape ``[...]``) over the items selected by ``mask``.

    ``reduction="none"`` returns ``values`` with masked items set to zero; ``"sum"`` their sum.
    """
    if mask is not None:
        if mask.shape != values.shape:
            raise KDConfigError(f"mask must have the items' shape {tuple(values.shape)}, got {tuple(mask.shape)}.")
        values = values * mask.to(values.dtype)
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction != "mean":
        raise KDConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    count = values.numel() if mask is None else mask.sum()
    return values.sum() / torch.as_tensor(count, dtype=values.dtype, device=values.device).clamp_min(1)


def kl_divergence(
    target_logits: Tensor,
    input_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """``KL(softmax(target/τ) ‖ softmax(input/τ))`` per item, summed over classes.

    Computed from log-softmax on both sides, so near-zero probabilities never meet a ``log(0)``.
    No ``τ²`` factor (multiply by it where a method's gradient scale calls for it).
    """
    check_temperature(temperature)
    log_p = F.log_softmax(upcast(target_logits) / temperature, dim=-1)
    log_q = F.log_softmax(upcast(input_logits) / temperature, dim=-1)
    return reduce_items((log_p.exp() * (log_p - log_q)).sum(-1), mask, reduction)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward (mean-seeking) KL, ``KL(p_T ‖ p_S)``: the KD and SFT direction."""
    return kl_divergence(teacher_logits, student_logits, temperature, mask, reduction)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Reverse (mode-seeking) KL, ``KL(p_S ‖ p_T)``: the on-policy / RL direction."""
    return kl_divergence(student_logits, teacher_logits, temperature, mask, reduction)


def mixed_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    reverse_weight: float = 0.25,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """KL mixing (Zhao et al. 2026, "Decoupling KL and Trajectories"): ``λ·KL(p_S‖p_T) + (1−λ)·KL(p_T‖p_S)``.

    ``λ = reverse_weight``: 0 is forward KL, 1 reverse KL; the paper recommends a forward-heavy
    mix (small λ) for long sequences.
    """
    if not 0.0 <= reverse_weight <= 1.0:
        raise KDConfigError(f"reverse_weight must be in [0, 1], got {reverse_weight}.")
    fkl = forward_kl(student_logits, teacher_logits, temperature, mask, "none")
    rkl = reverse_kl(student_logits, teacher_logits, temperature, mask, "none")
    return reduce_items(reverse_weight * rkl + (1.0 - reverse_weight) * fkl, mask, reduction)


def entropy(
    logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None, reduction: Reduction = "mean"
) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits/τ)`` per item."""
    check_temperature(temperature)
    log_p = F.log_softmax(upcast(logits) / temperature, dim=-1)
    return reduce_items(-(log_p.exp() * log_p).sum(-1), mask, reduction)
