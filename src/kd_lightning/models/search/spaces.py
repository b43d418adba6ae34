"""Search spaces of student architectures: every candidate is a hashable ``arch`` that builds an ``nn.Module`` and
writes itself as a ``class_path`` / ``init_args`` config (so ``kd fit`` can train it).

* :class:`SmallCNNSpace` — width/depth space of :class:`~kd_lightning.models.small.SmallCNN` (digits, any input);
* :class:`CifarResNetSpace` — width/depth space of the CIFAR zoo's :class:`~kd_lightning.models.cifar.ResNet`
  (3-channel inputs);
* :class:`NB201Space` — NAS-Bench-201 cells (:class:`~kd_lightning.models.search.nb201.NB201Network`) over a
  configurable operation set.

:func:`build_space` turns a ``space:`` mapping of a search config (``kind`` plus the class's arguments) into one.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.models.cifar.resnet import ResNet
from kd_lightning.models.search.nb201 import NB201_OPS, OPERATIONS, NB201Network, arch_string, parse_arch
from kd_lightning.models.small import SmallCNN

__all__ = ["SPACES", "CifarResNetSpace", "NB201Space", "SearchSpace", "SmallCNNSpace", "build_space"]

Arch = tuple[Any, ...]


def _choices(values: Sequence[Any], field: str, *, positive: bool = True) -> tuple[int, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise KDConfigError(field, f"must be a non-empty list, got {values!r}", "e.g. [4, 8, 16]")
    out = tuple(sorted({int(v) for v in values}))
    if positive and out[0] < 1:
        raise KDConfigError(field, f"values must be >= 1, got {list(values)}", "use positive integers")
    return out


class SearchSpace(ABC):
    """A space of candidate students (see the module docstring)."""

    kind: ClassVar[str]
    #: the fields that make smaller candidates possible (for the empty-budget error message)
    shrink_fields: ClassVar[str]

    in_channels: int
    image_size: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One input, without batch: ``(in_channels, image_size, image_size)``."""
        return (self.in_channels, self.image_size, self.image_size)

    @abstractmethod
    def sample(self, rng: random.Random) -> Arch:
        """A random architecture."""

    @abstractmethod
    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        """A neighbour of ``arch`` (one change; ``arch`` itself only when the space has no other candidate)."""

    @abstractmethod
    def class_config(self, arch: Arch, num_classes: int) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}`` of ``arch`` (what a ``kd fit`` config's student takes)."""

    @abstractmethod
    def smallest(self) -> Arch:
        """The candidate with the fewest parameters and FLOPs (for the empty-budget check)."""

    @abstractmethod
    def final_widths(self) -> set[int]:
        """Every final feature width (``fc.in_features``) a candidate can have."""

    def build(self, arch: Arch, num_classes: int) -> nn.Module:
        """The network of ``arch`` (random initial weights from the global torch generator)."""
        config = self.class_config(arch, num_classes)
        return self.model_class(**config["init_args"])

    @property
    @abstractmethod
    def model_class(self) -> type[nn.Module]:
        """The network class of every candidate."""

    def label(self, arch: Arch) -> str:
        """A short readable name of ``arch`` (unique within the space)."""
        return f"{self.kind}:{arch}"

    def to_json(self, arch: Arch) -> Any:
        """``arch`` as JSON-able values."""
        return [list(a) if isinstance(a, tuple) else a for a in arch]


# ---------------------------------------------------------------------------------------------- SmallCNN
class SmallCNNSpace(SearchSpace):
    """Width/depth space of :class:`~kd_lightning.models.small.SmallCNN`: ``arch`` = the tuple of block widths.

    Args:
        widths: the allowed width of each conv block.
        depths: the allowed numbers of blocks (each but the last is followed by a 2x2 max-pool, so at most
            ``log2(image_size) + 1``).
        in_channels: input channels (1 for digits).
        image_size: input height and width (8 for digits).
        final_width: fix the last block's width (e.g. to the teacher's, for DisWOT's channel semantic metric);
            ``None``: any of ``widths``.
        dropout: dropout before ``fc`` of every candidate.

    Mutation: change one block's width, add a block, or remove one (each when possible, chosen uniformly).
    """

    kind = "smallcnn"
    shrink_fields = "space.widths / space.depths"

    def __init__(
        self,
        widths: Sequence[int] = (4, 8, 16, 32, 64),
        depths: Sequence[int] = (1, 2, 3),
        in_channels: int = 1,
        image_size: int = 8,
        final_width: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        self.widths = _choices(widths, "space.widths")
        self.depths = _choices(depths, "space.depths")
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        max_depth = int(math.log2(self.image_size)) + 1 if self.image_size >= 1 else 0
        if self.depths[-1] > max_depth:
            raise KDConfigError(
                "space.depths",
                f"a {self.image_size}x{self.image_size} input allows at most {max_depth} SmallCNN blocks "
                f"(a max-pool follows each but the last), got {self.depths[-1]}",
                f"use depths up to {max_depth}",
            )
        self.final_width = None if final_width is None else int(final_width)
        if self.final_width is not None and self.final_width < 1:
            raise KDConfigError("space.final_width", f"must be >= 1, got {final_width}", "or null")
        self.dropout = float(dropout)

    @property
    def model_class(self) -> type[nn.Module]:
        return SmallCNN

    def _fix(self, widths: list[int]) -> Arch:
        if self.final_width is not None:
            widths[-1] = self.final_width
        return tuple(widths)

    def sample(self, rng: random.Random) -> Arch:
        depth = rng.choice(self.depths)
        return self._fix([rng.choice(self.widths) for _ in range(depth)])

    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        widths = list(arch)
        free = len(widths) - (1 if self.final_width is not None else 0)  # blocks whose width may change
        moves = []
        if free > 0 and len(self.widths) > 1:
            moves.append("width")
        if any(d > len(widths) for d in self.depths):
            moves.append("deeper")
        if any(d < len(widths) for d in self.depths) and len(widths) > 1:
            moves.append("shallower")
        if not moves:
            return tuple(arch)
        move = rng.choice(moves)
        if move == "width":
            i = rng.randrange(free)
            widths[i] = rng.choice([w for w in self.widths if w != widths[i]])
        elif move == "deeper":
            target = rng.choice([d for d in self.depths if d > len(widths)])
            while len(widths) < target:
                widths.insert(rng.randrange(max(free, 0) + 1), rng.choice(self.widths))
                free += 1
        else:
            target = rng.choice([d for d in self.depths if d < len(widths)])
            while len(widths) > target:
                widths.pop(rng.randrange(free) if free > 0 else 0)
                free = max(free - 1, 0)
        return self._fix(widths)

    def class_config(self, arch: Arch, num_classes: int) -> dict[str, Any]:
        init_args: dict[str, Any] = {
            "in_channels": self.in_channels,
            "widths": [int(w) for w in arch],
            "num_classes": int(num_classes),
        }
        if self.dropout:
            init_args["dropout"] = self.dropout
        return {"class_path": "kd_lightning.models.SmallCNN", "init_args": init_args}

    def smallest(self) -> Arch:
        return self._fix([self.widths[0]] * self.depths[0])

    def final_widths(self) -> set[int]:
        return {self.final_width} if self.final_width is not None else set(self.widths)

    def label(self, arch: Arch) -> str:
        return "smallcnn-" + "-".join(str(w) for w in arch)

    def to_json(self, arch: Arch) -> Any:
        return [int(w) for w in arch]


# ---------------------------------------------------------------------------------------------- CIFAR ResNet
class CifarResNetSpace(SearchSpace):
    """Width/depth space of the CIFAR zoo's :class:`~kd_lightning.models.cifar.ResNet` (basic blocks, 6n+2):
    ``arch = (depth, stem width, stage-1, stage-2, stage-3 widths)``, widths non-decreasing.

    Args:
        depths: allowed depths (each ``6n + 2``: 8, 14, 20, 32, 44, 56, 110).
        widths: allowed widths of the stem and of each stage.
        image_size: input height and width (32 for CIFAR; the ResNet takes 3 channels).

    Mutation: move the depth to another allowed value, or change one width (the widths stay sorted).
    """

    kind = "cifar_resnet"
    shrink_fields = "space.depths / space.widths"
    in_channels = 3

    def __init__(
        self,
        depths: Sequence[int] = (8, 14, 20, 32),
        widths: Sequence[int] = (8, 16, 32, 64),
        image_size: int = 32,
    ) -> None:
        self.depths = _choices(depths, "space.depths")
        bad = [d for d in self.depths if d < 8 or (d - 2) % 6]
        if bad:
            raise KDConfigError("space.depths", f"CIFAR ResNet depths are 6n+2 (8, 14, 20, ...), got {bad}", "")
        self.widths = _choices(widths, "space.widths")
        self.image_size = int(image_size)

    @property
    def model_class(self) -> type[nn.Module]:
        return ResNet

    def sample(self, rng: random.Random) -> Arch:
        return (rng.choice(self.depths), *sorted(rng.choice(self.widths) for _ in range(4)))

    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        depth, widths = arch[0], list(arch[1:])
        moves = (["depth"] if len(self.depths) > 1 else []) + (["width"] if len(self.widths) > 1 else [])
        if not moves:
            return tuple(arch)
        if rng.choice(moves) == "depth":
            depth = rng.choice([d for d in self.depths if d != depth])
        else:
            i = rng.randrange(4)
            widths[i] = rng.choice([w for w in self.widths if w != widths[i]])
        return (depth, *sorted(widths))

    def class_config(self, arch: Arch, num_classes: int) -> dict[str, Any]:
        return {
            "class_path": "kd_lightning.models.ResNet",
            "init_args": {"depth": int(arch[0]), "widths": [int(w) for w in arch[1:]], "num_classes": int(num_classes)},
        }

    def smallest(self) -> Arch:
        return (self.depths[0], *([self.widths[0]] * 4))

    def final_widths(self) -> set[int]:
        return set(self.widths)

    def label(self, arch: Arch) -> str:
        return f"resnet{arch[0]}-" + "-".join(str(w) for w in arch[1:])

    def to_json(self, arch: Arch) -> Any:
        return [int(a) for a in arch]


# ---------------------------------------------------------------------------------------------- NAS-Bench-201
#: parameter rank of each operation (for :meth:`NB201Space.smallest`)
_OP_COST = {"none": 0, "skip_connect": 0, "avg_pool_3x3": 0, "max_pool_3x3": 0, "nor_conv_1x1": 1, "nor_conv_3x3": 2}


class NB201Space(SearchSpace):
    """NAS-Bench-201 cell space: ``arch`` = the six operation names of the cell (one per edge).

    Args:
        ops: the operation set (default NAS-Bench-201's five: none, skip_connect, nor_conv_1x1, nor_conv_3x3,
            avg_pool_3x3; ``max_pool_3x3`` is also available).
        channels: first-stage width ``C`` of every candidate (final width ``4C``; NAS-Bench-201: 16).
        cells_per_stage: ``N`` (NAS-Bench-201: 5).
        in_channels: input channels.
        image_size: input height and width (two stride-2 reductions).

    Mutation (the official search's): one edge gets a different operation.
    """

    kind = "nb201"
    shrink_fields = "space.ops / space.channels / space.cells_per_stage"

    def __init__(
        self,
        ops: Sequence[str] = NB201_OPS,
        channels: int = 16,
        cells_per_stage: int = 5,
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        if isinstance(ops, str) or not ops:
            raise KDConfigError("space.ops", f"must be a non-empty list of operations, got {ops!r}", "")
        unknown = [op for op in ops if op not in OPERATIONS]
        if unknown:
            raise KDConfigError(
                "space.ops", f"unknown operation {unknown[0]!r}", f"choose from {', '.join(OPERATIONS)}"
            )
        self.ops = tuple(dict.fromkeys(str(op) for op in ops))
        self.channels = int(channels)
        self.cells_per_stage = int(cells_per_stage)
        if self.channels < 1 or self.cells_per_stage < 0:
            raise KDConfigError(
                "space.channels", f"needs channels >= 1 and cells_per_stage >= 0, got {channels}, {cells_per_stage}", ""
            )
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)

    @property
    def model_class(self) -> type[nn.Module]:
        return NB201Network

    def sample(self, rng: random.Random) -> Arch:
        return tuple(rng.choice(self.ops) for _ in range(6))

    def mutate(self, arch: Arch, rng: random.Random) -> Arch:
        if len(self.ops) < 2:
            return tuple(arch)
        ops = list(arch)
        i = rng.randrange(6)
        ops[i] = rng.choice([op for op in self.ops if op != ops[i]])
        return tuple(ops)

    def class_config(self, arch: Arch, num_classes: int) -> dict[str, Any]:
        return {
            "class_path": "kd_lightning.models.search.NB201Network",
            "init_args": {
                "arch": arch_string(arch),
                "channels": self.channels,
                "cells_per_stage": self.cells_per_stage,
                "in_channels": self.in_channels,
                "num_classes": int(num_classes),
            },
        }

    def smallest(self) -> Arch:
        cheapest = min(self.ops, key=lambda op: (_OP_COST[op], self.ops.index(op)))
        return (cheapest,) * 6

    def final_widths(self) -> set[int]:
        return {4 * self.channels}

    def label(self, arch: Arch) -> str:
        return f"nb201-C{self.channels}N{self.cells_per_stage}-{arch_string(arch)}"

    def to_json(self, arch: Arch) -> Any:
        return arch_string(arch)

    @staticmethod
    def parse(text: str | Sequence[str]) -> Arch:
        """An ``arch`` from a NAS-Bench-201 string or a list of six operations."""
        return parse_arch(text)


#: ``space.kind`` -> class
SPACES: dict[str, type[SearchSpace]] = {
    SmallCNNSpace.kind: SmallCNNSpace,
    CifarResNetSpace.kind: CifarResNetSpace,
    NB201Space.kind: NB201Space,
}


def build_space(spec: Mapping[str, Any], field: str = "space") -> SearchSpace:
    """A search space from a mapping ``{"kind": ..., **arguments}`` (a search config's ``space:``).

    Raises:
        KDConfigError: naming ``space.kind`` or the unknown ``space.<argument>``.
    """
    import inspect

    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise KDConfigError(f"{field}.kind", "is missing", f"choose one of {', '.join(SPACES)}")
    kind = str(spec["kind"])
    if kind not in SPACES:
        raise KDConfigError(f"{field}.kind", f"unknown space {kind!r}", f"choose one of {', '.join(SPACES)}")
    cls = SPACES[kind]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    args = {k: v for k, v in spec.items() if k != "kind"}
    for key in args:
        if key not in accepted:
            raise KDConfigError(
                f"{field}.{key}", f"is not an argument of the {kind} space", f"its arguments: {', '.join(accepted)}"
            )
    return cls(**args)
