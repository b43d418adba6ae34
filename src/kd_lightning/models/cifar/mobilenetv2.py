"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018), in the variant of RepDistiller / mdistiller (from Jin et al., "Knowledge Distillation via
Route Constrained Optimization", ICCV 2019).

Stride-2 3x3 stem, seven groups of inverted residuals (t, c, n, s) = (1,16,1,1), (T,24,2,1), (T,32,3,2),
(T,64,4,2), (T,96,3,1), (T,160,3,2), (T,320,1,1) with channels scaled by ``width_mult``, a 1x1 conv to
1280 channels, global average pooling and ``fc``. The default (``expand_ratio=6``, ``width_mult=0.5``) is
RepDistiller's ``mobile_half``, called ``MobileNetV2`` in its ``model_dict``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

from ._base import CifarModel

__all__ = ["InvertedResidual", "MobileNetV2"]


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, identity shortcut when shapes allow.

    The expansion conv is kept even for ``expand_ratio == 1``, as in the reference code.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise KDConfigError(f"InvertedResidual stride must be 1 or 2; got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(CifarModel):
    """MobileNetV2 for 32x32 inputs (Sandler et al. 2018), RepDistiller's ``mobilenetv2_T_w``.

    Args:
        num_classes: number of output logits.
        width_mult: channel multiplier ``W`` (0.5 = RepDistiller ``mobile_half``).
        expand_ratio: expansion factor ``T`` of the inverted residuals (6 in the paper).
    """

    feature_stages: ClassVar[tuple[str, ...]] = (
        "conv1",
        "blocks.1",
        "blocks.2",
        "blocks.4",
        "blocks.6",
        "flatten",
    )
    legacy_classifier_prefix: ClassVar[str | None] = "classifier.0."

    def __init__(self, num_classes: int = 100, width_mult: float = 0.5, expand_ratio: int = 6) -> None:
        super().__init__()
        t = expand_ratio
        setting = [(1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2)]
        setting.append((t, 320, 1, 1))
        self.width_mult = width_mult
        self.expand_ratio = expand_ratio

        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        group_out: list[int] = []
        for ratio, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, ratio))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
            group_out.append(output_channel)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(self.last_channel, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

        self.bn_before_relu = tuple(f"blocks.{i}.{len(self.blocks[i]) - 1}.conv.7" for i in (1, 2, 4, 6))
        # like RepDistiller, the stage outputs are linear bottlenecks already: no separate pre-activation
        self._finish(
            preact_stages=self.feature_stages,
            feature_dims=(int(32 * width_mult), *(group_out[i] for i in (1, 2, 4, 6)), self.last_channel),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for group in self.blocks:
            out = group(out)
        out = self.conv2(out)
        return self.fc(self.flatten(self.avgpool(out)))
