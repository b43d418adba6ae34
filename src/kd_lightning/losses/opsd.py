"""On-Policy Self-Distillation (OPSD) token losses (pure torch).

OPSD (Zhao, Xie, Liu, Huang, Pang, Chen, Grover, "Self-Distilled Reasoner", arXiv 2601.18734; official code
github.com/siyan-zhao/OPSD, ``opsd_trainer.py``): one LM is the student ``p_S(· | x)`` (problem only) and the
teacher ``p_T(· | x, y*)`` (problem + privileged reference solution). On the student's own rollout
``r = (r_1 … r_n)``, per response token ``t`` and with both logits divided by ``τ`` (the sampling temperature
in the code):

- ``loss_type="jsd"`` (default): with ``M_t = β·p_T,t + (1 − β)·p_S,t``,
  ``JSD_β,t = β·KL(p_T,t ‖ M_t) + (1 − β)·KL(p_S,t ‖ M_t)`` — the *un-normalised* TRL/GKD form, with the
  code's special cases ``β = 0 → KL(p_T ‖ p_S)`` (forward) and ``β = 1 → KL(p_S ‖ p_T)`` (reverse).
  ``top_k``: both distributions restricted to the teacher's ``k`` most likely vocabulary entries and
  renormalised over them before the divergence.
- ``loss_type="sampled_token"`` (the code's "Thinking Machines" loss): the advantage
  ``A_t = sg(log p_T(r_t) − log p_S(r_t))`` and ``ℓ_t = −A_t·log p_S(r_t)``, whose gradient is
  ``−A_t·∇log p_S(r_t)`` (in expectation over ``r_t ~ p_S`` the gradient of ``KL(p_S ‖ p_T)``).

The loss is the mean over the response tokens (``reduction="mean"``); ``"sum"`` gives the sum for the global
token normalisation of the LM methods, ``"none"`` the per-token values (zero off the mask).

Example:
    >>> import torch
    >>> s, t = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    >>> mask = torch.ones(2, 4, dtype=torch.bool)
    >>> opsd_jsd(s, t, mask=mask, beta=0.5, temperature=1.1).shape
    torch.Size([])
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.divergences import reduce_items
from kd_lightning.losses.lm import generalized_jsd
from kd_lightning.losses.terms import weighted_terms

__all__ = [
    "OPSD_LOSS_TYPES",
    "OPSDLoss",
    "check_opsd_args",
    "opsd_jsd",
    "opsd_sampled_token",
    "restrict_to_teacher_top_k",
]

Reduction = Literal["mean", "sum", "none"]
OPSD_LOSS_TYPES = ("jsd", "sampled_token")


def check_opsd_args(
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    loss_type: str = "jsd",
    prefix: str = "",
) -> None:
    """Validate the loss arguments; ``prefix`` is prepended to the field names (``model.init_args.``).

    Raises:
        KDConfigError: naming the field.
    """
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise KDConfigError(f"{prefix}beta", f"must be in [0, 1], got {beta!r}", "0: forward KL, 1: reverse KL")
    check_temperature(temperature, f"{prefix}loss_temperature")
    if loss_type not in OPSD_LOSS_TYPES:
        raise KDConfigError(f"{prefix}loss_type", f"must be one of {OPSD_LOSS_TYPES}, got {loss_type!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise KDConfigError(f"{prefix}top_k_loss", f"must be an integer >= 1 or null, got {top_k!r}")
        if loss_type != "jsd":
            raise KDConfigError(
                f"{prefix}top_k_loss",
                f"restricts the JSD only, but loss_type is {loss_type!r}",
                "set top_k_loss: null, or loss_type: jsd",
            )


def restrict_to_teacher_top_k(student_logits: Tensor, teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Both logits gathered at the teacher's ``k`` largest entries per token: ``([..., k], [..., k])``.

    A softmax over the result is the distribution renormalised over those entries (the code's ``top_k_loss``;
    the entries do not depend on the temperature). ``k`` larger than the vocabulary keeps all of it.
    """
    k = min(int(k), teacher_logits.shape[-1])
    index = torch.topk(teacher_logits.detach(), k, dim=-1).indices
    return student_logits.gather(-1, index), teacher_logits.gather(-1, index)


