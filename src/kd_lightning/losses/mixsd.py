"""MixSD: mixed contextual self-distillation targets for knowledge injection, in plain torch.

Liu, Zhang, Yang, He, Wang, Xuan, Jin, Diab, arXiv 2605.16865 (2026). Two conditionals of one frozen base LM
``p_0``: the **expert** ``q_E(· | x, f, y<t) = p_0(· | [f; x], y<t)`` sees the fact ``f`` in its context, the
**naive** ``q_N(· | x, y<t) = p_0(· | x, y<t)`` does not. Targets are built token by token, both conditionals
reading the same generated prefix ``y<t``:

- ``mixture``: ``y_t ~ m_t = ρ·q_E + (1 − ρ)·q_N`` (or ``argmax m_t`` when greedy);
- ``switch``:  ``y_t = argmax q_E`` where ``argmax q_E ≠ argmax q_N`` and ``KL(q_E ‖ q_N) > κ`` (the expert's
  token is "fact-bearing"), else ``argmax q_N``.

The student ``p_θ`` (prompt WITHOUT the fact) is then trained by NLL on the mixed tokens,
``−Σ_t log p_θ(y_t | x, y<t)``, or by the soft variant ``Σ_t KL(m_t ‖ p_θ(· | x, y<t))``.

RECONSTRUCTION (the paper's abstract only; no code): the mixing rule, ρ, κ, the KL direction of the switch
test, and NLL vs distribution matching are not verified: every one is an argument here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast

__all__ = [
    "MIXSD_TARGET_MODES",
    "MixedTargets",
    "build_mixed_targets",
    "check_mixsd_args",
    "expert_naive_kl",
    "mixed_target_nll",
    "mixture_log_probs",
    "mixture_soft_kl",
    "select_mixed_tokens",
]

MIXSD_TARGET_MODES = ("mixture", "switch")
TargetMode = Literal["mixture", "switch"]
Reduction = Literal["none", "sum", "mean"]


def check_mixsd_args(rho: float, kappa: float, mode: str, temperature: float = 1.0) -> None:
    """Raise :class:`KDConfigError` naming the argument unless ``ρ ∈ [0, 1]``, ``κ ≥ 0``, ``mode`` known, ``τ > 0``."""
    if not (isinstance(rho, (int, float)) and 0.0 <= rho <= 1.0):
        raise KDConfigError("rho", f"must be in [0, 1], got {rho!r}", "rho weighs the expert conditional")
    if not (isinstance(kappa, (int, float)) and math.isfinite(kappa) and kappa >= 0):
        raise KDConfigError("kappa", f"must be a finite number >= 0, got {kappa!r}", "kappa is a KL threshold (nats)")
    if mode not in MIXSD_TARGET_MODES:
        raise KDConfigError("target_mode", f"must be one of {list(MIXSD_TARGET_MODES)}, got {mode!r}")
    check_temperature(temperature)


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(upcast(logits).detach() / temperature, dim=-1)


def mixture_log_probs(
    expert_logits: Tensor, naive_logits: Tensor, rho: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """``log(ρ·q_E + (1 − ρ)·q_N)`` over the last dimension (detached; exact at ``ρ ∈ {0, 1}``)."""
    log_e, log_n = _log_softmax(expert_logits, temperature), _log_softmax(naive_logits, temperature)
    if rho >= 1.0:
        return log_e
    if rho <= 0.0:
        return log_n
    return torch.logaddexp(log_e + math.log(rho), log_n + math.log1p(-rho))


def expert_naive_kl(expert_logits: Tensor, naive_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(q_E ‖ q_N) = Σ_v q_E(v)·(log q_E(v) − log q_N(v))`` per position (the switch rule's test)."""
    log_e, log_n = _log_softmax(expert_logits, temperature), _log_softmax(naive_logits, temperature)
    return (log_e.exp() * (log_e - log_n)).sum(-1)


