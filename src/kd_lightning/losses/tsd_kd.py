"""TSD-KD: Token-Selective Dual Knowledge Distillation (Kim & Baek, ICLR 2026; arXiv 2603.13260), pure torch.

Three terms on the response tokens of student-generated sequences (official code: ``DistillTrainer.py``),
with ``H_S,t``/``H_T,t`` the entropies of the student/teacher next-token distributions at temperature τ:

1. **Direct** (token-selective generalised JSD)::

       w_t   = sigmoid(H_S,t − H_T,t)                      (detached: the student's relative uncertainty)
       JSD_t = β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m),   m = β·p_T + (1 − β)·p_S       (un-normalised, TRL's form)
       L_dir = Σ_t mask_t·w_t·JSD_t / Σ_t mask_t,     β = 0.9

2. **Entropy regulariser** on the top-(1 − q) entropy tokens: ``η`` = the q-quantile (q = 0.1) of ``H_S``
   over the valid tokens of the batch, ``E = {t : H_S,t ≥ η}``, ``L_ent = Σ_{t∈E} H_S,t / |E|``.

3. **Indirect** (Plackett–Luce ranking on the uncertain prefix): ``d`` = the first position where the cumulative
   normalised student entropy reaches ``prefix_threshold`` (0.1); for ``t < d``, ``C_t`` = the student's top-K
   (K = 10) tokens, ordered by the teacher's logits (descending) → ``π``, scores ``s`` = the student's logits in
   that order, mean-centred::

       listmle: ℓ_t = −Σ_k (s_πk − log Σ_{j≥k} exp s_πj)    (textbook ListMLE: likelihood of the teacher's order)
       code:    ℓ_t = −Σ_k (s_πk − log Σ_{j≤k} exp s_πj)    (released code: logcumsumexp without flipping)

   ``L_ind`` = mean of ``ℓ_t`` over the prefix tokens (0 when the prefix is empty).

Total ``L = w_dir·L_dir + w_ent·L_ent + α·L_ind`` (α = 0.1); the terms come back weighted
(:func:`~kd_lightning.losses.terms.weighted_terms`) and a term of weight 0 is not computed.

The ``code`` denominator (items ranked *above* k) rewards the teacher's LOWER-ranked candidates: its gradient
lowers the teacher's first choice relative to the others and raises its last (its minimiser is the reverse of the
teacher's order). That looks like a bug in the release; ``listmle`` is the default, ``code`` reproduces the release.

Code-faithful options (the release's behaviour, kept as arguments):

- ``prefix_scope="batch"``: ``d`` is found on the batch's valid entropies flattened row after row and normalised
  by their total, then used as one prefix length for every row (so ``d`` grows with the batch size);
  ``"sequence"`` (default) finds one ``d`` per response from its own entropies (the paper's "earliest
  high-uncertainty part of the response").
- ``entropy_mask="all_code"``: ``E`` also takes padded positions whose entropy passes ``η`` (the release's
  ``entropies >= threshold`` over the whole tensor); ``"valid"`` (default) keeps valid tokens only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.lm import generalized_jsd
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = [
    "PL_DENOMINATORS",
    "TSDKDLoss",
    "check_tsd_kd_args",
    "confidence_weights",
    "entropy_regularizer",
    "entropy_selection",
    "plackett_luce_loss",
    "plackett_luce_nll",
    "prefix_mask",
    "token_entropy",
    "tsd_kd_terms",
    "uncertain_prefix_lengths",
    "weighted_jsd",
]

PLDenominator = Literal["listmle", "code"]
PrefixScope = Literal["sequence", "batch"]
EntropyMask = Literal["valid", "all_code"]
PL_DENOMINATORS = ("listmle", "code")
PREFIX_SCOPES = ("sequence", "batch")
ENTROPY_MASKS = ("valid", "all_code")


# ---------------------------------------------------------------------------------------------- checks
def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise KDConfigError(name, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _fraction(name: str, value: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        raise KDConfigError(name, f"must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


def check_tsd_kd_args(
    *,
    beta: float = 0.9,
    entropy_quantile: float = 0.1,
    prefix_threshold: float = 0.1,
    top_k: int = 10,
    pl_denominator: str = "listmle",
    prefix_scope: str = "sequence",
    entropy_mask: str = "valid",
    temperature: float = 1.0,
    direct_weight: float = 1.0,
    entropy_weight: float = 1.0,
    indirect_weight: float = 0.1,
) -> None:
    """Validate TSD-KD's arguments; raises :class:`~kd_lightning.errors.KDConfigError` naming the argument."""
    if not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise KDConfigError("beta", f"must be in (0, 1), got {beta!r}", "the JSD mixture m = β·p_T + (1 − β)·p_S")
    _fraction("entropy_quantile", entropy_quantile)
    _fraction("prefix_threshold", prefix_threshold, low_open=True)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2:
        raise KDConfigError("top_k", f"must be an integer >= 2, got {top_k!r}", "a ranking needs two candidates")
    _choice("pl_denominator", pl_denominator, PL_DENOMINATORS)
    _choice("prefix_scope", prefix_scope, PREFIX_SCOPES)
    _choice("entropy_mask", entropy_mask, ENTROPY_MASKS)
    check_temperature(temperature)
    check_weights(direct_weight=direct_weight, entropy_weight=entropy_weight, indirect_weight=indirect_weight)
    if not any(active(w) for w in (direct_weight, entropy_weight, indirect_weight)):
        raise KDConfigError(
            "direct_weight/entropy_weight/indirect_weight", "are all 0", "give at least one TSD-KD term a weight > 0"
        )


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor | None, mask: Tensor) -> None:
    if student_logits.dim() != 3:
        raise KDConfigError("student_logits", f"must be [batch, tokens, vocab], got {tuple(student_logits.shape)}")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise KDConfigError(
            "teacher_logits",
            f"shape {tuple(teacher_logits.shape)} differs from the student's {tuple(student_logits.shape)}",
            "compute both on the same sequences and align the vocabularies",
        )
    if mask.shape != student_logits.shape[:2] or mask.dtype != torch.bool:
        raise KDConfigError("mask", f"must be a bool tensor of shape {tuple(student_logits.shape[:2])}")


