"""AdaKD as a LightningModule: LATF state per optimizer step, checkpointed, logged; CLI fit on digits."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.adakd import AdaKDLoss
from kd_lightning.methods.adakd import AdaKD
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet
from tests.helpers.tiny import tiny_trainer as tiny_trainer_base


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return tiny_trainer_base(tmp_path, **{"limit_val_batches": 1, **kwargs})


def method(**kwargs) -> AdaKD:
    torch.manual_seed(0)
    return AdaKD(
        TinyNet(), TinyNet(hidden=32), optimizer=lambda p: torch.optim.Adam(p, lr=0.05), loss=AdaKDLoss(**kwargs)
    )


# A student that learns fast from a random teacher: the AdaKD loss falls, so LATF shrinks r.
FAST_LATF = dict(warmup_fraction=0.0, ema_decay=0.0, loss_tolerance=0.0, ratio_step=0.2, min_ratio=0.3)


class StateSpy(Callback):
    def __init__(self) -> None:
        self.first: tuple[float, float, float, int] | None = None
        self.selected: list[float] = []
        self.ratios: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        c = pl_module.criterion
        if self.first is None:
            self.first = (c.ratio.item(), c.ema.item(), c.reference.item(), int(c.num_updates))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.selected.append(pl_module.criterion.last_selected_fraction)
        self.ratios.append(pl_module.criterion.ratio.item())


def test_latf_state_moves_per_step_is_logged_and_survives_resume(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    module = method(**FAST_LATF)
    spy = StateSpy()
    first = trainer(
        tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[spy, ModelCheckpoint(ckpt_dir, save_last=True)]
    )
    first.fit(module, datamodule=BlobsDataModule())
    c = module.criterion
    saved = (c.ratio.item(), c.ema.item(), c.reference.item(), int(c.num_updates))
    assert saved[3] == first.global_step == 8
    assert min(spy.ratios) < 1.0  # r moved down from r_0 = 1 ...
    assert all(0.3 - 1e-6 <= r <= 1.0 for r in spy.ratios)  # ... within [r_min, 1]
    assert min(spy.selected) < 1.0  # fewer items distilled once r < 1
    for name in ("train/adakd_ratio", "train/adakd_selected", "train/adakd_temperature", "train/adakd"):
        assert name in first.callback_metrics, name

    resumed_spy = StateSpy()
    resumed = method(**FAST_LATF)
    second = trainer(
        tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[resumed_spy, ModelCheckpoint(tmp_path / "ckpt2")]
    )
    second.fit(resumed, datamodule=BlobsDataModule(), ckpt_path=ckpt_dir / "last.ckpt")
    assert resumed_spy.first == pytest.approx(saved)
    assert int(resumed.criterion.num_updates) == second.global_step == 12


def test_one_update_per_optimizer_step_under_gradient_accumulation(tmp_path: Path) -> None:
    module = method()
    run = trainer(tmp_path, accumulate_grad_batches=2)
    run.fit(module, datamodule=BlobsDataModule())
    assert run.global_step == 2 and int(module.criterion.num_updates) == 2


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"min_ratio"):
        AdaKDLoss(min_ratio=0.0)
    with pytest.raises(KDConfigError, match=r"divergence"):
        AdaKDLoss(divergence="jsd")  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match=r"^model.init_args.teacher: AdaKD distils from a teacher and none"):
        AdaKD(TinyNet(), None)


def test_cli_fit_on_digits(in_tmp: Path) -> None:
    cli = fit_config("digits_adakd.yaml")
    model = cli.model
    assert isinstance(model, AdaKD)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"train/adakd", "train/ce", "train/adakd_ratio", "val/teacher_acc"} <= set(metrics)
    assert 0.3 <= model.ratio <= 1.0
    assert int(model.criterion.num_updates) == cli.trainer.global_step == 2
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    last = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=False)
    assert {"criterion.ratio", "criterion.ema", "criterion.reference"} <= set(last["state_dict"])
