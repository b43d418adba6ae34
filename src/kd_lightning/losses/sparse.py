"""Sparse teacher targets (top-k log-probabilities + tail mass) and the forward KL against them, pure torch.

What ``kd lm-teacher-logits`` stores per token (:mod:`kd_lightning.data.teacher_logits`) and what
``LMDistill(teacher_logits_path=...)`` trains on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.divergences import reduce_items

__all__ = ["Tail", "TopKTargets", "sparse_kl", "topk_targets"]

Tail = Literal["bucket", "zero", "uniform"]
Reduction = Literal["mean", "sum", "none"]


@dataclass
class TopKTargets:
    """Sparse teacher targets of a batch: ``logprobs`` and ``indices`` ``[..., k]``, ``tail_logmass`` ``[...]``.

    ``logprobs`` are float32 (read from fp16), ``indices`` int64, ``tail_logmass`` float32 (``log`` of the
    probability outside the top k; ``-inf`` when there is none). Positions without a stored token
    (padding) hold a uniform top-k with an empty tail; mask them out.
    """

    logprobs: Tensor
    indices: Tensor
    tail_logmass: Tensor

    def __post_init__(self) -> None:
        if self.logprobs.shape != self.indices.shape or self.logprobs.shape[:-1] != self.tail_logmass.shape:
            raise KDConfigError(
                f"TopKTargets: logprobs {tuple(self.logprobs.shape)} and indices {tuple(self.indices.shape)} must be "
                f"[..., k] with tail_logmass [...], got tail_logmass {tuple(self.tail_logmass.shape)}."
            )

    @property
    def k(self) -> int:
        return int(self.logprobs.shape[-1])

    def shifted(self) -> TopKTargets:
        """``[:, :-1]`` of ``[B, T, ...]`` targets: aligned with ``shift_for_next_token``'s logits."""
        return TopKTargets(self.logprobs[:, :-1], self.indices[:, :-1], self.tail_logmass[:, :-1])

    def to(self, device: torch.device | str) -> TopKTargets:
        return TopKTargets(self.logprobs.to(device), self.indices.to(device), self.tail_logmass.to(device))


def topk_targets(logits: Tensor, k: int, temperature: float = 1.0) -> TopKTargets:
    """Exact :class:`TopKTargets` of ``[..., V]`` logits (float32 or float64; what the writer stores before fp16)."""
    check_temperature(temperature)
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise KDConfigError(f"k must be in [1, {vocab}] (the vocabulary), got {k}.")
    logp = F.log_softmax(upcast(logits) / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    if k == vocab:
        tail = torch.full(logp.shape[:-1], -math.inf, dtype=logp.dtype, device=logp.device)
    else:
        tail = torch.logsumexp(logp.scatter(-1, indices, -math.inf), dim=-1)
    return TopKTargets(values, indices, tail)


# ------------------------------------------------------------------------------------------- sparse KL
def sparse_kl(
    student_logits: Tensor,
    targets: TopKTargets,
    mask: Tensor | None = None,
    tail: Tail = "bucket",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward KL ``KL(p_T ‖ q)`` per token from sparse teacher targets (top-k + tail mass).

    With ``K`` the teacher's top-k tokens, ``p_i = exp(logprobs_i)`` and ``P = exp(tail_logmass)``:

    - ``"bucket"`` (default): the tokens outside ``K`` form one bucket on both sides,
      ``Σ_{i∈K} p_i log(p_i/q_i) + P log(P / Q)``, ``Q = Σ_{j∉K} q_j``. Equals the full KL when ``k = V``.
    - ``"zero"``: the teacher is renormalised over ``K`` (no mass outside), ``Σ_{i∈K} p̃_i log(p̃_i/q_i)``.
    - ``"uniform"``: ``P`` is spread evenly over the ``V − k`` other tokens.

    The teacher side (top-k and tail) is renormalised to sum to 1 first (fp16 storage leaves it off by
    about 1e-3), so every variant is ≥ 0 and 0 when the student matches the (sparse) teacher.
    ``temperature`` divides the student logits only: the teacher's targets are used as stored (write
    them at the temperature you train with).

    Args:
        student_logits: ``[..., V]``, aligned with the targets (shift both the same way).
        targets: :class:`TopKTargets` ``[..., k]``.
        mask: ``[...]`` bool, tokens that count.
        tail: ``"bucket"``, ``"zero"`` or ``"uniform"``.
        temperature: of the student's softmax.
        reduction: ``"mean"`` over the masked tokens, ``"sum"`` or ``"none"`` (zero where masked).
    """
    check_temperature(temperature)
    if tail not in ("bucket", "zero", "uniform"):
        raise KDConfigError(f"tail must be 'bucket', 'zero' or 'uniform', got {tail!r}.")
    if reduction not in ("mean", "sum", "none"):
        raise KDConfigError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    if targets.logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise KDConfigError(
            f"targets {tuple(targets.logprobs.shape)} do not match student_logits {tuple(student_logits.shape)} in "
            "their token dimensions (shift both: targets.shifted() with shift_for_next_token's logits)."
        )
    vocab, k = student_logits.shape[-1], targets.k
    if k > vocab:
        raise KDConfigError(f"targets have k = {k} entries per token but the student's vocabulary is {vocab}.")
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    dtype = log_q.dtype
    index = targets.indices.to(device=log_q.device, dtype=torch.long)
    lp = targets.logprobs.to(device=log_q.device, dtype=dtype)
    tail_lm = targets.tail_logmass.to(device=log_q.device, dtype=dtype)
    has_tail = torch.isfinite(tail_lm) & (k < vocab) if tail != "zero" else torch.zeros_like(tail_lm, dtype=torch.bool)
    tail_safe = torch.where(has_tail, tail_lm, torch.zeros_like(tail_lm))
    # Renormalise the teacher side: log Z = logsumexp(top-k ∪ tail).
    pieces = torch.cat([lp, torch.where(has_tail, tail_lm, torch.full_like(tail_lm, -math.inf)).unsqueeze(-1)], -1)
    log_z = torch.logsumexp(pieces, dim=-1)
    lp = lp - log_z.unsqueeze(-1)
    tail_safe = tail_safe - log_z
    lq_k = log_q.gather(-1, index)
    per_token = (lp.exp() * (lp - lq_k)).sum(-1)
    if tail != "zero" and k < vocab:
        p_tail = torch.where(has_tail, tail_safe.exp(), torch.zeros_like(tail_safe))
        if tail == "bucket":
            lq_tail = torch.logsumexp(log_q.scatter(-1, index, -math.inf), dim=-1)
            per_token = per_token + p_tail * (tail_safe - lq_tail)
        else:
            others = vocab - k
            sum_lq_tail = log_q.sum(-1) - lq_k.sum(-1)
            per_token = per_token + p_tail * (tail_safe - math.log(others)) - p_tail / others * sum_lq_tail
    if mask is not None:
        mask = mask.to(per_token.device)
    if reduction == "sum":
        return reduce_items(per_token, mask, "none").sum()
    return reduce_items(per_token, mask, reduction)
