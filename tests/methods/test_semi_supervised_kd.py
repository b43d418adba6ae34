"""SemiSupervisedKD, the data-regime checks of the classification task, and hidden labels."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.data import LABELED, UNLABELED, DigitsDataModule, SemiSupervisedDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import SemiSupervisedKD, Supervised, VanillaKD
from kd_lightning.models.small import SmallCNN
from tests.helpers.cli import fit_config


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return SmallCNN(widths=[4, 8]), SmallCNN(widths=[8, 16])


def _semi() -> SemiSupervisedDataModule:
    return SemiSupervisedDataModule(source=DigitsDataModule(), labeled_fraction=0.1, batch_size=8)


def test_loss_by_hand() -> None:
    student, teacher = _nets()
    method = SemiSupervisedKD(student, teacher, temperature=2.0, ce_weight=0.3, kd_weight=0.7, num_classes=10)
    x_l, y_l, x_u = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), torch.randn(5, 1, 8, 8)
    terms, logits, target = method.training_loss({LABELED: (x_l, y_l), UNLABELED: (x_u, torch.arange(5))})
    s = student(torch.cat([x_l, x_u]))
    with torch.no_grad():
        t = teacher.eval()(torch.cat([x_l, x_u]))
    ce = F.cross_entropy(s[:3], y_l)
    p_t = F.softmax(t / 2, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(terms["ce"], 0.3 * ce)
    torch.testing.assert_close(terms["kd"], 0.7 * kl)
    torch.testing.assert_close(terms["loss"], 0.3 * ce + 0.7 * kl)
    assert logits.shape == (3, 10) and torch.equal(target, y_l)


def test_kd_on_unlabeled_only_and_inputs_only_batches() -> None:
    student, teacher = _nets()
    method = SemiSupervisedKD(student, teacher, kd_on="unlabeled", ce_weight=0.0, kd_weight=1.0, temperature=1.0)
    method.student.eval()  # batch-norm statistics of the joint forward would differ between the two batches
    x_l, x_u = torch.randn(3, 1, 8, 8), torch.randn(5, 1, 8, 8)
    both = method.training_loss({LABELED: (x_l, torch.tensor([0, 1, 2])), UNLABELED: (x_u, torch.arange(5))})
    alone = method.training_loss({UNLABELED: (x_u, torch.arange(5))})
    torch.testing.assert_close(both[0]["kd"], alone[0]["kd"])  # the labeled inputs are left out of the KL
    assert len(alone) == 1 and "ce" not in alone[0]
    with pytest.raises(KDConfigError, match="kd_on"):
        SemiSupervisedKD(student, teacher, kd_on="labeled")


def test_kd_is_zero_when_the_student_is_the_teacher() -> None:
    _, teacher = _nets()
    method = SemiSupervisedKD(copy.deepcopy(teacher), teacher, ce_weight=0.0, kd_weight=1.0)
    method.student.eval()
    terms = method.training_loss({UNLABELED: (torch.randn(6, 1, 8, 8), torch.arange(6))})[0]
    assert abs(float(terms["kd"])) < 1e-6


def test_supervised_trains_on_the_labeled_part_only() -> None:
    student, _ = _nets()
    method = Supervised(student, num_classes=10)
    x_l, y_l = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    a = method.training_loss({LABELED: (x_l, y_l), UNLABELED: (torch.randn(5, 1, 8, 8), torch.arange(5))})[0]
    b = method.training_loss({LABELED: (x_l, y_l), UNLABELED: (torch.randn(5, 1, 8, 8) * 9, torch.arange(5))})[0]
    torch.testing.assert_close(a["loss"], b["loss"])
    assert method.batch_size_of({LABELED: (x_l, y_l), UNLABELED: (torch.randn(5, 1, 8, 8), torch.arange(5))}) == 8


class _NeedsUnlabeled(SemiSupervisedKD):
    data_regimes: ClassVar[frozenset[str]] = frozenset({"semi_supervised"})


def test_data_regimes_are_checked_at_setup() -> None:
    student, teacher = _nets()
    with pytest.raises(KDConfigError) as err:
        VanillaKD(student, teacher).check_data(_semi())
    message = str(err.value)
    assert message.startswith("data: SemiSupervisedDataModule serves labeled + unlabeled batches but VanillaKD")
    assert "SemiSupervisedKD, DHO, LLKD" in message
    with pytest.raises(KDConfigError, match=r"^data: DigitsDataModule serves labeled batches .* wrap it"):
        _NeedsUnlabeled(student, teacher).check_data(DigitsDataModule())
    SemiSupervisedKD(student, teacher).check_data(_semi())  # accepted
    Supervised(student).check_data(_semi())  # the labels-alone baseline


def _train(dm: SemiSupervisedDataModule, steps: int) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    student, teacher = _nets()
    method = SemiSupervisedKD(student, teacher, num_classes=10, fidelity=False)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(method, datamodule=dm)
    return {k: v.clone() for k, v in method.student.state_dict().items()}


def test_a_method_cannot_read_the_hidden_labels(tmp_path: Path) -> None:
    """Scrambling the labels of the unlabeled pool (after the split) leaves a training run bit-identical."""
    plain = _semi()
    plain.setup("fit")
    scrambled = _semi()
    scrambled.setup("fit")
    targets = scrambled.source.train_set.targets
    pool = torch.tensor(sorted(set(range(len(targets))) - set(scrambled.labeled_set.indices)))
    targets[pool] = (targets[pool] + 1 + torch.randint(0, 9, (len(pool),))) % 10  # every hidden label changes
    assert not torch.equal(targets, plain.source.train_set.targets)
    assert all(torch.equal(a, b) for a, b in zip(_train(plain, 6).values(), _train(scrambled, 6).values(), strict=True))


def test_cli_fit_reuses_the_sources_teacher(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    fit_config("digits_kd.yaml")
    first = capsys.readouterr().out
    cli = fit_config("digits_semi_kd.yaml")
    second = capsys.readouterr().out
    trained = re.findall(r"kd: (?:trained and cached|reused cached) teacher (\S+)", first)
    assert len(trained) == 1 and f"kd: reused cached teacher {trained[0]}" in second
    assert isinstance(cli.model, SemiSupervisedKD)
    metrics = cli.trainer.callback_metrics
    assert {"train/ce", "train/kd", "val/acc"} <= set(metrics) and math.isfinite(float(metrics["train/loss"]))
    assert not cli.model.teacher.training
    alone = fit_config("digits_semi_student.yaml")
    assert isinstance(alone.model, Supervised) and "val/acc" in alone.trainer.callback_metrics
