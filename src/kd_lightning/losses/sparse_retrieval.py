"""Losses of learned sparse retrieval distillation, pure torch: IDF, ensemble score targets, ranking losses, FLOPS.

Geng, Wang, Ru, Yang, "Towards Competitive Search Relevance For Inference-Free Learned Sparse Retrievers",
arXiv 2411.04403, and its code (opensearch-sparse-model-tuning-sample: ``loss.py``, ``trainer.py``,
``bi_encoder_wrapper.py``, ``get_idf.py``). Score matrices are ``[queries, documents]``; a row is one query.

- :func:`idf_from_document_frequency` — ``idf[v] = ln(1 + (N − df_v + 0.5)/(df_v + 0.5))``, tokens never seen
  get ``unseen`` (1.0 in the code);
- :func:`minmax_per_query` and :func:`ensemble_targets` — each teacher's scores min-max normalised per query,
  averaged over teachers and scaled (``score_scale`` 30);
- :func:`ranking_kl` (the paper's loss), :func:`margin_mse` and :func:`info_nce` (the code's alternatives);
- :func:`flops_loss` — FLOPS on the document vectors with the code's group reshape, and
  :class:`FlopsRegularizer`, its weight with the quadratic warm-up ``λ(step) = λ_d·((step + 1)/T_d)²``;
- :func:`gather_with_grad` — a differentiable all-gather (uneven sizes) for in-batch negatives under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.schedule import ScheduledLoss

__all__ = [
    "FlopsRegularizer",
    "document_frequency",
    "ensemble_targets",
    "flops_lambda",
    "flops_loss",
    "gather_with_grad",
    "idf_from_document_frequency",
    "info_nce",
    "margin_mse",
    "minmax_per_query",
    "ranking_kl",
]


# ---------------------------------------------------------------------------------------------- IDF
def document_frequency(documents: Iterable[Sequence[int] | Tensor], vocab_size: int) -> tuple[Tensor, int]:
    """``(df, N)``: for every token id, the number of documents that contain it (multiplicity ignored), and the
    number of documents. Ids outside ``[0, vocab_size)`` are an error."""
    df = torch.zeros(vocab_size, dtype=torch.long)
    count = 0
    for ids in documents:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        count += 1
        if not ids.numel():
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise KDConfigError(
                "vocab_size",
                f"token ids up to {int(ids.max())} do not fit a vocabulary of {vocab_size}",
                "use the tokenizer's size",
            )
        df[torch.unique(ids)] += 1
    return df, count


def idf_from_document_frequency(df: Tensor, num_documents: int, unseen: float = 1.0) -> Tensor:
    """The IDF table of the paper's code (``get_idf.py``, the BM25 IDF of Lucene):

    ``idf[v] = ln(1 + (N − df_v + 0.5) / (df_v + 0.5))`` for tokens with ``df_v > 0``; ``unseen`` for the others.
    Float32 ``[V]``.
    """
    if num_documents < 1:
        raise KDConfigError("num_documents", f"must be >= 1, got {num_documents}", "compute IDF over a corpus")
    df = df.double()
    idf = torch.log1p((num_documents - df + 0.5) / (df + 0.5))
    return torch.where(df > 0, idf, torch.full_like(idf, unseen)).float()


# ---------------------------------------------------------------------------------------------- targets
def minmax_per_query(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """``(S[i, j] − min_j S[i, :]) / (max_j S[i, :] − min_j S[i, :] + eps)``: every row into ``[0, 1)``."""
    scores = upcast(scores)
    low = scores.min(dim=-1, keepdim=True).values
    high = scores.max(dim=-1, keepdim=True).values
    return (scores - low) / (high - low + eps)


def ensemble_targets(
    teacher_scores: Mapping[str, Tensor] | Sequence[Tensor],
    score_scale: float = 30.0,
    weights: Mapping[str, float] | Sequence[float] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """``score_scale · Σ_k w_k · minmax(S_k)`` with ``Σ_k w_k = 1`` (uniform ``1/K`` by default): the
    heterogeneous-ensemble targets (``BiEncoderWrapper.get_scores_batch``), per query and per teacher
    normalised before averaging, so teachers of different score ranges (BM25, cosine, sparse dot products)
    count alike."""
    if isinstance(teacher_scores, Mapping):
        names = list(teacher_scores)
        matrices = [teacher_scores[n] for n in names]
        if isinstance(weights, Mapping):
            missing = [n for n in names if n not in weights]
            if missing:
                raise KDConfigError("teacher_weights", f"has no weight for {missing}", f"name every teacher: {names}")
            weights = [float(weights[n]) for n in names]
    else:
        matrices = list(teacher_scores)
    if not matrices:
        raise KDConfigError("teachers", "no teacher scores to aggregate", "give at least one teacher")
    if weights is None:
        w = [1.0 / len(matrices)] * len(matrices)
    else:
        w = [float(x) for x in weights]  # type: ignore[union-attr]
        if len(w) != len(matrices) or sum(w) <= 0 or min(w) < 0:
            raise KDConfigError("teacher_weights", f"must be {len(matrices)} weights >= 0 with a positive sum, got {w}")
        w = [x / sum(w) for x in w]
    total = sum(wk * minmax_per_query(s.detach(), eps) for wk, s in zip(w, matrices, strict=True))
    return score_scale * total  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- ranking losses
def ranking_kl(student_scores: Tensor, teacher_scores: Tensor, temperature: float = 1.0) -> Tensor:
    """``(1/B) Σ_i KL(softmax(T_i/τ) ‖ softmax(S_i/τ))`` over the rows (``KLDivLoss(reduction="batchmean")``
    of the code; no τ² factor). ``>= 0``, zero when each student row equals its teacher row up to a constant."""
    check_temperature(temperature)
    log_q = F.log_softmax(upcast(student_scores) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_scores).detach() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def margin_mse(student_scores: Tensor, teacher_scores: Tensor) -> Tensor:
    """MarginMSE over each query's own candidates ``[B, G]`` (column 0 the positive, 1.. its negatives):
    ``mean_{i, j≥1} ((S_i0 − S_ij) − (T_i0 − T_ij))²``."""
    if student_scores.shape != teacher_scores.shape or student_scores.dim() != 2 or student_scores.shape[1] < 2:
        raise KDConfigError(
            "margin_mse",
            f"needs [queries, 1 + negatives] scores for student and teacher, got {tuple(student_scores.shape)} "
            f"and {tuple(teacher_scores.shape)}",
            "give every query at least one negative (data.init_args.num_negatives >= 1)",
        )
    s, t = upcast(student_scores), upcast(teacher_scores).detach()
    return ((s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])).pow(2).mean()


def info_nce(scores: Tensor, positive: Tensor, temperature: float = 1.0, label_smoothing: float = 0.0) -> Tensor:
    """``−(1/B) Σ_i log softmax(S_i/τ)[p_i]``: cross-entropy of each query's row against its positive column."""
    check_temperature(temperature)
    return F.cross_entropy(upcast(scores) / temperature, positive, label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------------- FLOPS
def flops_loss(reps: Tensor, group_size: int = 1, idf: Tensor | None = None, min_idf: float = 1e-3) -> Tensor:
    """FLOPS of document vectors with the code's grouping: ``reps`` ``[n·G, V]`` ordered query by query
    (``[q0 slot0, q0 slot1, …, q1 slot0, …]``) is reshaped to ``[n, G, V]`` and

    ``L = Σ_{g, v} (mean_i |w[i, g, v]|)²`` (``torch.sum(torch.mean(|rep|, dim=0) ** 2)``),

    i.e. the mean runs over queries separately for the positive slot and each negative slot; ``G = 1`` is the
    plain FLOPS of Paria et al. With ``idf`` the penalty is ``Σ_{g, v} (mean_i |w[i, g, v]| / idf[v])²``
    (the alternative reading of the paper's IDF-aware FLOPS; ``idf`` clamped to ``min_idf``).
    """
    if group_size < 1 or reps.shape[0] % group_size:
        raise KDConfigError(
            "group_size", f"{reps.shape[0]} document vectors do not split into groups of {group_size}", "check it"
        )
    mean = reps.abs().reshape(reps.shape[0] // group_size, group_size, reps.shape[-1]).mean(dim=0)
    if idf is not None:
        mean = mean / idf.to(mean).clamp_min(min_idf)
    return mean.pow(2).sum()


def flops_lambda(step: int, lambda_max: float, warmup_steps: int) -> float:
    """``λ_d · ((step + 1) / T_d)²`` while ``step < T_d``, then ``λ_d`` (the code's quadratic warm-up);
    ``λ_d`` throughout when ``T_d = 0``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(lambda_max)
    return float(lambda_max) * ((step + 1) / warmup_steps) ** 2


class FlopsRegularizer(nn.Module, ScheduledLoss):
    """``λ(step) · FLOPS(w_d)`` (:func:`flops_loss`, :func:`flops_lambda`) on the scheduled-loss protocol: the
    core sets the optimizer step before each training step and logs ``train/flops_lambda``.

    Args:
        lambda_max: ``λ_d`` after the warm-up (``flops_d_lambda``).
        warmup_steps: ``T_d`` (``flops_d_T``).
        divide_by_idf: penalise ``mean|w_v| / idf_v`` instead of ``mean|w_v|`` (needs ``idf`` at the call).
    """

    def __init__(self, lambda_max: float = 1e-3, warmup_steps: int = 0, divide_by_idf: bool = False) -> None:
        super().__init__()
        if not (math.isfinite(lambda_max) and lambda_max >= 0):
            raise KDConfigError("flops_weight", f"must be a finite number >= 0, got {lambda_max}")
        if warmup_steps < 0:
            raise KDConfigError("flops_warmup_steps", f"must be >= 0, got {warmup_steps}")
        self.lambda_max = float(lambda_max)
        self.warmup_steps = int(warmup_steps)
        self.divide_by_idf = divide_by_idf

    def weight(self) -> float:
        """``λ`` at the current optimizer step (``λ_d`` when no progress was set)."""
        step = self.progress.step if self.progress is not None else self.warmup_steps
        return flops_lambda(step, self.lambda_max, self.warmup_steps)

    def forward(self, reps: Tensor, group_size: int = 1, idf: Tensor | None = None) -> Tensor:
        """The unweighted FLOPS term (the caller weights it with :meth:`weight`)."""
        return flops_loss(reps, group_size, idf if self.divide_by_idf else None)

    def schedule_stats(self) -> dict[str, Any]:
        return {"flops_lambda": self.weight()}


# ---------------------------------------------------------------------------------------------- DDP
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (uneven sizes); backward sums every rank's gradient and keeps the local rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        world = dist.get_world_size()
        size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded.contiguous())
        rank = dist.get_rank()
        ctx.counts, ctx.rank, ctx.longest = counts, rank, longest
        offset = torch.tensor(sum(counts[:rank]), dtype=torch.long)
        ctx.mark_non_differentiable(offset)
        return torch.cat([c[:n] for c, n in zip(chunks, counts, strict=True)]), offset

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _offset_grad: Any) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]]


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """``(rows of every rank in rank order, offset of this rank's rows)``; gradients flow back to each rank's own
    rows, summed over the ranks that used them. Without a process group of several ranks: ``(x, 0)``.

    With DDP averaging parameter gradients, a loss that each rank computes as ``L_r(gathered rows)`` trains like
    one process minimising ``(1/W) Σ_r L_r`` over the concatenated batch — so per-rank means over equal local
    batches equal the one-process mean (no ``× world_size`` rescaling needed).
    """
    if not _distributed():
        return x, 0
    gathered, offset = _GatherWithGrad.apply(x)
    return gathered, int(offset)
