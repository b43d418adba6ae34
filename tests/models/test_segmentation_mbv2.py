"""The MobileNetV2 segmentation backbone: torchvision's features without the 1280-channel conv, dilated to output
stride 8/16 as CIRKD's MobileNetV2Dilated, its taps and channel counts, ImageNet weights from a local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

from kd_lightning.errors import KDConfigError
from kd_lightning.models.segmentation import (
    BACKBONES,
    LRASPP_BACKBONES,
    DeepLabV3Segmenter,
    FCNSegmenter,
    LRASPPSegmenter,
    build_backbone,
)
from kd_lightning.models.taps import FeatureTaps


def _tapped(model: nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    taps = FeatureTaps(model, list(model.tap_names.values()))
    with torch.no_grad():
        out, feats = taps(x)
    taps.remove()
    return out, {role: feats[path] for role, path in model.tap_names.items()}


def _depthwise(body: nn.Module, index: int) -> nn.Conv2d:
    (conv,) = [m for m in body[str(index)].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    return conv


def test_is_a_backbone_of_deeplab_and_fcn_not_lraspp() -> None:
    assert "mobilenet_v2" in BACKBONES and "mobilenet_v2" not in LRASPP_BACKBONES
    with pytest.raises(KDConfigError, match=r"^backbone: unknown value 'mobilenet_v2'"):
        LRASPPSegmenter(19, "mobilenet_v2")


def test_layout_is_torchvisions_features_up_to_the_320_channel_block() -> None:
    feats = build_backbone("mobilenet_v2", 8, aux=True)
    assert (feats.out_name, feats.out_channels, feats.aux_name, feats.aux_channels) == ("17", 320, "13", 96)
    assert [name for name, _ in feats.body.named_children()] == [str(i) for i in range(18)]  # no 1x1 to 1280
    reference = mobilenet_v2(weights=None).features[:18]
    ours, theirs = feats.body.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    assert build_backbone("mobilenet_v2", 16, aux=True).aux_name == "6"  # the deepest stride-8 block at OS 16
    model = DeepLabV3Segmenter(19, "mobilenet_v2", head_channels=128)
    assert model.tap_names["backbone"] == "backbone.17"
    assert model.classifier[0].convs[0][0].in_channels == 320  # ASPP input, as CIRKD's _DeepLabHead(320, ...)


def test_dilation_follows_cirkd_mobilenetv2_dilated() -> None:
    """OS 8: blocks 7-13 dilation 2, 14-17 dilation 4; a formerly strided 3x3 conv gets half; no stride left."""
    body = build_backbone("mobilenet_v2", 8).body
    expected = {i: 1 for i in range(7)} | {i: 2 for i in range(7, 14)} | {i: 4 for i in range(14, 18)}
    expected[7], expected[14] = 1, 2  # the stride-2 depthwise convs of the stride-16 and stride-32 stages
    for index, dilation in expected.items():
        conv = _depthwise(body, index)
        assert conv.dilation == (dilation, dilation) and conv.padding == (dilation, dilation), index
        assert conv.stride == ((2, 2) if index in (0, 2, 4) else (1, 1)), index
    body16 = build_backbone("mobilenet_v2", 16).body
    assert _depthwise(body16, 7).stride == (2, 2) and _depthwise(body16, 13).dilation == (1, 1)
    assert _depthwise(body16, 14).stride == (1, 1) and _depthwise(body16, 14).dilation == (1, 1)
    assert [_depthwise(body16, i).dilation for i in (15, 16, 17)] == [(2, 2)] * 3


@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_taps_and_channel_counts(output_stride: int) -> None:
    model = DeepLabV3Segmenter(5, "mobilenet_v2", aux_loss=True, output_stride=output_stride, head_channels=128)
    out, maps = _tapped(model.eval(), torch.randn(1, 3, 64, 96))
    size = (64 // output_stride, 96 // output_stride)
    assert maps["backbone"].shape == (1, 320, *size)
    assert maps["head_feature"].shape == (1, 128, *size)
    assert maps["logits"].shape == (1, 5, *size)
    assert maps["aux_logits"].shape == (1, 5, 8, 12)  # the aux map is at stride 8 for both output strides
    assert out["out"].shape == out["aux"].shape == (1, 5, 64, 96)
    fcn = FCNSegmenter(5, "mobilenet_v2", output_stride=output_stride)
    assert _tapped(fcn.eval(), torch.randn(1, 3, 64, 96))[1]["backbone"].shape == (1, 320, *size)


def test_undilated_blocks_compute_torchvisions_features() -> None:
    """At output stride 16 blocks 0-13 are untouched: with torchvision's weights they give torchvision's map."""
    torch.manual_seed(0)
    reference = mobilenet_v2(weights=None).features.eval()
    body = build_backbone("mobilenet_v2", 16).body.eval()
    body.load_state_dict(reference[:18].state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = x
        for index in range(14):
            ours = body[str(index)](ours)
        torch.testing.assert_close(ours, reference[:14](x))


def test_imagenet_weights_load_from_a_local_torchvision_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    imagenet = mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(imagenet.state_dict(), path)  # features.* incl. features.18 and classifier.*: extras ignored
    model = DeepLabV3Segmenter(19, "mobilenet_v2", backbone_weights=str(path))
    torch.testing.assert_close(
        model.backbone.get_submodule("17").conv[1][0].weight, imagenet.features[17].conv[1][0].weight
    )
    torch.testing.assert_close(model.backbone.get_submodule("0")[1].running_var, imagenet.features[0][1].running_var)


def test_pairs_with_a_dilated_resnet_teacher_at_the_same_resolution() -> None:
    x = torch.randn(1, 3, 64, 64)
    student = DeepLabV3Segmenter(19, "mobilenet_v2", head_channels=128).eval()
    teacher = DeepLabV3Segmenter(19, "resnet18", head_channels=128).eval()
    assert _tapped(student, x)[1]["backbone"].shape[-2:] == _tapped(teacher, x)[1]["backbone"].shape[-2:] == (8, 8)
