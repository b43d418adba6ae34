"""LLKD's sample selection and weighted pseudo-label loss (Li et al., "Learning with Less: Knowledge Distillation
from Large Language Models via Unlabeled Data", NAACL 2025 Findings, arXiv 2411.08028), in plain torch.

RECONSTRUCTION: no official code and no full paper text were available; the rule below follows the abstract-level
description (teacher confident AND student uncertain, class-wise adaptive thresholds, weighted loss) and the
FreeMatch-style EMA thresholds of the method spec. Every uncertain choice is an argument.

Per mini-batch of unlabeled inputs with teacher pseudo-labels ``ŷ_i`` and confidences ``c_i = max softmax(z_T/τ)``
and student uncertainties ``u_i`` (normalised entropy by default), for each pseudo-class ``y``:

    τ^T_t(y) = m·τ^T_{t−1}(y) + (1−m)·mean_{i: ŷ_i=y} c_i        (``ema``; ``batch_mean``: m = 0)
    τ^S_t(y) = m·τ^S_{t−1}(y) + (1−m)·mean_{i: ŷ_i=y} u_i
    S_t = {i : c_i ≥ τ^T_t(ŷ_i) and u_i ≥ τ^S_t(ŷ_i)}
    w_i = |S_t| · c_i·u_i / Σ_{j∈S_t} c_j·u_j                      (Σ_{i∈S_t} w_i = |S_t|)
    L_w = (1/|S_t|) Σ_{i∈S_t} w_i · CE(z_S_i, ŷ_i)

Classes absent from a batch keep their thresholds. The selection runs without autograd; only ``L_w`` back-props.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast

__all__ = [
    "EMPTY_MODES",
    "THRESHOLD_INITS",
    "THRESHOLD_MODES",
    "THRESHOLD_ORDERS",
    "UNCERTAINTY_FUNCTIONS",
    "WEIGHTINGS",
    "ClassThresholds",
    "LLKDLoss",
    "PoolUsage",
    "Selection",
    "least_confidence",
    "margin_uncertainty",
    "normalized_entropy",
    "select_samples",
    "selection_weights",
    "student_uncertainty",
    "teacher_pseudo_labels",
    "weighted_pseudo_label_ce",
]

ThresholdMode = Literal["ema", "batch_mean"]
ThresholdInit = Literal["constant", "first_batch"]
ThresholdOrder = Literal["update_first", "select_first"]
EmptyMode = Literal["skip", "top_k"]
Weighting = Literal["confidence_uncertainty", "uniform"]

THRESHOLD_MODES = ("ema", "batch_mean")
THRESHOLD_INITS = ("constant", "first_batch")
THRESHOLD_ORDERS = ("update_first", "select_first")
EMPTY_MODES = ("skip", "top_k")
WEIGHTINGS = ("confidence_uncertainty", "uniform")


# ------------------------------------------------------------------ uncertainty and confidence
def normalized_entropy(logits: Tensor) -> Tensor:
    """``H(softmax(z)) / log C`` per row of ``[N, C]`` logits, in [0, 1] (0 for one class)."""
    z = upcast(logits)
    num_classes = z.shape[-1]
    if num_classes < 2:
        return z.new_zeros(z.shape[:-1])
    log_p = F.log_softmax(z, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def least_confidence(logits: Tensor) -> Tensor:
    """``1 − max_c softmax(z)_c`` per row, in [0, 1 − 1/C]."""
    return 1.0 - F.softmax(upcast(logits), dim=-1).amax(-1)


def margin_uncertainty(logits: Tensor) -> Tensor:
    """``1 − (p_(1) − p_(2))`` per row (one minus the margin between the two largest probabilities), in [0, 1]."""
    p = F.softmax(upcast(logits), dim=-1)
    if p.shape[-1] < 2:
        return p.new_zeros(p.shape[:-1])
    top2 = p.topk(2, dim=-1).values
    return 1.0 - (top2[..., 0] - top2[..., 1])


#: The student uncertainties ``u_i`` by name (the ``uncertainty`` argument).
UNCERTAINTY_FUNCTIONS: Mapping[str, Callable[[Tensor], Tensor]] = {
    "entropy": normalized_entropy,
    "1-max_prob": least_confidence,
    "margin": margin_uncertainty,
}


def check_choice(field: str, value: Any, choices: tuple[str, ...] | Mapping[str, Any]) -> None:
    """Raise :class:`KDConfigError` naming ``field`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise KDConfigError(field, f"must be one of {listed}, got {value!r}")


@torch.no_grad()
def student_uncertainty(logits: Tensor, uncertainty: str = "entropy") -> Tensor:
    """``u_i`` of the (detached) student logits ``[N, C]`` by the named function of :data:`UNCERTAINTY_FUNCTIONS`."""
    check_choice("uncertainty", uncertainty, UNCERTAINTY_FUNCTIONS)
    return UNCERTAINTY_FUNCTIONS[uncertainty](logits.detach())


@torch.no_grad()
def teacher_pseudo_labels(teacher_logits: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(ŷ_i, c_i)``: the teacher's hard pseudo-labels (argmax) and confidences ``max softmax(z_T / τ)``."""
    check_temperature(temperature)
    probs = F.softmax(upcast(teacher_logits.detach()) / temperature, dim=-1)
    confidence, labels = probs.max(dim=-1)
    return labels, confidence


# ------------------------------------------------------------------ adaptive class-wise thresholds
class _Resizable(nn.Module):
    """Buffers of a size known late (the class count, the pool size): empty until :meth:`build`, and resized to a
    checkpoint's shape when an empty module loads one."""

    _sized: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        incoming = state_dict.get(prefix + self._sized[0]) if self._sized else None
        if isinstance(incoming, Tensor) and incoming.dim() == 1 and incoming.numel():
            self.build(incoming.numel())  # sizes an empty module; refuses another size with a clear error
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def size(self) -> int:
        return int(getattr(self, self._sized[0]).numel())

    def build(self, size: int) -> None:
        """Create the buffers for ``size`` entries (subclasses)."""
        raise NotImplementedError


class ClassThresholds(_Resizable):
    """Per-class teacher-confidence thresholds ``τ^T(y)`` and student-uncertainty thresholds ``τ^S(y)`` (buffers).

    ``update`` moves the thresholds of the classes present among the pseudo-labels of a batch towards the batch's
    class means of ``c`` and ``u``: ``τ ← m·τ + (1−m)·mean`` (``threshold_mode="ema"``) or ``τ ← mean``
    (``"batch_mean"``); absent classes keep theirs. With ``threshold_init="first_batch"`` a class's thresholds
    start at the means of the first batch in which it appears instead of the constants. Under
    ``torch.distributed`` the class sums and counts are added over every process first (``sync``), so every rank
    holds the same thresholds.

    Args:
        num_classes: C; ``None`` builds the buffers on the first update (or from a checkpoint).
        threshold_mode: ``"ema"`` or ``"batch_mean"`` (RECONSTRUCTION: the paper's exact update is unverified).
        momentum: m of the EMA, in [0, 1).
        threshold_init: ``"constant"`` (start at ``teacher_threshold_init``/``student_threshold_init``) or
            ``"first_batch"``.
        teacher_threshold_init: τ^T_0 for every class.
        student_threshold_init: τ^S_0 for every class.
    """

    teacher: Tensor
    student: Tensor
    seen: Tensor
    num_updates: Tensor
    _sized = ("teacher",)

    def __init__(
        self,
        num_classes: int | None = None,
        threshold_mode: ThresholdMode = "ema",
        momentum: float = 0.999,
        threshold_init: ThresholdInit = "constant",
        teacher_threshold_init: float = 0.5,
        student_threshold_init: float = 0.5,
    ) -> None:
        super().__init__()
        check_choice("threshold_mode", threshold_mode, THRESHOLD_MODES)
        check_choice("threshold_init", threshold_init, THRESHOLD_INITS)
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise KDConfigError("momentum", f"must be in [0, 1), got {momentum!r}", "e.g. 0.999 (the EMA momentum)")
        for name, value in (
            ("teacher_threshold_init", teacher_threshold_init),
            ("student_threshold_init", student_threshold_init),
        ):
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise KDConfigError(name, f"must be in [0, 1], got {value!r}", "confidences and uncertainties are")
        if num_classes is not None and num_classes < 1:
            raise KDConfigError("num_classes", f"must be >= 1, got {num_classes}")
        self.threshold_mode = threshold_mode
        self.momentum = float(momentum)
        self.threshold_init = threshold_init
        self.teacher_threshold_init = float(teacher_threshold_init)
        self.student_threshold_init = float(student_threshold_init)
        self.register_buffer("teacher", torch.zeros(0))
        self.register_buffer("student", torch.zeros(0))
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))  # a class has had an update
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        if num_classes is not None:
            self.build(num_classes)

    @property
    def num_classes(self) -> int:
        return self.size

    def build(self, size: int) -> None:
        """Create the ``[C]`` buffers at their initial values (once; a second call must give the same C)."""
        if self.size:
            if self.size != size:
                raise KDConfigError("num_classes", f"the thresholds hold {self.size} classes, got {size}")
            return
        device = self.num_updates.device
        self.teacher = torch.full((size,), self.teacher_threshold_init, device=device)
        self.student = torch.full((size,), self.student_threshold_init, device=device)
        self.seen = torch.zeros(size, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, labels: Tensor, confidence: Tensor, uncertainty: Tensor, sync: bool = True) -> None:
        """Move the thresholds of the pseudo-classes in ``labels`` (``[N]``) towards the batch's class means of
        ``confidence`` and ``uncertainty`` (``[N]`` each); the class sums/counts are all-reduced when ``sync``."""
        if not self.size:
            raise KDConfigError("num_classes", "ClassThresholds has no classes yet", "build(num_classes) first")
        labels = labels.reshape(-1).to(self.teacher.device)
        stats = torch.zeros(3, self.size, dtype=torch.float64, device=self.teacher.device)
        stats[0].index_add_(0, labels, confidence.detach().reshape(-1).to(stats))
        stats[1].index_add_(0, labels, uncertainty.detach().reshape(-1).to(stats))
        stats[2].index_add_(0, labels, torch.ones_like(labels, dtype=stats.dtype))
        if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        present = stats[2] > 0
        means = (stats[:2] / stats[2].clamp_min(1)).to(self.teacher.dtype)
        if self.threshold_mode == "batch_mean":
            momentum = torch.zeros_like(self.teacher)
        else:
            momentum = torch.full_like(self.teacher, self.momentum)
            if self.threshold_init == "first_batch":
                momentum = torch.where(self.seen, momentum, torch.zeros_like(momentum))
        for buffer, mean in ((self.teacher, means[0]), (self.student, means[1])):
            moved = momentum * buffer + (1.0 - momentum) * mean
            buffer.copy_(torch.where(present, moved, buffer))
        self.seen |= present
        self.num_updates += 1

    def lookup(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(τ^T(ŷ_i), τ^S(ŷ_i))`` for pseudo-labels ``[N]`` (copies)."""
        return self.teacher[labels].clone(), self.student[labels].clone()

    def extra_repr(self) -> str:
        return f"num_classes={self.size}, threshold_mode={self.threshold_mode!r}, momentum={self.momentum}"


# ------------------------------------------------------------------ selection and the weighted loss
@dataclass
class Selection:
    """The outcome of :func:`select_samples` (every tensor ``[N]`` and detached).

    Attributes:
        mask: selected samples ``S``.
        weights: ``w_i`` on ``S`` (``Σ w = |S|``), 0 elsewhere.
        score: ``c_i·u_i`` of every sample.
        fallback: a 0-d bool tensor, whether ``S`` is the top-k fallback of an empty selection.
    """

    mask: Tensor
    weights: Tensor
    score: Tensor
    fallback: Tensor

    @property
    def count(self) -> Tensor:
        """``|S|`` (a 0-d tensor: no host sync)."""
        return self.mask.sum()


@torch.no_grad()
def selection_weights(score: Tensor, mask: Tensor, weighting: Weighting = "confidence_uncertainty") -> Tensor:
    """``w_i = |S|·s_i / Σ_{j∈S} s_j`` on ``S = mask`` (0 elsewhere; ``Σ w = |S|``).

    ``weighting="uniform"`` gives ``w_i = 1`` on ``S``; so does a selection whose scores sum to 0.
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    selected = mask.to(score.dtype)
    if weighting == "uniform":
        return selected
    masked = score * selected
    total = masked.sum()
    normalised = masked * (selected.sum() / total.clamp_min(torch.finfo(score.dtype).tiny))
    return torch.where(total > 0, normalised, selected)


@torch.no_grad()
def select_samples(
    confidence: Tensor,
    uncertainty: Tensor,
    labels: Tensor,
    teacher_thresholds: Tensor,
    student_thresholds: Tensor,
    empty: EmptyMode = "skip",
    fallback_k: int = 1,
    weighting: Weighting = "confidence_uncertainty",
) -> Selection:
    """``S = {i : c_i ≥ τ^T(ŷ_i) and u_i ≥ τ^S(ŷ_i)}`` and its weights, without autograd.

    Args:
        confidence: ``c_i``, ``[N]``.
        uncertainty: ``u_i``, ``[N]``.
        labels: pseudo-labels ``ŷ_i``, ``[N]``.
        teacher_thresholds: ``τ^T``, the ``[C]`` class table (read at ``ŷ_i``).
        student_thresholds: ``τ^S``, the ``[C]`` class table.
        empty: an empty ``S`` stays empty (``"skip"``: the loss is 0) or becomes the ``fallback_k`` samples of
            largest ``c·u`` (``"top_k"``; decided on the device, no host sync).
        fallback_k: k of the ``"top_k"`` fallback.
        weighting: ``"confidence_uncertainty"`` (``w ∝ c·u``) or ``"uniform"``.
    """
    check_choice("empty", empty, EMPTY_MODES)
    check_choice("weighting", weighting, WEIGHTINGS)
    if fallback_k < 1:
        raise KDConfigError("fallback_k", f"must be >= 1, got {fallback_k}")
    c, u = confidence.detach().reshape(-1), uncertainty.detach().reshape(-1)
    tau_t, tau_s = teacher_thresholds.detach()[labels], student_thresholds.detach()[labels]
    mask = (c >= tau_t.to(c.dtype)) & (u >= tau_s.to(u.dtype))
    score = c * u.to(c.dtype)
    fallback = torch.zeros((), dtype=torch.bool, device=c.device)
    if empty == "top_k" and c.numel():
        top = torch.zeros_like(mask)
        top[score.topk(min(fallback_k, score.numel())).indices] = True
        fallback = ~mask.any()
        mask = torch.where(fallback, top, mask)
    return Selection(mask=mask, weights=selection_weights(score, mask, weighting), score=score, fallback=fallback)


def weighted_pseudo_label_ce(student_logits: Tensor, labels: Tensor, selection: Selection) -> Tensor:
    """``L_w = (1/|S|) Σ_{i∈S} w_i · CE(z_S_i, ŷ_i)``; 0 (still attached to the student's graph) when ``S`` is
    empty, so every rank and optimiser sees a loss of the student's parameters."""
    ce = F.cross_entropy(upcast(student_logits), labels, reduction="none")
    ce = torch.where(selection.mask, ce, torch.zeros_like(ce))  # unselected rows add nothing, not even a NaN
    return (selection.weights.to(ce.dtype) * ce).sum() / selection.count.clamp_min(1).to(ce.dtype)


# ------------------------------------------------------------------ the loss module
class LLKDLoss(nn.Module):
    """LLKD's weighted pseudo-label loss with its adaptive class-wise thresholds (a stateful criterion).

    ``loss(student_logits, teacher_logits)`` on a batch of unlabeled inputs returns ``(L_w, selection, stats)``:
    pseudo-labels and confidences from the teacher, the student's uncertainty from its detached logits, the
    thresholds updated (before or after the selection: ``threshold_order``), the selection and its weights, and
    ``L_w``. RECONSTRUCTION of Li et al. (2025): see the module docstring; every uncertain choice is an argument.

    Args:
        num_classes: C (``None``: taken from the logits at the first call).
        temperature: τ of the teacher's confidence ``c_i = max softmax(z_T/τ)``.
        uncertainty: ``"entropy"`` (normalised by log C), ``"1-max_prob"`` or ``"margin"``.
        threshold_order: ``"update_first"`` (update with this batch, then select: the spec's τ_t) or
            ``"select_first"`` (select with τ_{t−1}, then update).
        empty, fallback_k, weighting: see :func:`select_samples`.
        threshold_mode, momentum, threshold_init, teacher_threshold_init, student_threshold_init: see
            :class:`ClassThresholds`.
        sync: all-reduce the class statistics of the thresholds under ``torch.distributed``.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        temperature: float = 1.0,
        uncertainty: str = "entropy",
        threshold_mode: ThresholdMode = "ema",
        momentum: float = 0.999,
        threshold_init: ThresholdInit = "constant",
        teacher_threshold_init: float = 0.5,
        student_threshold_init: float = 0.5,
        threshold_order: ThresholdOrder = "update_first",
        empty: EmptyMode = "skip",
        fallback_k: int = 1,
        weighting: Weighting = "confidence_uncertainty",
        sync: bool = True,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_choice("uncertainty", uncertainty, UNCERTAINTY_FUNCTIONS)
        check_choice("threshold_order", threshold_order, THRESHOLD_ORDERS)
        check_choice("empty", empty, EMPTY_MODES)
        check_choice("weighting", weighting, WEIGHTINGS)
        if not isinstance(fallback_k, int) or fallback_k < 1:
            raise KDConfigError("fallback_k", f"must be an integer >= 1, got {fallback_k!r}")
        self.temperature = float(temperature)
        self.uncertainty = uncertainty
        self.threshold_order = threshold_order
        self.empty = empty
        self.fallback_k = fallback_k
        self.weighting = weighting
        self.sync = sync
        self.thresholds = ClassThresholds(
            num_classes,
            threshold_mode=threshold_mode,
            momentum=momentum,
            threshold_init=threshold_init,
            teacher_threshold_init=teacher_threshold_init,
            student_threshold_init=student_threshold_init,
        )

    @torch.no_grad()
    def select(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Selection]:
        """``(pseudo-labels, selection)`` of a batch, updating the thresholds (no autograd)."""
        labels, confidence = teacher_pseudo_labels(teacher_logits, self.temperature)
        uncertainty = student_uncertainty(student_logits, self.uncertainty)
        self.thresholds.build(teacher_logits.shape[-1])
        if self.threshold_order == "update_first":
            self.thresholds.update(labels, confidence, uncertainty, sync=self.sync)
        tau_t, tau_s = self.thresholds.teacher.clone(), self.thresholds.student.clone()
        if self.threshold_order == "select_first":
            self.thresholds.update(labels, confidence, uncertainty, sync=self.sync)
        selection = select_samples(
            confidence, uncertainty, labels, tau_t, tau_s, self.empty, self.fallback_k, self.weighting
        )
        return labels, selection

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor, Selection]:
        """``(L_w, pseudo-labels, selection)`` for ``[N, C]`` student and teacher logits of unlabeled inputs."""
        labels, selection = self.select(student_logits, teacher_logits)
        return weighted_pseudo_label_ce(student_logits, labels, selection), labels, selection


# ------------------------------------------------------------------ data efficiency
class PoolUsage(_Resizable):
    """Which items of the unlabeled pool have ever been selected (a persistent ``uint8`` buffer, one per item):
    LLKD's data-efficiency measure (the share of the pool that the student ever trained on).

    Args:
        pool_size: items in the pool; ``None`` (or 0) until :meth:`build` or a checkpoint sizes it.
    """

    used: Tensor
    _sized = ("used",)

    def __init__(self, pool_size: int | None = None) -> None:
        super().__init__()
        self.register_buffer("used", torch.zeros(0, dtype=torch.uint8))
        if pool_size:
            self.build(pool_size)

    def build(self, size: int) -> None:
        """Create the buffer for ``size`` items (once; a second call must give the same size).

        Raises:
            KDConfigError: the pool has another size than the one recorded (another data set or split).
        """
        if self.size:
            if self.size != size:
                raise KDConfigError(
                    "data",
                    f"the unlabeled pool has {size} items but this LLKD run recorded the use of {self.size}",
                    "resume with the data (and split) the checkpoint was trained on",
                )
            return
        self.used = torch.zeros(size, dtype=torch.uint8, device=self.used.device)

    @torch.no_grad()
    def mark(self, pool_index: Tensor, mask: Tensor) -> None:
        """Record the selected items: ``used[pool_index[i]] = 1`` where ``mask[i]`` (no host sync)."""
        if not self.size:
            return
        index = pool_index.reshape(-1).to(device=self.used.device, dtype=torch.long)
        self.used.scatter_reduce_(0, index, mask.reshape(-1).to(self.used), reduce="amax")

    def fraction(self) -> Tensor:
        """Share of the pool ever selected (a 0-d float tensor; 0 for an unsized pool)."""
        if not self.size:
            return self.used.new_zeros((), dtype=torch.float32)
        return self.used.float().mean()
