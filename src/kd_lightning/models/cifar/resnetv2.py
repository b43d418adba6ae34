"""ImageNet-style ResNets adapted to CIFAR (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016), as in RepDistiller ``models/resnetv2.py`` / mdistiller ``resnetv2.py``.

The four-stage ResNet-18/34/50 with a 3x3 stride-1 stem and no max-pool, so the stages run at 32, 16, 8
and 4 pixels; widths 64, 128, 256, 512 (times 4 for bottlenecks). Shortcuts are identity or 1x1 conv + BN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

from ._base import CifarModel

__all__ = [
    "CIFARResNet",
    "CIFARResNet18",
    "CIFARResNet34",
    "CIFARResNet50",
    "PreReluBasicBlock",
    "PreReluBottleneck",
]


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class PreReluBasicBlock(nn.Module):
    """Basic block of the four-stage ResNet; ``relu2``'s input is the block's pre-activation."""

    expansion: ClassVar[int] = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class PreReluBottleneck(nn.Module):
    """Bottleneck block (stride on the 3x3 conv); ``relu3``'s input is the block's pre-activation."""

    expansion: ClassVar[int] = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(in_planes, planes * 4, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class CIFARResNet(CifarModel):
    """Four-stage ResNet with a 3x3 stride-1 stem for 32x32 inputs (He et al. 2016).

    Args:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101/152).
        num_blocks: blocks in each of the four stages.
        num_classes: number of output logits.
        zero_init_residual: zero the last BN of every residual branch (Goyal et al. 2017).
    """

    feature_stages: ClassVar[tuple[str, ...]] = ("relu", "layer1", "layer2", "layer3", "layer4", "flatten")
    legacy_classifier_prefix: ClassVar[str | None] = "linear."

    def __init__(
        self,
        block: str = "bottleneck",
        num_blocks: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 100,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        block_cls: type[PreReluBasicBlock] | type[PreReluBottleneck]
        if block.lower() in ("basic", "basicblock"):
            block_cls = PreReluBasicBlock
        elif block.lower() == "bottleneck":
            block_cls = PreReluBottleneck
        else:
            raise KDConfigError(f"CIFARResNet block must be 'basic' or 'bottleneck'; got {block!r}")
        num_blocks = tuple(num_blocks)
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise KDConfigError(f"CIFARResNet needs 4 stages of >= 1 block; got num_blocks={num_blocks}")
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block_cls, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block_cls, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block_cls, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block_cls, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(512 * block_cls.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        last_bn, last_relu = ("bn3", "relu3") if block_cls is PreReluBottleneck else ("bn2", "relu2")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (PreReluBasicBlock, PreReluBottleneck)):
                    nn.init.zeros_(getattr(m, last_bn).weight)

        last = [n - 1 for n in num_blocks]
        self.bn_before_relu = tuple(f"layer{i + 1}.{last[i]}.{last_bn}" for i in range(4))
        exp = block_cls.expansion
        self._finish(
            preact_stages=("relu", *(f"layer{i + 1}.{last[i]}.{last_relu}:input" for i in range(4)), "flatten"),
            feature_dims=(64, 64 * exp, 128 * exp, 256 * exp, 512 * exp, 512 * exp),
        )

    def _make_layer(
        self,
        block_cls: type[PreReluBasicBlock] | type[PreReluBottleneck],
        planes: int,
        num_blocks: int,
        stride: int,
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block_cls(self.in_planes, planes, s))
            self.in_planes = planes * block_cls.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.flatten(self.avgpool(out)))


class CIFARResNet18(CIFARResNet):
    """ResNet-18 for CIFAR: basic blocks [2, 2, 2, 2], 3x3 stem (RepDistiller ``resnetv2.ResNet18``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(block="basic", num_blocks=(2, 2, 2, 2), num_classes=num_classes)


class CIFARResNet34(CIFARResNet):
    """ResNet-34 for CIFAR: basic blocks [3, 4, 6, 3], 3x3 stem (RepDistiller ``resnetv2.ResNet34``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(block="basic", num_blocks=(3, 4, 6, 3), num_classes=num_classes)


class CIFARResNet50(CIFARResNet):
    """ResNet-50 for CIFAR: bottlenecks [3, 4, 6, 3], 3x3 stem (RepDistiller ``ResNet50``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(block="bottleneck", num_blocks=(3, 4, 6, 3), num_classes=num_classes)
