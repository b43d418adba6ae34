"""DetFPNImitation, DetCWD, DetLogitKD: hand-checked terms, short fits, frozen teachers, checkpoint round trips."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.dense import channel_wise_divergence
from kd_lightning.methods.det_cwd import DetCWD
from kd_lightning.methods.det_fpn_imitation import DetFPNImitation
from kd_lightning.methods.det_logit_kd import DetLogitKD, sigmoid_kd
from kd_lightning.models.detection import FasterRCNNDetector, FCOSDetector, RetinaNetDetector
from tests.helpers.detection_data import ShapesDataModule, ShapesDetection, detection_collate
from tests.helpers.tiny import tiny_trainer

WIDE = {"tiny_widths": (32, 64, 128), "fpn_channels": 64}
NARROW = {"tiny_widths": (16, 32, 64), "fpn_channels": 32}


def adam(lr: float = 3e-3) -> Any:
    return functools.partial(torch.optim.Adam, lr=lr)


def tiny(cls: type = RetinaNetDetector, **kwargs: Any) -> nn.Module:
    defaults: dict[str, Any] = {"backbone": "tiny", "min_size": 64, "max_size": 64, **NARROW}
    return cls(3, **{**defaults, **kwargs})


def _identity(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None])
        conv.bias.zero_()


# ---------------------------------------------------------------------------------------------- hand checks
def test_sigmoid_kd_hand_values_zero_at_equality_and_gradient_to_the_student_only() -> None:
    teacher = torch.zeros(1, 2, 3)  # p = 0.5 for 2 anchors x 3 classes
    student = torch.full((1, 2, 3), math.log(3.0), requires_grad=True)  # q = 0.75
    per_class = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 log(4/3)
    loss = sigmoid_kd(student, teacher).detach()
    assert float(loss) == pytest.approx(3 * per_class, rel=1e-6)  # summed over classes, mean over anchors
    q = 1 / (1 + math.exp(-math.log(3.0) / 2))  # T = 2: logits / T, times T²
    expected_t2 = 4 * 3 * (0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q)))
    assert float(sigmoid_kd(student, teacher, temperature=2.0).detach()) == pytest.approx(expected_t2, rel=1e-6)
    z = torch.randn(2, 5, 4)
    assert float(sigmoid_kd(z, z)) == pytest.approx(0.0, abs=1e-6)
    teacher_param = torch.zeros(1, 2, 3, requires_grad=True)
    sigmoid_kd(student, teacher_param).backward()
    assert student.grad is not None and teacher_param.grad is None
    with pytest.raises(KDConfigError, match=r"^cls_logits: student \(1, 2, 3\) and teacher \(1, 2, 4\) differ"):
        sigmoid_kd(student, torch.zeros(1, 2, 4))


def test_fpn_imitation_is_weight_times_the_sum_of_per_level_mses() -> None:
    module = DetFPNImitation(tiny(), tiny(), weight=0.5, optimizer=adam())
    module.prepare()
    for level in ("0", "1"):
        _identity(module.adapters.adapters[level])
    student = {"0": torch.ones(1, 32, 2, 2), "1": 2 * torch.ones(1, 32, 1, 1)}
    teacher = {"0": torch.zeros(1, 32, 2, 2), "1": torch.zeros(1, 32, 1, 1)}
    terms = module.distill_terms(student, teacher, None)  # type: ignore[arg-type]
    assert float(terms["fpn_imitation"].detach()) == pytest.approx(0.5 * (1.0 + 4.0))


def test_cwd_term_is_weight_times_the_summed_channel_wise_divergence_with_adapters_only_when_needed() -> None:
    torch.manual_seed(0)
    same = DetCWD(tiny(), tiny(), tau=2.0, weight=3.0, optimizer=adam())
    same.prepare()
    assert all(isinstance(a, nn.Identity) for a in same.adapters.adapters.values())
    s = {"0": torch.randn(2, 32, 4, 4), "p6": torch.randn(2, 32, 1, 1)}
    t = {"0": torch.randn(2, 32, 4, 4), "p6": torch.randn(2, 32, 1, 1)}
    expected = 3.0 * (channel_wise_divergence(s["0"], t["0"], 2.0) + channel_wise_divergence(s["p6"], t["p6"], 2.0))
    torch.testing.assert_close(same.distill_terms(s, t, None)["cwd"], expected)  # type: ignore[arg-type]
    official = DetCWD(tiny(), tiny(**WIDE), distill_levels=["0", "1", "2", "p6"], weight=5.0, optimizer=adam())
    official.prepare()
    assert list(official.adapters.adapters) == ["0", "1", "2", "p6"]
    assert official.adapters.adapters["0"].in_channels == 32 and official.adapters.adapters["0"].out_channels == 64
    assert official.feature_channels["teacher"] == dict.fromkeys(["0", "1", "2", "p6"], 64)


# ---------------------------------------------------------------------------------------------- fits
def _frozen_and_eval(teacher: nn.Module) -> bool:
    return all(not m.training for m in teacher.modules())


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [(DetFPNImitation, {}), (DetCWD, {"weight": 1.0}), (DetLogitKD, {"temperature": 2.0})],
)
def test_fit_keeps_the_teacher_frozen_logs_map_and_round_trips(method: type, kwargs: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = tiny(**WIDE)
    before = copy.deepcopy(teacher.state_dict())
    head_calls: list[int] = []
    teacher.head.register_forward_hook(lambda *_: head_calls.append(1))
    modes: list[bool] = []
    teacher.backbone.register_forward_pre_hook(lambda *_: modes.append(_frozen_and_eval(teacher)))
    module = method(tiny(), teacher, optimizer=adam(), **kwargs)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, ShapesDataModule(train_size=16, val_size=8))

    metrics = trainer.callback_metrics
    term = {DetFPNImitation: "fpn_imitation", DetCWD: "cwd", DetLogitKD: "logit_kd"}[method]
    assert {"train/loss", f"train/{term}", "train/classification", "val/map", "val/map_50", "val/map_large"} <= set(
        metrics
    )
    assert modes and all(modes) and _frozen_and_eval(teacher) and not module.teacher.training
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    # the teacher's head runs only for the method that asks for it (DetLogitKD: its setup check + 2 steps)
    assert len(head_calls) == (3 if method is DetLogitKD else 0)

    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    adapters = getattr(module, "adapters", None)
    if adapters is not None:
        assert all(id(p) in optimised for p in adapters.parameters())
        assert isinstance(adapters.adapters["0"], nn.Conv2d)  # 32 -> 64 channels
    assert not optimised & {id(p) for p in teacher.parameters()}

    path = tmp_path / "method.ckpt"
    trainer.save_checkpoint(path)
    loaded = method.load_from_checkpoint(path, student=tiny(), teacher=tiny(**WIDE), optimizer=adam())
    assert loaded.feature_channels == module.feature_channels
    state, expected = loaded.state_dict(), module.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_faster_rcnn_teacher_bn_and_rpn_stay_in_eval_and_cwd_trains(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = tiny(FasterRCNNDetector, **WIDE)
    modes: list[tuple[bool, bool]] = []
    teacher.backbone.register_forward_pre_hook(lambda *_: modes.append((teacher.rpn.training, teacher.training)))
    module = DetCWD(tiny(FasterRCNNDetector), teacher, optimizer=adam())
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, ShapesDataModule(train_size=16, val_size=8))
    assert modes == [(False, False)] * 3  # the setup probe and two training steps
    assert module.student.rpn.training and not teacher.rpn.training  # module.train() leaves the teacher in eval
    assert _frozen_and_eval(teacher)
    assert {"train/loss_objectness", "train/loss_classifier", "train/cwd", "val/map"} <= set(trainer.callback_metrics)
    assert module.levels == ["0", "1", "2", "3", "pool"]


# ---------------------------------------------------------------------------------------------- bad inputs
def test_logit_kd_refuses_faster_rcnn_other_families_and_other_anchors() -> None:
    with pytest.raises(KDConfigError, match=r"^model.init_args.student: DetLogitKD distils the dense classification"):
        DetLogitKD(tiny(FasterRCNNDetector), tiny(), optimizer=adam())
    mixed = DetLogitKD(tiny(), tiny(FCOSDetector), optimizer=adam())
    with pytest.raises(
        KDConfigError, match=r"^model.init_args.teacher: is a fcos detector but the student is a retinanet"
    ):
        mixed.check_data(None)
    other = DetLogitKD(tiny(), tiny(anchor_sizes=[[8, 10, 12]] * 5), optimizer=adam())
    with pytest.raises(KDConfigError) as info:
        other.check_data(None)
    message = str(info.value)
    assert message.startswith("model.init_args.teacher.init_args.anchor_sizes: the teacher's head predicts")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DetCWD(tiny(), tiny(), tau=0.0, optimizer=adam()), r"^model.init_args.tau: must be > 0"),
        (lambda: DetCWD(tiny(), tiny(), weight=-1.0, optimizer=adam()), r"^model.init_args.weight: must be a finite"),
        (
            lambda: DetFPNImitation(tiny(), tiny(), adapter="never", optimizer=adam()),
            r"^model.init_args.adapter: must be 'always' or 'auto'",
        ),
        (
            lambda: DetFPNImitation(tiny(), tiny(), distill_levels=["p5"], optimizer=adam()),
            r"^model.init_args.distill_levels: \['p5'\] is not an FPN level of the student .*'p7'\]\)",
        ),
        (
            lambda: DetCWD(tiny(), tiny(FasterRCNNDetector), optimizer=adam()),
            r"^model.init_args.teacher: the student's FPN levels \['p6', 'p7'\] are not an FPN level of the",
        ),
        (
            lambda: DetLogitKD(tiny(), tiny(), temperature=0, optimizer=adam()),
            r"^model.init_args.temperature: must be > 0",
        ),
    ],
)
def test_bad_method_arguments_are_one_line_errors(make: Any, match: str) -> None:
    with pytest.raises(KDConfigError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def test_wrong_class_count_names_the_student_field() -> None:
    module = DetCWD(tiny(), tiny(), optimizer=adam())
    with pytest.raises(KDConfigError, match=r"^model.init_args.student.init_args.num_classes: is 3 .* has 5 classes"):
        module.check_data(ShapesDataModule(num_classes=5))


def test_bf16_teacher_precision_runs_the_teacher_backbone_and_head_under_autocast() -> None:
    torch.manual_seed(0)
    module = DetLogitKD(tiny(), tiny(), teacher_precision="bf16", optimizer=adam())
    seen: list[torch.dtype] = []
    module.teacher.head.classification_head.cls_logits.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    terms = module.training_loss(detection_collate(list(ShapesDetection(2, size=64))))
    assert seen[-1] == torch.bfloat16 and terms["logit_kd"].dtype == torch.float32
    assert torch.isfinite(terms["loss"]) and terms["logit_kd"].requires_grad


def test_one_teacher_only() -> None:
    with pytest.raises(KDConfigError, match=r"^model.init_args.teachers: detection methods distil from one teacher"):
        DetCWD(tiny(), None, teachers={"a": tiny(), "b": tiny()}, optimizer=adam())  # type: ignore[arg-type]


@pytest.mark.parametrize("student_backbone", ["resnet18", "mobilenet_v3_large"])
def test_resnet50_teacher_pairs_build_and_distil(student_backbone: str) -> None:
    torch.manual_seed(0)
    sizes = {"min_size": 96, "max_size": 96}
    teacher = RetinaNetDetector(3, backbone="resnet50", **sizes)
    student = RetinaNetDetector(3, backbone=student_backbone, fpn_channels=128, **sizes)
    module = DetCWD(student, teacher, optimizer=adam())
    module.prepare()
    assert module.feature_channels["student"] == dict.fromkeys(["0", "1", "2", "p6", "p7"], 128)
    assert isinstance(module.adapters.adapters["p7"], nn.Conv2d) and module.adapters.adapters["p7"].out_channels == 256
    terms = module.training_loss(detection_collate(list(ShapesDetection(2, size=96))))
    assert torch.isfinite(terms["loss"]) and float(terms["cwd"].detach()) > 0
