"""Token-level distillation objectives by name, behind one interface (pure torch).

:class:`~kd_lightning.methods.LMDistill` takes its objective ``D`` by name (``objective`` and
``objective_args`` in the config); :func:`build_token_objective` builds it. Every objective is an
``nn.Module`` with

    ``token_sum(student_logits, teacher_logits, mask) -> Σ_t D_t`` over the tokens of ``mask``

(logits ``[..., V]``, aligned; a sum, not a mean, for :func:`~kd_lightning.losses.lm.normalize_token_sum`).
No objective carries a cross-entropy or a weight of its own: the method composes ``w_KD·D + w_CE·CE``.

- The divergences of :data:`~kd_lightning.losses.lm.TOKEN_OBJECTIVES` (``forward_kl``, ``reverse_kl``,
  ``jsd``, ``skew_kl``, ``skew_reverse_kl``, ``tv``, ``mixed_kl``) at a temperature τ: :class:`TokenDivergence`.
- :data:`OBJECTIVE_LOSSES`, losses with arguments or state of their own: ``taid``
  (:class:`~kd_lightning.losses.taid.TAIDLoss`), ``adakd`` (:class:`~kd_lightning.losses.adakd.AdaKDLoss`),
  ``bild`` / ``dbild`` (:class:`~kd_lightning.losses.bild.BiLDLoss` / ``DBiLDLoss``). TAID and AdaKD are
  :class:`~kd_lightning.losses.schedule.ScheduledLoss` objects: the distillation core steps them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.adakd import AdaKDLoss
from kd_lightning.losses.bild import BiLDLoss, DBiLDLoss
from kd_lightning.losses.lm import TOKEN_OBJECTIVES, token_objective
from kd_lightning.losses.taid import TAIDLoss

__all__ = ["LM_OBJECTIVES", "OBJECTIVE_LOSSES", "TokenDivergence", "TokenObjective", "build_token_objective"]


class TokenObjective(Protocol):
    """What LMDistill needs of an objective: the sum of ``D`` over the tokens of ``mask``."""

    def token_sum(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor: ...


class TokenDivergence(nn.Module):
    """A divergence of :data:`~kd_lightning.losses.lm.TOKEN_OBJECTIVES` at temperature τ, as a token objective.

    Args:
        name: the divergence (``"forward_kl"``, ``"jsd"``, ...).
        temperature: τ of both softmaxes (no τ² factor).
        **hyperparameters: the divergence's own (``beta`` of ``jsd``, ...), checked now.
    """

    def __init__(self, name: str = "forward_kl", temperature: float = 1.0, **hyperparameters: Any) -> None:
        super().__init__()
        check_temperature(temperature)
        self.name = name
        self.temperature = temperature
        self.divergence = token_objective(name, **hyperparameters)

    def token_sum(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
        return self.divergence(student_logits, teacher_logits, mask=mask, temperature=self.temperature, reduction="sum")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, temperature={self.temperature}"


#: Objectives with arguments or state of their own: the loss class, and its argument that mixes in a
#: cross-entropy (the method's own ``ce_weight`` replaces it, so it may not be given).
OBJECTIVE_LOSSES: dict[str, tuple[type[nn.Module], str]] = {
    "taid": (TAIDLoss, "distil_ratio"),
    "adakd": (AdaKDLoss, "kd_ratio"),
    "bild": (BiLDLoss, "ce_weight"),
    "dbild": (DBiLDLoss, "ce_weight"),
}

#: Every objective name :func:`build_token_objective` knows.
LM_OBJECTIVES: tuple[str, ...] = (*sorted(TOKEN_OBJECTIVES), *OBJECTIVE_LOSSES)


def build_token_objective(
    objective: str, objective_args: Mapping[str, Any] | None = None, temperature: float = 1.0
) -> nn.Module:
    """The token objective ``objective`` with its arguments (see the module docstring).

    ``temperature`` is τ of the divergences; the other objectives take theirs (if any) in
    ``objective_args`` and need ``temperature=1``.

    Raises:
        KDConfigError: naming ``objective``, ``objective_args`` or ``temperature``.
    """
    args = dict(objective_args or {})
    if objective not in LM_OBJECTIVES:
        raise KDConfigError("objective", f"must be one of {list(LM_OBJECTIVES)}, got {objective!r}")
    check_temperature(temperature)
    if objective in OBJECTIVE_LOSSES:
        own_ce = OBJECTIVE_LOSSES[objective][1]
        if own_ce in args:
            raise KDConfigError(
                "objective_args", f"{own_ce} is replaced by kd_weight and ce_weight", f"remove {own_ce}"
            )
        if temperature != 1.0:
            fix = "give its temperature in objective_args"
            raise KDConfigError("temperature", f"applies to the divergences, not {objective!r}", fix)
    elif "temperature" in args:
        raise KDConfigError("objective_args", "temperature is set here", "set temperature instead")
    try:
        if objective in OBJECTIVE_LOSSES:
            return OBJECTIVE_LOSSES[objective][0](**args)
        return TokenDivergence(objective, temperature, **args)
    except (TypeError, ValueError) as err:
        raise KDConfigError("objective_args", f"for {objective!r}: {err}") from None
