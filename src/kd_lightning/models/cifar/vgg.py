"""VGG for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015), in the fully-connected-free form of RepDistiller / mdistiller.

Five groups of 3x3 conv (with bias) + BatchNorm + ReLU; max-pool after the first three groups (and after
the fourth only for 64x64 inputs), global average pooling and a single ``fc`` layer from 512 features.
``VGG8``/``VGG11``/``VGG13``/``VGG16``/``VGG19`` are RepDistiller's ``vgg8_bn`` ... ``vgg19_bn`` (its
``model_dict`` maps ``"vgg8"`` to ``vgg8_bn`` and so on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

from ._base import CifarModel

__all__ = ["VGG", "VGG8", "VGG11", "VGG13", "VGG16", "VGG19", "VGG_CONFIGS"]

#: conv widths of the five groups: "S" = VGG8, "A" = VGG11, "B" = VGG13, "D" = VGG16, "E" = VGG19
VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _make_group(widths: Sequence[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU repeated, without the last ReLU (applied by the model as ``relu<i>``)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers.append(nn.Conv2d(in_channels, w, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(w))
        layers.append(nn.ReLU())
        in_channels = w
    return nn.Sequential(*layers[:-1])


class VGG(CifarModel):
    """VGG with five conv groups, global average pooling and one linear layer (Simonyan & Zisserman 2015).

    Args:
        cfg: conv widths of the five groups, or a key of ``VGG_CONFIGS`` (``"S"``, ``"A"``, ``"B"``,
            ``"D"``, ``"E"``).
        batch_norm: BatchNorm after every conv (the ``*_bn`` models used for distillation).
        num_classes: number of output logits.
    """

    feature_stages: ClassVar[tuple[str, ...]] = ("relu0", "relu1", "relu2", "relu3", "relu4", "flatten")
    legacy_classifier_prefix: ClassVar[str | None] = "classifier."

    def __init__(
        self, cfg: str | Sequence[Sequence[int]] = "S", batch_norm: bool = True, num_classes: int = 100
    ) -> None:
        super().__init__()
        groups = VGG_CONFIGS[cfg] if isinstance(cfg, str) else tuple(tuple(int(w) for w in g) for g in cfg)
        if len(groups) != 5 or not all(groups):
            raise KDConfigError(f"VGG cfg must have 5 non-empty groups of conv widths; got {cfg!r}")
        self.cfg = groups
        ins = (3, *(g[-1] for g in groups[:-1]))
        self.block0 = _make_group(groups[0], batch_norm, ins[0])
        self.block1 = _make_group(groups[1], batch_norm, ins[1])
        self.block2 = _make_group(groups[2], batch_norm, ins[2])
        self.block3 = _make_group(groups[3], batch_norm, ins[3])
        self.block4 = _make_group(groups[4], batch_norm, ins[4])
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)  # only used for 64x64 inputs, as in RepDistiller
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(groups[4][-1], num_classes)

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

        self.bn_before_relu = tuple(f"block{i}.{len(getattr(self, f'block{i}')) - 1}" for i in (1, 2, 3, 4))
        self._finish(
            preact_stages=("relu0", "block1", "block2", "block3", "block4", "flatten"),
            feature_dims=(*(g[-1] for g in groups), groups[4][-1]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.fc(self.flatten(self.pool4(x)))


class VGG8(VGG):
    """VGG-8 with BatchNorm, config "S" (RepDistiller ``vgg8`` = ``vgg8_bn``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(cfg="S", batch_norm=True, num_classes=num_classes)


class VGG11(VGG):
    """VGG-11 with BatchNorm, config "A" (RepDistiller ``vgg11`` = ``vgg11_bn``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(cfg="A", batch_norm=True, num_classes=num_classes)


class VGG13(VGG):
    """VGG-13 with BatchNorm, config "B" (RepDistiller ``vgg13`` = ``vgg13_bn``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(cfg="B", batch_norm=True, num_classes=num_classes)


class VGG16(VGG):
    """VGG-16 with BatchNorm, config "D" (RepDistiller ``vgg16`` = ``vgg16_bn``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(cfg="D", batch_norm=True, num_classes=num_classes)


class VGG19(VGG):
    """VGG-19 with BatchNorm, config "E" (RepDistiller ``vgg19`` = ``vgg19_bn``)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__(cfg="E", batch_norm=True, num_classes=num_classes)