def opsd_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """OPSD's β-JSD per token (see the module docstring), reduced over the tokens of ``mask``.

    Args:
        student_logits: ``[..., V]`` student logits at the response positions (gradients flow).
        teacher_logits: ``[..., V]`` teacher logits at the same positions (detached).
        mask: boolean ``[...]``, true at response tokens; ``None``: every token.
        beta: β ∈ [0, 1], the teacher's weight in the mixture.
        temperature: τ dividing both logits.
        top_k: restrict both distributions to the teacher's top-k entries (``None``: the full vocabulary).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    check_opsd_args(beta=beta, temperature=temperature, top_k=top_k)
    if top_k is not None:
        student_logits, teacher_logits = restrict_to_teacher_top_k(student_logits, teacher_logits, top_k)
    return generalized_jsd(
        student_logits,
        teacher_logits,
        beta=float(beta),
        normalized=False,
        temperature=temperature,
        mask=mask,
        reduction=reduction,
    )


def opsd_sampled_token(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tokens: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> tuple[Tensor, Tensor]:
    """OPSD's sampled-token loss ``−sg(A_t)·log p_S(r_t)`` and the advantage ``A_t``, both reduced.

    ``A_t = log p_T(r_t) − log p_S(r_t)`` (log-softmax at ``τ``; detached). ``tokens`` ``[...]`` are the
    sampled response tokens. Returns ``(loss, advantage)``, each reduced with ``reduction`` over ``mask``
    (the advantage is a constant: ``−mean A`` estimates ``KL(p_S ‖ p_T)``).
    """
    check_temperature(temperature, "loss_temperature")
    if student_logits.shape != teacher_logits.shape or tokens.shape != student_logits.shape[:-1]:
        raise KDConfigError(
            f"student_logits {tuple(student_logits.shape)}, teacher_logits {tuple(teacher_logits.shape)} and "
            f"tokens {tuple(tokens.shape)} must be [..., V], [..., V] and [...]."
        )
    safe = tokens.long() if mask is None else tokens.long().masked_fill(~mask.bool(), 0)
    log_s = F.log_softmax(upcast(student_logits) / temperature, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    log_t = F.log_softmax(upcast(teacher_logits).detach() / temperature, dim=-1)
    log_t = log_t.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    advantage = (log_t - log_s).detach()
    mask = None if mask is None else mask.bool()
    return reduce_items(-advantage * log_s, mask, reduction), reduce_items(advantage, mask, reduction)


class OPSDLoss(nn.Module):
    """OPSD's token loss as a module: ``{"loss": total, "jsd" | "sampled_token": total}`` (one term).

    Args:
        beta: β of the JSD (``loss_type="jsd"``).
        temperature: τ of both softmaxes (OPSD: the sampling temperature, 1.1).
        top_k: the teacher's top-k restriction of the JSD (``None``: full vocabulary).
        loss_type: ``"jsd"`` or ``"sampled_token"``.
        reduction: ``"mean"`` over the masked tokens or ``"sum"`` (for global token normalisation).
    """

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        top_k: int | None = None,
        loss_type: Literal["jsd", "sampled_token"] = "jsd",
        reduction: Literal["mean", "sum"] = "mean",
    ) -> None:
        super().__init__()
        check_opsd_args(beta=beta, temperature=temperature, top_k=top_k, loss_type=loss_type)
        if reduction not in ("mean", "sum"):
            raise KDConfigError("reduction", f"must be 'mean' or 'sum', got {reduction!r}")
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.top_k = top_k
        self.loss_type = loss_type
        self.reduction = reduction

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Loss of the response tokens ``tokens`` ``[...]`` from logits ``[..., V]`` predicting them."""
        if self.loss_type == "sampled_token":
            loss, _ = opsd_sampled_token(
                student_logits,
                teacher_logits,
                tokens,
                mask=mask,
                temperature=self.temperature,
                reduction=self.reduction,
            )
            return weighted_terms({"sampled_token": loss})
        jsd = opsd_jsd(
            student_logits,
            teacher_logits,
            mask=mask,
            beta=self.beta,
            temperature=self.temperature,
            top_k=self.top_k,
            reduction=self.reduction,
        )
        return weighted_terms({"jsd": jsd})
