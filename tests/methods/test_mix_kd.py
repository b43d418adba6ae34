"""MixKD: the teacher sees the mixed batch, PMU/FMU switches, dominant-label accuracy, CLI fit."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.mix_kd import MixKD
from kd_lightning.models.checkpoints import load_weights
from tests.helpers.cli import fit_config
from tests.helpers.tiny import TinyNet


class InputSpy(nn.Module):
    """A network that records every input it sees."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_teacher_sees_the_mixed_batch_the_student_sees() -> None:
    torch.manual_seed(0)
    module = MixKD(student=InputSpy(TinyNet()), teacher=InputSpy(TinyNet()), num_classes=4)
    x, y = batch()
    torch.manual_seed(0)
    parts, logits, targets = module.training_loss((x, y))
    (seen_s,), (seen_t,) = module.student.seen, module.teacher.seen
    assert torch.equal(seen_s, seen_t)
    assert not torch.equal(seen_t, x)  # mixed (and permuted), not the clean batch
    assert set(parts) == {"loss", "ce", "kd"} and math.isfinite(parts["loss"].item())
    # train/acc is scored against the dominant label of each mixed sample
    torch.manual_seed(0)
    mixed_x, soft_y, plan = module.mix_batch(x, y)
    assert torch.equal(mixed_x, seen_s)
    assert torch.equal(targets, soft_y.argmax(-1))
    dominant = torch.where(plan.lam >= 0.5, y[plan.index_a], y[plan.index_b])
    assert torch.equal(targets, dominant)
    assert logits.shape == (16, 4)


def test_full_mixup_equals_partial_mixup_with_p_zero() -> None:
    x, y = batch(32)
    full = MixKD(student=TinyNet(), teacher=TinyNet(), mixup="full", num_classes=4)
    pmu0 = MixKD(student=TinyNet(), teacher=TinyNet(), mixup="partial", unmixed_fraction=0.0, num_classes=4)
    torch.manual_seed(7)
    a = full.mix_batch(x, y)
    torch.manual_seed(7)
    b = pmu0.mix_batch(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not a[2].unmixed.any()


def test_partial_mixup_unmixed_counts() -> None:
    x, y = batch(40)
    exact = MixKD(student=TinyNet(), teacher=TinyNet(), unmixed_sampling="exact", unmixed_fraction=0.75, num_classes=4)
    torch.manual_seed(0)
    mixed_x, soft_y, plan = exact.mix_batch(x, y)
    assert int(plan.unmixed.sum()) == 30
    assert torch.equal(mixed_x[plan.unmixed], x[plan.index_a[plan.unmixed]])
    none = MixKD(student=TinyNet(), teacher=TinyNet(), mixup="none", num_classes=4)
    mixed_x, soft_y, plan = none.mix_batch(x, y)
    assert plan.unmixed.all() and torch.equal(mixed_x, x[plan.index_a])
    assert torch.equal(soft_y.argmax(-1), y[plan.index_a]) and (soft_y.max(-1).values == 1).all()


def test_bad_arguments_named() -> None:
    for kwargs, field in (
        ({"mixup": "cutmix"}, "mixup"),
        ({"unmixed_fraction": 1.2}, "unmixed_fraction"),
        ({"unmixed_sampling": "poisson"}, "unmixed_sampling"),
        ({"beta_a": 0.0}, "beta_a"),
        ({"distill": "crd"}, "distill"),
    ):
        with pytest.raises(KDConfigError, match=f"model.init_args.{field}"):
            MixKD(student=TinyNet(), teacher=TinyNet(), **kwargs)
    with pytest.raises(KDConfigError, match="needs num_classes"):
        MixKD(student=TinyNet(), teacher=TinyNet()).training_loss(batch())


def test_cli_fit_digits(in_tmp: Path) -> None:
    cli = fit_config("digits_mix_kd.yaml")
    model = cli.model
    assert isinstance(model, MixKD)
    metrics = cli.trainer.callback_metrics
    for name in ("train/loss", "train/ce", "train/kd", "train/acc"):
        assert name in metrics and math.isfinite(float(metrics[name])), name
    assert 0.2 < float(metrics["train/mixed"]) < 0.7  # ≈ 41 % mixed with p = 0.9 drawn with replacement
    cached = load_weights(copy.deepcopy(model.teacher), model.teacher_ckpt)  # the teacher did not move
    for key, value in cached.state_dict().items():
        assert torch.equal(value, model.teacher.state_dict()[key]), key
    assert not model.teacher.training
