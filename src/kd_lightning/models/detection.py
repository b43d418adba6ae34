"""torchvision detectors as configurable classes: RetinaNet, FCOS and Faster R-CNN on ResNet, MobileNetV3 or a tiny
CPU backbone, with an FPN (pure torch).

Each class *subclasses* the torchvision detector, so its ``state_dict`` keys are torchvision's own (an exported
student loads into a plain ``torchvision.models.detection.RetinaNet`` built with the same backbone). Following
torchvision's convention, ``num_classes`` is the number K of foreground categories and the heads have K + 1
outputs (index 0 = background).

Backbones (the builders of torchvision's ``retinanet_resnet50_fpn`` / ``fcos_resnet50_fpn`` /
``fasterrcnn_resnet50_fpn``, with the FPN width ``fpn_channels`` made configurable):

- ``resnet18/34/50/101``: ``_resnet_fpn_extractor``. RetinaNet/FCOS: C3..C5 + ``LastLevelP6P7`` (P6 from P5,
  torchvision v1) = levels ``'0','1','2','p6','p7'`` (P3..P7, strides 8..128). Faster R-CNN: C2..C5 +
  max-pool = ``'0','1','2','3','pool'`` (P2..P6, strides 4..64).
- ``mobilenet_v3_large``: the last block of each stride (8/16/32 for RetinaNet/FCOS, 4/8/16/32 for Faster
  R-CNN) feeds the same FPN, so its levels and strides equal the ResNet ones (a ResNet teacher and a MobileNet
  student align level by level). torchvision's own ``fasterrcnn_mobilenet_v3_large_fpn`` instead returns two
  stride-32 maps; we do not copy that.
- ``tiny``: conv-BN-ReLU stages (stem to stride 4, then strides 8/16/32 with widths ``tiny_widths``) + the
  same torchvision FPN and extra blocks, for 64-128 px scenes on a CPU (levels and strides as above).

Speed of the ``tiny`` detectors: the digit-scenes grid (``kd bench benchmarks/grids/digitscenes_det.yaml``,
README "Results on digit scenes") records seconds per epoch on the project's 2-core CPU (FCOS-tiny student ~22 s,
teacher ~40 s per 2,400 images of 96x96).

Tap names (module paths for :class:`~kd_lightning.models.taps.FeatureTaps`): ``backbone`` (output: the FPN dict,
keys :attr:`fpn_levels`), ``backbone.body`` (the C-level dict), ``backbone.fpn``; RetinaNet/FCOS:
``head.classification_head``, ``head.regression_head``, ``anchor_generator``; Faster R-CNN: ``rpn``,
``rpn.head``, ``roi_heads.box_head``, ``roi_heads.box_predictor``.

The functions :func:`detection_losses`, :func:`head_outputs`, :func:`detector_family`, :func:`num_outputs` and
:func:`fpn_levels` also accept plain torchvision RetinaNet / FCOS / Faster R-CNN models (e.g. teachers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from kd_lightning.errors import KDConfigError

__all__ = [
    "BACKBONES",
    "FCOSDetector",
    "FasterRCNNDetector",
    "LevelAdapters",
    "RetinaNetDetector",
    "TinyBody",
    "detection_losses",
    "detector_family",
    "fpn_backbone",
    "fpn_levels",
    "head_outputs",
    "num_outputs",
    "probe_size",
]

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "tiny")
Family = Literal["retinanet", "fcos", "faster_rcnn", "detr"]
#: Stride of the first FPN level: 8 (P3, single-stage detectors) or 4 (P2, Faster R-CNN).
_FIRST_STRIDE = {"retinanet": 8, "fcos": 8, "faster_rcnn": 4}


class TinyBody(nn.Module):
    """A small conv body for CPU tests and digit scenes: named stages returning strides 4, 8, 16, 32.

    ``stem``: two stride-2 conv3x3-BN-ReLU (3 → w₀, stride 4); ``layer1``/``layer2``/``layer3``: one stride-2
    conv3x3-BN-ReLU + one conv3x3-BN-ReLU each (widths ``widths``, strides 8/16/32).

    Args:
        widths: channels of ``layer1``, ``layer2``, ``layer3`` (the stem has ``widths[0]``).
        norm_layer: normalisation after each conv (``nn.BatchNorm2d``).
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), norm_layer: Any = nn.BatchNorm2d) -> None:
        super().__init__()
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise KDConfigError("tiny_widths", f"must be three positive widths, got {list(widths)}")
        w = [int(v) for v in widths]

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), norm_layer(c_out), nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(*block(3, w[0], 2), *block(w[0], w[0], 2))
        self.layer1 = nn.Sequential(*block(w[0], w[0], 2), *block(w[0], w[0], 1))
        self.layer2 = nn.Sequential(*block(w[0], w[1], 2), *block(w[1], w[1], 1))
        self.layer3 = nn.Sequential(*block(w[1], w[2], 2), *block(w[2], w[2], 1))
        self.stage_channels = {"stem": w[0], "layer1": w[0], "layer2": w[1], "layer3": w[2]}

    def forward(self, x: Tensor) -> Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


