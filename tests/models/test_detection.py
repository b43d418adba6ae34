"""torchvision detectors as classes: torchvision's key names, FPN levels/strides, losses from pieces, bad arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet34
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from kd_lightning.errors import KDConfigError
from kd_lightning.models.detection import (
    FasterRCNNDetector,
    FCOSDetector,
    LevelAdapters,
    RetinaNetDetector,
    detection_losses,
    detector_family,
    fpn_levels,
    head_outputs,
    num_outputs,
)

DETECTORS = [RetinaNetDetector, FCOSDetector, FasterRCNNDetector]


def _batch(n: int = 2, size: int = 64, seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.randint(0, size // 2, (2, 2), generator=g).float()
        targets.append({"boxes": torch.cat([xy, xy + 16], 1), "labels": torch.tensor([1, 3])})
    return images, targets


def tiny(cls: type, **kwargs: object) -> torch.nn.Module:
    return cls(3, backbone="tiny", fpn_channels=32, min_size=64, max_size=64, **kwargs)


@pytest.mark.parametrize("cls", DETECTORS)
def test_tiny_detectors_expose_levels_strides_and_k_plus_one_outputs(cls: type) -> None:
    torch.manual_seed(0)
    model = tiny(cls)
    first = 4 if cls is FasterRCNNDetector else 8
    assert model.fpn_levels == (
        ["0", "1", "2", "3", "pool"] if cls is FasterRCNNDetector else ["0", "1", "2", "p6", "p7"]
    )
    assert fpn_levels(model) == model.fpn_levels
    assert num_outputs(model) == 4 and model.num_classes == 3
    model.eval()
    feats = model.backbone(torch.zeros(1, 3, 128, 128))
    assert list(feats) == model.fpn_levels
    for level, value in feats.items():
        assert value.shape[1] == 32
        assert model.fpn_strides[level] == 128 // value.shape[-1]
    assert model.fpn_strides[model.fpn_levels[0]] == first
    with torch.no_grad():
        detections = model(_batch()[0])
    assert len(detections) == 2 and set(detections[0]) >= {"boxes", "scores", "labels"}


@pytest.mark.parametrize("cls", DETECTORS)
def test_losses_from_pieces_equal_torchvisions_forward(cls: type) -> None:
    torch.manual_seed(0)
    model = tiny(cls).train()
    images, targets = _batch()
    torch.manual_seed(1)
    expected = model(images, targets)
    torch.manual_seed(1)
    image_list, resized = model.transform(images, targets)
    feats = model.backbone(image_list.tensors)
    losses, head, anchors = detection_losses(model, image_list, feats, resized)
    assert set(losses) == set(expected)
    for name in losses:
        torch.testing.assert_close(losses[name], expected[name])
    if cls is FasterRCNNDetector:
        assert head is None and anchors is None
        with pytest.raises(KDConfigError, match="no dense head"):
            head_outputs(model, feats)
    else:
        assert head["cls_logits"].shape[-1] == 4 and len(anchors) == 2
        assert head["cls_logits"].shape[1] == anchors[0].shape[0]


def test_state_dict_keys_are_torchvisions_own() -> None:
    torch.manual_seed(0)
    ours = RetinaNetDetector(10, backbone="resnet18")
    plain = RetinaNet(_resnet_fpn_extractor(resnet18(), 5, [2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)), 11)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    ours_rcnn = FasterRCNNDetector(10, backbone="resnet18")
    plain_rcnn = FasterRCNN(_resnet_fpn_extractor(resnet18(), 5), 11)
    assert {k: v.shape for k, v in ours_rcnn.state_dict().items()} == {
        k: v.shape for k, v in plain_rcnn.state_dict().items()
    }
    assert detector_family(plain) == "retinanet" and detector_family(plain_rcnn) == "faster_rcnn"
    assert fpn_levels(plain) == ["0", "1", "2", "p6", "p7"] and num_outputs(plain_rcnn) == 11


def test_mobilenet_and_resnet_levels_align_and_fpn_width_is_configurable() -> None:
    torch.manual_seed(0)
    x = torch.zeros(1, 3, 128, 128)
    resnet = RetinaNetDetector(2, backbone="resnet18", fpn_channels=64).eval()
    mobile = RetinaNetDetector(2, backbone="mobilenet_v3_large", fpn_channels=32).eval()
    with torch.no_grad():
        a, b = resnet.backbone(x), mobile.backbone(x)
    assert list(a) == list(b) == mobile.fpn_levels
    assert [v.shape[-1] for v in a.values()] == [v.shape[-1] for v in b.values()] == [16, 8, 4, 2, 1]
    assert a["0"].shape[1] == 64 and b["0"].shape[1] == 32 and mobile.backbone.out_channels == 32
    rcnn = FasterRCNNDetector(2, backbone="mobilenet_v3_large", fpn_channels=32).eval()
    with torch.no_grad():
        assert [v.shape[-1] for v in rcnn.backbone(x).values()] == [32, 16, 8, 4, 2]


def test_backbone_weights_are_read_from_a_local_file_and_freeze_like_torchvision(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = resnet18()
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = RetinaNetDetector(2, backbone="resnet18", backbone_weights=str(path))
    torch.testing.assert_close(model.backbone.body.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.backbone.body.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # 3 trainable stages: layer2..layer4
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    torch.save(resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(KDConfigError, match=r"^backbone_weights: .*does not fit"):
        RetinaNetDetector(2, backbone="resnet18", backbone_weights=str(tmp_path / "r34.pth"))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: RetinaNetDetector(2, backbone="resnet9"), r"^backbone: unknown backbone 'resnet9'.*'tiny'"),
        (lambda: FCOSDetector(2, backbone="tiny", fpn_channels=48), r"^fpn_channels: must be a multiple of 32"),
        (lambda: RetinaNetDetector(2, backbone="tiny", anchor_sizes=[[8], [16]]), r"^anchor_sizes: needs one"),
        (lambda: RetinaNetDetector(0, backbone="tiny"), r"^num_classes: must be the number of foreground"),
        (lambda: RetinaNetDetector(2, backbone="tiny", tiny_widths=(8, 8)), r"^tiny_widths: must be three"),
        (lambda: RetinaNetDetector(2, backbone="resnet18", trainable_backbone_layers=7), r"^trainable_backbone"),
        (lambda: detector_family(torch.nn.Linear(2, 2)), r"^model: Linear is not a torchvision RetinaNet"),
    ],
)
def test_bad_arguments_give_one_line_errors(make: object, match: str) -> None:
    with pytest.raises(KDConfigError, match=match) as info:
        make()  # type: ignore[operator]
    assert "\n" not in str(info.value)


def test_level_adapters_map_student_to_teacher_channels() -> None:
    auto = LevelAdapters({"0": 16, "1": 32}, {"0": 32, "1": 32})
    assert isinstance(auto.adapters["0"], torch.nn.Conv2d) and isinstance(auto.adapters["1"], torch.nn.Identity)
    assert auto("0", torch.zeros(2, 16, 4, 4)).shape == (2, 32, 4, 4)
    always = LevelAdapters({"0": 32}, {"0": 32}, mode="always")
    assert always.adapters["0"].kernel_size == (1, 1)