# ---------------------------------------------------------------------------------------------- pieces
def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy (nats) of ``softmax(z/τ)`` per position: ``[..., V] -> [...]`` (float32 or wider, differentiable)."""
    log_p = F.log_softmax(upcast(logits) / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def confidence_weights(student_entropy: Tensor, teacher_entropy: Tensor) -> Tensor:
    """``w_t = sigmoid(H_S,t − H_T,t)``, detached: in (0, 1), ½ where the two are equally uncertain."""
    return torch.sigmoid(student_entropy.detach() - teacher_entropy.detach())


def weighted_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    weights: Tensor,
    beta: float = 0.9,
    temperature: float = 1.0,
) -> Tensor:
    """``L_dir = Σ mask·w·JSD_β / Σ mask`` with the un-normalised generalised JSD (0 without valid tokens)."""
    jsd = generalized_jsd(
        student_logits, teacher_logits, beta=beta, normalized=False, temperature=temperature, reduction="none"
    )
    valid = mask.to(jsd.dtype)
    return (jsd * weights.to(jsd.dtype) * valid).sum() / valid.sum().clamp_min(1)


def entropy_selection(
    student_entropy: Tensor, mask: Tensor, quantile: float = 0.1, entropy_mask: EntropyMask = "valid"
) -> Tensor:
    """The tokens ``E`` of the entropy regulariser: ``H_S ≥ η``, ``η`` = the ``quantile`` of ``H_S`` over ``mask``.

    ``η`` is computed once over every valid token of the batch (linear interpolation, ``torch.quantile``).
    ``entropy_mask="valid"`` intersects with ``mask``; ``"all_code"`` keeps every position above ``η`` (the
    release also counts padded positions). No valid token: nothing is selected.
    """
    _choice("entropy_mask", entropy_mask, ENTROPY_MASKS)
    values = student_entropy.detach()[mask]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values.double(), quantile).to(values.dtype)
    selected = student_entropy.detach() >= threshold
    return selected & mask if entropy_mask == "valid" else selected


def entropy_regularizer(
    student_entropy: Tensor, mask: Tensor, quantile: float = 0.1, entropy_mask: EntropyMask = "valid"
) -> Tensor:
    """``L_ent = Σ_{t∈E} H_S,t / |E|`` over :func:`entropy_selection`'s tokens (0 when ``E`` is empty)."""
    selected = entropy_selection(student_entropy, mask, quantile, entropy_mask).to(student_entropy.dtype)
    return (student_entropy * selected).sum() / selected.sum().clamp_min(1)