def select_mixed_tokens(
    expert_logits: Tensor,
    naive_logits: Tensor,
    mode: TargetMode = "mixture",
    rho: float = 0.5,
    kappa: float = 0.5,
    greedy: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One target token per row of ``[B, V]`` expert/naive logits: ``(tokens [B], from_expert [B])``.

    ``mixture``: ``argmax m`` (``greedy``) or a sample of ``m = ρ·q_E + (1 − ρ)·q_N``; ``switch``: ``argmax q_E``
    where the argmaxes disagree and ``KL(q_E ‖ q_N) > κ``, else ``argmax q_N`` (always greedy). ``from_expert`` is
    true where the chosen token is the expert's argmax against a different naive argmax (what the fact changed).
    """
    check_mixsd_args(rho, kappa, mode, temperature)
    top_e, top_n = expert_logits.argmax(-1), naive_logits.argmax(-1)
    disagree = top_e != top_n
    if mode == "switch":
        switch = disagree & (expert_naive_kl(expert_logits, naive_logits, temperature) > kappa)
        tokens = torch.where(switch, top_e, top_n)
    else:
        log_m = mixture_log_probs(expert_logits, naive_logits, rho, temperature)
        sampled = None if greedy else torch.multinomial(log_m.exp(), 1, generator=generator).squeeze(-1)
        tokens = log_m.argmax(-1) if sampled is None else sampled
    return tokens, disagree & (tokens == top_e)


@dataclass
class MixedTargets:
    """Mixed target sequences built by :func:`build_mixed_targets`.

    ``response_ids [B, N]`` (pad after the first EOS), ``response_mask [B, N]`` (true at target tokens, the first
    EOS included), ``from_expert [B, N]`` (see :func:`select_mixed_tokens`), and the conditionals' logits at
    each target position ``expert_logits``/``naive_logits [B, N, V]`` (float, detached).
    """

    response_ids: Tensor
    response_mask: Tensor
    from_expert: Tensor
    expert_logits: Tensor
    naive_logits: Tensor


LogitsFn = Callable[..., Tensor]


def _last_logits(model: LogitsFn, ids: Tensor, mask: Tensor) -> Tensor:
    return model(ids, attention_mask=mask)[:, -1]


@torch.no_grad()
def build_mixed_targets(
    expert_model: LogitsFn,
    naive_model: LogitsFn,
    expert_ids: Tensor,
    expert_mask: Tensor,
    naive_ids: Tensor,
    naive_mask: Tensor,
    max_new_tokens: int,
    mode: TargetMode = "mixture",
    rho: float = 0.5,
    kappa: float = 0.5,
    greedy: bool = True,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> MixedTargets:
    """Build the mixed targets autoregressively: at step ``t`` both conditionals read their own LEFT-padded prompt
    (expert: fact + question, naive: question) followed by the SAME prefix ``y<t``, and
    :func:`select_mixed_tokens` picks ``y_t``. A row stops after its first ``eos_token_id`` (kept in the mask);
    the loop stops when every row has. Models are called as ``model(ids, attention_mask=mask) -> [B, T, V]``
    (``expert_model`` and ``naive_model`` are usually the same network); ``nn.Module`` ones run in eval mode
    (restored after) under ``no_grad``. Full re-encoding per step (no KV cache): meant for short answers.
    """
    if max_new_tokens < 1:
        raise KDConfigError("max_new_tokens", f"must be >= 1, got {max_new_tokens}", "the targets need a token")
    check_mixsd_args(rho, kappa, mode, temperature)
    if expert_ids.shape[0] != naive_ids.shape[0]:
        raise KDConfigError(
            "expert_ids", f"has {expert_ids.shape[0]} rows but naive_ids {naive_ids.shape[0]}", "one row per sample"
        )
    modules = [m for m in {id(m): m for m in (expert_model, naive_model)}.values() if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    batch, device = expert_ids.shape[0], expert_ids.device
    expert_mask, naive_mask = expert_mask.bool(), naive_mask.bool()
    tokens: list[Tensor] = []
    alive: list[Tensor] = []
    chosen: list[Tensor] = []
    expert_steps: list[Tensor] = []
    naive_steps: list[Tensor] = []
    running = torch.ones(batch, dtype=torch.bool, device=device)
    try:
        for _ in range(max_new_tokens):
            prefix = torch.stack(tokens, 1) if tokens else expert_ids.new_zeros(batch, 0)
            prefix_mask = torch.ones_like(prefix, dtype=torch.bool)
            z_e = _last_logits(
                expert_model, torch.cat([expert_ids, prefix], 1), torch.cat([expert_mask, prefix_mask], 1)
            )
            z_n = _last_logits(naive_model, torch.cat([naive_ids, prefix], 1), torch.cat([naive_mask, prefix_mask], 1))
            token, from_expert = select_mixed_tokens(z_e, z_n, mode, rho, kappa, greedy, temperature, generator)
            token = torch.where(running, token, torch.full_like(token, pad_token_id))
            tokens.append(token.to(expert_ids.dtype))
            alive.append(running.clone())
            chosen.append(from_expert & running)
            expert_steps.append(upcast(z_e).float())
            naive_steps.append(upcast(z_n).float())
            if eos_token_id is not None:
                running = running & (token != eos_token_id)
            if not bool(running.any()):
                break
    finally:
        for m, was_training in zip(modules, modes):
            m.train(was_training)
    return MixedTargets(
        response_ids=torch.stack(tokens, 1),
        response_mask=torch.stack(alive, 1),
        from_expert=torch.stack(chosen, 1),
        expert_logits=torch.stack(expert_steps, 1),
        naive_logits=torch.stack(naive_steps, 1),
    )


def _reduce(per_token: Tensor, mask: Tensor | None, reduction: Reduction) -> Tensor:
    if reduction not in ("none", "sum", "mean"):
        raise KDConfigError("reduction", f"must be 'none', 'sum' or 'mean', got {reduction!r}")
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    count = mask.sum() if mask is not None else torch.tensor(per_token.numel(), device=per_token.device)
    return per_token.sum() / count.clamp_min(1).to(per_token.dtype)


def mixed_target_nll(
    student_logits: Tensor, tokens: Tensor, mask: Tensor | None = None, reduction: Reduction = "sum"
) -> Tensor:
    """SFT on the mixed targets: ``−log p_θ(y_t | x, y<t)`` per target position (``[B, N, V]`` logits that
    predict ``tokens [B, N]``), over ``mask``."""
    flat = upcast(student_logits).reshape(-1, student_logits.shape[-1])
    safe = tokens if mask is None else tokens.masked_fill(~mask.bool(), 0)
    nll = F.cross_entropy(flat, safe.reshape(-1).long(), reduction="none").reshape(tokens.shape)
    return _reduce(nll, mask, reduction)


def mixture_soft_kl(
    student_logits: Tensor,
    expert_logits: Tensor,
    naive_logits: Tensor,
    rho: float = 0.5,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: Reduction = "sum",
) -> Tensor:
    """Soft MixSD: ``KL(m_t ‖ p_θ) = Σ_v m_t(v)·(log m_t(v) − log p_θ(v))`` with ``m_t = ρ·q_E + (1 − ρ)·q_N``
    (targets detached; the student at the same temperature), per position over ``mask``."""
    check_mixsd_args(rho, 0.0, "mixture", temperature)
    if student_logits.shape != expert_logits.shape or expert_logits.shape != naive_logits.shape:
        raise KDConfigError(
            "student_logits",
            f"shapes differ: student {tuple(student_logits.shape)}, expert {tuple(expert_logits.shape)}, "
            f"naive {tuple(naive_logits.shape)}",
            "align the three over one vocabulary and the same target positions",
        )
    log_m = mixture_log_probs(expert_logits, naive_logits, rho, temperature)
    log_p = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    m = log_m.exp()
    per_token = (m * (log_m - log_p)).masked_fill(m == 0, 0.0).sum(-1)
    return _reduce(per_token, mask, reduction)