def _read_backbone_weights(path: str, network: nn.Module, ignore: Sequence[str]) -> None:
    """Load an ImageNet-style classification checkpoint (a local file, ``weights_only=True``) into ``network``.

    Keys starting with any of ``ignore`` (the classifier) may be missing or extra; every other key must match.
    """
    from kd_lightning.models.checkpoints import read_checkpoint, state_dict_of

    field = "backbone_weights"
    state = dict(state_dict_of(read_checkpoint(Path(path), field)))
    for prefix in ("module.", "backbone.body.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    wanted = {k for k in network.state_dict() if not k.endswith("num_batches_tracked")}
    kept = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
    missing = sorted(k for k in wanted - set(kept) if not any(k.startswith(p) for p in ignore))
    unexpected = sorted(k for k in set(kept) - wanted if not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise KDConfigError(
            field,
            f"{path} does not fit the {type(network).__name__} backbone: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}",
            "give an ImageNet classification checkpoint of the same architecture (torchvision key names)",
        )
    result = network.load_state_dict(kept, strict=False)
    bad = [k for k in result.missing_keys if not any(k.startswith(p) for p in ignore) and k in wanted]
    if bad:  # pragma: no cover - guarded above
        raise KDConfigError(field, f"{path} leaves {bad[:4]} unset")


def _with_fpn_width(backbone: nn.Module, fpn_channels: int, in_channels: list[int], extra: nn.Module) -> nn.Module:
    """Replace the 256-channel FPN torchvision's extractors build by one of ``fpn_channels`` (same key names)."""
    if fpn_channels != backbone.out_channels:
        backbone.fpn = FeaturePyramidNetwork(in_channels, fpn_channels, extra_blocks=extra)
        backbone.out_channels = fpn_channels
    return backbone


def _trainable(value: int | None, pretrained: bool, most: int, name: str) -> int:
    """Trainable stages: ``value``, or torchvision's default (3 for a pretrained body, else all ``most``)."""
    layers = (3 if pretrained else most) if value is None else int(value)
    if not 0 <= layers <= most:
        raise KDConfigError("trainable_backbone_layers", f"must be in [0, {most}] for {name}, got {layers}")
    return layers


def fpn_backbone(
    name: str,
    family: Family,
    fpn_channels: int = 256,
    trainable_layers: int | None = None,
    tiny_widths: Sequence[int] = (16, 32, 64),
    weights: str | None = None,
    frozen_bn: bool | None = None,
) -> nn.Module:
    """A torchvision ``BackboneWithFPN`` (``out_channels = fpn_channels``) for a detector family.

    Args:
        name: one of :data:`BACKBONES`.
        family: ``"retinanet"``/``"fcos"`` (P3..P7 with ``LastLevelP6P7``) or ``"faster_rcnn"`` (P2..P5 + pool).
        fpn_channels: FPN width.
        trainable_layers: trainable (not frozen) backbone stages counted from the top, 0..5 (MobileNet: 0..6);
            ``None``: 3 with ``weights`` (torchvision's default for pretrained backbones), else all. Ignored by
            ``tiny``.
        tiny_widths: stage widths of the ``tiny`` body.
        weights: a local ImageNet checkpoint for the body, read with ``weights_only=True`` (never downloaded).
        frozen_bn: ``FrozenBatchNorm2d`` in the body; ``None``: frozen iff ``weights`` (torchvision's rule).
    """
    if name not in BACKBONES:
        raise KDConfigError("backbone", f"unknown backbone {name!r}", f"choose one of {list(BACKBONES)}")
    if fpn_channels < 1:
        raise KDConfigError("fpn_channels", f"must be >= 1, got {fpn_channels}")
    frozen = bool(weights) if frozen_bn is None else frozen_bn
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    single_stage = family != "faster_rcnn"

    def extra() -> nn.Module:
        return LastLevelP6P7(fpn_channels, fpn_channels) if single_stage else LastLevelMaxPool()

    if name == "tiny":
        body = TinyBody(tiny_widths, norm_layer=norm_layer)
        if weights:
            _read_backbone_weights(weights, body, ignore=())
        stages = ["layer1", "layer2", "layer3"] if single_stage else ["stem", "layer1", "layer2", "layer3"]
        return BackboneWithFPN(
            body,
            {stage: str(i) for i, stage in enumerate(stages)},
            [body.stage_channels[s] for s in stages],
            fpn_channels,
            extra_blocks=extra(),
        )

    if name.startswith("resnet"):
        layers = (
            5 if trainable_layers is None and not weights else (3 if trainable_layers is None else trainable_layers)
        )
        if not 0 <= layers <= 5:
            raise KDConfigError("trainable_backbone_layers", f"must be in [0, 5] for {name}, got {layers}")
        network = getattr(resnet, name)(weights=None, norm_layer=norm_layer)
        if weights:
            _read_backbone_weights(weights, network, ignore=("fc.",))
        returned = [2, 3, 4] if single_stage else [1, 2, 3, 4]
        backbone = _resnet_fpn_extractor(network, layers, returned_layers=returned, extra_blocks=extra())
        stage2 = network.inplanes // 8
        return _with_fpn_width(backbone, fpn_channels, [stage2 * 2 ** (i - 1) for i in returned], extra())

    network = mobilenet_v3_large(weights=None, norm_layer=norm_layer)
    if weights:
        _read_backbone_weights(weights, network, ignore=("classifier.",))
    features = network.features
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    layers = (
        len(stage_indices)
        if trainable_layers is None and not weights
        else (3 if trainable_layers is None else trainable_layers)
    )
    if not 0 <= layers <= len(stage_indices):
        raise KDConfigError(
            "trainable_backbone_layers", f"must be in [0, {len(stage_indices)}] for {name}, got {layers}"
        )
    freeze_before = len(features) if layers == 0 else stage_indices[len(stage_indices) - layers]
    for block in features[:freeze_before]:
        block.requires_grad_(False)
    # the last block of each stride: 4 (C2), 8 (C3), 16 (C4), 32 (C5)
    last_of_stride = [i - 1 for i in stage_indices[2:-1]] + [len(features) - 1]
    returned = last_of_stride[1:] if single_stage else last_of_stride
    in_channels = [features[i].out_channels for i in returned]
    return BackboneWithFPN(
        features, {str(k): str(v) for v, k in enumerate(returned)}, in_channels, fpn_channels, extra_blocks=extra()
    )


def _level_names(backbone: nn.Module) -> list[str] | None:
    body = getattr(backbone, "body", None)
    fpn = getattr(backbone, "fpn", None)
    returned = getattr(body, "return_layers", None)
    if returned is None or fpn is None:
        return None
    names = list(returned.values())
    extra = getattr(fpn, "extra_blocks", None)
    if isinstance(extra, LastLevelP6P7):
        names += ["p6", "p7"]
    elif isinstance(extra, LastLevelMaxPool):
        names += ["pool"]
    elif extra is not None:
        return None
    return names


def _anchor_grid(
    anchor_sizes: Any, aspect_ratios: Sequence[float]
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """Anchor sizes per level (5 levels, the same count on each) and the aspect ratios repeated per level."""
    sizes = _check_anchor_sizes(anchor_sizes, 5)
    if len({len(s) for s in sizes}) != 1:
        raise KDConfigError("anchor_sizes", f"every level needs the same number of sizes, got {sizes}")
    return sizes, (tuple(float(r) for r in aspect_ratios),) * len(sizes)


def _check_anchor_sizes(sizes: Any, levels: int, field: str = "anchor_sizes") -> tuple[tuple[int, ...], ...]:
    try:
        sizes = tuple(tuple(int(s) for s in level) for level in sizes)
    except TypeError:
        raise KDConfigError(field, f"must list one tuple of sizes per FPN level, got {sizes!r}") from None
    if len(sizes) != levels or not all(sizes):
        raise KDConfigError(field, f"needs one non-empty tuple per FPN level ({levels}), got {len(sizes)}")
    return sizes


def _octave_sizes(bases: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """RetinaNet's three octave scales per level: ``(x, x·2^(1/3), x·2^(2/3))`` (torchvision's anchors)."""
    return tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in bases)


def _defaults(backbone: str, family: Family) -> tuple[tuple[int, ...], ...]:
    tiny = backbone == "tiny"
    if family == "retinanet":
        return _octave_sizes([16, 32, 64, 128, 256] if tiny else [32, 64, 128, 256, 512])
    if family == "fcos":
        return ((8,), (16,), (32,), (64,), (128,))
    return ((8,), (16,), (32,), (64,), (128,)) if tiny else ((32,), (64,), (128,), (256,), (512,))


#: Faster R-CNN defaults for the ``tiny`` backbone (torchvision: 2000/2000/1000/1000 proposals, 512 RoIs per image).
_TINY_RCNN_DEFAULTS = {
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 128,
}


class _DetectorMixin:
    """What the three detector classes share: FPN level names, strides, and the family."""

    family: Family
    fpn_levels: list[str]
    fpn_strides: dict[str, int]

    def _record_levels(self, backbone: nn.Module) -> None:
        names = _level_names(backbone)
        assert names is not None
        self.fpn_levels = names
        first = _FIRST_STRIDE[self.family]
        self.fpn_strides = {name: first * 2**i for i, name in enumerate(names)}

    def detection_losses(
        self, images: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, list[Tensor] | None]:
        """See :func:`detection_losses`."""
        return detection_losses(self, images, features, targets)  # type: ignore[arg-type]


def _common_checks(num_classes: int, min_size: Any, max_size: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise KDConfigError("num_classes", f"must be the number of foreground categories (>= 1), got {num_classes!r}")
    sizes = min_size if isinstance(min_size, (tuple, list)) else (min_size,)
    if not sizes or any(int(s) < 1 for s in sizes) or max_size < 1:
        raise KDConfigError("min_size", f"min_size {min_size} and max_size {max_size} must be positive")


class RetinaNetDetector(_DetectorMixin, RetinaNet):
    """torchvision RetinaNet (v1 head: 4 conv3x3+ReLU towers, focal loss + L1 box loss) on an FPN backbone.

    Args:
        num_classes: K foreground categories (the head predicts K + 1, index 0 = background).
        backbone: one of ``resnet18/34/50/101``, ``mobilenet_v3_large``, ``tiny``.
        fpn_channels: FPN width (256 in torchvision).
        min_size, max_size: the transform's resize (torchvision: 800, 1333; digit scenes: 96, 96).
        trainable_backbone_layers: see :func:`fpn_backbone`.
        anchor_sizes: one tuple of sizes per level (P3..P7), each with the same count; default torchvision's
            octave sizes from 32 px at P3 (``tiny``: from 16 px, twice the P3 stride, for 10-60 px objects).
        aspect_ratios: per anchor size, shared by every level (0.5, 1, 2).
        tiny_widths: widths of the ``tiny`` body's three stages.
        backbone_weights: a local ImageNet checkpoint for the body (``weights_only=True``; never downloaded).
        frozen_bn: ``FrozenBatchNorm2d`` in the body (``None``: iff ``backbone_weights``).
        **kwargs: torchvision ``RetinaNet`` arguments (``score_thresh``, ``nms_thresh``,
            ``detections_per_img``, ``fg_iou_thresh``, ``bg_iou_thresh``, ``topk_candidates``, ``image_mean``,
            ``image_std``, ``size_divisible``...).
    """

    family: Family = "retinanet"

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        fpn_channels: int = 256,
        min_size: int = 800,
        max_size: int = 1333,
        trainable_backbone_layers: int | None = None,
        anchor_sizes: Sequence[Sequence[int]] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        tiny_widths: Sequence[int] = (16, 32, 64),
        backbone_weights: str | None = None,
        frozen_bn: bool | None = None,
        **kwargs: Any,
    ) -> None:
        _common_checks(num_classes, min_size, max_size)
        body = fpn_backbone(
            backbone, "retinanet", fpn_channels, trainable_backbone_layers, tiny_widths, backbone_weights, frozen_bn
        )
        sizes, ratios = _anchor_grid(anchor_sizes or _defaults(backbone, "retinanet"), aspect_ratios)
        super().__init__(
            body,
            num_classes + 1,
            min_size=min_size,
            max_size=max_size,
            anchor_generator=AnchorGenerator(sizes, ratios),
            **kwargs,
        )
        self.num_classes = num_classes
        self._record_levels(body)


class FCOSDetector(_DetectorMixin, FCOS):
    """torchvision FCOS (anchor-free; GroupNorm(32) towers, so ``fpn_channels`` must be a multiple of 32).

    Args:
        num_classes: K foreground categories (K + 1 outputs).
        backbone, fpn_channels, min_size, max_size, trainable_backbone_layers, tiny_widths, backbone_weights,
            frozen_bn: as :class:`RetinaNetDetector`.
        anchor_sizes: one single-size tuple per level (torchvision: 8, 16, 32, 64, 128; they set FCOS's
            centre-sampling radius and the per-level box-size ranges).
        **kwargs: torchvision ``FCOS`` arguments (``center_sampling_radius``, ``score_thresh``,
            ``nms_thresh``, ``detections_per_img``, ``topk_candidates``...).
    """

    family: Family = "fcos"

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        fpn_channels: int = 256,
        min_size: int = 800,
        max_size: int = 1333,
        trainable_backbone_layers: int | None = None,
        anchor_sizes: Sequence[Sequence[int]] | None = None,
        tiny_widths: Sequence[int] = (16, 32, 64),
        backbone_weights: str | None = None,
        frozen_bn: bool | None = None,
        **kwargs: Any,
    ) -> None:
        _common_checks(num_classes, min_size, max_size)
        if fpn_channels % 32:
            raise KDConfigError(
                "fpn_channels", f"must be a multiple of 32 for FCOS (GroupNorm(32) heads), got {fpn_channels}"
            )
        body = fpn_backbone(
            backbone, "fcos", fpn_channels, trainable_backbone_layers, tiny_widths, backbone_weights, frozen_bn
        )
        sizes = _check_anchor_sizes(anchor_sizes or _defaults(backbone, "fcos"), 5)
        if any(len(s) != 1 for s in sizes):
            raise KDConfigError("anchor_sizes", f"FCOS takes one size per level, got {sizes}")
        super().__init__(
            body,
            num_classes + 1,
            min_size=min_size,
            max_size=max_size,
            anchor_generator=AnchorGenerator(sizes, ((1.0,),) * len(sizes)),
            **kwargs,
        )
        self.num_classes = num_classes
        self._record_levels(body)


class FasterRCNNDetector(_DetectorMixin, FasterRCNN):
    """torchvision Faster R-CNN with an FPN (P2..P5 + pool), RPN and a two-MLP box head.

    Args:
        num_classes: K foreground categories (K + 1 outputs).
        backbone, fpn_channels, min_size, max_size, trainable_backbone_layers, tiny_widths, backbone_weights,
            frozen_bn: as :class:`RetinaNetDetector`.
        anchor_sizes: one tuple of RPN anchor sizes per level (torchvision: 32..512; ``tiny``: 8..128).
        aspect_ratios: RPN aspect ratios, shared by every level.
        representation_size: width of the box head's two MLP layers (torchvision: 1024; ``None``: 1024, or
            256 for ``tiny``).
        **kwargs: torchvision ``FasterRCNN`` arguments (``rpn_*``, ``box_score_thresh``, ``box_nms_thresh``,
            ``box_detections_per_img``, ``box_batch_size_per_image``...). With ``backbone="tiny"``, unless given:
            300 RPN proposals before/after NMS in training, 300/100 in evaluation, 128 sampled RoIs per image
            (torchvision: 2000/2000, 1000/1000, 512).
    """

    family: Family = "faster_rcnn"

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        fpn_channels: int = 256,
        min_size: int = 800,
        max_size: int = 1333,
        trainable_backbone_layers: int | None = None,
        anchor_sizes: Sequence[Sequence[int]] | None = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        tiny_widths: Sequence[int] = (16, 32, 64),
        backbone_weights: str | None = None,
        frozen_bn: bool | None = None,
        representation_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        _common_checks(num_classes, min_size, max_size)
        body = fpn_backbone(
            backbone, "faster_rcnn", fpn_channels, trainable_backbone_layers, tiny_widths, backbone_weights, frozen_bn
        )
        sizes, ratios = _anchor_grid(anchor_sizes or _defaults(backbone, "faster_rcnn"), aspect_ratios)
        width = representation_size or (256 if backbone == "tiny" else 1024)
        if backbone == "tiny":  # CPU-sized proposal and sampling budgets (4x faster training than torchvision's)
            for key, value in _TINY_RCNN_DEFAULTS.items():
                kwargs.setdefault(key, value)
        resolution = 7  # torchvision's MultiScaleRoIAlign output size
        super().__init__(
            body,
            None,
            min_size=min_size,
            max_size=max_size,
            rpn_anchor_generator=AnchorGenerator(sizes, ratios),
            box_head=TwoMLPHead(fpn_channels * resolution**2, width),
            box_predictor=FastRCNNPredictor(width, num_classes + 1),
            **kwargs,
        )
        self.num_classes = num_classes
        self._record_levels(body)


# ---------------------------------------------------------------------------------------------- family functions
def detector_family(model: nn.Module) -> Family:
    """``"retinanet"``, ``"fcos"`` or ``"faster_rcnn"`` for these classes and plain torchvision models,
    ``"detr"`` for :class:`~kd_lightning.models.detr.DETRDetector`.

    Raises:
        KDConfigError: for any other network.
    """
    if getattr(model, "family", None) == "detr":
        return "detr"
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, FCOS):
        return "fcos"
    if isinstance(model, GeneralizedRCNN) and hasattr(model, "rpn") and hasattr(model, "roi_heads"):
        return "faster_rcnn"
    raise KDConfigError(
        "model",
        f"{type(model).__name__} is not a torchvision RetinaNet, FCOS or Faster R-CNN, nor a DETRDetector",
        "use kd_lightning.models.detection.RetinaNetDetector, FCOSDetector, FasterRCNNDetector or "
        "kd_lightning.models.detr.DETRDetector",
    )


def num_outputs(model: nn.Module) -> int:
    """Class outputs of a detector, background included (K + 1)."""
    family = detector_family(model)
    if family == "faster_rcnn":
        return int(model.roi_heads.box_predictor.cls_score.out_features)
    if family == "detr":
        return int(model.num_classes) + 1
    return int(model.head.classification_head.num_classes)


def fpn_levels(model: nn.Module) -> list[str]:
    """The keys of ``model.backbone(x)``: :attr:`fpn_levels` when set, else read from the backbone (or probed)."""
    names = getattr(model, "fpn_levels", None) or _level_names(model.backbone)
    if names is not None:
        return list(names)
    param = next(iter(model.parameters()), None)
    probe = torch.zeros(1, 3, 128, 128, device=param.device if param is not None else None)
    was_training = model.backbone.training
    model.backbone.eval()
    try:
        with torch.no_grad():
            return list(model.backbone(probe).keys())
    finally:
        model.backbone.train(was_training)


def head_outputs(model: nn.Module, features: dict[str, Tensor] | list[Tensor]) -> dict[str, Tensor]:
    """The single-stage head on FPN features: RetinaNet ``{cls_logits [N, ΣHWA, K+1], bbox_regression}``,
    FCOS also ``bbox_ctrness``.

    Raises:
        KDConfigError: for Faster R-CNN (its RoI head runs on proposals, not on every location).
    """
    family = detector_family(model)
    if family == "faster_rcnn":
        raise KDConfigError(
            "model", "Faster R-CNN has no dense head: its box head runs on RPN proposals", "use RetinaNet or FCOS"
        )
    if family == "detr":
        raise KDConfigError(
            "model", "a DETR has no dense head: its decoder predicts a set of queries", "use RetinaNet or FCOS"
        )
    feats = list(features.values()) if isinstance(features, dict) else list(features)
    return model.head(feats)


def detection_losses(
    model: nn.Module, images: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]]
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, list[Tensor] | None]:
    """The detector's own training losses from an already transformed batch and its FPN features.

    The pieces of torchvision's ``forward`` after ``transform`` and ``backbone``: RetinaNet ``head`` +
    ``anchor_generator`` + ``compute_loss`` (``classification``, ``bbox_regression``); FCOS likewise
    (+ ``bbox_ctrness``); Faster R-CNN ``rpn`` + ``roi_heads`` (``loss_objectness``, ``loss_rpn_box_reg``,
    ``loss_classifier``, ``loss_box_reg``); DETR: encoder + decoder + Hungarian losses (``loss_class``,
    ``loss_bbox``, ``loss_giou`` summed over decoder layers, ``loss_dn_*`` with denoising groups). The RPN and RoI
    heads must be in training mode.

    Args:
        model: the detector.
        images: the transformed ``ImageList`` (``tensors``, ``image_sizes``).
        features: ``model.backbone(images.tensors)``.
        targets: the transformed targets (boxes in the resized frame, labels 1..K).

    Returns:
        ``(losses, head_outputs, anchors)``; the last two are ``None`` for Faster R-CNN and DETR.
    """
    family = detector_family(model)
    if family == "detr":
        return model.compute_losses(images, features, targets), None, None
    if family == "faster_rcnn":
        proposals, rpn_losses = model.rpn(images, features, targets)
        _, box_losses = model.roi_heads(features, proposals, images.image_sizes, targets)
        return {**rpn_losses, **box_losses}, None, None
    feats = list(features.values())
    outputs = model.head(feats)
    anchors = model.anchor_generator(images, feats)
    if family == "retinanet":
        return model.compute_loss(targets, outputs, anchors), outputs, anchors
    per_level = [x.size(2) * x.size(3) for x in feats]
    return model.compute_loss(targets, outputs, anchors, per_level), outputs, anchors