def uncertain_prefix_lengths(
    student_entropy: Tensor, mask: Tensor, threshold: float = 0.1, scope: PrefixScope = "sequence"
) -> Tensor:
    """``d`` per row (``LongTensor [B]``): first position where the cumulative normalised entropy reaches ``threshold``.

    ``scope="sequence"``: per row, entropies of the valid tokens divided by the row's total, cumulated along the
    row; ``d_b`` is the first position ``t`` with ``Σ_{u≤t} H̃_u ≥ threshold``. ``scope="batch"`` (the release):
    the batch's valid entropies flattened row after row, normalised by their total; ``d`` = the first flat index
    reaching ``threshold``, used as the prefix length of every row. A row (batch) with zero total entropy has
    ``d = 0`` (no uncertain prefix), as ``argmax`` of an all-false mask in the release.
    """
    _choice("prefix_scope", scope, PREFIX_SCOPES)
    h = student_entropy.detach().double() * mask.double()
    batch = h.shape[0]
    if scope == "sequence":
        total = h.sum(-1, keepdim=True)
        cum = torch.cumsum(h, -1) / total.clamp_min(torch.finfo(h.dtype).tiny)
        reached = (cum >= threshold) & (total > 0)
        return reached.long().argmax(-1)
    flat = student_entropy.detach().double()[mask]
    if flat.numel() == 0 or float(flat.sum()) <= 0:
        return torch.zeros(batch, dtype=torch.long, device=h.device)
    cum = torch.cumsum(flat / flat.sum(), 0)
    d = (cum >= threshold).long().argmax()
    return d.expand(batch).clone()


