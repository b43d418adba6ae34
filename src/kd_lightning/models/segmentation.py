"""Semantic segmenters: torchvision's DeepLabV3, FCN and LRASPP as configurable classes (pure torch).

Each class *subclasses* torchvision's model (:class:`torchvision.models.segmentation.DeepLabV3`, ``FCN``,
``LRASPP``), so its ``state_dict`` keys are torchvision's own (``backbone.layer4.1.conv2.weight``,
``classifier.0.convs.0.0.weight``, ``aux_classifier.4.bias``) and ``forward(x)`` returns torchvision's dict:
``{"out": logits [B, C, H, W] bilinearly upsampled to the input size (align_corners=False), "aux": ...}``.
Nothing is downloaded: ``backbone_weights`` names a local file (``torch.load(weights_only=True)``).

Backbones: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``mobilenet_v2``, ``mobilenet_v3_large`` and
``tiny``.

- Dilated ResNets (DeepLab): ``output_stride=8`` replaces the strides of ``layer3``/``layer4`` by dilation 2/4
  (torchvision's ``replace_stride_with_dilation=[False, True, True]``; ``16``: ``[False, False, True]``).
  torchvision's ``BasicBlock`` refuses dilation > 1, so ResNet-18/34 are built plain and dilated afterwards the way
  CIRKD's ``resnetv1b.py`` does (S6 in the dense-baselines spec): in a layer of dilation ``d``, the first block's
  ``conv1`` gets dilation ``d/2`` and its ``conv2`` ``d``, later blocks ``d`` in both convs; strides (downsample
  included) become 1. Module names and parameter shapes are unchanged.
- MobileNetV3-Large: torchvision's ``deeplabv3_mobilenet_v3_large`` dilates only the last stage (output stride 16,
  ``output_stride=16`` reproduces it exactly); the default 8 also dilates the stride-16 stage (dilation 2, last
  stage 4), so that it pairs with a dilated ResNet teacher at the same resolution. CIRKD's and CWD's MobileNetV2
  students are not in torchvision's segmentation builders; see ``mobilenet_v2`` below.
- MobileNetV2 (the light student of CIRKD, CWD and ACAM-KD): torchvision's ``mobilenet_v2(weights=None).features``
  without its final 1x1 conv to 1280 channels, so the last map is the 320-channel block 17 (the ASPP input of
  CIRKD's ``deeplabv3_mobile.py`` and mmseg's DeepLabV3-MobileNetV2). Dilated as CIRKD's ``MobileNetV2Dilated``
  (the CSAIL ``_nostride_dilate`` rule): output stride 8 gives blocks 7-13 dilation 2 and blocks 14-17 dilation 4,
  16 gives blocks 14-17 dilation 2; in each dilated block the former stride-2 3x3 conv gets stride 1 and half the
  dilation, the other 3x3 convs the full dilation. Auxiliary map (CIRKD's MobileNetV2 has none): the deepest
  stride-8 map, block 13 (96 channels, mmseg's auxiliary-head input) at output stride 8, block 6 (32 channels) at
  16. Module names are torchvision's (``backbone.17.conv.1.0.weight``), so ImageNet ``features.*`` checkpoints
  load through ``backbone_weights``. CIRKD's head on it is 128 wide (``head_channels=128``).
- ``tiny``: four conv-BN-ReLU stages (``layer1..layer4``, widths ``tiny_widths``), strides 2/2/2/1 (dilation 2 in
  ``layer4``, output stride 8; ``16``: stride 2 in ``layer4``), feeding the same torchvision heads: for CPU
  experiments on small images (the digit scenes, 96x96); seconds per epoch on the project's 2-core CPU are in
  ``kd bench benchmarks/grids/digitscenes_seg.yaml``'s results (README "Results on digit scenes").

Every model lists the tap names distillation methods use (:attr:`~DeepLabV3Segmenter.tap_names`):
``"logits"`` (the native-stride logits before upsampling, the module ``classifier``), ``"head_feature"``
(the head's penultimate map, before its 1x1 classifier), ``"backbone"`` (the last backbone stage) and, with
``aux_loss``, ``"aux_logits"`` (``aux_classifier``). Distil at the native stride (dense-baselines spec,
section 0): the upsampled ``out`` changes CWD's scale and costs ~64x more.

Pairs in mind: DeepLabV3-R101 -> DeepLabV3-R18, -> DeepLabV3-MobileNetV2 (CIRKD, CWD, ACAM-KD) and
-> DeepLabV3-MobileNetV3-Large; tiny
``(32, 64, 128)`` -> tiny ``(16, 32, 64)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, mobilenet_v3_large, resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.models.segmentation.lraspp import LRASPP
from torchvision.ops.misc import Conv2dNormActivation

from kd_lightning.errors import KDConfigError

__all__ = [
    "BACKBONES",
    "DeepLabV3Segmenter",
    "FCNSegmenter",
    "LRASPPSegmenter",
    "SegmentationBackbone",
    "TinyBackbone",
    "build_backbone",
    "load_backbone_weights",
]

#: Backbones of :class:`DeepLabV3Segmenter` and :class:`FCNSegmenter`.
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "mobilenet_v3_large", "tiny")
#: Backbones of :class:`LRASPPSegmenter` (it needs a low- and a high-level map).
LRASPP_BACKBONES = ("mobilenet_v3_large", "tiny")
#: DeepLabV3 paper atrous rates by output stride (torchvision's DeepLabHead uses 12/24/36 at both).
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
#: Default rates of the tiny backbone (its 96x96 inputs give 12x12 maps, where rate 12 reads only padding).
TINY_ATROUS_RATES = (2, 4, 6)


# ---------------------------------------------------------------------------------------------------- backbones
class TinyBackbone(nn.Module):
    """Four conv-BN-ReLU stages ``layer1..layer4`` of widths ``widths`` (3 or 4 entries; the 4th defaults to the 3rd).

    Strides 2, 2, 2 then 1 with dilation 2 (output stride 8), or 2 (output stride 16); output stride 4 keeps the
    last two stages at stride 1 with dilations 2 and 4 (thin structures such as digit strokes). Each stage is two
    3x3 :class:`~torchvision.ops.misc.Conv2dNormActivation` blocks, the first one strided.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), output_stride: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        widths = list(widths)
        if len(widths) not in (3, 4) or any(int(w) < 1 for w in widths):
            raise KDConfigError(
                "tiny_widths", f"must be 3 or 4 positive widths, got {widths}", "e.g. [16, 32, 64] or [32, 64, 128]"
            )
        if len(widths) == 3:
            widths.append(widths[-1])
        self.widths = tuple(int(w) for w in widths)
        specs = {
            4: [(2, 1), (2, 1), (1, 2), (1, 4)],
            8: [(2, 1), (2, 1), (2, 1), (1, 2)],
            16: [(2, 1), (2, 1), (2, 1), (2, 1)],
        }[output_stride]
        previous = in_channels
        for i, (width, (stride, dilation)) in enumerate(zip(self.widths, specs), start=1):
            stage = nn.Sequential(
                Conv2dNormActivation(previous, width, 3, stride=stride, dilation=dilation, inplace=False),
                Conv2dNormActivation(width, width, 3, dilation=dilation, inplace=False),
            )
            self.add_module(f"layer{i}", stage)
            previous = width

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


