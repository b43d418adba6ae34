"""KLMixingKD: the mixed loss reaches the student, λ = 0 is vanilla KD, the entropy diagnostic, a CLI fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kd_lightning.losses.kl_mixing import MixedKLLoss
from kd_lightning.methods import VanillaKD
from kd_lightning.methods.kl_mixing import KLMixingKD
from tests.helpers.cli import fit_config
from tests.helpers.tiny import TinyNet


def test_criterion_and_lambda_zero_equals_vanilla_kd() -> None:
    torch.manual_seed(0)
    student, teacher = TinyNet(), TinyNet(hidden=32)
    mixed = KLMixingKD(student, teacher, reverse_weight=0.0, temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    vanilla = VanillaKD(student, teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    assert isinstance(mixed.criterion, MixedKLLoss) and mixed.criterion.reverse_weight == 0.0
    batch = (torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,)))
    student.eval()  # same BatchNorm output for both calls
    got, _ = mixed.training_loss(batch)
    want, _ = vanilla.training_loss(batch)
    for name in ("loss", "ce", "kd"):
        assert got[name].item() == pytest.approx(want[name].item(), rel=1e-6), name
    reverse = KLMixingKD(student, teacher, reverse_weight=1.0)
    assert reverse.training_loss(batch)[0]["kd"].item() != pytest.approx(got["kd"].item(), rel=1e-3)


def test_bad_reverse_weight_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"model.init_args.reverse_weight: must be in \[0, 1\]"):
        KLMixingKD(TinyNet(), TinyNet(), reverse_weight=-0.1)


def test_cli_fit_on_digits(in_tmp: Path) -> None:
    cli = fit_config("digits_kl_mixing.yaml")
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/kd"] > 0
    assert 0 < metrics["val/student_entropy"] < math.log(10)  # nats, below the uniform maximum
    assert torch.isfinite(metrics["val/kl_to_teacher"])
    assert cli.model.criterion.reverse_weight == 0.25
    assert not cli.model.teacher.training
    teacher = torch.load(cli.model.teacher_ckpt, weights_only=False)
    state = teacher.get("state_dict", teacher)
    for key, value in cli.model.teacher.state_dict().items():  # teacher unchanged by the student run
        stored = [v for k, v in state.items() if k == key or k.endswith("." + key)]
        assert len(stored) == 1 and torch.equal(stored[0], value), key
