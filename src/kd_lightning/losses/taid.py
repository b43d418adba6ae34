"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025; arXiv 2501.16937), pure torch.

The student learns from an *intermediate* teacher that interpolates, in logit space, between the
detached student and the teacher::

    p_t = softmax((1 − t)·sg(z_S) + t·z_T)
    J   = −(1/|M|) Σ_{i∈M} Σ_v p_t(v)·log softmax(z_S)(v)          (cross-entropy form, official)

and ``t`` grows from ``t_start`` to ``t_end`` (never below the linear schedule, never down), faster
while the loss falls quickly. The schedule state (``t``, previous loss, momentum, update count) are
persistent buffers of :class:`TAIDLoss`, so checkpoints carry them and resumed runs continue them.
Items are the leading positions of ``[..., C]`` logits (samples of ``[B, C]``, tokens of
``[B, T, V]``); an optional boolean ``mask`` of the leading shape selects the items that count.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, upcast
from kd_lightning.losses.divergences import forward_kl, reduce_items
from kd_lightning.losses.schedule import Progress, ScheduledLoss
from kd_lightning.losses.terms import weighted_terms

__all__ = ["TAIDLoss", "pending_over_ranks", "taid_interpolated_logits", "taid_loss"]

Objective = Literal["cross_entropy", "forward_kl"]