class SegmentationBackbone:
    """What :func:`build_backbone` returns: the feature extractor and where its maps come from.

    Attributes:
        body: an :class:`~torchvision.models._utils.IntermediateLayerGetter` returning ``{"out", "aux"}`` or
            ``{"low", "high"}`` maps.
        out_channels, aux_channels: channels of the ``out`` (last) and ``aux`` (earlier, stride 8) maps.
        out_name, aux_name: module names of those maps inside ``body``.
    """

    def __init__(self, body: nn.Module, out_name: str, out_channels: int, aux_name: str, aux_channels: int) -> None:
        self.body = body
        self.out_name, self.out_channels = out_name, out_channels
        self.aux_name, self.aux_channels = aux_name, aux_channels


def _check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=2, cutoff=0.5)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise KDConfigError(field, f"unknown value {value!r}{hint}", f"choose one of {', '.join(choices)}")


def _check_output_stride(output_stride: int, backbone: str = "") -> None:
    allowed = (4, 8, 16) if backbone == "tiny" else (8, 16)
    if output_stride not in allowed:
        raise KDConfigError(
            "output_stride",
            f"must be {' or '.join(map(str, allowed))} for backbone {backbone or 'resnet'!r}, got {output_stride}",
            "8 = dilated (DeepLab, CIRKD), 16 = lighter (4: tiny backbone only, for thin structures)",
        )


