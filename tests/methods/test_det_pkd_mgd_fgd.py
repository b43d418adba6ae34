"""DetPKD, DetMGD, DetFGD: terms equal the plain-torch losses on the tapped FPN maps; short fits keep the teacher
frozen and round-trip the trainable parts; level defaults follow the official configs."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.dense import FGDLoss, pearson_feature_loss
from kd_lightning.methods.det_fgd import DetFGD
from kd_lightning.methods.det_mgd import DetMGD
from kd_lightning.methods.det_pkd import DetPKD
from kd_lightning.models.detection import FasterRCNNDetector, RetinaNetDetector
from tests.helpers.detection_data import ShapesDataModule
from tests.helpers.tiny import tiny_trainer

WIDE = {"tiny_widths": (32, 64, 128), "fpn_channels": 64}
NARROW = {"tiny_widths": (16, 32, 64), "fpn_channels": 32}


def adam() -> Any:
    return functools.partial(torch.optim.Adam, lr=3e-3)


def tiny(cls: type = RetinaNetDetector, **kwargs: Any) -> nn.Module:
    return cls(3, **{"backbone": "tiny", "min_size": 64, "max_size": 64, **NARROW, **kwargs})


def test_level_defaults_follow_the_official_configs() -> None:
    assert DetPKD(tiny(), tiny()).levels == ["0", "1", "2", "p6"]  # neck outputs 0..3 (P3..P6)
    assert DetMGD(tiny(), tiny()).levels == ["0", "1", "2", "p6", "p7"]  # one-stage: P3..P7
    assert DetFGD(tiny(), tiny()).levels == ["0", "1", "2", "p6", "p7"]
    two_stage = tiny(FasterRCNNDetector)
    assert DetMGD(two_stage, tiny(FasterRCNNDetector)).levels == ["0", "1", "2", "3"]  # P2..P5, no pool
    assert DetFGD(two_stage, tiny(FasterRCNNDetector)).levels == ["0", "1", "2", "3"]
    assert DetPKD(tiny(), tiny(), distill_levels=["p7"]).levels == ["p7"]


def test_pkd_term_is_weight_times_the_summed_pearson_loss_after_adapters() -> None:
    torch.manual_seed(0)
    module = DetPKD(tiny(), tiny(), weight=6.0)
    module.prepare()
    assert all(isinstance(a, nn.Identity) for a in module.adapters.adapters.values())  # equal widths: none
    s = {"0": torch.randn(2, 32, 4, 4), "1": torch.randn(2, 32, 2, 2)}
    t = {"0": torch.randn(2, 32, 4, 4), "1": torch.randn(2, 32, 2, 2)}
    expected = 6.0 * (pearson_feature_loss(s["0"], t["0"]) + pearson_feature_loss(s["1"], t["1"]))
    torch.testing.assert_close(module.distill_terms(s, t, None)["pkd"], expected)  # type: ignore[arg-type]
    # PKD is invariant to a positive per-channel affine map of the student's features
    scaled = {k: 3.0 * v + 1.0 for k, v in s.items()}
    torch.testing.assert_close(module.distill_terms(scaled, t, None)["pkd"], expected)  # type: ignore[arg-type]


def test_mgd_without_masking_is_alpha_times_the_summed_squared_generation_error() -> None:
    torch.manual_seed(0)
    module = DetMGD(tiny(), tiny(**WIDE), alpha=0.5, lambda_mask=0.0, distill_levels=["0"])
    module.prepare()
    part = module.generators["0"]
    s, t = torch.randn(2, 32, 4, 4), torch.randn(2, 64, 4, 4)
    generated = part.generator(part.align(s))
    expected = 0.5 * ((generated - t) ** 2).sum() / 2
    torch.testing.assert_close(module.distill_terms({"0": s}, {"0": t}, None)["mgd"], expected)  # type: ignore[arg-type]


def test_fgd_terms_sum_the_per_level_losses_on_the_resized_boxes() -> None:
    torch.manual_seed(0)
    module = DetFGD(tiny(), tiny(), distill_levels=["0", "1"])
    module.prepare()
    s = {"0": torch.randn(2, 32, 8, 8), "1": torch.randn(2, 32, 4, 4)}
    t = {"0": torch.randn(2, 32, 8, 8), "1": torch.randn(2, 32, 4, 4)}
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.zeros(0, 4)]
    context = type("Context", (), {})()
    context.targets = [{"boxes": b} for b in boxes]
    context.images = type("Images", (), {"image_sizes": [(64, 64), (64, 48)]})()
    terms = module.distill_terms(s, t, context)  # type: ignore[arg-type]
    for name in ("fg", "bg", "attention", "relation"):
        expected = sum(
            module.losses[level](s[level], t[level], boxes, [(64, 64), (64, 48)])[name] for level in ("0", "1")
        )
        torch.testing.assert_close(terms[f"fgd_{name}"], expected)
    assert isinstance(module.losses["0"], FGDLoss)


@pytest.mark.parametrize(
    ("method", "kwargs", "term"),
    [
        (DetPKD, {}, "pkd"),
        (DetMGD, {"alpha": 1e-3}, "mgd"),
        (DetFGD, {}, "fgd_fg"),
    ],
)
def test_fit_keeps_the_teacher_frozen_and_round_trips(method: type, kwargs: dict, term: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = tiny(**WIDE)
    before = copy.deepcopy(teacher.state_dict())
    module = method(tiny(), teacher, optimizer=adam(), **kwargs)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, ShapesDataModule(train_size=16, val_size=8))
    assert {"train/loss", f"train/{term}", "val/map"} <= set(trainer.callback_metrics)
    assert all(not m.training for m in teacher.modules())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    parts = [m for m in module.children() if m is not module.student and m is not module.teachers]
    trainable = [p for part in parts for p in part.parameters()]
    assert trainable and all(id(p) in optimised for p in trainable)  # adapters / generators / GcBlocks
    assert not optimised & {id(p) for p in teacher.parameters()}
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = method.load_from_checkpoint(path, student=tiny(), teacher=tiny(**WIDE), optimizer=adam())
    state, expected = loaded.state_dict(), module.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DetPKD(tiny(), tiny(), weight=-1.0), r"^model.init_args.weight: must be a finite number >= 0"),
        (lambda: DetMGD(tiny(), tiny(), lambda_mask=1.0), r"^model.init_args.lambda_mask: must be in \[0, 1\)"),
        (lambda: DetFGD(tiny(), tiny(), temperature=0.0), r"^model.init_args.temperature: "),
        (lambda: DetFGD(tiny(), tiny(), alpha_fg=-1.0), r"^model.init_args.alpha_fg: must be a finite number >= 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(make: Any, match: str) -> None:
    with pytest.raises(KDConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)