def _ceil_to(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def probe_size(model: nn.Module) -> int:
    """A square input size the transform would produce for ``min_size`` images (rounded up to the padding)."""
    transform = model.transform
    size = transform.min_size[-1] if isinstance(transform.min_size, (tuple, list)) else transform.min_size
    return _ceil_to(min(int(size), int(transform.max_size)), int(getattr(transform, "size_divisible", 32)))


class LevelAdapters(nn.Module):
    """One 1×1 ``Conv2d`` (with bias) per FPN level, mapping the student's channels to the teacher's.

    The adapter of FitNets-style imitation and of CWD/MGD/FGD when ``C_S ≠ C_T`` (mmdet-distiller's ``align``).

    Args:
        student_channels: ``{level: C_S}``.
        teacher_channels: ``{level: C_T}`` (same levels).
        mode: ``"auto"`` (a conv only where the channels differ, identity elsewhere) or ``"always"``.
    """

    def __init__(
        self,
        student_channels: dict[str, int],
        teacher_channels: dict[str, int],
        mode: Literal["auto", "always"] = "auto",
    ) -> None:
        super().__init__()
        if mode not in ("auto", "always"):
            raise KDConfigError("adapter", f"must be 'auto' or 'always', got {mode!r}")
        self.adapters = nn.ModuleDict()
        for level, c_s in student_channels.items():
            c_t = teacher_channels[level]
            if mode == "always" or c_s != c_t:
                self.adapters[level] = nn.Conv2d(c_s, c_t, kernel_size=1)
            else:
                self.adapters[level] = nn.Identity()

    def forward(self, level: str, x: Tensor) -> Tensor:
        return self.adapters[level](x)
