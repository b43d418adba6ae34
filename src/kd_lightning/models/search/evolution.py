"""Regularised (aging) evolution under a parameter/FLOPs budget (Real et al., "Regularized Evolution for Image
Classifier Architecture Search", AAAI 2019, Algorithm 1), as DisWOT's NAS-Bench-201 search uses it.

The population starts with ``population_size`` random candidates within the budget; each cycle draws
``sample_size`` members at random (with replacement), takes the best of that tournament as the parent, adds a
mutated child within the budget and removes the oldest member. Everything random comes from one
``random.Random(seed)``, so a search is reproducible given the seed and a deterministic score.

Fixed bug of the official DisWOT code (``searcher/evo_search_nb201.py``): its tournament sorts the sample by score
ASCENDING and draws the parent among the first five, i.e. among the WORST members (DisWOT scores are negative
distances, higher is better). Here the parent is the best of the tournament, as in Real et al.
(``parent_selection="best"``); ``parent_selection="official"`` reproduces the official behaviour for comparison.
The official search also filters only the initial population by FLOPs; here every child respects the budget too.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kd_lightning.errors import KDConfigError
from kd_lightning.models.search.spaces import Arch, SearchSpace

__all__ = ["PARENT_SELECTIONS", "Budget", "Candidate", "SearchResult", "regularized_evolution", "select_parent"]

PARENT_SELECTIONS: tuple[str, ...] = ("best", "official")


@dataclass
class Budget:
    """Upper bounds on a candidate's parameters and FLOPs (``None``: no bound)."""

    max_params: int | None = None
    max_flops: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_params", "max_flops"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise KDConfigError(f"budget.{name}", f"must be a positive number or null, got {value!r}", "")

    def fits(self, params: int, flops: int) -> bool:
        """Whether a candidate of ``params`` parameters and ``flops`` FLOPs is within the budget."""
        return (self.max_params is None or params <= self.max_params) and (
            self.max_flops is None or flops <= self.max_flops
        )

    def violated(self, params: int, flops: int) -> list[str]:
        """The budget fields that ``(params, flops)`` exceeds."""
        out = []
        if self.max_params is not None and params > self.max_params:
            out.append("max_params")
        if self.max_flops is not None and flops > self.max_flops:
            out.append("max_flops")
        return out


@dataclass
class Candidate:
    """One evaluated architecture: its score (higher is better), cost and extra values (score terms, baselines)."""

    arch: Arch
    score: float
    params: int
    flops: int
    extras: dict[str, Any] = field(default_factory=dict)
    born: int = 0


@dataclass
class SearchResult:
    """The evaluation history (in order, duplicates included), the unique candidates best first, and counts."""

    history: list[Candidate]
    ranking: list[Candidate]
    skipped_children: int = 0

    @property
    def winner(self) -> Candidate:
        """The best-scoring candidate."""
        return self.ranking[0]


def select_parent(
    sample: Sequence[Candidate], rng: random.Random, mode: str = "best", official_top_n: int = 5
) -> Candidate:
    """The parent of a tournament: the best-scoring member (``best``; the first one on ties), or, as the official
    DisWOT code does (``official``), a random one among the ``official_top_n`` LOWEST-scoring members."""
    if not sample:
        raise KDConfigError("evolution.sample_size", "the tournament is empty", "use sample_size >= 1")
    if mode == "best":
        best = sample[0]
        for member in sample[1:]:
            if member.score > best.score:
                best = member
        return best
    if mode == "official":
        ordered = sorted(sample, key=lambda m: m.score)
        return rng.choice(ordered[:official_top_n])
    raise KDConfigError(
        "evolution.parent_selection", f"unknown mode {mode!r}", f"choose one of {', '.join(PARENT_SELECTIONS)}"
    )


def _empty_budget(space: SearchSpace, budget: Budget, cost: Callable[[Arch], tuple[int, int]]) -> None:
    smallest = space.smallest()
    params, flops = cost(smallest)
    violated = budget.violated(params, flops) or ["max_params" if budget.max_params is not None else "max_flops"]
    name = violated[0]
    limit = getattr(budget, name)
    have = params if name == "max_params" else flops
    unit = "parameters" if name == "max_params" else "FLOPs"
    raise KDConfigError(
        f"budget.{name}",
        f"no candidate of the {space.kind} search space fits {limit:,} {unit} (the smallest, "
        f"{space.label(smallest)}, has {have:,})",
        f"raise budget.{name} to at least {have:,} or allow smaller candidates ({space.shrink_fields})",
    )


