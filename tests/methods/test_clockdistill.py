"""CLoCKDistill: terms equal the plain-torch losses, zero when student equals teacher, GT queries never reach the
normal queries nor inference, teacher frozen, parts round-trip, pair checks are one-line errors."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.methods import CLoCKDistill, DetectionSupervised
from kd_lightning.models.detection import FCOSDetector
from kd_lightning.models.detr import DETRDetector
from tests.helpers.detection_data import ShapesDataModule
from tests.helpers.tiny import tiny_trainer

WIDE = {"tiny_widths": (16, 32, 64), "d_model": 32, "dim_feedforward": 64}
NARROW = {"tiny_widths": (8, 16, 32), "d_model": 16, "dim_feedforward": 32}


def detr(**kwargs: Any) -> DETRDetector:
    base = {
        "backbone": "tiny",
        "feature_levels": ["0", "1"],
        "num_heads": 4,
        "num_encoder_layers": 1,
        "num_decoder_layers": 2,
        "num_queries": 6,
        "dn_groups": 1,
        "min_size": 64,
        "max_size": 64,
        **NARROW,
    }
    return DETRDetector(3, **{**base, **kwargs})


def adam() -> Any:
    return functools.partial(torch.optim.Adam, lr=1e-3)


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0], [30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[10.0, 12.0, 20.0, 30.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def test_terms_are_zero_when_the_student_is_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = detr(**WIDE)
    module = CLoCKDistill(copy.deepcopy(teacher), teacher, reliability_gate=True)
    module.prepare()
    module.student.eval()  # same mode as the teacher: identical computations
    terms = module.training_loss(batch())
    assert isinstance(module.adapter, torch.nn.Identity)
    assert float(terms["memory"].detach()) == pytest.approx(0.0, abs=1e-10)  # no_grad takes attention fast paths
    assert float(terms["logit_cls"].detach()) == pytest.approx(0.0, abs=1e-7)
    assert float(terms["logit_box"].detach()) == pytest.approx(0.0, abs=1e-6)


def test_terms_equal_the_plain_losses_and_the_teacher_gets_no_gradient() -> None:
    torch.manual_seed(0)
    teacher = detr(**WIDE)
    module = CLoCKDistill(detr(), teacher, lambda_mem=2.0, lambda_logit=3.0, box_weight=0.5)
    module.prepare()
    terms = module.training_loss(batch())
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_dn_class", "memory", "logit_cls", "logit_box"} <= set(terms)
    assert isinstance(module.adapter, torch.nn.Linear) and module.adapter.in_features == 16
    parts = sum(v for k, v in terms.items() if k != "loss")
    torch.testing.assert_close(terms["loss"], parts)
    assert float(terms["memory"].detach()) > 0
    terms["loss"].backward()
    assert module.adapter.weight.grad is not None and module.student.label_embed.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not m.training for m in teacher.modules())


def test_inference_uses_no_gt_queries() -> None:
    torch.manual_seed(0)
    module = CLoCKDistill(detr(), detr(**WIDE))
    module.prepare()
    seen: list[int] = []
    decode = module.student.decode

    def recording(memory: Any, groups: Any = ()) -> Any:
        seen.append(len(groups))
        return decode(memory, groups)

    module.student.decode = recording  # type: ignore[method-assign]
    module.student.eval()
    with torch.no_grad():
        module.student(batch()[0])
    assert seen == [0]
    module.student.train()
    module.training_loss(batch())
    assert seen[-1] == 2  # training: the student's DN group + the GT group


def test_location_weighting_can_be_switched_off() -> None:
    torch.manual_seed(0)
    teacher = detr(**WIDE)
    student = detr()
    uniform = CLoCKDistill(student, teacher, lambda_fg=0.0, lambda_logit=0.0)
    weighted = CLoCKDistill(copy.deepcopy(student), teacher, lambda_fg=50.0, lambda_logit=0.0)
    for module in (uniform, weighted):
        module.prepare()
        module.student.eval()
    weighted.adapter.load_state_dict(uniform.adapter.state_dict())
    a, b = uniform.training_loss(batch())["memory"], weighted.training_loss(batch())["memory"]
    assert "logit_cls" not in uniform.training_loss(batch())
    assert float(a.detach()) != pytest.approx(float(b.detach()))  # the GT boxes change the weighting


def test_fit_keeps_the_teacher_frozen_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = detr(**WIDE)
    before = copy.deepcopy(teacher.state_dict())
    module = CLoCKDistill(detr(), teacher, optimizer=adam(), reliability_gate=True)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, ShapesDataModule(train_size=16, val_size=8))
    assert {"train/loss", "train/memory", "train/logit_cls", "val/map"} <= set(trainer.callback_metrics)
    assert all(not m.training for m in teacher.modules())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in module.adapter.parameters())
    assert not optimised & {id(p) for p in teacher.parameters()}
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = CLoCKDistill.load_from_checkpoint(path, student=detr(), teacher=detr(**WIDE), optimizer=adam())
    state, expected = loaded.state_dict(), module.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_detr_trains_alone_with_detection_supervised(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DetectionSupervised(detr(), optimizer=adam())
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, ShapesDataModule(train_size=16, val_size=8))
    assert {"train/loss_class", "train/loss_dn_giou", "val/map"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: CLoCKDistill(detr(), detr(query_type="point", **WIDE)),
            r"^model.init_args.teacher.init_args.query_type: is 'point' but the student's is 'anchor'",
        ),
        (
            lambda: CLoCKDistill(detr(), detr(feature_levels=["1", "2"], **WIDE)),
            r"^model.init_args.teacher.init_args.feature_levels: are \['1', '2'\] but the student's are \['0', '1'\]",
        ),
        (
            lambda: CLoCKDistill(detr(), detr(num_decoder_layers=3, **WIDE)),
            r"^model.init_args.distill_layers: is 'all' but the student has 2 decoder layers and the teacher 3",
        ),
        (
            lambda: CLoCKDistill(detr(), detr(dn_groups=0, **WIDE)),
            r"^model.init_args.gt_query_content: is 'label' but the teacher has dn_groups: 0",
        ),
        (
            lambda: CLoCKDistill(detr(), FCOSDetector(3, backbone="tiny", fpn_channels=32, min_size=64, max_size=64)),
            r"^model.init_args.teacher: CLoCKDistill distils DETR encoders and decoders, got a fcos detector",
        ),
        (lambda: CLoCKDistill(detr(), detr(**WIDE), lambda_mem=0, lambda_logit=0), r"^model.init_args.lambda_mem: "),
        (lambda: CLoCKDistill(detr(), detr(**WIDE), gt_box_noise=1.5), r"^model.init_args.gt_box_noise: "),
    ],
)
def test_bad_pairs_are_one_line_errors(make: Any, match: str) -> None:
    with pytest.raises(KDConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_a_mismatched_pair_is_accepted_with_the_right_switches() -> None:
    CLoCKDistill(detr(), detr(num_decoder_layers=3, **WIDE), distill_layers="last")
    CLoCKDistill(detr(), detr(dn_groups=0, **WIDE), gt_query_content="zeros")
