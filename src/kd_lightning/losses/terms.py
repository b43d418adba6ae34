"""Losses as weighted sums of named terms: ``loss = Σ_i w_i · term_i``, one helper for every method.

A loss returns ``{"loss": total, name_i: w_i·term_i, ...}``: the named entries are the *weighted* terms and
sum to ``"loss"``, so a log of ``train/<name>`` shows how much each term contributes. Terms with weight 0
are left out of the sum and of the dict (and need not be computed: see :func:`active`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from kd_lightning.errors import KDConfigError

__all__ = ["active", "check_weights", "weighted_terms"]


def check_weights(**weights: float) -> None:
    """Every weight must be a finite number ``>= 0``.

    Raises:
        KDConfigError: naming the weight (``ce_weight: must be a finite number >= 0, got -1``).
    """
    for name, value in weights.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise KDConfigError(
                name, f"must be a finite number >= 0, got {value!r}", "loss weights scale non-negative terms"
            )


def active(weight: float) -> bool:
    """Whether a term of this weight enters the loss (so whether it is worth computing)."""
    return weight != 0


def weighted_terms(terms: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> dict[str, Tensor]:
    """``{"loss": Σ_i w_i·t_i, **{name_i: w_i·t_i}}`` over ``terms``; a name without a weight has weight 1.

    Terms whose weight is 0 are dropped. At least one term must remain.

    Raises:
        KDConfigError: every term has weight 0 (nothing to train on).
    """
    weights = weights or {}
    weighted = {
        name: (value if weights.get(name, 1.0) == 1.0 else weights[name] * value)
        for name, value in terms.items()
        if weights.get(name, 1.0) != 0
    }
    if not weighted:
        raise KDConfigError(
            "loss weights", f"every term of {sorted(terms)} has weight 0", "give at least one term a positive weight"
        )
    values = list(weighted.values())
    total = values[0]
    for value in values[1:]:
        total = total + value
    return {"loss": total, **weighted}
