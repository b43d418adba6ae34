"""Token-level distillation objectives for language models, with global token normalisation (pure torch).

Conventions shared by every function here:

- **Logits** are ``[..., V]`` (``[B, T, V]`` after :func:`shift_for_next_token`); every item (token) is one
  distribution. Softmaxes and logs are computed in at least float32 (float64 stays float64).
- ``p`` is the teacher's distribution ``softmax(z_T/τ)``, ``q`` the student's ``softmax(z_S/τ)``; there is
  no ``τ²`` factor (multiply where a method's gradient scale calls for it).
- The teacher is a constant: its logits are detached, gradients reach the student only.
- Logits must be finite: leave vocabulary entries out with a large negative number, not ``-inf``.
- ``mask`` (boolean, the items' shape) selects the tokens that count; ``reduction`` is ``"mean"`` (over the
  selected tokens of this call: plain use), ``"sum"`` (for :func:`normalize_token_sum`, which divides by
  the valid tokens of the whole gradient-accumulation group on every rank) or ``"none"`` (per token,
  zero where masked).

Objectives (``TOKEN_OBJECTIVES``, built with :func:`token_objective`): forward KL ``KL(p‖q)``, reverse KL
``KL(q‖p)``, generalised JSD(β) (GKD), skew KL and skew reverse KL (DistiLLM), total variation, and
λ-mixed KL. TAID, AdaKD and DBiLD take ``[..., V]`` logits with masks in ``losses/taid.py``,
``losses/adakd.py`` and ``losses/bild.py``; their functional forms accept ``reduction="sum"``.

Example:
    >>> import torch
    >>> s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    >>> labels = torch.randint(0, 11, (2, 5))
    >>> s_shift, targets, mask = shift_for_next_token(s, labels)
    >>> loss = token_objective("jsd", beta=0.5)(s_shift, t[:, :-1], mask=mask)
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.divergences import forward_kl as _forward_kl
from kd_lightning.losses.divergences import mixed_kl as _mixed_kl
from kd_lightning.losses.divergences import reduce_items
from kd_lightning.losses.divergences import reverse_kl as _reverse_kl

__all__ = [
    "IGNORE_INDEX",
    "TOKEN_OBJECTIVES",
    "align_vocab",
    "check_vocab_sizes",
    "count_valid_tokens",
    "forward_kl",
    "generalized_jsd",
    "log_mixture_ratio",
    "mixed_kl",
    "normalize_token_sum",
    "reverse_kl",
    "shift_for_next_token",
    "skew_kl",
    "skew_reverse_kl",
    "token_cross_entropy",
    "token_objective",
    "total_variation",
]

IGNORE_INDEX = -100
Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------- shifting
def shift_for_next_token(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor, Tensor]:
    """Align next-token predictions with their targets: ``(logits[:, :-1], labels[:, 1:], mask)``.

    Position ``t``'s logits predict ``labels[t + 1]`` (the HF convention); ``mask`` is
    ``labels[:, 1:] != ignore_index``. Shift the teacher's logits the same way (``teacher_logits[:, :-1]``).

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids with ``ignore_index`` at positions that must not be predicted.
        ignore_index: label of those positions.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise KDConfigError(
            f"shift_for_next_token needs logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    targets = labels[:, 1:]
    return logits[:, :-1], targets, targets != ignore_index


def count_valid_tokens(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of predicted tokens of a ``[B, T]`` label batch after the shift (``labels[:, 1:] != ignore_index``)."""
    return (labels[:, 1:] != ignore_index).sum()


# -------------------------------------------------------------------------------------- normalisation
def normalize_token_sum(
    loss_sum: Tensor,
    num_items_in_batch: Tensor | int,
    accumulate_grad_batches: int = 1,
    world_size: int | None = None,
) -> Tensor:
    """Scale a per-micro-batch token-loss *sum* so the optimizer sees the mean over the whole group's tokens.

    Lightning divides the value returned by ``training_step`` by ``accumulate_grad_batches`` (also in an
    epoch's last, incomplete group) and DDP averages gradients over ``world_size`` ranks. Returning::

        loss_sum · accumulate_grad_batches · world_size / N,   N = Σ_ranks num_items_in_batch

    makes the accumulated gradient ``∇(Σ over every valid token of the group's micro-batches on every
    rank of the per-token loss) / N``: each token weighs the same, however the tokens fall into
    micro-batches and ranks (the mean of per-micro-batch means does not have this property).

    Args:
        loss_sum: the micro-batch's loss with ``reduction="sum"`` over its valid tokens.
        num_items_in_batch: valid tokens of the micro-batch's accumulation group on this rank (the batch
            key of the same name, from :class:`~kd_lightning.data.text.TextDataModule`).
        accumulate_grad_batches: ``trainer.accumulate_grad_batches``.
        world_size: ranks whose gradients are averaged; ``None`` reads ``torch.distributed`` (1 when it is
            not initialised).

    When ``torch.distributed`` is initialised with more than one process, the token count is
    all-reduced (every rank must call this once per micro-batch); the result carries no gradient
    through the count. A group without valid tokens gives ``loss_sum · 0`` (no NaN).
    """
    if accumulate_grad_batches < 1:
        raise KDConfigError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}.")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    if world_size < 1:
        raise KDConfigError(f"world_size must be >= 1, got {world_size}.")
    count = torch.as_tensor(num_items_in_batch, device=loss_sum.device).detach().to(torch.long).reshape(())
    if distributed:
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return loss_sum * (accumulate_grad_batches * world_size) / count.clamp_min(1).to(loss_sum.dtype)


# ---------------------------------------------------------------------------------------------- helpers
def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() < 1 or student_logits.shape != teacher_logits.shape:
        hint = (
            "the vocabularies differ: align them with kd_lightning.losses.lm.align_vocab"
            if student_logits.shape[:-1] == teacher_logits.shape[:-1]
            else "the token shapes differ (shift both logits the same way)"
        )
        raise KDConfigError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            f"do not match: {hint}."
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise KDConfigError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``(log q, log p)`` at temperature ``τ``; the teacher side detached."""
    _check_pair(student_logits, teacher_logits)
    check_temperature(temperature)
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_logits).detach() / temperature, dim=-1)
    return log_q, log_p


