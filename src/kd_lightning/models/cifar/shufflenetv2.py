"""ShuffleNet V2 for CIFAR (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018), in the variant of RepDistiller / mdistiller (``ShuffleV2``, net size 1).

1x1 stem to 24 channels (no stride, no max-pool), three stages of one stride-2 down-sampling unit plus
channel-split units, a 1x1 conv to the last width, global average pooling and ``fc``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

from ._base import CifarModel
from .shufflenetv1 import ChannelShuffle

__all__ = ["SHUFFLENETV2_CONFIGS", "ShuffleNetV2", "ShuffleV2Block", "ShuffleV2DownBlock"]

#: net_size -> (stage widths + final conv width, units per stage)
SHUFFLENETV2_CONFIGS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.2: ((40, 80, 160, 512), (3, 3, 3)),
    0.3: ((40, 80, 160, 512), (3, 7, 3)),
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ChannelSplit(nn.Module):
    """Split the channels into the first ``ratio`` and the rest."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class ShuffleV2Block(nn.Module):
    """Channel-split unit: half the channels pass, the other half go 1x1 - 3x3 dw - 1x1, then shuffle.

    ``preact`` (an identity) outputs the unit's pre-activation ``cat([passed half, bn3 output])``.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = ChannelSplit(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu3 = nn.ReLU()
        self.preact = nn.Identity()
        self.shuffle = ChannelShuffle(groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.split(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x2)))))
        pre = self.bn3(self.conv3(out))
        self.preact(torch.cat([x1, pre], 1))
        return self.shuffle(torch.cat([x1, self.relu3(pre)], 1))


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 unit: both branches see the whole input and are concatenated, then shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ChannelShuffle(groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu3(self.bn3(self.conv3(x)))
        right = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(CifarModel):
    """ShuffleNet V2 for 32x32 inputs (Ma et al. 2018); the default is RepDistiller ``ShuffleV2``.

    Args:
        num_classes: number of output logits.
        net_size: width preset, one of ``SHUFFLENETV2_CONFIGS`` (0.2, 0.3, 0.5, 1, 1.5, 2).
    """

    feature_stages: ClassVar[tuple[str, ...]] = ("relu", "layer1", "layer2", "layer3", "flatten")
    legacy_classifier_prefix: ClassVar[str | None] = "linear."

    def __init__(self, num_classes: int = 100, net_size: float = 1.0) -> None:
        super().__init__()
        if float(net_size) not in SHUFFLENETV2_CONFIGS:
            raise KDConfigError(f"ShuffleNetV2 net_size must be one of {sorted(SHUFFLENETV2_CONFIGS)}; got {net_size}")
        out_channels, num_blocks = SHUFFLENETV2_CONFIGS[float(net_size)]
        self.net_size = net_size
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(out_channels[3], num_classes)
        # layer<i>[0] is the down-sampling unit, so the last split unit is index num_blocks
        self._finish(
            preact_stages=("relu", *(f"layer{i + 1}.{num_blocks[i]}.preact" for i in range(3)), "flatten"),
            feature_dims=(24, *out_channels[:3], out_channels[3]),
        )

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleV2DownBlock(self.in_channels, out_channels)]
        layers += [ShuffleV2Block(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.fc(self.flatten(self.avgpool(out)))
