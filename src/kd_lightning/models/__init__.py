"""Model zoo (pure torch): the RepDistiller/mdistiller CIFAR models, small digits models, timm/torchvision
wrappers and feature taps. Every model is a class whose ``forward(x)`` returns logits only.

timm and torchvision are imported only when a wrapper is built, so this package imports without timm.
"""

from __future__ import annotations

from .cifar import (
    CIFAR_MODELS,
    VGG,
    VGG8,
    VGG11,
    VGG13,
    VGG16,
    VGG19,
    WRN16_1,
    WRN16_2,
    WRN40_1,
    WRN40_2,
    CifarModel,
    CIFARResNet,
    CIFARResNet18,
    CIFARResNet34,
    CIFARResNet50,
    MobileNetV2,
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
    ShuffleNetV1,
    ShuffleNetV2,
    WideResNet,
)
from .clip_zero_shot import CLIPZeroShotClassifier
from .detection import FasterRCNNDetector, FCOSDetector, LevelAdapters, RetinaNetDetector
from .detr import DETRDetector
from .diffusion import DiffusionUNet
from .graph import GATNet, GCNNet, GraphMLP, SAGENet
from .lm import HFCausalLM, TinyGPT
from .mae_decoder import MAEDecoder, MAEDecoderBlock
from .multimodal import LateFusionNet, ModalityNet, SignalNet
from .policy import HierarchicalPolicy
from .radioml import KDCNN, ClST, KDMobileNet
from .search import NB201Network
from .segmentation import DeepLabV3Segmenter, FCNSegmenter, LRASPPSegmenter
from .seq2seq import HFSeq2SeqLM, TinySeq2Seq
from .small import MLP, SmallCNN
from .sparse_retrieval import BM25Scorer, DenseBiEncoder, SiameseSparseEncoder, SpladeDocumentEncoder
from .taps import FeatureTaps, UnknownModuleError, module_names
from .vlm import DigitPatchEncoder, TimmVisionEncoder, VisionLanguageModel
from .wrappers import TimmModel, TorchvisionModel

__all__ = [
    "CIFAR_MODELS",
    "KDCNN",
    "MLP",
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
    "BM25Scorer",
    "CIFARResNet",
    "CIFARResNet18",
    "CIFARResNet34",
    "CIFARResNet50",
    "CLIPZeroShotClassifier",
    "CifarModel",
    "ClST",
    "DETRDetector",
    "DeepLabV3Segmenter",
    "DenseBiEncoder",
    "DiffusionUNet",
    "DigitPatchEncoder",
    "FCNSegmenter",
    "FCOSDetector",
    "FasterRCNNDetector",
    "FeatureTaps",
    "GATNet",
    "GCNNet",
    "GraphMLP",
    "HFCausalLM",
    "HFSeq2SeqLM",
    "HierarchicalPolicy",
    "KDMobileNet",
    "LRASPPSegmenter",
    "LateFusionNet",
    "LevelAdapters",
    "MAEDecoder",
    "MAEDecoderBlock",
    "MobileNetV2",
    "ModalityNet",
    "NB201Network",
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
    "RetinaNetDetector",
    "SAGENet",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "SiameseSparseEncoder",
    "SignalNet",
    "SmallCNN",
    "SpladeDocumentEncoder",
    "TimmModel",
    "TimmVisionEncoder",
    "TinyGPT",
    "TinySeq2Seq",
    "TorchvisionModel",
    "UnknownModuleError",
    "VisionLanguageModel",
    "WideResNet",
    "module_names",
]
