"""What every simulated environment of the embodied zoo provides (the contract of :mod:`kd_lightning.data.embodied`).

An environment here is a ``gymnasium.Env`` whose observation is a ``Dict`` with five keys, so that gymnasium's
vector environments (sync or async, shared memory or not) can batch it:

- ``image`` (``uint8``, H x W x C): what the **student** sees: egocentric pixels, or BabyAI's symbolic egocentric
  grid (integer categories per channel, see ``image_categories``).
- ``mission`` (``int64``, L): the instruction as word ids (0 = padding), from :class:`MissionVocabulary`.
- ``privileged`` (``uint8``, Hp x Wp x Cp): the simulator state only a teacher may read (the full grid / the
  semantic map around the agent), integer categories per channel (``privileged_categories``).
- ``privileged_vector`` (``float32``, P): privileged scalars (inventory, pose, carried object).
- ``labels`` (``int64``, F): the scripted **expert**'s label of this state for every factor of every level of
  the hierarchy, in :func:`factor_names` order; ``-1`` where the expert has no valid label (masked in losses).
  The last level's first factor is the expert's action.

The env also exposes ``hierarchy`` (level -> factor -> class count), ``task_family`` (``"navigation"`` or
``"creation"``), ``achievement_names`` and ``achievement_families`` (Crafter; empty for BabyAI) and
``mirror_rollout(horizon)``: from a deep copy of the current state, the expert acts for up to ``horizon`` steps
and the copy's observations come back stacked (the "mirror" of the parallel simulation). When an episode ends,
``info`` holds ``success`` (bool) and ``achievements`` (bool per achievement name).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kd_lightning.errors import KDConfigError

__all__ = [
    "OBSERVATION_KEYS",
    "Hierarchy",
    "MissionVocabulary",
    "factor_names",
    "factor_sizes",
    "require_module",
    "stack_observations",
]

#: The keys of every embodied observation dict.
OBSERVATION_KEYS = ("image", "mission", "privileged", "privileged_vector", "labels")

#: level name -> factor name -> number of classes, in order (the last level's first factor is the action).
Hierarchy = Mapping[str, Mapping[str, int]]


def factor_names(hierarchy: Hierarchy) -> list[str]:
    """``"level/factor"`` for every factor, in label order."""
    return [f"{level}/{factor}" for level, factors in hierarchy.items() for factor in factors]


def factor_sizes(hierarchy: Hierarchy) -> list[int]:
    """The class count of every factor, in label order."""
    return [int(size) for factors in hierarchy.values() for size in factors.values()]


def require_module(module: str, extra: str, field: str, what: str) -> Any:
    """Import ``module`` or raise a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KDConfigError(
            field,
            f"{what} needs the {module} package, which is not installed",
            f"pip install 'kd-lightning[{extra}]'",
        ) from None


class MissionVocabulary:
    """Word ids of instructions: lower-cased words split on spaces and commas; 0 pads, 1 is unknown.

    Args:
        words: the known words (ids 2, 3, ... in this order).
        length: the fixed token length of a mission (longer ones are cut).
    """

    PAD, UNKNOWN = 0, 1

    def __init__(self, words: Sequence[str], length: int) -> None:
        self.words = tuple(words)
        self.length = int(length)
        self._ids = {word: i + 2 for i, word in enumerate(self.words)}

    @property
    def size(self) -> int:
        return len(self.words) + 2

    def encode(self, text: str) -> np.ndarray:
        tokens = text.lower().replace(",", " , ").split()
        ids = [self._ids.get(token, self.UNKNOWN) for token in tokens][: self.length]
        out = np.zeros(self.length, dtype=np.int64)
        out[: len(ids)] = ids
        return out


def stack_observations(observations: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A list of observation dicts as one dict of stacked arrays (empty arrays for an empty list are not made)."""
    return {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
