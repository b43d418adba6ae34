"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

The 6n+2 family with three stages at 32x32, 16x16 and 8x8, as used by RepDistiller (Tian et al.,
"Contrastive Representation Distillation", ICLR 2020) and mdistiller: ``resnet8`` ... ``resnet110`` with
widths (16, 16, 32, 64) and the 4x-wide ``resnet8x4`` / ``resnet32x4`` with widths (32, 64, 128, 256).
Shortcuts are identity, or 1x1 conv + BN when the stride or the width changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

from ._base import CifarModel

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNet8",
    "ResNet8x4",
    "ResNet14",
    "ResNet20",
    "ResNet32",
    "ResNet32x4",
    "ResNet44",
    "ResNet56",
    "ResNet110",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut; ``relu2``'s input is the block's pre-activation."""

    expansion: ClassVar[int] = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + residual)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4) bottleneck; ``relu3``'s input is the block's pre-activation."""

    expansion: ClassVar[int] = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + residual)


class ResNet(CifarModel):
    """CIFAR ResNet of depth ``6n+2`` (basic blocks) or ``9n+2`` (bottlenecks), He et al. 2016.

    Layout of RepDistiller ``models/resnet.py``: 3x3 stem conv to ``widths[0]``, three stages of ``n``
    blocks with ``widths[1:]`` channels (strides 1, 2, 2), global average pool, ``fc``.

    Args:
        depth: total depth; ``6n+2`` for ``block="basic"``, ``9n+2`` for ``block="bottleneck"``.
        widths: stem width followed by the widths of the three stages.
        num_classes: number of output logits.
        block: ``"basic"`` or ``"bottleneck"``.
    """

    feature_stages: ClassVar[tuple[str, ...]] = ("relu", "layer1", "layer2", "layer3", "flatten")

    def __init__(
        self,
        depth: int = 20,
        widths: Sequence[int] = (16, 16, 32, 64),
        num_classes: int = 100,
        block: str = "basic",
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4:
            raise KDConfigError(f"ResNet widths must have 4 entries (stem, stage1..3); got {widths}")
        kind = block.lower()
        if kind in ("basic", "basicblock"):
            if (depth - 2) % 6 != 0:
                raise KDConfigError(f"ResNet with basic blocks needs depth 6n+2 (20, 32, 56, ...); got {depth}")
            n, block_cls = (depth - 2) // 6, BasicBlock
        elif kind == "bottleneck":
            if (depth - 2) % 9 != 0:
                raise KDConfigError(f"ResNet with bottlenecks needs depth 9n+2 (29, 47, 56, ...); got {depth}")
            n, block_cls = (depth - 2) // 9, Bottleneck
        else:
            raise KDConfigError(f"ResNet block must be 'basic' or 'bottleneck'; got {block!r}")
        if n < 1:
            raise KDConfigError(f"ResNet depth {depth} leaves no residual blocks")
        self.depth = depth
        self.widths = widths

        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block_cls, widths[1], n, stride=1)
        self.layer2 = self._make_layer(block_cls, widths[2], n, stride=2)
        self.layer3 = self._make_layer(block_cls, widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3] * block_cls.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        last_relu = "relu2" if block_cls is BasicBlock else "relu3"
        last_bn = "bn2" if block_cls is BasicBlock else "bn3"
        self.bn_before_relu = tuple(f"layer{i}.{n - 1}.{last_bn}" for i in (1, 2, 3))
        exp = block_cls.expansion
        self._finish(
            preact_stages=(
                "relu",
                *(f"layer{i}.{n - 1}.{last_relu}:input" for i in (1, 2, 3)),
                "flatten",
            ),
            feature_dims=(widths[0], widths[1] * exp, widths[2] * exp, widths[3] * exp, widths[3] * exp),
        )

    def _make_layer(self, block_cls: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        expansion = block_cls.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        layers = [block_cls(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * expansion
        layers += [block_cls(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


class ResNet8(ResNet):
    """CIFAR ResNet-8, widths (16, 16, 32, 64) (RepDistiller ``resnet8``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=8, widths=_NARROW, num_classes=num_classes)


class ResNet14(ResNet):
    """CIFAR ResNet-14, widths (16, 16, 32, 64) (RepDistiller ``resnet14``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=14, widths=_NARROW, num_classes=num_classes)


class ResNet20(ResNet):
    """CIFAR ResNet-20, widths (16, 16, 32, 64) (He et al. 2016; RepDistiller ``resnet20``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=20, widths=_NARROW, num_classes=num_classes)


class ResNet32(ResNet):
    """CIFAR ResNet-32, widths (16, 16, 32, 64) (He et al. 2016; RepDistiller ``resnet32``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=32, widths=_NARROW, num_classes=num_classes)


class ResNet44(ResNet):
    """CIFAR ResNet-44, widths (16, 16, 32, 64) (He et al. 2016; RepDistiller ``resnet44``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=44, widths=_NARROW, num_classes=num_classes)


class ResNet56(ResNet):
    """CIFAR ResNet-56, widths (16, 16, 32, 64) (He et al. 2016; RepDistiller ``resnet56``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=56, widths=_NARROW, num_classes=num_classes)


class ResNet110(ResNet):
    """CIFAR ResNet-110, widths (16, 16, 32, 64) (He et al. 2016; RepDistiller ``resnet110``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=110, widths=_NARROW, num_classes=num_classes)


class ResNet8x4(ResNet):
    """CIFAR ResNet-8 with 4x widths (32, 64, 128, 256) (Tian et al. 2020; RepDistiller ``resnet8x4``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=8, widths=_WIDE, num_classes=num_classes)


class ResNet32x4(ResNet):
    """CIFAR ResNet-32 with 4x widths (32, 64, 128, 256) (Tian et al. 2020; RepDistiller ``resnet32x4``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(depth=32, widths=_WIDE, num_classes=num_classes)
