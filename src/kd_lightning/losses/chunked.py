"""A chunked, fused LM-head + distillation loss whose (tokens × vocabulary) logits never exist at once.

For a chunk of ``C`` tokens at a time, :func:`chunked_distillation_loss` computes the student's logits
``x_c Wᵀ`` (and the teacher's, from its hidden states and LM head, or takes the chunk's rows of
given teacher logits), their log-softmax, the token objective's value **and its gradient with
respect to the student logits, analytically**, then ``∂L/∂x_c = G W`` and ``∂L/∂W += Gᵀ x_c``. The
gradients are finished in the forward pass; ``backward`` only scales them by the incoming gradient.
The idea is Liger-Kernel's chunked loss, here in plain PyTorch with pre-allocated chunk workspaces
reused across chunks (``out=`` and in-place operations), so the peak memory is about
``V·H`` (the LM-head gradient) + a few ``C·V`` buffers instead of about seven ``N·V`` tensors.

Objectives (``p`` = teacher, ``q`` = student distribution, both ``softmax(logits / τ)``; per token,
summed over the vocabulary; ``z = s/τ`` the tempered student logits, ``ℓ = log q``). The gradient of
every objective is written in :data:`CHUNK_OBJECTIVES`, each next to its value, from the identity
``∂L/∂z_j = h_j − q_j Σ_v h_v`` with ``h = ∂L/∂ℓ``:

=====================  ==============================================  ==========================================
name                   value                                           ``∂L/∂z``
=====================  ==============================================  ==========================================
``forward_kl``         ``Σ p (log p − ℓ)``                             ``q − p``
``reverse_kl``         ``R = Σ q (ℓ − log p)``                         ``q ⊙ (ℓ − log p − R)``
``jsd`` (β)            ``[β KL(p‖m) + (1−β) KL(q‖m)] / (β(1−β))``,     ``q ⊙ (ℓ − log m − K_q) / β``,
                       ``m = βp + (1−β)q`` (``normalized=False``: not  ``K_q = KL(q‖m)`` (``normalized=False``:
                       divided); β = 0: forward, β = 1: reverse KL     ``(1−β)·q ⊙ (ℓ − log m − K_q)``)
``skew_kl`` (α)        ``KL(p ‖ m)``, ``m = αp + (1−α)q``              ``(1−α)(q S − u)``, ``u = pq/m``, ``S = Σu``
``skew_reverse_kl``    ``K = KL(q ‖ m)``, ``m = (1−α)p + αq``          ``q ⊙ (ℓ − log m − K − α(q/m − Σ q²/m))``
``tv``                 ``½ Σ |p − q|``                                 ``½ q ⊙ (σ − Σ q σ)``, ``σ = sign(q − p)``
``mixed_kl`` (λ)       ``λ·reverse + (1−λ)·forward``                   the same mixture of the two gradients
=====================  ==============================================  ==========================================

and ``∂L/∂s = ∂L/∂z / τ``. The values are the token objectives of :mod:`kd_lightning.losses.lm`, with
the same hyperparameters and defaults (the tests check every value and gradient against autograd
through them). The mixtures enter through ``log(m/a) = log1p(w·expm1(log b − log a))``, accurate
relative to the mixing weight, as in :mod:`kd_lightning.losses.lm` (so the normalised JSD stays exact
for β near 0 or 1).

Memory (fp32, ``n`` valid tokens, hidden ``H``, vocabulary ``V``, chunk ``C``): ``V·H`` for the
LM-head gradient, ``n·H`` for the hidden-state gradient and the compacted inputs, and 4 ``C·V``
buffers (student and teacher logits and probabilities) + 1 row-product scratch buffer, + 1 float and
1 bool buffer for ``jsd``/``skew_*``, + 1 for the cross-entropy term. ``benchmarks/chunked_loss.py``
measures it against the naive path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature

__all__ = [
    "CHUNK_OBJECTIVES",
    "ChunkObjective",
    "chunked_distillation_loss",
]

Reduction = Literal["mean", "sum"]

#: Default number of tokens per chunk: 256 × 32,000 fp32 logits are 31 MiB per buffer.
DEFAULT_CHUNK_SIZE = 256


# ---------------------------------------------------------------------------------------------------- workspace
class _Work:
    """Views of the pre-allocated ``[C, V]`` buffers for one chunk of ``c ≤ C`` tokens.

    On entry to an objective: ``lq = log q``, ``q``, ``lp = log p``, ``p`` (all ``[c, V]``). An objective
    may overwrite every buffer; it must leave ``∂L/∂z`` (the gradient of its per-token value with
    respect to the tempered student logits) in ``q`` and return the per-token values ``[c]``.
    ``extra`` (float) and ``flags`` (bool) are the buffers of the objectives that declare ``extra_buffers=1``;
    ``scratch`` is a float buffer every objective may use between calls of :meth:`rowdot`.
    """

    __slots__ = ("extra", "flags", "lp", "lq", "p", "q", "scratch")

    def __init__(
        self, lq: Tensor, q: Tensor, lp: Tensor, p: Tensor, extra: Tensor | None, flags: Tensor | None, scratch: Tensor
    ) -> None:
        self.lq, self.q, self.lp, self.p = lq, q, lp, p
        self.extra, self.flags, self.scratch = extra, flags, scratch

    def rowdot(self, a: Tensor, b: Tensor) -> Tensor:
        """``Σ_v a[:, v]·b[:, v]`` per row (``[c]``), through the scratch buffer (no allocation of ``[c, V]``)."""
        torch.mul(a, b, out=self.scratch)
        return self.scratch.sum(-1)


def _log_mixture_ratio_(out: Tensor, d: Tensor, weight: float, work: _Work) -> Tensor:
    """``out ← log((1 − w) + w·eᵈ)``: ``log(m/a)`` for ``m = (1 − w)·a + w·b`` and ``d = log b − log a``.

    Computed as ``log1p(w·expm1(d))``, accurate relative to ``w`` (so it can be divided by a small β);
    where ``1 + w·expm1(d)`` would cancel (``w > ½`` and ``w·expm1(d) < −½``), as
    ``logaddexp(d + log w, log(1 − w))``. ``d`` is clamped below the overflow of ``expm1``: beyond it,
    the ratio only ever meets a factor ``eᵃ < e⁻⁸⁰`` (fp32). ``d`` is left unchanged.
    """
    limit = math.log(torch.finfo(d.dtype).max) - 8.0
    x = torch.clamp(d, max=limit, out=out).expm1_().mul_(weight)
    if weight <= 0.5:  # 1 + x ≥ 1 − w ≥ ½: no cancellation
        return x.log1p_()
    flags = torch.lt(x, -0.5, out=work.flags)
    x.log1p_()
    alt = torch.add(d, math.log(weight) - math.log1p(-weight), out=work.scratch)
    torch.logaddexp(alt, torch.zeros((), dtype=alt.dtype, device=alt.device), out=alt).add_(math.log1p(-weight))
    return torch.where(flags, alt, out, out=out)


# ---------------------------------------------------------------------------------------------------- objectives
def _forward_kl(w: _Work) -> Tensor:
    # L = Σ p (log p − log q);  ∂L/∂z = q − p.
    w.lp.sub_(w.lq)
    value = w.rowdot(w.p, w.lp)
    w.q.sub_(w.p)
    return value


def _reverse_kl(w: _Work) -> Tensor:
    # L = R = Σ q (log q − log p);  h = q (log q − log p + 1), Σh = R + 1;  ∂L/∂z = q (log q − log p − R).
    d = w.lq.sub_(w.lp)
    value = w.rowdot(w.q, d)
    w.q.mul_(d.sub_(value.unsqueeze(-1)))
    return value


def _mixed_kl(w: _Work, reverse_weight: float) -> Tensor:
    # L = λ R + (1 − λ) F;  ∂L/∂z = λ q (d − R) + (1 − λ)(q − p),  d = log q − log p.
    lam = reverse_weight
    d = w.lq.sub_(w.lp)
    rkl = w.rowdot(w.q, d)
    fkl = -w.rowdot(w.p, d)
    w.q.mul_(d.sub_(rkl.unsqueeze(-1)).mul_(lam).add_(1.0 - lam)).sub_(w.p, alpha=1.0 - lam)
    return lam * rkl + (1.0 - lam) * fkl


def _jsd(w: _Work, beta: float, normalized: bool) -> Tensor:
    # m = βp + (1−β)q;  K_p = KL(p‖m) = −Σ p r_p,  K_q = KL(q‖m) = −Σ q r_q,  r_a = log(m/a).
    # J = β K_p + (1−β) K_q, divided by β(1−β) when normalized (→ forward KL as β→0, reverse KL as β→1).
    # ∂/∂log q of β K_p + (1−β) K_q is h = −(1−β) q r_q (the ∂ log m terms cancel) and Σh = (1−β) K_q, so
    # ∂(β K_p + (1−β) K_q)/∂z = −(1−β) q (r_q + K_q); normalized: −q (r_q + K_q) / β.
    if beta <= 0.0:
        return _forward_kl(w)
    if beta >= 1.0:
        return _reverse_kl(w)
    d = torch.sub(w.lp, w.lq, out=w.extra)  # log p − log q
    r_q = _log_mixture_ratio_(w.lq, d, beta, w)  # log(m/q), m = (1−β)q + βp
    r_p = _log_mixture_ratio_(w.lp, d.neg_(), 1.0 - beta, w)  # log(m/p), m = βp + (1−β)q
    k_p = -w.rowdot(w.p, r_p)
    k_q = -w.rowdot(w.q, r_q)
    scale = 1.0 / beta if normalized else 1.0 - beta
    w.q.mul_(r_q.add_(k_q.unsqueeze(-1))).mul_(-scale)
    if normalized:
        return k_p / (1.0 - beta) + k_q / beta
    return beta * k_p + (1.0 - beta) * k_q


def _skew_kl(w: _Work, alpha: float) -> Tensor:
    # m = αp + (1−α)q, r = log(m/p);  L = −Σ p r;  h = −(1−α) p q / m = −(1−α) u with u = q e^{−r};
    # ∂L/∂z = h − q Σh = (1−α)(q Σu − u).
    if alpha <= 0.0:
        return _forward_kl(w)
    d = torch.sub(w.lq, w.lp, out=w.extra)  # log q − log p
    r = _log_mixture_ratio_(w.lp, d, 1.0 - alpha, w)
    value = -w.rowdot(w.p, r)
    u = r.neg_().exp_().mul_(w.q)
    total = u.sum(-1, keepdim=True)
    w.q.mul_(total).sub_(u).mul_(1.0 - alpha)
    return value


def _skew_reverse_kl(w: _Work, alpha: float) -> Tensor:
    # m = (1−α)p + αq, r = log(m/q);  L = K = −Σ q r;  h = −q r + q − α q²/m = q (1 − r − α e^{−r});
    # ∂L/∂z = q (−r − K − α (e^{−r} − Σ q e^{−r})).
    if alpha <= 0.0:
        return _reverse_kl(w)
    d = torch.sub(w.lp, w.lq, out=w.extra)  # log p − log q
    r = _log_mixture_ratio_(w.lq, d, 1.0 - alpha, w)
    value = -w.rowdot(w.q, r)
    e = torch.neg(r, out=w.lp).exp_()  # q/m
    s = w.rowdot(w.q, e)
    r.add_(value.unsqueeze(-1)).neg_().sub_(e.sub_(s.unsqueeze(-1)).mul_(alpha))
    w.q.mul_(r)
    return value


def _total_variation(w: _Work) -> Tensor:
    # L = ½ Σ |p − q|;  with σ = sign(q − p): ∂L/∂z = ½ q (σ − Σ q σ)  (σ = 0 where p = q, as autograd's |·|).
    diff = w.p.sub_(w.q).neg_()
    value = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
    sign = diff.sign_()
    s = w.rowdot(w.q, sign)
    w.q.mul_(sign.sub_(s.unsqueeze(-1))).mul_(0.5)
    return value


_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "beta": (lambda v: 0.0 <= v <= 1.0, "[0, 1]"),
    "alpha": (lambda v: 0.0 <= v < 1.0, "[0, 1)"),
    "reverse_weight": (lambda v: 0.0 <= v <= 1.0, "[0, 1]"),
}


@dataclass(frozen=True)
class ChunkObjective:
    """A token objective for the chunked path: in-place value and ``∂/∂z`` on a chunk's buffers.

    Attributes:
        name: the name in :data:`kd_lightning.losses.lm.TOKEN_OBJECTIVES`.
        fn: ``fn(work, **params) -> per-token values``; leaves ``∂L/∂z`` in ``work.q``.
        params: the objective's hyperparameters and their defaults (those of the token objective).
        extra_buffers: ``[C, V]`` float (+ bool) buffers it needs beyond the four of the two distributions.
    """

    name: str
    fn: Callable[..., Tensor]
    params: Mapping[str, Any] = field(default_factory=dict)
    extra_buffers: int = 0

    def bind(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The hyperparameters with defaults filled in, checked like :func:`~kd_lightning.losses.lm.token_objective`.

        Raises:
            KDConfigError: an argument the objective does not take, or a value out of range.
        """
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown:
            allowed = sorted(self.params) or "none"
            raise KDConfigError(f"token objective {self.name!r} takes {allowed} as hyperparameters, not {unknown}.")
        bound = {k: kwargs.get(k, v) for k, v in self.params.items()}
        for key, value in bound.items():
            if key in _RANGES:
                check, text = _RANGES[key]
                if not check(float(value)):
                    raise KDConfigError(f"token objective {self.name!r}: {key} must be in {text}, got {value}.")
                bound[key] = float(value)
            else:
                bound[key] = bool(value)
        return bound

    def needs_extra(self, params: Mapping[str, Any]) -> bool:
        """Whether this call needs the extra buffers (not at the ends where the objective is a plain KL)."""
        if self.extra_buffers == 0:
            return False
        if "beta" in params:
            return 0.0 < params["beta"] < 1.0
        return params.get("alpha", 1.0) > 0.0


