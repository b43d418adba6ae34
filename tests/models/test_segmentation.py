"""Segmenters: torchvision's own key names and outputs, output strides, dilation of ResNet-18/34, taps, weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18
from torchvision.models import segmentation as tvs

from kd_lightning.errors import KDConfigError
from kd_lightning.models.segmentation import (
    BACKBONES,
    DeepLabV3Segmenter,
    FCNSegmenter,
    LRASPPSegmenter,
)
from kd_lightning.models.taps import FeatureTaps


def _same_network(ours: nn.Module, theirs: nn.Module, size: tuple[int, int] = (64, 96)) -> None:
    """Identical key order and shapes; with our weights loaded into theirs, identical outputs."""
    mine, other = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(other)
    assert all(mine[k].shape == other[k].shape for k in mine)
    torch.manual_seed(0)
    for module in ours.modules():  # non-trivial BN statistics, so that every buffer matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == (2, ours.num_classes, *size)
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda: DeepLabV3Segmenter(5, "resnet50", aux_loss=True),
            lambda: tvs.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=True),
        ),
        (
            lambda: DeepLabV3Segmenter(5, "mobilenet_v3_large", aux_loss=True, output_stride=16),
            lambda: tvs.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5, aux_loss=True),
        ),
        (
            lambda: FCNSegmenter(5, "resnet50", aux_loss=True),
            lambda: tvs.fcn_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=True),
        ),
        (
            lambda: LRASPPSegmenter(5),
            lambda: tvs.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5),
        ),
    ],
    ids=["deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large"],
)
def test_equals_torchvision_builders_key_for_key_and_output_for_output(ours, theirs) -> None:
    model = ours()
    assert isinstance(model, (tvs.DeepLabV3, tvs.FCN, tvs.LRASPP))
    _same_network(model, theirs())


def test_resnet101_has_torchvision_keys() -> None:
    ours = DeepLabV3Segmenter(19, "resnet101", aux_loss=True).state_dict()
    theirs = tvs.deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=19, aux_loss=True).state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)


def test_resnet18_keeps_torchvision_names_and_is_dilated_as_cirkd() -> None:
    model = DeepLabV3Segmenter(19, "resnet18", aux_loss=True)
    classifier_keys = {k for k in resnet18().state_dict() if not k.startswith("fc.")}
    assert set(model.backbone.state_dict()) == classifier_keys
    body = model.backbone
    # CIRKD resnetv1b: first block conv1 dilation d/2, conv2 d; later blocks d in both; no strides.
    expected = {"layer3": [(1, 2), (2, 2)], "layer4": [(2, 4), (4, 4)]}
    for name, dilations in expected.items():
        for block, (d1, d2) in zip(getattr(body, name), dilations):
            assert block.conv1.dilation == (d1, d1) and block.conv1.padding == (d1, d1)
            assert block.conv2.dilation == (d2, d2) and block.conv2.padding == (d2, d2)
            assert block.conv1.stride == (1, 1)
        assert getattr(body, name)[0].downsample[0].stride == (1, 1)
    # Output stride 16 dilates layer4 only (rate 2).
    body16 = DeepLabV3Segmenter(19, "resnet18", output_stride=16).backbone
    assert body16.layer3[0].conv1.stride == (2, 2) and body16.layer3[0].conv2.dilation == (1, 1)
    assert body16.layer4[0].conv1.dilation == (1, 1) and body16.layer4[0].conv2.dilation == (2, 2)


def _tapped(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.eval()
    taps = FeatureTaps(model, list(model.tap_names.values()))
    with torch.no_grad():
        out, feats = taps(x)
    taps.remove()
    return out, {role: feats[path] for role, path in model.tap_names.items()}


# ResNet-101 at stride 16 takes resnet50's code path: one ResNet-101 build is enough.
STRIDES = [(b, s) for b in BACKBONES for s in (8, 16) if (b, s) != ("resnet101", 16)]


@pytest.mark.parametrize(("backbone", "output_stride"), STRIDES)
def test_output_stride_of_every_backbone(backbone: str, output_stride: int) -> None:
    model = DeepLabV3Segmenter(3, backbone, aux_loss=True, output_stride=output_stride)
    out, maps = _tapped(model, torch.randn(1, 3, 64, 96))
    size = (64 // output_stride, 96 // output_stride)
    assert maps["logits"].shape == (1, 3, *size)
    assert maps["backbone"].shape[-2:] == size and maps["head_feature"].shape[-2:] == size
    aux_stride = output_stride if backbone.startswith("resnet") else 8  # layer3; MobileNetV3's C2 and tiny's layer3
    assert maps["aux_logits"].shape == (1, 3, 64 // aux_stride, 96 // aux_stride)
    assert out["out"].shape == out["aux"].shape == (1, 3, 64, 96)


@pytest.mark.parametrize(
    ("make", "head_channels"),
    [
        (lambda: DeepLabV3Segmenter(4, "tiny", aux_loss=True), 64),
        (lambda: DeepLabV3Segmenter(4, "resnet18", head_channels=128), 128),
        (lambda: DeepLabV3Segmenter(4, "tiny", tiny_widths=(32, 64, 128)), 128),
        (lambda: FCNSegmenter(4, "tiny"), 16),
        (lambda: FCNSegmenter(4, "resnet18"), 128),
        (lambda: LRASPPSegmenter(4, "tiny"), 64),
        (lambda: LRASPPSegmenter(4), 128),
    ],
)
def test_tap_names_give_native_stride_logits_and_head_features(make, head_channels: int) -> None:
    model = make()
    assert {"logits", "head_feature", "backbone"} <= set(model.tap_names)
    assert model.tap_names["logits"] == "classifier"
    x = torch.randn(2, 3, 64, 96)
    out, maps = _tapped(model, x)
    assert maps["logits"].shape == (2, 4, 8, 12)  # input / 8
    assert maps["head_feature"].shape == (2, head_channels, 8, 12)
    # "logits" is what forward upsamples (bilinear, align_corners=False) into "out"
    upsampled = F.interpolate(maps["logits"], size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsampled, out["out"], rtol=0, atol=0)


def test_deeplab_head_feature_is_the_relu_before_the_1x1_classifier() -> None:
    model = DeepLabV3Segmenter(4, "tiny")
    head = model.get_submodule("classifier")
    assert isinstance(head[3], nn.ReLU) and isinstance(head[4], nn.Conv2d) and head[4].kernel_size == (1, 1)
    _, maps = _tapped(model, torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(head[4](maps["head_feature"]), maps["logits"])


def test_tiny_backbone_layout_and_widths() -> None:
    model = DeepLabV3Segmenter(19, "tiny", aux_loss=True, tiny_widths=(8, 16, 32, 48))
    body = model.backbone
    assert [name for name, _ in body.named_children()] == ["layer1", "layer2", "layer3", "layer4"]
    assert [body.get_submodule(f"layer{i}")[1][0].out_channels for i in range(1, 5)] == [8, 16, 32, 48]
    assert model.tap_names["backbone"] == "backbone.layer4"
    assert model.classifier[0].convs[1][0].dilation == (2, 2)  # tiny ASPP rates 2/4/6
    params = sum(p.numel() for p in DeepLabV3Segmenter(19, "tiny").parameters())
    assert params < 400_000  # small enough for CPU runs on digit scenes


def test_backbone_weights_load_from_local_torchvision_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(1)
    imagenet = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)  # includes fc.*, which is ignored
    model = DeepLabV3Segmenter(19, "resnet18", backbone_weights=str(path))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    torch.testing.assert_close(model.backbone.bn1.running_var, imagenet.bn1.running_var)

    mobile = mobilenet_v3_large()
    path = tmp_path / "mbv3.pth"
    torch.save({"state_dict": mobile.state_dict()}, path)
    lraspp = LRASPPSegmenter(19, backbone_weights=str(path))
    torch.testing.assert_close(lraspp.backbone.get_submodule("16")[0].weight, mobile.features[16][0].weight)

    with pytest.raises(KDConfigError, match=r"^backbone_weights: .* lacks \d+ of the backbone's") as err:
        DeepLabV3Segmenter(19, "resnet50", backbone_weights=str(tmp_path / "resnet18.pth"))
    assert "\n" not in str(err.value)
    with pytest.raises(KDConfigError, match=r"^backbone_weights: no file at .*nothing is downloaded"):
        FCNSegmenter(19, "resnet18", backbone_weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DeepLabV3Segmenter(19, "resnet19"), r"^backbone: unknown value 'resnet19' \(did you mean 'resnet18'"),
        (
            lambda: FCNSegmenter(19, "tiny", output_stride=32),
            r"^output_stride: must be 4 or 8 or 16 for backbone .tiny., got 32",
        ),
        (
            lambda: FCNSegmenter(19, "resnet18", output_stride=4),
            r"^output_stride: must be 8 or 16 for backbone .resnet18., got 4",
        ),
        (lambda: LRASPPSegmenter(19, "resnet50"), r"^backbone: unknown value 'resnet50'.*mobilenet_v3_large, tiny"),
        (lambda: DeepLabV3Segmenter(19, "tiny", tiny_widths=(8, 16)), r"^tiny_widths: must be 3 or 4 positive"),
        (lambda: DeepLabV3Segmenter(0, "tiny"), r"^num_classes: must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(make, message: str) -> None:
    with pytest.raises(KDConfigError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_tiny_backbone_at_output_stride_4_keeps_a_quarter_resolution() -> None:
    model = DeepLabV3Segmenter(5, "tiny", output_stride=4, tiny_widths=(8, 16, 32)).eval()
    with torch.no_grad():
        assert model.backbone(torch.zeros(1, 3, 64, 48))["out"].shape[-2:] == (16, 12)
        assert model(torch.zeros(1, 3, 64, 48))["out"].shape[-2:] == (64, 48)