_EXPM1_LIMIT = 20.0


def log_mixture_ratio(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """``log((1 − w)·a + w·b) − log a`` elementwise from log-probabilities, for ``w`` in (0, 1), accurate
    *relative to w* (``KL(a ‖ mixture) = −Σ a·log_mixture_ratio(log a, log b, w)``).

    ``log1p(w·expm1(log b − log a))`` has no cancellation when ``w`` is small (what lets the generalised
    JSD be divided by β or 1 − β and stay continuous at the ends); where that argument nears −1 or
    ``expm1`` would overflow, ``logaddexp`` is exact enough (there ``w`` is not small). Both branches get
    finite inputs, so gradients never meet a NaN.
    """
    delta = log_b - log_a
    x = weight * torch.expm1(delta.clamp(max=_EXPM1_LIMIT))
    direct = (x > -0.5) & (delta <= _EXPM1_LIMIT)
    small = torch.log1p(torch.where(direct, x, torch.zeros_like(x)))
    large = torch.logaddexp(delta + math.log(weight), torch.full_like(delta, math.log1p(-weight)))
    return torch.where(direct, small, large)


def _kl_to_mixture(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """``KL(a ‖ (1 − w)·a + w·b)`` per item, summed over the last dimension."""
    return -(log_a.exp() * log_mixture_ratio(log_a, log_b, weight)).sum(-1)


def _finish(per_token: Tensor, mask: Tensor | None, reduction: Reduction) -> Tensor:
    _check_reduction(reduction)
    return reduce_items(per_token, mask, reduction)


# ------------------------------------------------------------------------------------------- objectives
def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward KL ``KL(p ‖ q) = Σ_v p(v)·(log p(v) − log q(v))``: mean-seeking, the SFT/KD direction."""
    _check_pair(student_logits, teacher_logits)
    _check_reduction(reduction)
    return _forward_kl(student_logits, teacher_logits.detach(), temperature, mask, reduction)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Reverse KL ``KL(q ‖ p) = Σ_v q(v)·(log q(v) − log p(v))``: mode-seeking, the on-policy direction."""
    _check_pair(student_logits, teacher_logits)
    _check_reduction(reduction)
    return _reverse_kl(student_logits, teacher_logits.detach(), temperature, mask, reduction)


def mixed_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    reverse_weight: float = 0.25,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """λ-mixed KL ``λ·KL(q‖p) + (1 − λ)·KL(p‖q)``, ``λ = reverse_weight`` (Zhao et al. 2026, KL mixing)."""
    _check_pair(student_logits, teacher_logits)
    _check_reduction(reduction)
    return _mixed_kl(student_logits, teacher_logits.detach(), reverse_weight, temperature, mask, reduction)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    normalized: bool = True,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Generalised Jensen–Shannon divergence of GKD (Agarwal et al., ICLR 2024; arXiv 2306.13649).

    With the mixture ``m = β·p + (1 − β)·q`` (TRL's ``generalized_jsd_loss``)::

        JSD_β = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)

    ``normalized=True`` (default) returns ``JSD_β / (β·(1 − β))``, which is **continuous** at the ends:
    → ``KL(p‖q)`` (forward KL) as β → 0 and → ``KL(q‖p)`` (reverse KL) as β → 1, the values GKD and TRL
    assign to β = 0 and β = 1 (the un-normalised JSD tends to 0 there: TRL's special cases make it jump).
    The two terms are computed as ``KL(p‖m)/(1 − β) + KL(q‖m)/β`` without cancellation, so β = 1e-8 is as
    accurate as β = 0.5. ``normalized=False`` returns ``JSD_β`` itself for β in (0, 1) (TRL's values, e.g.
    ``β = 0.5`` is the symmetric JSD, ``≤ log 2``) and forward / reverse KL at β = 0 / 1, as TRL does.
    The normalisation multiplies the gradient by ``1/(β(1 − β))`` (4 at β = 0.5): mind the learning rate.
    """
    if not 0.0 <= beta <= 1.0:
        raise KDConfigError(f"beta must be in [0, 1], got {beta}.")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    teacher_term = _kl_to_mixture(log_p, log_q, 1.0 - beta)  # KL(p ‖ m), m = p + (1 − β)(q − p)
    student_term = _kl_to_mixture(log_q, log_p, beta)  # KL(q ‖ m), m = q + β(p − q)
    if normalized:
        per_token = teacher_term / (1.0 - beta) + student_term / beta
    else:
        per_token = beta * teacher_term + (1.0 - beta) * student_term
    return _finish(per_token, mask, reduction)


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Skew KL of DistiLLM (Ko et al., ICML 2024; arXiv 2402.03898): ``KL(p ‖ α·p + (1 − α)·q)``.

    α = 0 is forward KL. The student enters the mixture with its gradient (official code). The official
    ``skewed_forward_kl`` returns the cross-entropy ``−Σ p·log m``; this is that minus the teacher's
    entropy (same gradient, 0 at a match). α in [0, 1); official default 0.1.
    """
    if not 0.0 <= alpha < 1.0:
        raise KDConfigError(f"alpha must be in [0, 1), got {alpha}.")
    if alpha == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _finish(_kl_to_mixture(log_p, log_q, 1.0 - alpha), mask, reduction)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Skew reverse KL of DistiLLM: ``KL(q ‖ (1 − α)·p + α·q)`` (official ``skewed_reverse_kl``).

    α = 0 is reverse KL; α in [0, 1); official default 0.1.
    """
    if not 0.0 <= alpha < 1.0:
        raise KDConfigError(f"alpha must be in [0, 1), got {alpha}.")
    if alpha == 0.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _finish(_kl_to_mixture(log_q, log_p, 1.0 - alpha), mask, reduction)


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Total variation distance ``½·Σ_v |p(v) − q(v)|`` ∈ [0, 1] (DistiLLM's ``tv_distance``)."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    return _finish(0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), mask, reduction)


def token_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    mask: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross-entropy of ``[..., V]`` logits on ``[...]`` token ids; ``ignore_index`` and ``~mask`` tokens left out.

    Same reductions as the objectives (``"sum"`` for :func:`normalize_token_sum`); the perplexity of a
    split is ``exp(Σ sum / Σ valid tokens)``.
    """
    _check_reduction(reduction)
    if targets.shape != logits.shape[:-1]:
        raise KDConfigError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}.")
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & mask
    flat = upcast(logits).reshape(-1, logits.shape[-1])
    safe = torch.where(valid, targets, torch.zeros_like(targets)).reshape(-1)
    per_token = F.cross_entropy(flat, safe, reduction="none").reshape(targets.shape)
    return reduce_items(per_token, valid, reduction)


# --------------------------------------------------------------------------------------------- registry
TOKEN_OBJECTIVES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tv": total_variation,
    "mixed_kl": mixed_kl,
}

#: Hyperparameters each objective accepts besides ``temperature``, ``mask`` and ``reduction``.
_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "forward_kl": (),
    "reverse_kl": (),
    "jsd": ("beta", "normalized"),
    "skew_kl": ("alpha",),
    "skew_reverse_kl": ("alpha",),
    "tv": (),
    "mixed_kl": ("reverse_weight",),
}


