"""LLKD as a LightningModule: data regimes, frozen teacher, thresholds per step, pool usage (monotone, resumed),
logging, argument errors; CLI fit on digits."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kd_lightning.data import LABELED, UNLABELED, SemiSupervisedDataModule, TransferSetDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.methods.llkd import LLKD
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet
from tests.helpers.tiny import tiny_trainer as tiny_trainer_base


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return tiny_trainer_base(tmp_path, **{"limit_val_batches": 1, **kwargs})


def semi_data() -> SemiSupervisedDataModule:
    """48 unlabeled + 16 labeled blobs: 3 steps per epoch."""
    return SemiSupervisedDataModule(
        source=BlobsDataModule(per_class=16), labeled_fraction=0.25, batch_size=8, unlabeled_batch_size=16
    )


def method(**kwargs) -> LLKD:
    torch.manual_seed(0)
    defaults = {"momentum": 0.9, "optimizer": lambda p: torch.optim.Adam(p, lr=0.05)}
    return LLKD(TinyNet(), TinyNet(hidden=32), **{**defaults, **kwargs})


class PoolSpy(Callback):
    """The pool fraction and thresholds after every training batch, and the state at the first batch."""

    def __init__(self) -> None:
        self.fractions: list[float] = []
        self.updates: list[int] = []
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first is None:
            self.first = (pl_module.pool_usage.used.clone(), pl_module.criterion.thresholds.teacher.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.fractions.append(pl_module.pool_usage.fraction().item())
        self.updates.append(int(pl_module.criterion.thresholds.num_updates))


def test_refuses_a_plain_supervised_data_module(tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match=r"data: BlobsDataModule serves labeled batches but LLKD trains on"):
        trainer(tmp_path).fit(method(), datamodule=BlobsDataModule())


def test_teacher_frozen_student_trained_and_thresholds_move_each_step(tmp_path: Path) -> None:
    module = method()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    spy = PoolSpy()
    run = trainer(tmp_path, max_epochs=2, callbacks=[spy])
    run.fit(module, datamodule=semi_data())
    assert run.global_step == 6 and spy.updates == [1, 2, 3, 4, 5, 6]  # one update per step
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    assert any(not torch.equal(v, student_before[k]) for k, v in module.student.state_dict().items())
    assert not torch.allclose(module.criterion.thresholds.teacher, torch.full((4,), 0.5))
    assert "criterion.thresholds.teacher" in module.state_dict() and "pool_usage.used" in module.state_dict()


def test_pool_fraction_is_monotone_and_logged(tmp_path: Path) -> None:
    module = method(teacher_threshold_init=0.0, student_threshold_init=0.0, threshold_mode="batch_mean")
    spy = PoolSpy()
    run = trainer(tmp_path, max_epochs=2, callbacks=[spy])
    run.fit(module, datamodule=semi_data())
    assert module.pool_usage.size == 48
    assert all(b >= a for a, b in zip(spy.fractions, spy.fractions[1:], strict=False))
    assert 0 < spy.fractions[-1] <= 1
    metrics = run.callback_metrics
    assert metrics["train/pool_fraction_used_epoch"].item() == pytest.approx(spy.fractions[-1])
    assert {"train/selected_fraction_step", "train/selected_fraction_epoch", "train/ce", "train/llkd"} <= set(metrics)
    assert 0 <= metrics["train/selected_fraction_epoch"].item() <= 1
    per_class = [k for k in metrics if k.startswith("train/selected_fraction_class")]
    assert per_class and all(0 <= metrics[k].item() <= 1 for k in per_class)
    for k in range(4):
        assert metrics[f"train/threshold_teacher_class{k}"].item() == pytest.approx(
            module.criterion.thresholds.teacher[k].item()
        )
        assert f"train/threshold_student_class{k}" in metrics


@pytest.mark.filterwarnings("ignore:.*the `self.trainer` reference is not registered")
def test_pool_usage_records_the_selected_pool_indices() -> None:
    def batch() -> dict:
        g = torch.Generator().manual_seed(0)
        x_l, x_u = torch.randn(4, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
        return {LABELED: (x_l, torch.tensor([0, 1, 2, 3])), UNLABELED: (x_u, torch.tensor([5, 7, 9]))}

    data = semi_data()
    data.setup("fit")
    everything = method(teacher_threshold_init=0.0, student_threshold_init=0.0, threshold_order="select_first")
    everything.check_data(data)
    terms, logits, y = everything.training_loss(batch())
    assert everything.pool_usage.used.nonzero().flatten().tolist() == [5, 7, 9]
    assert {"loss", "ce", "llkd"} <= set(terms) and logits.shape == (4, 4) and y.tolist() == [0, 1, 2, 3]
    nothing = method(teacher_threshold_init=1.0, student_threshold_init=1.0, threshold_order="select_first")
    nothing.check_data(data)
    terms, *_ = nothing.training_loss(batch())
    assert int(nothing.pool_usage.used.sum()) == 0 and terms["llkd"].item() == 0.0
    terms["loss"].backward()  # the labeled CE still trains the student


def test_pool_usage_and_thresholds_survive_resume(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    module = method(threshold_mode="batch_mean", teacher_threshold_init=0.0, student_threshold_init=0.0)
    first = trainer(tmp_path, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
    first.fit(module, datamodule=semi_data())
    saved_used, saved_teacher = module.pool_usage.used.clone(), module.criterion.thresholds.teacher.clone()
    assert int(saved_used.sum()) > 0
    spy = PoolSpy()
    resumed = method(threshold_mode="batch_mean", teacher_threshold_init=0.0, student_threshold_init=0.0)
    second = trainer(tmp_path, max_epochs=2, callbacks=[spy])
    second.fit(resumed, datamodule=semi_data(), ckpt_path=ckpt_dir / "last.ckpt")
    assert spy.first is not None
    assert torch.equal(spy.first[0], saved_used) and torch.equal(spy.first[1], saved_teacher)
    assert bool((resumed.pool_usage.used >= saved_used).all())
    assert int(resumed.criterion.thresholds.num_updates) == second.global_step == 6


def test_transfer_set_trains_on_pseudo_labels_alone(tmp_path: Path) -> None:
    data = TransferSetDataModule(source=BlobsDataModule(), transfer=BlobsDataModule(seed=1), batch_size=16)
    module = method()
    run = trainer(tmp_path)
    run.fit(module, datamodule=data)
    assert module.pool_usage.size == 64 and run.global_step == 4
    assert "train/llkd" in run.callback_metrics and "train/ce" not in run.callback_metrics
    with pytest.raises(KDConfigError, match=r"unlabeled_weight: is 0 but TransferSetDataModule serves no labels"):
        trainer(tmp_path).fit(method(unlabeled_weight=0.0), datamodule=data)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"momentum": 1.5}, "momentum"),
        ({"uncertainty": "variance"}, "uncertainty"),
        ({"threshold_mode": "percentile"}, "threshold_mode"),
        ({"empty": "raise"}, "empty"),
        ({"temperature": -1.0}, "temperature"),
        ({"labeled_weight": -1.0}, "labeled_weight"),
        ({"labeled_weight": 0.0, "unlabeled_weight": 0.0}, "unlabeled_weight"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=rf"model\.init_args\.{field}: "):
        method(**kwargs)


def test_cli_fit_on_digits(in_tmp: Path) -> None:
    cli = fit_config("digits_llkd.yaml")
    model = cli.model
    assert isinstance(model, LLKD)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"train/ce", "train/llkd", "train/selected_fraction", "train/pool_fraction_used", "val/acc"} <= set(metrics)
    assert int(model.criterion.thresholds.num_updates) == cli.trainer.global_step == 2
    assert model.criterion.thresholds.momentum == pytest.approx(0.99)
    assert 0 < model.pool_usage.fraction().item() <= 1
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    last = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=False)
    assert {"criterion.thresholds.teacher", "criterion.thresholds.student", "pool_usage.used"} <= set(
        last["state_dict"]
    )
