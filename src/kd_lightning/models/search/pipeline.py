"""DisWOT's search in one call: score candidates of a space against a teacher and evolve under a budget.

:func:`evaluate_network` gives every value the ranking reports for one network (the DisWOT score and its terms,
parameters, FLOPs, and the NASWOT / Zen baselines); :func:`search_students` runs
:func:`~kd_lightning.models.search.evolution.regularized_evolution` with it. Each candidate is built under
``torch.manual_seed(seed)``, so its random weights, and therefore its score, do not depend on the order of
evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.models.search.evolution import Budget, SearchResult, regularized_evolution
from kd_lightning.models.search.scores import DisWOTScorer, count_cost, naswot_score, zen_score
from kd_lightning.models.search.spaces import Arch, SearchSpace

__all__ = ["evaluate_network", "search_students"]


def evaluate_network(
    build: Any,
    scorer: DisWOTScorer,
    input_shape: Sequence[int],
    *,
    seed: int = 0,
    baselines: bool = True,
    naswot_batch: Tensor | None = None,
    zen_batch_size: int = 16,
) -> dict[str, Any]:
    """Every reported value of the network ``build()`` returns (called under ``torch.manual_seed(seed)``).

    Returns:
        ``{"score", "semantic", "relation", "semantic_mode", "params", "flops"}`` and, with ``baselines``,
        ``"naswot"`` (on ``naswot_batch``, a fresh copy in train mode) and ``"zen"``.
    """
    torch.manual_seed(seed)
    network: nn.Module = build()
    out: dict[str, Any] = dict(count_cost(network, input_shape))
    out.update(scorer.score(network))
    if baselines:
        torch.manual_seed(seed)
        fresh: nn.Module = build().train()
        batch = naswot_batch if naswot_batch is not None else scorer.batches[0][0]
        out["naswot"] = naswot_score(fresh, batch)
        generator = torch.Generator().manual_seed(seed)
        try:
            out["zen"] = zen_score(fresh, input_shape, batch_size=zen_batch_size, generator=generator)
        except (RuntimeError, ValueError):  # e.g. a network without a feature map
            out["zen"] = math.nan
    return out


def search_students(
    space: SearchSpace,
    scorer: DisWOTScorer,
    num_classes: int,
    budget: Budget,
    *,
    seed: int = 0,
    baselines: bool = True,
    **evolution: Any,
) -> SearchResult:
    """Regularised evolution of ``space`` under ``budget``, scored by ``scorer`` (see the module docstring);
    ``evolution`` holds :func:`~kd_lightning.models.search.evolution.regularized_evolution`'s keyword arguments
    (its ``seed`` is ``seed``)."""
    shape = space.input_shape

    def cost(arch: Arch) -> tuple[int, int]:
        stats = count_cost(space.build(arch, num_classes), shape)
        return stats["params"], stats["flops"]

    def score(arch: Arch) -> tuple[float, dict[str, Any]]:
        values = evaluate_network(lambda: space.build(arch, num_classes), scorer, shape, seed=seed, baselines=baselines)
        return values.pop("score"), values

    return regularized_evolution(space, score, cost, budget, seed=seed, **evolution)
