"""NAS-Bench-201 cell networks (Dong & Yang, "NAS-Bench-201: Extending the Scope of Reproducible Neural
Architecture Search", ICLR 2020), in plain torch, for any input channels and image size.

A cell is a complete DAG over 4 nodes: node 0 is the cell input, node ``i`` (1..3) sums one operation applied to
every earlier node, and the cell output is node 3 — six edges in the order ``1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2``.
An architecture is written as in NAS-Bench-201, ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``, or as the list of the six
operation names in that order. The macro network (NAS-Bench-201's ``TinyNetwork``): a 3x3 conv-BN stem with
``channels`` outputs, ``cells_per_stage`` cells, a residual reduction block (stride 2, width x2), again
``cells_per_stage`` cells, a reduction, ``cells_per_stage`` cells, BN-ReLU, global average pooling and ``fc``.

The operations (NAS-Bench-201 ``OPS``, stride 1 and equal widths inside a cell): ``none`` (zeros), ``skip_connect``
(identity), ``nor_conv_1x1`` / ``nor_conv_3x3`` (ReLU-conv-BN), ``avg_pool_3x3`` (``count_include_pad=False``) and
``max_pool_3x3``. Differences from the reference code: no module runs in place (feature taps read tensors that are
never overwritten) and the classifier is called ``fc`` and the pooling ``avgpool`` (as in the rest of the zoo).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

__all__ = [
    "EDGES",
    "NB201_OPS",
    "OPERATIONS",
    "NB201Network",
    "arch_string",
    "parse_arch",
]

#: the NAS-Bench-201 operation set, in the benchmark's order
NB201_OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
#: every operation this module builds (NAS-Bench-201's plus ``max_pool_3x3``)
OPERATIONS: tuple[str, ...] = (*NB201_OPS, "max_pool_3x3")
#: the six edges of a cell, ``(to_node, from_node)``, in the order of the architecture string
EDGES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))


def arch_string(ops: Sequence[str]) -> str:
    """The NAS-Bench-201 string of six operations: ``|a~0|+|b~0|c~1|+|d~0|e~1|f~2|``."""
    ops = tuple(ops)
    if len(ops) != len(EDGES):
        raise KDConfigError("arch", f"a cell has {len(EDGES)} edges, got {len(ops)} operations", "give six")
    nodes = []
    for node in (1, 2, 3):
        nodes.append("|" + "|".join(f"{ops[k]}~{j}" for k, (i, j) in enumerate(EDGES) if i == node) + "|")
    return "+".join(nodes)


def parse_arch(arch: str | Sequence[str]) -> tuple[str, ...]:
    """Six operation names from a NAS-Bench-201 string or a list of names (checked against :data:`OPERATIONS`)."""
    if isinstance(arch, str):
        ops: list[str] = []
        nodes = arch.strip().split("+")
        if len(nodes) != 3:
            raise KDConfigError(
                "arch", f"{arch!r} is not a NAS-Bench-201 cell string", "write |op~0|+|op~0|op~1|+|op~0|op~1|op~2|"
            )
        for node, text in enumerate(nodes, start=1):
            items = [item for item in text.strip().strip("|").split("|") if item]
            if len(items) != node:
                raise KDConfigError("arch", f"node {node} of {arch!r} needs {node} inputs, got {len(items)}", "")
            for j, item in enumerate(items):
                name, sep, source = item.partition("~")
                if not sep or source != str(j):
                    raise KDConfigError("arch", f"{item!r} in {arch!r} must read <op>~{j}", "see NAS-Bench-201")
                ops.append(name)
    else:
        ops = [str(op) for op in arch]
    if len(ops) != len(EDGES):
        raise KDConfigError("arch", f"a cell has {len(EDGES)} edges, got {len(ops)} operations", "give six")
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown:
        raise KDConfigError("arch", f"unknown operation {unknown[0]!r}", f"operations: {', '.join(OPERATIONS)}")
    return tuple(ops)


class ReLUConvBN(nn.Module):
    """ReLU, convolution (no bias), BatchNorm — NAS-Bench-201's ``ReLUConvBN``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Zero(nn.Module):
    """The ``none`` operation: zeros of the input's shape (the edge is absent)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def build_operation(name: str, channels: int) -> nn.Module:
    """One cell edge (stride 1, ``channels`` in and out)."""
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1)
    if name == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=1, padding=1)
    raise KDConfigError("arch", f"unknown operation {name!r}", f"operations: {', '.join(OPERATIONS)}")


class NB201Cell(nn.Module):
    """A NAS-Bench-201 cell: node ``i`` = sum over ``j < i`` of ``op_{i<-j}(node_j)``; output = node 3."""

    def __init__(self, ops: Sequence[str], channels: int) -> None:
        super().__init__()
        self.ops = tuple(ops)
        self.edges = nn.ModuleList(build_operation(op, channels) for op in self.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for node in (1, 2, 3):
            terms = [self.edges[k](nodes[j]) for k, (i, j) in enumerate(EDGES) if i == node]
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            nodes.append(total)
        return nodes[-1]


class ResidualReduction(nn.Module):
    """NAS-Bench-201's reduction block (``ResNetBasicblock`` with stride 2): two ReLU-conv3x3-BN, the first with
    stride 2, plus a shortcut of 2x2 average pooling and a 1x1 conv; no activation after the sum."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_b(self.conv_a(x)) + self.downsample(x)


class NB201Network(nn.Module):
    """NAS-Bench-201's macro network around one cell architecture (``TinyNetwork``).

    Args:
        arch: the cell, as a NAS-Bench-201 string (``|nor_conv_3x3~0|+|...|``) or a list of six operation names.
        channels: width of the first stage (``C``; the stages have ``C``, ``2C``, ``4C`` channels).
        cells_per_stage: cells per stage (``N``; NAS-Bench-201 uses 5).
        in_channels: input channels (1 for 8x8 digits, 3 for CIFAR).
        num_classes: number of output logits.

    ``avgpool:input`` is the pre-pooling feature map (after the final BN-ReLU); ``fc`` is the classifier.
    """

    def __init__(
        self,
        arch: str | Sequence[str] = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|"
        "nor_conv_3x3~2|",
        channels: int = 16,
        cells_per_stage: int = 5,
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise KDConfigError("channels", f"must be >= 1, got {channels}", "NAS-Bench-201 uses 16")
        if cells_per_stage < 0:
            raise KDConfigError("cells_per_stage", f"must be >= 0, got {cells_per_stage}", "NAS-Bench-201 uses 5")
        self.ops = parse_arch(arch)
        self.arch = arch_string(self.ops)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(channels)
        )
        cells: list[nn.Module] = []
        width = channels
        stage_ends = []
        for stage in range(3):
            if stage:
                cells.append(ResidualReduction(width, width * 2))
                width *= 2
            cells.extend(NB201Cell(self.ops, width) for _ in range(cells_per_stage))
            stage_ends.append(f"cells.{len(cells) - 1}" if cells else "stem")
        self.cells = nn.ModuleList(cells)
        self.lastact = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(width, num_classes)
        self.classifier_in_features = width
        #: stage features: the last module of each stage, the final BN-ReLU and the pooled vector
        self.feature_stages: tuple[str, ...] = (*stage_ends, "lastact", "flatten")
        self.feature_dims: tuple[int, ...] = (channels, channels * 2, channels * 4, width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.fc(self.flatten(self.avgpool(self.lastact(x))))
