"""Token-level KD of vision-language models on the answer tokens: SFT cross-entropy + a token KD term.

Plain torch (no Lightning). ``VLMTokenKDLoss(student_logits, teacher_logits, targets, mask)`` returns SUMS over the
tokens of ``mask`` (the LM task normalises them globally)::

    L = w_CE · Σ_t CE(z^S_t, y_t) + w_KD · Σ_t D_t
    D_t = τ² · KL(softmax(z^T_t/τ) ‖ softmax(z^S_t/τ))             (loss="kl": Hinton et al., 2015, per token)
    D_t = DBiLD's t-LD + s-LD on the top-k logit differences        (loss="dbild": DBiLDLoss.token_sum, Switch-KD's
                                                                     "Dynamic Bi-directional Logits Difference",
                                                                     a RECONSTRUCTION)

These are the "token KD" and "DBiLD token KD" baselines of the vision-language KD papers (e.g. Switch-KD, Align-TI).
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.bild import DBiLDLoss
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = ["VLMTokenKDLoss", "token_kl_sum"]

TOKEN_KD_LOSSES = ("kl", "dbild")


def token_kl_sum(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0, scale: bool = True
) -> Tensor:
    """``Σ_{t in mask} s·KL(softmax(z^T_t/τ) ‖ softmax(z^S_t/τ))`` with ``s = τ²`` (``scale``) or 1; float32 or
    wider. Logits ``[..., V]``, ``mask`` their leading shape."""
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_logits).detach() / temperature, dim=-1)
    per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    total = (per_token * mask.to(per_token.dtype)).sum()
    return total * (temperature**2 if scale else 1.0)


class VLMTokenKDLoss(nn.Module):
    """SFT cross-entropy + token KD (``kl`` or ``dbild``) summed over the masked tokens (module docstring).

    Args:
        loss: ``"kl"`` (temperature-scaled forward KL) or ``"dbild"`` (:class:`~kd_lightning.losses.bild.DBiLDLoss`).
        temperature: τ of ``kl`` (DBiLD's τ is among ``dbild_args``).
        temperature_squared: multiply the ``kl`` term by τ² (Hinton's gradient scale).
        kd_weight: w_KD.
        ce_weight: w_CE of the cross-entropy on the answer tokens.
        dbild_args: :class:`~kd_lightning.losses.bild.DBiLDLoss` arguments (``mass``, ``k_min``, ``k_max``,
            ``temperature``, ``reverse_weight``, ...; its own weights are fixed to 1 and 0 here).

    ``forward`` returns ``{"loss", "<loss>", "ce"}`` (weighted sums; a term whose weight is 0 is not computed).
    """

    def __init__(
        self,
        loss: Literal["kl", "dbild"] = "kl",
        temperature: float = 1.0,
        temperature_squared: bool = True,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        dbild_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if loss not in TOKEN_KD_LOSSES:
            raise KDConfigError("loss", f"must be one of {list(TOKEN_KD_LOSSES)}, got {loss!r}")
        check_temperature(temperature)
        check_weights(kd_weight=kd_weight, ce_weight=ce_weight)
        if not (active(kd_weight) or active(ce_weight)):
            raise KDConfigError("kd_weight and ce_weight", "are both 0", "give one of them a positive weight")
        args = dict(dbild_args or {})
        if loss != "dbild" and args:
            raise KDConfigError("dbild_args", f"are given but loss is {loss!r}", "set loss: dbild or drop dbild_args")
        for key in ("kd_weight", "ce_weight"):
            if key in args:
                raise KDConfigError(f"dbild_args.{key}", "is set by the method", "use kd_weight / ce_weight instead")
        self.loss = loss
        self.temperature = temperature
        self.temperature_squared = temperature_squared
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight
        self.dbild = DBiLDLoss(**args, kd_weight=1.0, ce_weight=0.0) if loss == "dbild" else None

    def kd_sum(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
        """``Σ_t D_t`` over the tokens of ``mask`` (unweighted)."""
        if self.dbild is not None:
            return self.dbild.token_sum(student_logits, teacher_logits.detach(), mask)
        return token_kl_sum(student_logits, teacher_logits, mask, self.temperature, self.temperature_squared)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, mask: Tensor
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if active(self.kd_weight):
            terms[self.loss] = self.kd_sum(student_logits, teacher_logits, mask)
        if active(self.ce_weight):
            flat = upcast(student_logits).reshape(-1, student_logits.shape[-1])
            ce = F.cross_entropy(flat, targets.masked_fill(~mask, 0).reshape(-1), reduction="none")
            terms["ce"] = (ce.reshape(targets.shape) * mask.to(ce.dtype)).sum()
        return weighted_terms(terms, {self.loss: self.kd_weight, "ce": self.ce_weight})
