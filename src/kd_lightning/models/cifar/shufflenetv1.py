"""ShuffleNet V1 for CIFAR (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices", CVPR 2018), in the variant of RepDistiller / mdistiller (``ShuffleV1``).

1x1 stem to 24 channels (no stride, no max-pool), three stages of grouped-conv bottlenecks with channel
shuffle (the first block of each stage has stride 2 and concatenates an average-pooled shortcut),
global average pooling and ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

from ._base import CifarModel

__all__ = ["ChannelShuffle", "ShuffleNetV1", "ShuffleV1Bottleneck"]


class ChannelShuffle(nn.Module):
    """Channel shuffle: ``[N, g*c, H, W] -> [N, c*g, H, W]`` (transpose of the group axis)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Bottleneck(nn.Module):
    """ShuffleNet unit: 1x1 group conv - shuffle - 3x3 depthwise - 1x1 group conv, plus shortcut.

    With stride 2 the shortcut is a 3x3 average pool concatenated to the branch, otherwise it is added.
    ``relu3``'s input is the unit's pre-activation.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups  # no grouping right after the 24-channel stem
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ChannelShuffle(groups=g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu3(preact)


class ShuffleNetV1(CifarModel):
    """ShuffleNet V1 for 32x32 inputs (Zhang et al. 2018); defaults = RepDistiller ``ShuffleV1``.

    Args:
        num_classes: number of output logits.
        groups: number of groups of the 1x1 convolutions.
        out_planes: output channels of the three stages.
        num_blocks: units per stage.
    """

    feature_stages: ClassVar[tuple[str, ...]] = ("relu", "layer1", "layer2", "layer3", "flatten")
    legacy_classifier_prefix: ClassVar[str | None] = "linear."

    def __init__(
        self,
        num_classes: int = 100,
        groups: int = 3,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
    ) -> None:
        super().__init__()
        out_planes, num_blocks = tuple(out_planes), tuple(num_blocks)
        if len(out_planes) != 3 or len(num_blocks) != 3:
            raise KDConfigError(f"ShuffleNetV1 needs 3 stages; got out_planes={out_planes}, num_blocks={num_blocks}")
        self.groups = groups
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(out_planes[2], num_classes)
        self._finish(
            preact_stages=(
                "relu",
                *(f"layer{i + 1}.{num_blocks[i] - 1}.relu3:input" for i in range(3)),
                "flatten",
            ),
            feature_dims=(24, *out_planes, out_planes[2]),
        )

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # the stride-2 first unit concatenates its pooled input, so its branch makes the rest
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(ShuffleV1Bottleneck(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.flatten(self.avgpool(out)))
