"""SwingKD: privacy sources through a real fit, per-item temperatures in the step, clear errors, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.swing import SwingLoss
from kd_lightning.methods.swing import SwingKD
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


def test_training_step_uses_per_sample_scores_by_dataset_index() -> None:
    torch.manual_seed(0)
    scores = torch.tensor([0.0, 1.0, 0.25, 0.5])
    module = SwingKD(TinyNet(), TinyNet(), privacy_scores=scores, t_min=1.0, t_max=5.0, alpha=0.7, noise="none")
    module = module.double().eval()
    x, y, index = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])
    parts, _ = module.training_loss((x, y, index))
    expected = SwingLoss(t_min=1.0, t_max=5.0, alpha=0.7, noise="none")(
        module.student(x), module.teacher(x), y, privacy=torch.tensor([0.25, 1.0, 0.0])
    )
    for name in ("loss", "ce", "kd"):
        assert parts[name].item() == pytest.approx(expected[name].item(), rel=1e-6), name
    # by hand, item 1 (π = 1 → T = 5): T²·KL(softmax(z_T/5) ‖ softmax(z_S/5))
    s, t = module.student(x)[1].tolist(), module.teacher(x)[1].tolist()
    p = [math.exp(v / 5) for v in t]
    q = [math.exp(v / 5) for v in s]
    p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
    items, temps = module.criterion.per_item(module.student(x), module.teacher(x), torch.tensor([0.25, 1.0, 0.0]))
    assert temps.tolist() == pytest.approx([2.0, 5.0, 1.0])
    assert items[1].item() == pytest.approx(25 * sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-9)


def test_per_class_table_and_callable_sources() -> None:
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
    by_class = SwingKD(TinyNet(), TinyNet(), privacy_scores={1: 1.0}, num_classes=4, noise="none")
    assert by_class.privacy(x, y).tolist() == [0.0, 1.0, 0.0, 0.0]
    by_fn = SwingKD(TinyNet(), TinyNet(), privacy_scores=lambda x, y, i: (y >= 2).float(), noise="none")
    assert by_fn.privacy(x, y).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_fit_with_per_sample_scores_teacher_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = BlobsDataModule(return_index=True)
    scores = torch.zeros(64)
    scores[::4] = 1.0
    module = SwingKD(
        TinyNet(), TinyNet(), privacy_scores=scores, t_min=1.0, t_max=8.0, alpha=0.5, epsilon=5.0,
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
    )  # fmt: skip
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, logger=False)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"train/kd", "train/ce", "val/acc", "val/teacher_acc"} <= set(metrics)
    assert metrics["train/private_fraction"].item() == pytest.approx(0.25, abs=1e-6)
    assert metrics["train/mean_temperature"].item() == pytest.approx(1.0 + 7.0 * 0.25, rel=1e-5)
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not module.teacher.training


def test_per_sample_scores_without_indices_fail_clearly(tmp_path: Path) -> None:
    module = SwingKD(TinyNet(), TinyNet(), privacy_scores=torch.zeros(64))
    with pytest.raises(KDConfigError, match=r"serves no indices: set --data.init_args.return_index=true"):
        tiny_trainer(tmp_path).fit(module, datamodule=BlobsDataModule(return_index=False))
    # the same message when a batch without indices reaches the step (e.g. a hand-made loader)
    with pytest.raises(KDConfigError, match=r"carries no indices.*return_index=True"):
        module.training_loss((torch.randn(2, 1, 4, 4), torch.tensor([0, 1])))


def test_table_sizes_checked(tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match=r"per-class table needs 4 scores"):
        tiny_trainer(tmp_path).fit(
            SwingKD(TinyNet(), TinyNet(), privacy_scores=[0.0, 1.0]), datamodule=BlobsDataModule()
        )
    too_short = SwingKD(TinyNet(), TinyNet(), privacy_scores=torch.zeros(10))
    with pytest.raises(KDConfigError, match=r"has 10 per-sample scores but the training set has 64"):
        tiny_trainer(tmp_path).fit(too_short, datamodule=BlobsDataModule(return_index=True))
    with pytest.raises(KDConfigError, match=r"model.init_args: t_max must be >= t_min"):
        SwingKD(TinyNet(), TinyNet(), t_min=5.0, t_max=1.0)
    with pytest.raises(KDConfigError, match=r"model.init_args.privacy_scores: scores must lie in \[0, 1\]"):
        SwingKD(TinyNet(), TinyNet(), privacy_scores=[0.0, 3.0])


def test_cli_fit_digits_with_per_sample_file(in_tmp: Path) -> None:
    scores = torch.zeros(1079)  # one per sample of the digits training split
    scores[:540] = 1.0
    torch.save(scores, in_tmp / "scores.pt")
    cli = fit_config(
        "digits_swing.yaml",
        f"--model.init_args.privacy_scores={in_tmp / 'scores.pt'}",
        "--data.init_args.return_index=true",
        "--model.init_args.noise=gaussian",
        "--model.init_args.epsilon=5",
    )
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/kd"] > 0
    fraction = metrics["train/private_fraction"].item()
    assert 0.2 < fraction < 0.8  # 2 random batches of 64
    assert metrics["train/mean_temperature"].item() == pytest.approx(4.0 + 6.0 * fraction, rel=1e-5)
    assert not cli.model.teacher.training