def regularized_evolution(
    space: SearchSpace,
    score: Callable[[Arch], tuple[float, dict[str, Any]]],
    cost: Callable[[Arch], tuple[int, int]],
    budget: Budget,
    *,
    population_size: int = 36,
    sample_size: int = 8,
    cycles: int = 100,
    seed: int = 0,
    parent_selection: str = "best",
    max_tries: int = 1000,
    official_top_n: int = 5,
) -> SearchResult:
    """Regularised evolution (see the module docstring).

    Args:
        space: the candidates.
        score: ``arch -> (score, extras)``, higher is better; called once per distinct architecture.
        cost: ``arch -> (params, flops)``; called once per distinct architecture.
        budget: the bounds every evaluated candidate respects.
        population_size: members kept (DisWOT's NAS-Bench-201 search: 36).
        sample_size: tournament size (DisWOT: 8).
        cycles: children produced after the initial population (the official search uses a time budget instead).
        seed: seed of the ``random.Random`` that drives sampling, tournaments and mutations.
        parent_selection: ``best`` (Real et al.; the fix) or ``official`` (the official code's worst-of-tournament).
        max_tries: random draws (initial population) or mutations (per child) tried before giving up on the budget.
        official_top_n: ``official`` mode's pool size (the code: 5).

    Raises:
        KDConfigError: ``budget.max_params`` / ``budget.max_flops`` when no candidate of the space fits (the
            smallest is over budget, or ``max_tries`` random draws found none); ``evolution.*`` for bad settings.
    """
    for name, value, least in (
        ("population", population_size, 1),
        ("sample_size", sample_size, 1),
        ("cycles", cycles, 0),
        ("max_tries", max_tries, 1),
    ):
        if int(value) < least:
            raise KDConfigError(f"evolution.{name}", f"must be >= {least}, got {value}", "")
    if parent_selection not in PARENT_SELECTIONS:
        raise KDConfigError(
            "evolution.parent_selection",
            f"unknown mode {parent_selection!r}",
            f"choose one of {', '.join(PARENT_SELECTIONS)}",
        )
    costs: dict[Arch, tuple[int, int]] = {}
    scored: dict[Arch, Candidate] = {}

    def cost_of(arch: Arch) -> tuple[int, int]:
        if arch not in costs:
            costs[arch] = cost(arch)
        return costs[arch]

    def fits(arch: Arch) -> bool:
        return budget.fits(*cost_of(arch))

    history: list[Candidate] = []

    def evaluate(arch: Arch) -> Candidate:
        if arch not in scored:
            value, extras = score(arch)
            value = float(value)
            if value != value:  # NaN: ranked last
                value = float("-inf")
            params, flops = cost_of(arch)
            scored[arch] = Candidate(arch, value, params, flops, dict(extras), born=len(history))
        member = scored[arch]
        history.append(member)
        return member

    if not fits(space.smallest()):
        _empty_budget(space, budget, cost_of)
    rng = random.Random(seed)
    population: collections.deque[Candidate] = collections.deque()
    tries = 0
    while len(population) < population_size:
        arch = space.sample(rng)
        tries += 1
        if fits(arch):
            population.append(evaluate(arch))
        elif tries >= max_tries * population_size:
            params, flops = cost_of(space.smallest())
            raise KDConfigError(
                "evolution.max_tries",
                f"{tries:,} random draws of the {space.kind} space found too few candidates within the budget "
                f"(max_params {budget.max_params}, max_flops {budget.max_flops}; the smallest has {params:,} "
                f"parameters and {flops:,} FLOPs)",
                "raise evolution.max_tries or the budget, or narrow the space to smaller candidates",
            )
    skipped = 0
    for _ in range(cycles):
        sample = [rng.choice(population) for _ in range(sample_size)]
        parent = select_parent(sample, rng, parent_selection, official_top_n)
        child = None
        for _ in range(max_tries):
            arch = space.mutate(parent.arch, rng)
            if fits(arch):
                child = arch
                break
        if child is None:  # no mutation of this parent fits the budget: the population does not age this cycle
            skipped += 1
            continue
        population.append(evaluate(child))
        population.popleft()
    ranking = sorted(scored.values(), key=lambda m: (-m.score, m.born))
    return SearchResult(history=history, ranking=ranking, skipped_children=skipped)
