"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

Pre-activation WRN-d-k for 32x32 inputs as used by RepDistiller / mdistiller: a 3x3 stem to 16 channels,
three groups of ``(d-4)/6`` BN-ReLU-conv basic blocks with ``16k, 32k, 64k`` channels (strides 1, 2, 2),
then BN-ReLU, global average pooling and ``fc``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

from ._base import CifarModel

__all__ = ["WRN16_1", "WRN16_2", "WRN40_1", "WRN40_2", "WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus (1x1 conv) shortcut.

    When the width changes, the shortcut starts from the activated input, as in the reference code.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of ``nb_layers`` wide basic blocks (the first one carries the stride)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarModel):
    """Pre-activation Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016).

    Args:
        depth: total depth, ``6n+4`` (16, 28, 40, ...).
        widen_factor: width multiplier ``k`` of the three groups (16k, 32k, 64k channels).
        num_classes: number of output logits.
        drop_rate: dropout between the two convolutions of each block.
    """

    feature_stages: ClassVar[tuple[str, ...]] = ("conv1", "block1", "block2", "block3", "flatten")

    def __init__(self, depth: int = 16, widen_factor: int = 1, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise KDConfigError(f"WideResNet depth must be 6n+4 with n >= 1 (16, 28, 40, ...); got {depth}")
        n = (depth - 4) // 6
        ch = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.depth = depth
        self.widen_factor = widen_factor
        self.conv1 = nn.Conv2d(3, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(ch[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

        # the pre-activation of a stage is the next BN applied to it (RepDistiller's ``preact=True``)
        self.bn_before_relu = ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")
        self._finish(
            preact_stages=("conv1", *self.bn_before_relu, "flatten"),
            feature_dims=(ch[0], ch[1], ch[2], ch[3], ch[3]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(self.flatten(self.avgpool(out)))


class WRN16_1(WideResNet):
    """WRN-16-1 (Zagoruyko & Komodakis 2016; RepDistiller ``wrn_16_1``)."""

    def __init__(self, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__(depth=16, widen_factor=1, num_classes=num_classes, drop_rate=drop_rate)


class WRN16_2(WideResNet):
    """WRN-16-2 (Zagoruyko & Komodakis 2016; RepDistiller ``wrn_16_2``)."""

    def __init__(self, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__(depth=16, widen_factor=2, num_classes=num_classes, drop_rate=drop_rate)


class WRN40_1(WideResNet):
    """WRN-40-1 (Zagoruyko & Komodakis 2016; RepDistiller ``wrn_40_1``)."""

    def __init__(self, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__(depth=40, widen_factor=1, num_classes=num_classes, drop_rate=drop_rate)


class WRN40_2(WideResNet):
    """WRN-40-2 (Zagoruyko & Komodakis 2016; RepDistiller ``wrn_40_2``)."""

    def __init__(self, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__(depth=40, widen_factor=2, num_classes=num_classes, drop_rate=drop_rate)