def _dilate_conv(conv: nn.Conv2d, dilation: int) -> None:
    """Stride 1, ``dilation``, and the padding that keeps the map size (``(k - 1) / 2 · dilation``)."""
    conv.stride = (1, 1)
    conv.dilation = (dilation, dilation)
    conv.padding = tuple((k - 1) // 2 * dilation for k in conv.kernel_size)


def _dilate_basic_layer(layer: nn.Sequential, dilation: int) -> None:
    """Dilate a layer of torchvision ``BasicBlock`` s as CIRKD's ``ResNetV1b._make_layer`` does."""
    for i, block in enumerate(layer):
        _dilate_conv(block.conv1, dilation // 2 if i == 0 else dilation)
        _dilate_conv(block.conv2, dilation)
        block.stride = 1
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def _resnet(name: str, output_stride: int) -> nn.Module:
    dilate = [False, output_stride == 8, True]
    if name in ("resnet50", "resnet101"):
        return getattr(resnet, name)(weights=None, replace_stride_with_dilation=dilate)
    net = getattr(resnet, name)(weights=None)
    for layer, dilated, dilation in ((net.layer3, dilate[1], 2), (net.layer4, dilate[2], 2 if not dilate[1] else 4)):
        if dilated:
            _dilate_basic_layer(layer, dilation)
    return net


def _mobilenet_features(output_stride: int) -> nn.Sequential:
    """MobileNetV3-Large ``features`` with torchvision's dilated last stage (stride 16), optionally stride 8."""
    features = mobilenet_v3_large(weights=None, dilated=True).features
    if output_stride == 8:
        stage_starts = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
        stride16, stride32 = stage_starts[-2], stage_starts[-1]  # C3 and C4 blocks
        for index in range(stride16, len(features) - 1):
            dilation = 2 if index < stride32 else 4
            for conv in features[index].modules():
                if isinstance(conv, nn.Conv2d) and conv.kernel_size[0] > 1:
                    _dilate_conv(conv, dilation)
    return features


#: MobileNetV2 ``features`` blocks: first block of the stride-16 and stride-32 stages, the last 320-channel block,
#: and the deepest stride-8 map at output stride 8 (after dilation) and 16.
_MBV2_STRIDE16, _MBV2_STRIDE32, _MBV2_LAST = 7, 14, 17
_MBV2_AUX = {8: 13, 16: 6}


def _mobilenet_v2_features(output_stride: int) -> nn.Sequential:
    """MobileNetV2 ``features[:18]`` (320 channels) dilated to ``output_stride`` 8 or 16 as CIRKD's
    ``MobileNetV2Dilated``: a former stride-2 3x3 conv gets stride 1 and dilation ``d/2``, other 3x3 convs ``d``."""
    features = mobilenet_v2(weights=None).features[: _MBV2_LAST + 1]
    first = _MBV2_STRIDE16 if output_stride == 8 else _MBV2_STRIDE32
    for index in range(first, _MBV2_LAST + 1):
        dilation = 2 if index < _MBV2_STRIDE32 or output_stride == 16 else 4
        block = features[index]
        block.stride = 1  # use_res_connect was fixed at construction (stride-2 blocks change width anyway)
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size[0] > 1:
                _dilate_conv(conv, dilation // 2 if conv.stride == (2, 2) else dilation)
    return features


def build_backbone(
    name: str,
    output_stride: int = 8,
    tiny_widths: Sequence[int] = (16, 32, 64),
    aux: bool = False,
    low_high: bool = False,
) -> SegmentationBackbone:
    """The feature extractor of a segmenter, as torchvision's segmentation builders make it.

    Args:
        name: one of :data:`BACKBONES`.
        output_stride: 8 or 16 (the stride of the last map).
        tiny_widths: stage widths of the ``tiny`` backbone.
        aux: also return the auxiliary map: ``layer3`` of ResNets (stride 8, or 16 at output stride 16) and of
            ``tiny`` (stride 8), MobileNetV3's stride-8 stage (as torchvision), MobileNetV2's deepest stride-8
            block (13 at output stride 8, 6 at 16).
        low_high: return ``{"low": stride-8 map, "high": last map}`` (LRASPP) instead of ``{"out", "aux"}``.
    """
    _check_choice("backbone", name, BACKBONES)
    _check_output_stride(output_stride, name)
    net: nn.Module
    if name.startswith("resnet"):
        net = _resnet(name, output_stride)
        out_name, aux_name = "layer4", "layer3"
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        out_channels, aux_channels = 512 * expansion, 256 * expansion
    elif name == "mobilenet_v2":
        net = _mobilenet_v2_features(output_stride)
        out_name, aux_name = str(_MBV2_LAST), str(_MBV2_AUX[output_stride])
        out_channels, aux_channels = net[_MBV2_LAST].out_channels, net[_MBV2_AUX[output_stride]].out_channels
    elif name == "mobilenet_v3_large":
        net = _mobilenet_features(output_stride)
        stage_indices = [0] + [i for i, b in enumerate(net) if getattr(b, "_is_cn", False)] + [len(net) - 1]
        out_pos, aux_pos = stage_indices[-1], stage_indices[-4]  # C5 and C2 (stride 8), as torchvision
        out_name, aux_name = str(out_pos), str(aux_pos)
        out_channels, aux_channels = net[out_pos].out_channels, net[aux_pos].out_channels
    else:
        net = TinyBackbone(tiny_widths, output_stride)
        out_name, aux_name = "layer4", "layer3"
        out_channels, aux_channels = net.widths[3], net.widths[2]
    if low_high:
        return_layers = {aux_name: "low", out_name: "high"}
    else:
        return_layers = {out_name: "out", **({aux_name: "aux"} if aux else {})}
    body = IntermediateLayerGetter(net, return_layers=return_layers)
    return SegmentationBackbone(body, out_name, out_channels, aux_name, aux_channels)


#: Prefixes stripped from a backbone checkpoint's keys (ImageNet classifiers, segmenters, distillation checkpoints).
_WEIGHT_PREFIXES = ("", "backbone.", "features.", "module.", "model.", "student.backbone.", "teacher.backbone.")


def load_backbone_weights(body: nn.Module, path: str | Path, field: str = "backbone_weights") -> None:
    """Load a local backbone checkpoint into ``body`` with ``torch.load(weights_only=True)``; never downloads.

    Accepts torchvision's ImageNet classifier files (``conv1.weight``...``fc.*`` for ResNets,
    ``features.*``/``classifier.*`` for MobileNetV3; the classifier is ignored), a segmenter's state dict
    (``backbone.*``) and ``{"state_dict"|"model": ...}`` wrappers.

    Raises:
        KDConfigError: the file is missing or unreadable, or no key prefix covers every backbone weight.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise KDConfigError(field, f"no file at {path.resolve()}", "give a local checkpoint (nothing is downloaded)")
    try:
        checkpoint: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a checkpoint, or one that needs full unpickling
        raise KDConfigError(
            field,
            f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__})",
            "re-save its tensors",
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    wanted = body.state_dict()
    best: tuple[int, str, list[str]] = (-1, "", [])
    for prefix in _WEIGHT_PREFIXES:
        found = {
            k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix) and k[len(prefix) :] in wanted
        }
        missing = sorted(set(wanted) - set(found))
        if not missing:
            shapes = [k for k, v in found.items() if tuple(v.shape) != tuple(wanted[k].shape)]
            if shapes:
                raise KDConfigError(
                    field,
                    f"{path}: {len(shapes)} weights have other shapes than the backbone's, e.g. {shapes[0]} "
                    f"{tuple(found[shapes[0]].shape)} vs {tuple(wanted[shapes[0]].shape)}",
                    "use a checkpoint of the same backbone (and tiny_widths)",
                )
            body.load_state_dict(found)
            return
        if len(found) > best[0]:
            best = (len(found), prefix, missing)
    _, prefix, missing = best
    raise KDConfigError(
        field,
        f"{path} lacks {len(missing)} of the backbone's {len(wanted)} weights (best key prefix {prefix!r}), "
        f"e.g. {missing[:3]}",
        "give an ImageNet checkpoint of the same backbone (torchvision layout)",
    )


# ---------------------------------------------------------------------------------------------------- heads
class _DeepLabHead(DeepLabHead):
    """torchvision's ``DeepLabHead`` (ASPP -> 3x3 conv -> BN -> ReLU -> 1x1 conv) with a configurable width."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int], channels: int = 256) -> None:
        nn.Sequential.__init__(
            self,
            ASPP(in_channels, atrous_rates, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, num_classes, 1),
        )


def _check_num_classes(num_classes: int) -> None:
    if int(num_classes) < 1:
        raise KDConfigError("num_classes", f"must be >= 1, got {num_classes}", "19 for Cityscapes trainIds")


def _default_head_channels(backbone: str, feats: SegmentationBackbone, default: int) -> int:
    return feats.out_channels if backbone == "tiny" else default


# ---------------------------------------------------------------------------------------------------- models
class DeepLabV3Segmenter(DeepLabV3):
    """DeepLabV3 (Chen, Papandreou, Schroff, Adam; arXiv 1706.05587) as torchvision builds it, any backbone.

    ``backbone -> DeepLabHead (ASPP -> 3x3 conv -> BN -> ReLU -> 1x1 conv)``, optional FCN auxiliary head on the
    stride-8 stage (``layer3``; CIRKD trains it with weight 0.4). With ``backbone="resnet50"/"resnet101"``,
    ``mobilenet_v3_large`` + ``output_stride=16`` and default widths it equals torchvision's
    ``deeplabv3_*`` (same keys, same outputs for the same weights).

    Args:
        num_classes: output classes (19 for Cityscapes trainIds).
        backbone: one of ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``mobilenet_v2``,
            ``mobilenet_v3_large``, ``tiny``.
        aux_loss: add the auxiliary FCN head (``forward`` then also returns ``"aux"``).
        output_stride: 8 (dilated; torchvision's ResNet default) or 16.
        backbone_weights: a local backbone checkpoint (e.g. torchvision's ImageNet ``resnet18-f37072fd.pth``),
            loaded with ``weights_only=True``; ``None``: random initialisation. Never downloads.
        tiny_widths: stage widths of the ``tiny`` backbone.
        head_channels: ASPP/head width; ``None``: 256 (torchvision; CIRKD's ResNet-18 head uses 128), the last
            tiny width for ``tiny``.
        atrous_rates: ASPP rates; ``None``: 12/24/36 at stride 8 (torchvision), 6/12/18 at stride 16 (the paper),
            2/4/6 for ``tiny``.

    Attributes:
        tap_names: ``{"logits": "classifier", "head_feature": "classifier.3", "backbone": "backbone.<last stage>"}``
            (+ ``"aux_logits": "aux_classifier"``); all at the native output stride.
    """

    def __init__(
        self,
        num_classes: int = 19,
        backbone: str = "resnet101",
        aux_loss: bool = False,
        output_stride: int = 8,
        backbone_weights: str | None = None,
        tiny_widths: Sequence[int] = (16, 32, 64),
        head_channels: int | None = None,
        atrous_rates: Sequence[int] | None = None,
    ) -> None:
        _check_num_classes(num_classes)
        feats = build_backbone(backbone, output_stride, tiny_widths, aux=aux_loss)
        if backbone_weights is not None:
            load_backbone_weights(feats.body, backbone_weights)
        channels = head_channels or _default_head_channels(backbone, feats, 256)
        if atrous_rates is None:
            atrous_rates = TINY_ATROUS_RATES if backbone == "tiny" else ATROUS_RATES[output_stride]
        classifier = _DeepLabHead(feats.out_channels, num_classes, tuple(atrous_rates), channels)
        aux_classifier = FCNHead(feats.aux_channels, num_classes) if aux_loss else None
        super().__init__(feats.body, classifier, aux_classifier)
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.tap_names: dict[str, str] = {
            "logits": "classifier",
            "head_feature": "classifier.3",
            "backbone": f"backbone.{feats.out_name}",
            **({"aux_logits": "aux_classifier"} if aux_loss else {}),
        }


class FCNSegmenter(FCN):
    """FCN (Long, Shelhamer, Darrell; CVPR 2015) as torchvision builds it: ``backbone -> FCNHead``, any backbone.

    ``FCNHead`` = 3x3 conv (to ``in/4`` channels) -> BN -> ReLU -> Dropout(0.1) -> 1x1 conv. With
    ``backbone="resnet50"/"resnet101"`` it equals torchvision's ``fcn_resnet*``.

    Args:
        num_classes, backbone, aux_loss, output_stride, backbone_weights, tiny_widths: as :class:`DeepLabV3Segmenter`.

    Attributes:
        tap_names: ``{"logits": "classifier", "head_feature": "classifier.2", "backbone": ...}`` (+ ``aux_logits``).
    """

    def __init__(
        self,
        num_classes: int = 19,
        backbone: str = "resnet50",
        aux_loss: bool = False,
        output_stride: int = 8,
        backbone_weights: str | None = None,
        tiny_widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        _check_num_classes(num_classes)
        feats = build_backbone(backbone, output_stride, tiny_widths, aux=aux_loss)
        if backbone_weights is not None:
            load_backbone_weights(feats.body, backbone_weights)
        classifier = FCNHead(feats.out_channels, num_classes)
        aux_classifier = FCNHead(feats.aux_channels, num_classes) if aux_loss else None
        super().__init__(feats.body, classifier, aux_classifier)
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.tap_names: dict[str, str] = {
            "logits": "classifier",
            "head_feature": "classifier.2",
            "backbone": f"backbone.{feats.out_name}",
            **({"aux_logits": "aux_classifier"} if aux_loss else {}),
        }


class LRASPPSegmenter(LRASPP):
    """Lite R-ASPP (Howard et al., "Searching for MobileNetV3", ICCV 2019) as torchvision builds it.

    Logits = ``low_classifier(stride-8 map) + high_classifier(upsampled, gated high-level map)``, always at
    output stride 8 (the low branch); MobileNetV3-Large's high map has stride 16 (torchvision's dilated
    last stage), the tiny backbone's stride 8. No auxiliary head. With ``mobilenet_v3_large`` it equals
    torchvision's ``lraspp_mobilenet_v3_large``.

    Args:
        num_classes, backbone_weights, tiny_widths: as :class:`DeepLabV3Segmenter`.
        backbone: ``mobilenet_v3_large`` or ``tiny``.
        inter_channels: width of the high branch; ``None``: 128 (torchvision), the last tiny width for ``tiny``.

    Attributes:
        tap_names: ``{"logits": "classifier", "head_feature": "classifier.high_classifier:input"`` (the gated,
            upsampled high-level map), ``"backbone": ...}``.
    """

    def __init__(
        self,
        num_classes: int = 19,
        backbone: str = "mobilenet_v3_large",
        backbone_weights: str | None = None,
        tiny_widths: Sequence[int] = (16, 32, 64),
        inter_channels: int | None = None,
    ) -> None:
        _check_num_classes(num_classes)
        _check_choice("backbone", backbone, LRASPP_BACKBONES)
        output_stride = 16 if backbone == "mobilenet_v3_large" else 8
        feats = build_backbone(backbone, output_stride, tiny_widths, low_high=True)
        if backbone_weights is not None:
            load_backbone_weights(feats.body, backbone_weights)
        inter = inter_channels or _default_head_channels(backbone, feats, 128)
        super().__init__(feats.body, feats.aux_channels, feats.out_channels, num_classes, inter)
        self.num_classes = num_classes
        self.output_stride = 8
        self.tap_names: dict[str, str] = {
            "logits": "classifier",
            "head_feature": "classifier.high_classifier:input",
            "backbone": f"backbone.{feats.out_name}",
        }
