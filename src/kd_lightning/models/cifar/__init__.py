"""The CIFAR model zoo of RepDistiller / mdistiller, re-implemented in plain torch.

``CIFAR_MODELS`` maps RepDistiller's ``model_dict`` names to the classes; every class takes
``num_classes`` (default 100), returns logits only and names its feature stages (see
:class:`~kd_lightning.models.cifar._base.CifarModel`).
"""

from __future__ import annotations

from torch import nn

from ._base import CifarModel
from .mobilenetv2 import InvertedResidual, MobileNetV2
from .resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet8,
    ResNet8x4,
    ResNet14,
    ResNet20,
    ResNet32,
    ResNet32x4,
    ResNet44,
    ResNet56,
    ResNet110,
)
from .resnetv2 import CIFARResNet, CIFARResNet18, CIFARResNet34, CIFARResNet50
from .shufflenetv1 import ShuffleNetV1
from .shufflenetv2 import ShuffleNetV2
from .vgg import VGG, VGG8, VGG11, VGG13, VGG16, VGG19
from .wrn import WRN16_1, WRN16_2, WRN40_1, WRN40_2, WideResNet

#: RepDistiller ``model_dict`` name -> class
CIFAR_MODELS: dict[str, type[nn.Module]] = {
    "resnet8": ResNet8,
    "resnet14": ResNet14,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet44": ResNet44,
    "resnet56": ResNet56,
    "resnet110": ResNet110,
    "resnet8x4": ResNet8x4,
    "resnet32x4": ResNet32x4,
    "ResNet50": CIFARResNet50,
    "wrn_16_1": WRN16_1,
    "wrn_16_2": WRN16_2,
    "wrn_40_1": WRN40_1,
    "wrn_40_2": WRN40_2,
    "vgg8": VGG8,
    "vgg11": VGG11,
    "vgg13": VGG13,
    "vgg16": VGG16,
    "vgg19": VGG19,
    "MobileNetV2": MobileNetV2,
    "ShuffleV1": ShuffleNetV1,
    "ShuffleV2": ShuffleNetV2,
}

__all__ = [
    "CIFAR_MODELS",
    "VGG",
    "VGG8",
    "VGG11",
    "VGG13",
    "VGG16",
    "VGG19",
    "WRN16_1",
    "WRN16_2",
    "WRN40_1",
    "WRN40_2",
    "BasicBlock",
    "Bottleneck",
    "CIFARResNet",
    "CIFARResNet18",
    "CIFARResNet34",
    "CIFARResNet50",
    "CifarModel",
    "InvertedResidual",
    "MobileNetV2",
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
    "ShuffleNetV1",
    "ShuffleNetV2",
    "WideResNet",
]
