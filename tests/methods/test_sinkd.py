"""SinKD method: parts logged, frozen teacher, temperature annealing over epochs, argument errors, CLI fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.schedule import Progress
from kd_lightning.losses.transport import SinKDLoss
from kd_lightning.methods.sinkd import SinKD
from kd_lightning.models import SmallCNN
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


class TemperatureSpy(Callback):
    def __init__(self) -> None:
        self.temperatures: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.temperatures.append(pl_module.criterion.current_temperature())


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
    module = SinKD(student=TinyNet(), teacher=TinyNet(), loss=SinKDLoss(temperature=4.0, anneal_temperature=True))
    spy = TemperatureSpy()
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=0, callbacks=[spy])
    trainer.fit(module, datamodule=BlobsDataModule())
    assert spy.temperatures == pytest.approx([4.0, 2.5, 1.0])  # from T_0 to 1 at the last of max_epochs
    assert trainer.callback_metrics["train/kd_temperature"].item() == pytest.approx(1.0)


def test_anneal_epochs_and_constant_temperature() -> None:
    loss = SinKDLoss(temperature=3.0, anneal_temperature=True, anneal_epochs=5)
    assert loss.current_temperature() == 3.0  # no progress set yet: the initial temperature
    loss.set_progress(Progress(epoch=2, max_epochs=100))
    assert loss.current_temperature() == pytest.approx(1.0 + 2.0 * 2 / 4)  # linear to 1 over anneal_epochs = 5
    constant = SinKDLoss(temperature=3.0)
    constant.set_progress(Progress(epoch=2, max_epochs=100))
    assert constant.current_temperature() == 3.0


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"epsilon must be > 0"):
        SinKDLoss(epsilon=0.0)
    with pytest.raises(KDConfigError, match=r"anneal_epochs: must be >= 1"):
        SinKDLoss(anneal_epochs=0)
    loss = SinKDLoss(anneal_temperature=True)
    loss.set_progress(Progress(epoch=0, max_epochs=None))
    with pytest.raises(KDConfigError, match=r"set anneal_epochs or trainer.max_epochs"):
        loss.current_temperature()  # no anneal_epochs and no known run length


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
