"""TAID as a LightningModule: t per optimizer step, survives resume, logged; CLI fit on digits."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.taid import TAIDLoss
from kd_lightning.methods.taid import TAID
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet
from tests.helpers.tiny import tiny_trainer as tiny_trainer_base


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return tiny_trainer_base(tmp_path, **{"limit_val_batches": 1, **kwargs})


def method(**kwargs) -> TAID:
    torch.manual_seed(0)
    return TAID(
        TinyNet(), TinyNet(hidden=32), optimizer=lambda p: torch.optim.Adam(p, lr=0.05), loss=TAIDLoss(**kwargs)
    )


class ScheduleSpy(Callback):
    """t and momentum seen at the first training batch of the run."""

    def __init__(self) -> None:
        self.first: tuple[float, float, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first is None:
            c = pl_module.criterion
            self.first = (c.t.item(), c.momentum.item(), int(c.num_updates))


def test_schedule_state_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    module = method(alpha=0.2, beta=0.5)
    first = trainer(tmp_path, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
    first.fit(module, datamodule=BlobsDataModule())  # 4 optimizer steps
    saved = (module.criterion.t.item(), module.criterion.momentum.item(), int(module.criterion.num_updates))
    assert saved[2] == first.global_step == 4
    assert saved[0] > 0.4 and saved[1] != 0.0
    stored = torch.load(ckpt_dir / "last.ckpt", weights_only=False)["state_dict"]
    assert stored["criterion.t"].item() == pytest.approx(saved[0])

    spy = ScheduleSpy()
    resumed = method(alpha=0.2, beta=0.5)  # fresh module: t = t_start until the checkpoint is loaded
    second = trainer(
        tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[spy, ModelCheckpoint(tmp_path / "ckpt2")]
    )
    second.fit(resumed, datamodule=BlobsDataModule(), ckpt_path=ckpt_dir / "last.ckpt")
    assert spy.first == pytest.approx(saved)  # continued, not reset
    assert resumed.criterion.t.item() >= saved[0]
    assert int(resumed.criterion.num_updates) == second.global_step == 8


def test_one_update_per_optimizer_step_under_gradient_accumulation(tmp_path: Path) -> None:
    module = method()
    run = trainer(tmp_path, accumulate_grad_batches=2)
    run.fit(module, datamodule=BlobsDataModule())  # 4 micro-batches, 2 optimizer steps
    assert run.global_step == 2
    assert int(module.criterion.num_updates) == 2


def test_linear_schedule_from_estimated_stepping_batches_and_t_logged(tmp_path: Path) -> None:
    module = method(disable_adaptive=True, t_start=0.2, t_end=1.0)
    run = trainer(tmp_path, max_epochs=2)  # 8 steps; the last update runs at global_step 7
    run.fit(module, datamodule=BlobsDataModule())
    assert module.t == pytest.approx(0.2 + 0.8 * 7 / 8, rel=1e-6)
    assert "train/taid_t" in run.callback_metrics
    assert run.callback_metrics["train/taid_t"].item() == pytest.approx(
        0.2 + 0.8 * 6 / 8, rel=1e-6
    )  # t of the last batch


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"t_start and t_end"):
        TAIDLoss(t_start=0.9, t_end=0.5)
    with pytest.raises(KDConfigError, match=r"distil_ratio"):
        TAIDLoss(distil_ratio=2.0)


def test_cli_fit_on_digits(in_tmp: Path) -> None:
    cli = fit_config("digits_taid.yaml")
    model = cli.model
    assert isinstance(model, TAID)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"train/taid", "train/ce", "train/taid_t", "val/teacher_acc"} <= set(metrics)
    assert model.criterion.t.item() >= 0.4
    assert int(model.criterion.num_updates) == cli.trainer.global_step == 2
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    last = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=False)
    assert "criterion.t" in last["state_dict"] and "criterion.momentum" in last["state_dict"]