def pending_over_ranks(total: Tensor | None, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(Σ total, Σ count)`` over every process of ``torch.distributed`` (this one alone when not initialised).

    Used by the schedules of TAID and AdaKD so that every rank takes the same step from the same
    (rank- and micro-batch-averaged) loss, ``mean = Σ total / Σ count``. One ``all_reduce`` of a
    float64 pair; every rank must call it, also one that recorded nothing (``total=None``).
    """
    packed = torch.zeros(2, dtype=torch.float64, device=device if total is None else total.device)
    if total is not None:
        packed[0] = total.detach().double().reshape(())
        packed[1] = float(count)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed[0], packed[1]


def taid_interpolated_logits(student_logits: Tensor, teacher_logits: Tensor, t: float | Tensor) -> Tensor:
    """``(1 − t)·sg(z_S) + t·sg(z_T)``: the logits of TAID's intermediate teacher (no gradient)."""
    s, z = upcast(student_logits).detach(), upcast(teacher_logits).detach()
    return (1.0 - t) * s + t * z


def taid_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    t: float | Tensor,
    mask: Tensor | None = None,
    objective: Objective = "cross_entropy",
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """TAID distillation term per item (or averaged over the items of ``mask``).

    ``objective="cross_entropy"`` is the official form ``−Σ_v p_t(v)·log q_S(v)`` (vocabulary entries
    where the student logit is ``−inf`` are left out of the sum, as in the official code);
    ``"forward_kl"`` subtracts the entropy of ``p_t``: same gradient, a value that is 0 at a match
    (the value feeds the adaptive update of ``t``, so the two forms give different schedules).
    """
    check_logits(student_logits, teacher_logits)
    target = taid_interpolated_logits(student_logits, teacher_logits, t)
    if objective == "forward_kl":
        return forward_kl(student_logits, target, mask=mask, reduction=reduction)
    if objective != "cross_entropy":
        raise KDConfigError(f"objective must be 'cross_entropy' or 'forward_kl', got {objective!r}.")
    s = upcast(student_logits)
    log_q = F.log_softmax(s, dim=-1)
    p_t = F.softmax(target, dim=-1)
    terms = torch.where(torch.isinf(s), torch.zeros_like(log_q), p_t * log_q)
    return reduce_items(-terms.sum(-1), mask, reduction)


class TAIDLoss(nn.Module, ScheduledLoss):
    """TAID loss with its adaptive interpolation schedule as checkpointed state.

    ``total = distil_ratio·J_TAID(t) + (1 − distil_ratio)·CE(z_S, y)``; returns
    ``{"loss", "taid", "ce"}`` (weighted parts; ``"ce"`` only when labels are used).

    Schedule (official ``update_t``, called once per optimizer step with the detached TAID loss J_n)::

        first update: prev = J_n (t stays t_start)
        δ_n = (prev − J_n)/(prev + eps);  m_n = β·m_{n−1} + (1 − β)·δ_n
        t_lin = t_start + (t_end − t_start)·progress
        t ← min(t_end, max(t_lin, t + α·sigmoid(m_n)·(1 − t)));  prev = J_n

    ``disable_adaptive`` gives ``t = t_lin`` (the paper's ablation). ``t`` never decreases.

    In training mode every call records its (unweighted) TAID loss; :meth:`update_schedule` averages the
    calls since the last update, over ranks too (``all_reduce`` when ``torch.distributed`` is
    initialised), and steps the schedule once: call it once per optimizer step.

    Args:
        t_start: first interpolation coefficient (official 0.4; 0.2 for the widest capacity gap).
        t_end: last coefficient (1: the teacher itself).
        alpha: α, learning rate of ``t`` (official 5e-4).
        beta: β, momentum of the relative loss decrease (official 0.99).
        disable_adaptive: follow the linear schedule only.
        distil_ratio: weight of the TAID term; ``1 − distil_ratio`` weights the cross-entropy on labels
            (official 1.0: no labels).
        objective: ``"cross_entropy"`` (official) or ``"forward_kl"``; see :func:`taid_loss`.
        eps: added to the previous loss in δ_n (official 1e-15).
        ignore_index: label of items left out of the cross-entropy (padding tokens).
    """

    needs_run_length = True

    t: Tensor
    prev_loss: Tensor
    momentum: Tensor
    num_updates: Tensor

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        disable_adaptive: bool = False,
        distil_ratio: float = 1.0,
        objective: Objective = "cross_entropy",
        eps: float = 1e-15,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise KDConfigError(
                f"t_start and t_end must satisfy 0 <= t_start <= t_end <= 1, got {t_start} and {t_end}."
            )
        if alpha < 0:
            raise KDConfigError(f"alpha must be >= 0, got {alpha}.")
        if not 0.0 <= beta < 1.0:
            raise KDConfigError(f"beta must be in [0, 1), got {beta}.")
        if not 0.0 <= distil_ratio <= 1.0:
            raise KDConfigError(f"distil_ratio must be in [0, 1], got {distil_ratio}.")
        if objective not in ("cross_entropy", "forward_kl"):
            raise KDConfigError(f"objective must be 'cross_entropy' or 'forward_kl', got {objective!r}.")
        if eps < 0:
            raise KDConfigError(f"eps must be >= 0, got {eps}.")
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.disable_adaptive = disable_adaptive
        self.distil_ratio = distil_ratio
        self.objective: Objective = objective
        self.eps = eps
        self.ignore_index = ignore_index
        self.register_buffer("t", torch.tensor(float(t_start)))
        self.register_buffer("prev_loss", torch.tensor(0.0))
        self.register_buffer("momentum", torch.tensor(0.0))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        # Sum and count of the loss values recorded since the last schedule update. Plain attributes, not
        # buffers: DDP broadcasts buffers from rank 0 at every forward, overwriting each rank's own values.
        self._pending_total: Tensor | None = None
        self._pending_count = 0

    # ------------------------------------------------------------------ loss
    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target if self.distil_ratio < 1.0 else None)
        distil = taid_loss(student_logits, teacher_logits, self.t, mask, self.objective)
        if self.training:
            self.record(distil)
        terms = {"taid": distil}
        if self.distil_ratio < 1.0:
            if target is None:
                raise KDConfigError(f"distil_ratio={self.distil_ratio} < 1 mixes in a cross-entropy: pass target.")
            flat = upcast(student_logits).reshape(-1, student_logits.shape[-1])
            per_item = F.cross_entropy(flat, target.reshape(-1), ignore_index=self.ignore_index, reduction="none")
            valid = target != self.ignore_index
            keep = valid if mask is None else valid & mask
            terms["ce"] = reduce_items(per_item.reshape(target.shape), keep)
        return weighted_terms(terms, {"taid": self.distil_ratio, "ce": 1.0 - self.distil_ratio})

    def token_sum(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
        """``Σ`` of the TAID term over the tokens of ``mask`` (no CE): a token objective of LMDistill.

        In training it records the tokens' mean for the schedule, as :meth:`forward` does.
        """
        total = taid_loss(student_logits, teacher_logits, self.t, mask, self.objective, reduction="none").sum()
        if self.training:
            self.record(total.detach() / mask.sum().clamp_min(1))
        return total

    # ------------------------------------------------------------------ schedule
    def record(self, loss: Tensor) -> None:
        """Keep a (detached) TAID loss value for the next :meth:`update_schedule` (``forward`` does in training)."""
        value = loss.detach().double()
        self._pending_total = value if self._pending_total is None else self._pending_total + value
        self._pending_count += 1

    def linear_t(self, progress: float) -> float:
        """``t_start + (t_end − t_start)·progress`` with ``progress`` clipped to [0, 1]."""
        return self.t_start + (self.t_end - self.t_start) * min(max(float(progress), 0.0), 1.0)

    @torch.no_grad()
    def update_t(self, loss: float | Tensor, progress: float) -> None:
        """One step of the schedule from the loss value ``loss`` at training progress ``progress`` ∈ [0, 1]."""
        value = torch.as_tensor(loss, dtype=self.t.dtype, device=self.t.device)
        first = self.num_updates == 0
        t_lin = torch.tensor(self.linear_t(progress), dtype=self.t.dtype, device=self.t.device)
        delta = (self.prev_loss - value) / (self.prev_loss + self.eps)
        momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
        if self.disable_adaptive:
            proposal = t_lin
        else:
            proposal = torch.maximum(t_lin, self.t + self.alpha * torch.sigmoid(momentum) * (1.0 - self.t))
        new_t = torch.maximum(self.t, proposal).clamp(max=self.t_end)
        self.t.copy_(torch.where(first, self.t, new_t))
        self.momentum.copy_(torch.where(first, self.momentum, momentum))
        self.prev_loss.copy_(value)
        self.num_updates += 1

    @torch.no_grad()
    def update_schedule(self, progress: float) -> bool:
        """Step the schedule with the mean TAID loss recorded since the last call (all ranks).

        Returns whether a step was taken (not when nothing was recorded on any rank).
        """
        total, count = pending_over_ranks(self._pending_total, self._pending_count, self.t.device)
        self._pending_total, self._pending_count = None, 0
        if count.item() == 0:
            return False
        self.update_t(total / count, progress)
        return True

    def step_schedule(self, progress: Progress) -> None:
        """Scheduled-loss protocol: once per optimizer step, move ``t`` (:meth:`update_schedule`)."""
        self.update_schedule(progress.fraction if progress.fraction is not None else 0.0)

    def schedule_stats(self) -> dict[str, float | Tensor]:
        return {"taid_t": self.t.clone()}