#: The objectives of the chunked path, by the names of :data:`kd_lightning.losses.lm.TOKEN_OBJECTIVES`.
CHUNK_OBJECTIVES: dict[str, ChunkObjective] = {
    "forward_kl": ChunkObjective("forward_kl", _forward_kl),
    "reverse_kl": ChunkObjective("reverse_kl", _reverse_kl),
    "jsd": ChunkObjective("jsd", _jsd, {"beta": 0.5, "normalized": True}, extra_buffers=1),
    "skew_kl": ChunkObjective("skew_kl", _skew_kl, {"alpha": 0.1}, extra_buffers=1),
    "skew_reverse_kl": ChunkObjective("skew_reverse_kl", _skew_reverse_kl, {"alpha": 0.1}, extra_buffers=1),
    "tv": ChunkObjective("tv", _total_variation),
    "mixed_kl": ChunkObjective("mixed_kl", _mixed_kl, {"reverse_weight": 0.25}),
}


# ---------------------------------------------------------------------------------------------------- engine
def _softmax_pair_(logits: Tensor, probs: Tensor) -> None:
    """In place: ``logits ← log_softmax(logits)`` and ``probs ← softmax(logits)`` with one ``exp`` pass."""
    top = logits.amax(dim=-1, keepdim=True)
    torch.sub(logits, top, out=probs).exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    logits.sub_(top.add_(total.log_()))


