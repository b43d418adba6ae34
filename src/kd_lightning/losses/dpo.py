"""Direct Preference Optimization (DPO) on sequence log-probabilities, in plain torch.

Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
NeurIPS 2023 (arXiv 2305.18290). For a prompt ``x``, a preferred response ``y⁺`` and a dispreferred ``y⁻``::

    r(y) = β · (log π(y|x) − log π_ref(y|x))                      (implicit reward)
    L    = −log σ(r(y⁺) − r(y⁻))  = softplus(−(r(y⁺) − r(y⁻)))

with ``log π(y|x)`` the sum of the response tokens' log-probabilities (TRL's ``DPOTrainer``,
``loss_type="sigmoid"``). Options:

- ``length_normalize``: every sequence log-probability (policy and reference) is divided by its token count
  before the difference (TRL's ``loss_type="sigmoid_norm"``; counters the length bias when the preferred
  responses are longer);
- ``nll_weight`` λ > 0 adds the SFT regulariser ``λ · (−log π(y⁺|x) / |y⁺|)`` per pair (RPO-style; per-pair
  token mean — TRL's ``"sft"`` loss type averages over all chosen tokens of the batch instead, which is the
  same when the chosen responses have equal lengths).

Used by :class:`~kd_lightning.methods.soda.SODA` (teacher response = chosen, the base student's own
response = rejected).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.terms import active, check_weights

__all__ = ["dpo_loss", "response_token_logps"]

Reduction = Literal["none", "mean", "sum"]


def response_token_logps(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Per-token ``log softmax(logits)[token]`` (float32 or wider) ``[B, N]``, 0 where ``mask`` is false.

    ``logits [B, N, V]`` are the logits that predict ``tokens [B, N]`` (already shifted).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_probs = F.log_softmax(logits, dim=-1)
    safe = tokens.masked_fill(~mask.bool(), 0).long().unsqueeze(-1)
    return log_probs.gather(-1, safe).squeeze(-1) * mask.to(log_probs.dtype)


def _reduce(value: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return value.mean() if value.numel() else value.sum()
    if reduction == "sum":
        return value.sum()
    return value


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    length_normalize: bool = False,
    nll_weight: float = 0.0,
    reduction: Reduction = "none",
) -> dict[str, Tensor]:
    """DPO loss of preference pairs from summed response log-probabilities.

    ``L_i = −log σ(β[(π_c − ref_c) − (π_r − ref_r)]) + λ · (−π_c / |y⁺|)`` where ``π_c = log π(y⁺_i|x_i)``
    (summed over response tokens) etc.; with ``length_normalize`` each of the four log-probabilities is first
    divided by its response's token count.

    Args:
        policy_chosen_logps: ``[B]`` summed log-probs of the chosen responses under the trained policy.
        policy_rejected_logps: ``[B]`` same for the rejected responses.
        ref_chosen_logps: ``[B]`` summed log-probs of the chosen responses under the frozen reference.
        ref_rejected_logps: ``[B]`` same for the rejected responses.
        beta: β > 0, the inverse strength of the implicit KL constraint to the reference.
        chosen_lengths: ``[B]`` token counts of the chosen responses (needed for ``length_normalize`` and
            ``nll_weight > 0``).
        rejected_lengths: ``[B]`` token counts of the rejected responses (needed for ``length_normalize``).
        length_normalize: divide each sequence log-prob by its token count (TRL ``sigmoid_norm``).
        nll_weight: λ ≥ 0 of the chosen-response NLL regulariser (per-token mean of the pair's chosen response).
        reduction: ``"none"`` (per pair), ``"mean"`` or ``"sum"`` over the pairs.

    Returns:
        ``{"loss": dpo + λ·nll, "dpo": …, "nll": λ·nll (only when λ > 0), "chosen_reward": β(π_c − ref_c),
        "rejected_reward": β(π_r − ref_r), "margin": chosen_reward − rejected_reward}``; the rewards and the
        margin are detached (monitoring) and use the length-normalised log-probs when ``length_normalize``.
        ``"loss"``, ``"dpo"`` and ``"nll"`` follow ``reduction``; the rewards and margin are always per pair.

    Raises:
        KDConfigError: a bad ``beta``, ``nll_weight`` or ``reduction``; mismatched shapes; missing lengths.
    """
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise KDConfigError("beta", f"must be a finite number > 0, got {beta!r}", "DPO uses beta around 0.1")
    check_weights(nll_weight=nll_weight)
    if reduction not in ("none", "mean", "sum"):
        raise KDConfigError("reduction", f"must be 'none', 'mean' or 'sum', got {reduction!r}")
    shape = policy_chosen_logps.shape
    for name, value in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if value.shape != shape:
            raise KDConfigError(name, f"has shape {tuple(value.shape)}, policy_chosen_logps {tuple(shape)}")
    needs_chosen = length_normalize or active(nll_weight)
    if needs_chosen and chosen_lengths is None:
        raise KDConfigError("chosen_lengths", "are needed for length_normalize and nll_weight > 0")
    if length_normalize and rejected_lengths is None:
        raise KDConfigError("rejected_lengths", "are needed for length_normalize")

    pi_c, pi_r, ref_c, ref_r = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    n_c = chosen_lengths.to(pi_c.dtype).clamp_min(1) if chosen_lengths is not None else None
    if length_normalize:
        n_r = rejected_lengths.to(pi_r.dtype).clamp_min(1)  # type: ignore[union-attr]
        pi_c, ref_c, pi_r, ref_r = pi_c / n_c, ref_c / n_c, pi_r / n_r, ref_r / n_r
    chosen_logratio = pi_c - ref_c.detach()
    rejected_logratio = pi_r - ref_r.detach()
    logits = beta * (chosen_logratio - rejected_logratio)
    dpo = F.softplus(-logits)  # = −log σ(logits), stable for large |logits|
    chosen_reward = (beta * chosen_logratio).detach()
    rejected_reward = (beta * rejected_logratio).detach()
    out = {"dpo": dpo}
    total = dpo
    if active(nll_weight):
        nll = nll_weight * (-policy_chosen_logps / n_c)
        out["nll"] = nll
        total = total + nll
    result = {"loss": _reduce(total, reduction), **{k: _reduce(v, reduction) for k, v in out.items()}}
    result.update(chosen_reward=chosen_reward, rejected_reward=rejected_reward, margin=chosen_reward - rejected_reward)
    return result