def token_objective(name: str, **kwargs: Any) -> Callable[..., Tensor]:
    """The objective ``name`` of :data:`TOKEN_OBJECTIVES` with its hyperparameters bound.

    The result is called as ``fn(student_logits, teacher_logits, mask=..., reduction=...)``
    (``temperature`` may be bound here or passed per call). Hyperparameters are checked now, so a bad
    config fails before training: ``beta``/``normalized`` (``"jsd"``), ``alpha`` (``"skew_kl"``,
    ``"skew_reverse_kl"``), ``reverse_weight`` (``"mixed_kl"``), ``temperature`` (all).

    Raises:
        KDConfigError: unknown name or a hyperparameter the objective does not take / out of range.
    """
    if name not in TOKEN_OBJECTIVES:
        raise KDConfigError(f"unknown token objective {name!r}; choose one of {sorted(TOKEN_OBJECTIVES)}.")
    allowed = {*_HYPERPARAMETERS[name], "temperature"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise KDConfigError(
            f"token objective {name!r} takes {sorted(allowed)} as hyperparameters, not {unknown} "
            "(leave them unset or choose another objective)."
        )
    checks = {
        "beta": lambda v: 0.0 <= v <= 1.0,
        "alpha": lambda v: 0.0 <= v < 1.0,
        "reverse_weight": lambda v: 0.0 <= v <= 1.0,
        "temperature": lambda v: v > 0,
    }
    ranges = {"beta": "[0, 1]", "alpha": "[0, 1)", "reverse_weight": "[0, 1]", "temperature": "> 0"}
    for key, value in kwargs.items():
        if key in checks and not checks[key](value):
            raise KDConfigError(f"token objective {name!r}: {key} must be in {ranges[key]}, got {value}.")
    return partial(TOKEN_OBJECTIVES[name], **kwargs)


# ------------------------------------------------------------------------------------ vocabulary checks
_WARNED_SIZES: set[tuple[int, int]] = set()


def check_vocab_sizes(
    student_size: int,
    teacher_size: int,
    tokenizer_ids_match: bool | None = None,
    tokenizer_size: int | None = None,
    max_padding_rows: int = 512,
    student_tokenizer: str | None = None,
    teacher_tokenizer: str | None = None,
) -> int:
    """The vocabulary size both models are compared on, or a :class:`KDConfigError`.

    - Equal sizes: that size.
    - ``tokenizer_ids_match=False`` (different tokenizers): error naming both sizes (and tokenizers);
      token-level distillation compares the same id in both models, which is meaningless then.
    - A model smaller than ``tokenizer_size`` (the tokenizer's real vocabulary, e.g. the data module's
      ``num_classes``) cannot score every token: error.
    - Otherwise the extra rows are padding of the same family (32000 vs 32064, 151936 vs 152064): the
      smaller size, with a one-time warning naming both. With ``tokenizer_ids_match=None`` (unknown)
      this is assumed only for differences up to ``max_padding_rows``; larger ones are taken as
      different tokenizers (pass ``tokenizer_ids_match=True`` to slice anyway).
    """
    if student_size == teacher_size:
        return student_size
    sizes = f"student vocabulary {student_size}, teacher vocabulary {teacher_size}"
    names = ""
    if student_tokenizer or teacher_tokenizer:
        names = f" (student tokenizer {student_tokenizer!r}, teacher tokenizer {teacher_tokenizer!r})"
    if tokenizer_ids_match is False:
        raise KDConfigError(
            f"{sizes}{names}: the models use different tokenizers, so token-level distillation would compare "
            "unrelated token ids. Use a student and teacher of the same tokenizer family."
        )
    smaller = min(student_size, teacher_size)
    if tokenizer_size is not None and smaller < tokenizer_size:
        raise KDConfigError(
            f"{sizes}{names}: the tokenizer has {tokenizer_size} tokens, more than the "
            f"{'student' if student_size < teacher_size else 'teacher'} can score. Build both models with at "
            f"least {tokenizer_size} output rows (model vocab_size)."
        )
    if tokenizer_ids_match is None and abs(student_size - teacher_size) > max_padding_rows:
        raise KDConfigError(
            f"{sizes}{names}: they differ by {abs(student_size - teacher_size)} rows, more than the "
            f"{max_padding_rows} padding rows expected of one tokenizer family, so the tokenizers look "
            "different. Use models of the same tokenizer, or declare that the ids match "
            "(tokenizer_ids_match=True) to compare the first "
            f"{smaller} rows."
        )
    key = (student_size, teacher_size)
    if key not in _WARNED_SIZES:
        _WARNED_SIZES.add(key)
        warnings.warn(
            f"{sizes}: treating the extra rows as padding of the same tokenizer family and comparing the first "
            f"{smaller} logits of both models.",
            stacklevel=3,
        )
    return smaller


def align_vocab(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tokenizer_ids_match: bool | None = None,
    tokenizer_size: int | None = None,
    max_padding_rows: int = 512,
) -> tuple[Tensor, Tensor]:
    """Slice student and teacher logits ``[..., V]`` to a common vocabulary (see :func:`check_vocab_sizes`).

    Same family with padding rows: both are cut to the smaller size (views, with a one-time warning naming
    both sizes); different tokenizers: :class:`KDConfigError` naming both sizes.
    """
    size = check_vocab_sizes(
        student_logits.shape[-1], teacher_logits.shape[-1], tokenizer_ids_match, tokenizer_size, max_padding_rows
    )
    if student_logits.shape[-1] == teacher_logits.shape[-1]:
        return student_logits, teacher_logits
    return student_logits[..., :size], teacher_logits[..., :size]