def prefix_mask(lengths: Tensor, mask: Tensor) -> Tensor:
    """Positions ``t < d_b`` of each row, intersected with ``mask``."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions.unsqueeze(0) < lengths.to(mask.device).unsqueeze(-1)) & mask


def plackett_luce_nll(scores: Tensor, denominator: PLDenominator = "listmle") -> Tensor:
    """Negative Plackett–Luce log-likelihood of the order of the last dimension: ``[..., K] -> [...]``.

    ``scores[..., k]`` is the score of the item ranked ``k``-th (0 = first). ``"listmle"``:
    ``−Σ_k (s_k − log Σ_{j≥k} e^{s_j})`` (≥ 0, minimal when the scores decrease along the order);
    ``"code"``: ``−Σ_k (s_k − log Σ_{j≤k} e^{s_j})`` (the release's un-flipped ``logcumsumexp``).
    """
    _choice("pl_denominator", denominator, PL_DENOMINATORS)
    if denominator == "listmle":
        log_norm = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    else:
        log_norm = torch.logcumsumexp(scores, dim=-1)
    return -(scores - log_norm).sum(-1)


def plackett_luce_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    top_k: int = 10,
    denominator: PLDenominator = "listmle",
    temperature: float = 1.0,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Indirect term: the teacher re-ranks the student's top-K tokens; ListMLE of that order under the student.

    Per position: ``C`` = ``topk(z_S)`` (K = ``min(top_k, V)``), ``π`` = ``C`` sorted by the teacher's logits
    (descending; no gradient), ``s`` = the student's logits ``z_S/τ`` of ``C`` in the order ``π``, mean-centred
    (the release does it; both likelihoods are shift-invariant), then :func:`plackett_luce_nll`.
    ``reduction="mean"``: mean over ``mask`` (0 when empty); ``"none"``: per position, 0 where masked.
    """
    scaled = upcast(student_logits) / temperature
    k = min(int(top_k), scaled.shape[-1])
    student_top, index = scaled.topk(k, dim=-1)
    teacher_top = (upcast(teacher_logits).detach() / temperature).gather(-1, index)
    order = teacher_top.argsort(dim=-1, descending=True)
    scores = student_top.gather(-1, order)
    scores = scores - scores.mean(-1, keepdim=True)
    per_token = plackett_luce_nll(scores, denominator) * mask.to(scores.dtype)
    if reduction == "none":
        return per_token
    return per_token.sum() / mask.sum().clamp_min(1).to(per_token.dtype)


# ---------------------------------------------------------------------------------------------- total
def tsd_kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.9,
    entropy_quantile: float = 0.1,
    prefix_threshold: float = 0.1,
    top_k: int = 10,
    pl_denominator: PLDenominator = "listmle",
    prefix_scope: PrefixScope = "sequence",
    entropy_mask: EntropyMask = "valid",
    temperature: float = 1.0,
    direct_weight: float = 1.0,
    entropy_weight: float = 1.0,
    indirect_weight: float = 0.1,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """TSD-KD on response logits ``[B, N, V]`` (position ``t`` predicts response token ``t``) and ``mask [B, N]``.

    Returns ``(terms, stats)``: ``terms = {"loss", "direct", "entropy", "indirect"}`` (weighted; terms of
    weight 0 absent and not computed); ``stats`` (detached) = ``student_entropy``, ``teacher_entropy`` (means
    over ``mask``), ``confidence_weight`` (mean ``w_t``), ``entropy_tokens`` (``|E|``), ``prefix_tokens``
    (tokens of the indirect term) and ``prefix_fraction`` (their share of the valid tokens).
    """
    check_tsd_kd_args(
        beta=beta,
        entropy_quantile=entropy_quantile,
        prefix_threshold=prefix_threshold,
        top_k=top_k,
        pl_denominator=pl_denominator,
        prefix_scope=prefix_scope,
        entropy_mask=entropy_mask,
        temperature=temperature,
        direct_weight=direct_weight,
        entropy_weight=entropy_weight,
        indirect_weight=indirect_weight,
    )
    _check_inputs(student_logits, teacher_logits, mask)
    h_s = token_entropy(student_logits, temperature)
    h_t = token_entropy(teacher_logits.detach(), temperature)
    valid = mask.to(h_s.dtype)
    n_valid = valid.sum().clamp_min(1)
    terms: dict[str, Tensor] = {}
    weights = {"direct": direct_weight, "entropy": entropy_weight, "indirect": indirect_weight}
    w = confidence_weights(h_s, h_t)
    stats = {
        "student_entropy": (h_s.detach() * valid).sum() / n_valid,
        "teacher_entropy": (h_t * valid).sum() / n_valid,
        "confidence_weight": (w * valid).sum() / n_valid,
    }
    if active(direct_weight):
        terms["direct"] = weighted_jsd(student_logits, teacher_logits, mask, w, beta, temperature)
    if active(entropy_weight):
        selected = entropy_selection(h_s, mask, entropy_quantile, entropy_mask)
        chosen = selected.to(h_s.dtype)
        terms["entropy"] = (h_s * chosen).sum() / chosen.sum().clamp_min(1)
        stats["entropy_tokens"] = chosen.sum().detach()
    if active(indirect_weight):
        lengths = uncertain_prefix_lengths(h_s, mask, prefix_threshold, prefix_scope)
        prefix = prefix_mask(lengths, mask)
        terms["indirect"] = plackett_luce_loss(
            student_logits, teacher_logits, prefix, top_k, pl_denominator, temperature
        )
        stats["prefix_tokens"] = prefix.sum().detach().to(h_s.dtype)
        stats["prefix_fraction"] = stats["prefix_tokens"] / n_valid
    return weighted_terms(terms, {k: v for k, v in weights.items() if k in terms}), stats


class TSDKDLoss(nn.Module):
    """:func:`tsd_kd_terms` as a module with its arguments bound; ``last_stats`` keeps the last call's stats.

    Args:
        beta: β of the generalised JSD's mixture ``m = β·p_T + (1 − β)·p_S`` (release: 0.9).
        entropy_quantile: q of the entropy threshold η (release: 0.1, the same number as ``prefix_threshold``).
        prefix_threshold: cumulative normalised entropy that ends the uncertain prefix (release: 0.1).
        top_k: K student candidates the teacher re-ranks (release: 10).
        pl_denominator: ``"listmle"`` (textbook, default) or ``"code"`` (the release's un-flipped denominator).
        prefix_scope: ``"sequence"`` (default, one ``d`` per response) or ``"batch"`` (the release).
        entropy_mask: ``"valid"`` (default) or ``"all_code"`` (the release also selects padded positions).
        temperature: τ of every softmax (entropies, JSD, ranking scores); release: 1.
        direct_weight, entropy_weight, indirect_weight: weights of the three terms (release: 1, 1, α = 0.1).
    """

    def __init__(
        self,
        beta: float = 0.9,
        entropy_quantile: float = 0.1,
        prefix_threshold: float = 0.1,
        top_k: int = 10,
        pl_denominator: PLDenominator = "listmle",
        prefix_scope: PrefixScope = "sequence",
        entropy_mask: EntropyMask = "valid",
        temperature: float = 1.0,
        direct_weight: float = 1.0,
        entropy_weight: float = 1.0,
        indirect_weight: float = 0.1,
    ) -> None:
        super().__init__()
        self.kwargs = {
            "beta": beta,
            "entropy_quantile": entropy_quantile,
            "prefix_threshold": prefix_threshold,
            "top_k": top_k,
            "pl_denominator": pl_denominator,
            "prefix_scope": prefix_scope,
            "entropy_mask": entropy_mask,
            "temperature": temperature,
            "direct_weight": direct_weight,
            "entropy_weight": entropy_weight,
            "indirect_weight": indirect_weight,
        }
        check_tsd_kd_args(**self.kwargs)
        self.last_stats: dict[str, Tensor] = {}

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """``{"loss", "direct", "entropy", "indirect"}`` (weighted) on response logits ``[B, N, V]``."""
        terms, self.last_stats = tsd_kd_terms(student_logits, teacher_logits, mask, **self.kwargs)
        return terms
