"""SinKD method: parts logged, frozen teacher, temperature annealing over epochs, argument errors, CLI fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.transport import SinKDLoss
from kd_lightning.methods.sinkd import SinKD
from kd_lightning.models import SmallCNN
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


class TemperatureSpy(Callback):
    def __init__(self) -> None:
        self.temperatures: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.temperatures.append(pl_module.kd_temperature())


def test_fit_logs_parts_and_leaves_the_teacher_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SinKD(student=TinyNet(), teacher=TinyNet(hidden=32), optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    assert isinstance(module.criterion, SinKDLoss) and module.criterion.marginals == "unit"
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=BlobsDataModule())
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/ce", "train/kd", "train/sinkhorn"):
        assert torch.isfinite(metrics[name]), name
    assert metrics["train/sinkhorn"] > 0
    assert metrics["train/loss"].item() == pytest.approx(
        (metrics["train/ce"] + metrics["train/kd"] + metrics["train/sinkhorn"]).item(), rel=1e-5
    )
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not module.teacher.training


def test_temperature_annealed_linearly_over_the_run(tmp_path: Path) -> None:
    module = SinKD(student=TinyNet(), teacher=TinyNet(), temperature=4.0, anneal_temperature=True)
    spy = TemperatureSpy()
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=0, callbacks=[spy])
    trainer.fit(module, datamodule=BlobsDataModule())
    assert spy.temperatures == pytest.approx([4.0, 2.5, 1.0])  # from T_0 to 1 at the last of max_epochs
    assert trainer.callback_metrics["train/kd_temperature"].item() == pytest.approx(1.0)


def test_anneal_epochs_and_constant_temperature() -> None:
    module = SinKD(student=TinyNet(), teacher=TinyNet(), temperature=3.0, anneal_temperature=True, anneal_epochs=5)
    assert module.kd_temperature() == 3.0  # epoch 0
    assert SinKD(student=TinyNet(), teacher=TinyNet(), temperature=3.0).kd_temperature() == 3.0


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.epsilon must be > 0"):
        SinKD(student=TinyNet(), teacher=TinyNet(), epsilon=0.0)
    with pytest.raises(KDConfigError, match=r"model.init_args.anneal_epochs must be >= 1"):
        SinKD(student=TinyNet(), teacher=TinyNet(), anneal_epochs=0)
    module = SinKD(student=TinyNet(), teacher=TinyNet(), anneal_temperature=True)
    with pytest.raises(KDConfigError, match=r"model.init_args.anneal_epochs or trainer.max_epochs"):
        module.kd_temperature()  # no Trainer, no anneal_epochs: the run's length is unknown


def test_cli_fit_of_the_digits_config(in_tmp: Path) -> None:
    teacher = in_tmp / "teacher.pt"  # a given checkpoint: the CLI trains no teacher first (keeps the test short)
    torch.save(SmallCNN(in_channels=1, widths=[32, 64, 128], num_classes=10, dropout=0.2).state_dict(), teacher)
    cli = fit_config("digits_sinkd.yaml", f"--model.init_args.teacher_ckpt={teacher}")
    model = cli.model
    assert isinstance(model, SinKD)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/sinkhorn"] > 0
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    assert model.criterion.epsilon == 0.1 and model.criterion.n_iters == 20