@dataclass
class _Config:
    objective: ChunkObjective
    params: dict[str, Any]
    temperature: float
    reduction: Reduction
    chunk_size: int
    kd_weight: float
    ce_weight: float
    grad_hidden: bool
    grad_weight: bool


def _run(
    x: Tensor,
    w: Tensor,
    t_logits: Tensor | None,
    t_hidden: Tensor | None,
    t_w: Tensor | None,
    mask: Tensor | None,
    labels: Tensor | None,
    cfg: _Config,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Loss, its unweighted KD and CE parts, and (when asked) the gradients, chunk by chunk.

    ``x`` ``[N, H]``, ``w`` ``[V, H]``, teacher ``[N, V]`` logits or ``[N, H_t]`` hidden states with
    ``[V, H_t]`` weight, ``mask`` ``[N]`` bool or ``None``, ``labels`` ``[N]`` (CE targets) or ``None``.
    """
    n_all, vocab = x.shape[0], w.shape[0]
    dtype = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
    device = x.device
    idx = None if mask is None else mask.nonzero().squeeze(1)
    n = n_all if idx is None else int(idx.numel())
    norm = float(max(n, 1)) if cfg.reduction == "mean" else 1.0
    tau = cfg.temperature

    def rows(t: Tensor) -> Tensor:  # valid rows in the compute dtype
        t = t if idx is None else t.index_select(0, idx)
        return t.to(dtype)

    xv = rows(x)
    wc = w.to(dtype)
    tv = rows(t_hidden) if t_hidden is not None else None
    twc = t_w.to(dtype) if t_w is not None else None
    yv = (labels if idx is None else labels.index_select(0, idx)) if labels is not None else None

    grad_x = torch.zeros(n_all, x.shape[1], dtype=dtype, device=device) if cfg.grad_hidden else None
    grad_w = torch.zeros_like(wc) if cfg.grad_weight else None
    needs_grad = grad_x is not None or grad_w is not None
    kd_sum = torch.zeros((), dtype=torch.float64, device=device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    if n > 0:
        size = min(cfg.chunk_size, n)
        alloc = lambda: torch.empty(size, vocab, dtype=dtype, device=device)  # noqa: E731
        zs, q, zt, p, scratch = alloc(), alloc(), alloc(), alloc(), alloc()
        extra = flags = None
        if cfg.objective.needs_extra(cfg.params):
            extra = alloc()
            flags = torch.empty(size, vocab, dtype=torch.bool, device=device)
        ce_buf = alloc() if cfg.ce_weight > 0 else None
        gx_buf = torch.empty(size, x.shape[1], dtype=dtype, device=device) if grad_x is not None else None
        for start in range(0, n, size):
            stop = min(start + size, n)
            c = stop - start
            zs_c, q_c, zt_c, p_c = zs[:c], q[:c], zt[:c], p[:c]
            x_c = xv[start:stop]
            torch.mm(x_c, wc.t(), out=zs_c)
            if tv is not None:
                torch.mm(tv[start:stop], twc.t(), out=zt_c)
            else:
                zt_c.copy_(_teacher_rows(t_logits, start, stop, idx))
            if ce_buf is not None:  # cross-entropy on the untempered student logits: value and ∂/∂s = q₁ − onehot
                e = ce_buf[:c]
                y = yv[start:stop]
                keep = y >= 0
                y_safe = torch.where(keep, y, torch.zeros_like(y)).unsqueeze(-1)
                top = zs_c.amax(dim=-1, keepdim=True)
                torch.sub(zs_c, top, out=e).exp_()
                total = e.sum(-1, keepdim=True)
                ce = (top + total.log()).squeeze(-1) - zs_c.gather(-1, y_safe).squeeze(-1)
                ce_sum += (ce * keep).sum(dtype=torch.float64)
                if needs_grad:
                    e.div_(total)
                    e.scatter_add_(-1, y_safe, torch.full_like(y_safe, -1, dtype=dtype))
                    e.mul_(keep.unsqueeze(-1))
            if tau != 1.0:
                zs_c.div_(tau)
                zt_c.div_(tau)
            _softmax_pair_(zs_c, q_c)
            _softmax_pair_(zt_c, p_c)
            work = _Work(
                zs_c,
                q_c,
                zt_c,
                p_c,
                None if extra is None else extra[:c],
                None if flags is None else flags[:c],
                scratch[:c],
            )
            values = cfg.objective.fn(work, **cfg.params)
            kd_sum += values.sum(dtype=torch.float64)
            if not needs_grad:
                continue
            g = q_c.mul_(cfg.kd_weight / (tau * norm))  # ∂(weighted, reduced loss)/∂ student logits
            if ce_buf is not None:
                g.add_(ce_buf[:c], alpha=cfg.ce_weight / norm)
            if grad_x is not None:
                gx = torch.mm(g, wc, out=gx_buf[:c])
                if idx is None:
                    grad_x[start:stop] = gx
                else:
                    grad_x.index_copy_(0, idx[start:stop], gx)
            if grad_w is not None:
                grad_w.addmm_(g.t(), x_c)
    kd = (kd_sum / norm).to(dtype)
    ce = (ce_sum / norm).to(dtype)
    loss = cfg.kd_weight * kd + cfg.ce_weight * ce if cfg.ce_weight > 0 else cfg.kd_weight * kd
    if grad_x is not None:
        grad_x = grad_x.to(x.dtype)
    if grad_w is not None:
        grad_w = grad_w.to(w.dtype)
    return loss.to(x.dtype), kd, ce, grad_x, grad_w


def _teacher_rows(t_logits: Tensor, start: int, stop: int, idx: Tensor | None) -> Tensor:
    """Rows ``start:stop`` of the valid tokens of teacher logits ``[N, V]`` or ``[..., V]`` (a ``[c, V]`` tensor)."""
    if t_logits.dim() == 2:
        return t_logits[start:stop] if idx is None else t_logits.index_select(0, idx[start:stop])
    rows = torch.arange(start, stop, device=t_logits.device) if idx is None else idx[start:stop]
    return t_logits[torch.unravel_index(rows, t_logits.shape[:-1])]


class _ChunkedDistillation(torch.autograd.Function):
    """Loss in ``forward`` with the gradients computed there too; ``backward`` scales them."""

    @staticmethod
    def forward(ctx, x, w, t_logits, t_hidden, t_w, mask, labels, cfg):  # type: ignore[override]
        loss, kd, ce, grad_x, grad_w = _run(x, w, t_logits, t_hidden, t_w, mask, labels, cfg)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):  # type: ignore[override]
        grad_x, grad_w = ctx.saved_tensors
        unit = grad_loss.numel() == 1 and bool(grad_loss == 1)
        if not unit:
            grad_x = None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_x, grad_w, None, None, None, None, None, None


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_lm_head_weight: Tensor | None = None,
    mask: Tensor | None = None,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kd_weight: float = 1.0,
    labels: Tensor | None = None,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    return_parts: bool = False,
    **objective_kwargs: float,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Token distillation loss of a student LM head, computed chunk by chunk with analytic gradients.

    Equals ``kd_weight · objective(x Wᵀ, teacher_logits, τ, mask)`` (+ ``ce_weight · CE(x Wᵀ, labels)``)
    of the naive path, with ``objective`` one of :data:`kd_lightning.losses.lm.TOKEN_OBJECTIVES`, but the
    ``[N, V]`` logits never exist: tokens are processed ``chunk_size`` at a time and the gradients with
    respect to ``student_hidden`` and ``student_lm_head_weight`` are computed in the forward pass
    (``backward`` only multiplies them by the incoming gradient). The teacher is a constant: no
    gradient reaches it. Masked tokens cost nothing (the valid tokens are gathered first).

    Args:
        student_hidden: ``[..., H]`` final hidden states of the student (before its LM head), already
            aligned with the targets (shifted for next-token prediction).
        student_lm_head_weight: ``[V, H]`` weight of the student's LM head (no bias).
        teacher_logits: ``[..., V]`` teacher logits. Alternatively ``teacher_hidden`` and
            ``teacher_lm_head_weight``: the teacher's chunk logits are then computed per chunk too.
        teacher_hidden: ``[..., H_t]`` teacher hidden states.
        teacher_lm_head_weight: ``[V, H_t]`` teacher LM-head weight.
        mask: ``[...]`` bool, the tokens that count. ``None``: ``labels != ignore_index`` when labels
            are given, else every token.
        objective: a name of :data:`CHUNK_OBJECTIVES`; its hyperparameters (``beta`` of ``jsd``,
            ``alpha`` of ``skew_kl``/``skew_reverse_kl``, ``reverse_weight`` of ``mixed_kl``) are
            passed as keyword arguments.
        temperature: ``τ`` of both softmaxes (no ``τ²`` factor, as in :mod:`kd_lightning.losses.divergences`).
        reduction: ``"mean"`` over the valid tokens or ``"sum"`` (for global token normalisation with
            :func:`kd_lightning.losses.lm.normalize_token_sum`).
        chunk_size: tokens per chunk. Memory grows with it (5–7 buffers of ``chunk_size × V``);
            256–512 is a good CPU setting at V = 32k.
        kd_weight: weight of the distillation term.
        labels: ``[...]`` target token ids for the optional cross-entropy term (``ignore_index``
            excluded); CE uses the untempered student logits.
        ce_weight: weight of the cross-entropy term (0: no CE; nothing is mixed in by default).
        ignore_index: label value that is not a target.
        return_parts: also return ``{"kd": ..., "ce": ...}`` (unweighted, reduced like the loss, detached).

    Returns:
        The scalar loss, and the parts with ``return_parts=True``.

    Raises:
        ValueError: unknown objective or argument, shapes or vocabularies that do not match.
    """
    spec = CHUNK_OBJECTIVES.get(objective)
    if spec is None:
        raise KDConfigError(f"unknown token objective {objective!r}; choose one of {sorted(CHUNK_OBJECTIVES)}.")
    params = spec.bind(objective_kwargs)
    check_temperature(temperature)
    if reduction not in ("mean", "sum"):
        raise KDConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise KDConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if ce_weight < 0 or kd_weight < 0:
        raise KDConfigError(f"kd_weight and ce_weight must be >= 0, got {kd_weight} and {ce_weight}.")
    if ce_weight > 0 and labels is None:
        raise KDConfigError("ce_weight > 0 needs labels (the target token ids).")

    hidden_size = student_hidden.shape[-1]
    if student_lm_head_weight.dim() != 2 or student_lm_head_weight.shape[1] != hidden_size:
        raise KDConfigError(
            f"student_lm_head_weight must be [V, H] with H = {hidden_size} (the hidden size of student_hidden), "
            f"got {tuple(student_lm_head_weight.shape)}."
        )
    vocab = student_lm_head_weight.shape[0]
    lead = student_hidden.shape[:-1]
    x = student_hidden.reshape(-1, hidden_size)
    n = x.shape[0]
    t_logits = t_hidden = t_w = None
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_lm_head_weight is not None:
            raise KDConfigError("give either teacher_logits or teacher_hidden + teacher_lm_head_weight, not both.")
        if teacher_logits.shape[:-1] != lead:
            raise KDConfigError(
                f"teacher_logits {tuple(teacher_logits.shape)} do not match student_hidden "
                f"{tuple(student_hidden.shape)} in their leading (token) dimensions."
            )
        _check_vocab(vocab, teacher_logits.shape[-1])
        t_logits = teacher_logits.detach()
        if t_logits.dim() != 2:  # a view when the layout allows, else rows are gathered chunk by chunk
            with contextlib.suppress(RuntimeError):  # e.g. logits[:, :-1]: never copy the [N, V] tensor whole
                t_logits = t_logits.view(n, t_logits.shape[-1])
    else:
        if teacher_hidden is None or teacher_lm_head_weight is None:
            raise KDConfigError(
                "the teacher is missing: give teacher_logits, or teacher_hidden and teacher_lm_head_weight."
            )
        if teacher_hidden.shape[:-1] != lead:
            raise KDConfigError(
                f"teacher_hidden {tuple(teacher_hidden.shape)} does not match student_hidden "
                f"{tuple(student_hidden.shape)} in its leading (token) dimensions."
            )
        if teacher_lm_head_weight.dim() != 2 or teacher_lm_head_weight.shape[1] != teacher_hidden.shape[-1]:
            raise KDConfigError(
                f"teacher_lm_head_weight must be [V, H_t] with H_t = {teacher_hidden.shape[-1]}, "
                f"got {tuple(teacher_lm_head_weight.shape)}."
            )
        _check_vocab(vocab, teacher_lm_head_weight.shape[0])
        t_hidden = teacher_hidden.detach().reshape(n, -1)
        t_w = teacher_lm_head_weight.detach()
    flat_labels = None
    if labels is not None:
        if labels.shape != lead:
            raise KDConfigError(f"labels must have the token shape {tuple(lead)}, got {tuple(labels.shape)}.")
        if labels.dtype.is_floating_point:
            raise KDConfigError("labels must hold integer token ids.")
        flat_labels = labels.reshape(n)
        flat_labels = torch.where(flat_labels == ignore_index, torch.full_like(flat_labels, -1), flat_labels)
    flat_mask = None
    if mask is not None:
        if mask.shape != lead:
            raise KDConfigError(f"mask must have the token shape {tuple(lead)}, got {tuple(mask.shape)}.")
        flat_mask = mask.reshape(n).bool()
    elif flat_labels is not None:
        flat_mask = flat_labels >= 0
    if flat_mask is not None and bool(flat_mask.all()):
        flat_mask = None

    grad_on = torch.is_grad_enabled()
    cfg = _Config(
        objective=spec,
        params=params,
        temperature=float(temperature),
        reduction=reduction,
        chunk_size=chunk_size,
        kd_weight=float(kd_weight),
        ce_weight=float(ce_weight),
        grad_hidden=grad_on and student_hidden.requires_grad,
        grad_weight=grad_on and student_lm_head_weight.requires_grad,
    )
    if cfg.grad_hidden or cfg.grad_weight:
        loss, kd, ce = _ChunkedDistillation.apply(
            x, student_lm_head_weight, t_logits, t_hidden, t_w, flat_mask, flat_labels, cfg
        )
    else:
        with torch.no_grad():
            loss, kd, ce, _, _ = _run(
                x.detach(), student_lm_head_weight.detach(), t_logits, t_hidden, t_w, flat_mask, flat_labels, cfg
            )
    if return_parts:
        parts = {"kd": kd.detach()}
        if ce_weight > 0:
            parts["ce"] = ce.detach()
        return loss, parts
    return loss


def _check_vocab(student: int, teacher: int) -> None:
    if student != teacher:
        raise KDConfigError(
            f"the student's LM head has {student} rows and the teacher's vocabulary {teacher}: pass the "
            f"common rows of both heads (e.g. weight[:{min(student, teacher)}] for same-family padding rows, "
            "as kd_lightning.losses.lm.align_vocab does for logits); different tokenizers cannot be compared "
            "token by token."
        )
