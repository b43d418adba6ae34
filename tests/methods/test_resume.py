"""Resuming from a checkpoint is exact: the losses after resuming equal an uninterrupted run's."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from kd_lightning.methods import VanillaKD
from tests.helpers.cli import QUICKSTART_ARGS, fit
from tests.helpers.tiny import BlobsDataModule


class DropoutNet(nn.Module):
    """A tiny classifier with dropout: its training draws random numbers every step."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class NoRandomState(VanillaKD):
    """The same method without the random-state callback (the check below must be able to fail)."""

    def configure_callbacks(self) -> list[Callback]:
        return []


def _fit(cls: type, root: Path, epochs: int, ckpt_path: str | None = None) -> tuple[LossRecorder, ModelCheckpoint]:
    L.seed_everything(0, workers=True)
    module = cls(student=DropoutNet(), teacher=DropoutNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    recorder = LossRecorder()
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, every_n_epochs=1)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, checkpoint],
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=BlobsDataModule(per_class=24, batch_size=8), ckpt_path=ckpt_path)
    return recorder, checkpoint


@pytest.mark.parametrize("cls", [VanillaKD, NoRandomState], ids=["with_random_state", "without"])
def test_resumed_losses_equal_an_uninterrupted_run(cls: type, tmp_path: Path) -> None:
    full, _ = _fit(cls, tmp_path / "full", epochs=3)
    first, checkpoint = _fit(cls, tmp_path / "split", epochs=1)
    resumed, _ = _fit(cls, tmp_path / "split", epochs=3, ckpt_path=checkpoint.last_model_path)
    per_epoch = len(first.losses)
    assert first.losses == full.losses[:per_epoch]
    assert len(resumed.losses) == 2 * per_epoch
    if cls is VanillaKD:
        assert resumed.losses == full.losses[per_epoch:]
    else:  # without the stored random states the data order and dropout masks differ
        assert resumed.losses != full.losses[per_epoch:]


def test_cli_resume_continues_in_the_same_version_folder(in_tmp: Path) -> None:
    first = fit([*QUICKSTART_ARGS, "--trainer.max_epochs=1"])
    last = Path(first.trainer.checkpoint_callback.last_model_path)
    resumed = fit([*QUICKSTART_ARGS, "--trainer.max_epochs=2", f"--ckpt_path={last}"])
    assert resumed.trainer.log_dir == first.trainer.log_dir
    assert Path(resumed.trainer.checkpoint_callback.last_model_path) == last
    assert resumed.trainer.current_epoch == 2
