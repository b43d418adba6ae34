"""utils.trainable: the core's teacher freezing remembers parameters frozen by design; copies restore them."""

from __future__ import annotations

from torch import nn

from kd_lightning.methods.det_cwd import DetCWD
from kd_lightning.models.detection import RetinaNetDetector
from kd_lightning.utils.trainable import freeze, trainable_copy


def test_freeze_remembers_and_trainable_copy_restores_the_design() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[0].requires_grad_(False)  # frozen by design
    freeze(net)
    assert not any(p.requires_grad for p in net.parameters())
    freeze(net)  # a second freeze keeps the first record
    twin = trainable_copy(net)
    assert twin.training and twin is not net
    assert [p.requires_grad for p in twin.parameters()] == [False, False, True, True]
    assert not any(p.requires_grad for p in net.parameters())  # the frozen original is untouched


def test_a_network_never_frozen_keeps_its_flags() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).eval()
    net[1].requires_grad_(False)
    twin = trainable_copy(net)
    assert twin.training and [p.requires_grad for p in twin.parameters()] == [True, True, False, False]


def test_a_detector_teacher_trained_when_missing_keeps_its_frozen_stem() -> None:
    def detector() -> RetinaNetDetector:
        return RetinaNetDetector(3, backbone="resnet18", trainable_backbone_layers=2, min_size=64, max_size=64)

    designed = {n: p.requires_grad for n, p in detector().named_parameters()}
    assert not designed["backbone.body.conv1.weight"] and designed["backbone.body.layer4.0.conv1.weight"]
    module = DetCWD(detector(), detector())
    assert not any(p.requires_grad for p in module.teacher.parameters())
    twin = trainable_copy(module.teacher)
    assert {n: p.requires_grad for n, p in twin.named_parameters()} == designed
