"""The DistillationModule contract: frozen teacher in eval mode, checks, checkpoints, export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.errors import KDConfigError, TeacherCheckpointError
from kd_lightning.methods import DKD, PLD, LogitStandardKD, Supervised, VanillaKD
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


class TeacherModeSpy(Callback):
    """Record the teacher's mode and gradient flags at every step of every stage."""

    def __init__(self) -> None:
        self.modes: list[bool] = []
        self.grads: list[bool] = []

    def _record(self, pl_module: L.LightningModule) -> None:
        self.modes.extend(m.training for m in pl_module.teacher.modules())
        self.grads.extend(p.requires_grad for p in pl_module.teacher.parameters())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(pl_module)


METHODS = [VanillaKD, DKD, LogitStandardKD, PLD]


@pytest.mark.parametrize("method", METHODS)
def test_teacher_frozen_and_in_eval_mode_through_fit_validate_and_train_call(method, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = method(student=TinyNet(), teacher=TinyNet(hidden=32))
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    module.train()  # Lightning issue #18930: a .train() call before fit used to flip a frozen teacher
    assert not module.teacher.training and module.student.training
    spy = TeacherModeSpy()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[spy])
    trainer.fit(module, datamodule=BlobsDataModule())
    trainer.validate(module, datamodule=BlobsDataModule(), verbose=False)
    assert spy.modes and not any(spy.modes)
    assert spy.grads and not any(spy.grads)
    after = module.teacher.state_dict()
    for key, value in before.items():  # weights and BatchNorm running statistics unchanged
        assert torch.equal(value, after[key]), key
    module.train()
    assert not module.teacher.training


def test_only_student_parameters_are_optimised(tmp_path: Path) -> None:
    module = VanillaKD(student=TinyNet(), teacher=TinyNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.student.parameters()}


def test_student_learns_and_metrics_logged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = Supervised(TinyNet(), optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    tiny_trainer(tmp_path, max_epochs=15).fit(teacher, datamodule=BlobsDataModule())
    module = VanillaKD(student=TinyNet(), teacher=teacher.model, optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    trainer = tiny_trainer(tmp_path, max_epochs=15)
    trainer.fit(module, datamodule=BlobsDataModule())
    metrics = trainer.callback_metrics
    for name in (
        "train/loss",
        "train/ce",
        "train/kd",
        "train/acc",
        "val/acc",
        "val/acc_top5",
        "val/loss",
        "val/teacher_acc",
        "val/agreement",
        "val/kl_to_teacher",
        "train/samples_per_sec",
    ):
        assert name in metrics, name
    assert metrics["val/teacher_acc"] > 0.9
    assert metrics["val/acc"] > 0.9
    assert metrics["val/agreement"] > 0.9
    assert 0 <= metrics["val/kl_to_teacher"] < 0.5


def test_class_count_mismatch_named_at_setup(tmp_path: Path) -> None:
    module = PLD(student=TinyNet(num_classes=4), teacher=TinyNet(num_classes=10))
    with pytest.raises(KDConfigError, match=r"model.init_args.teacher: TinyNet outputs 10 classes .* has 4"):
        tiny_trainer(tmp_path).fit(module, datamodule=BlobsDataModule(num_classes=4))


def test_num_classes_argument_must_match_data(tmp_path: Path) -> None:
    module = PLD(student=TinyNet(), teacher=TinyNet(), num_classes=5)
    with pytest.raises(KDConfigError, match=r"model.init_args.num_classes: is 5 but BlobsDataModule has 4 classes"):
        tiny_trainer(tmp_path).fit(module, datamodule=BlobsDataModule())


def test_input_shape_mismatch_named(tmp_path: Path) -> None:
    module = PLD(student=TinyNet(in_features=64), teacher=TinyNet())
    with pytest.raises(KDConfigError, match=r"model.init_args.student: TinyNet fails on an input of shape"):
        tiny_trainer(tmp_path).fit(module, datamodule=BlobsDataModule())


def test_missing_teacher_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TeacherCheckpointError, match=r"teacher_ckpt: no file at .*nope.ckpt"):
        VanillaKD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(tmp_path / "nope.ckpt"))


def test_teacher_loaded_from_lightning_checkpoint_and_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    supervised = Supervised(TinyNet(), optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    trainer.fit(supervised, datamodule=BlobsDataModule())
    lightning_ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(lightning_ckpt)
    state_dict_file = tmp_path / "teacher_sd.pt"
    torch.save(supervised.model.state_dict(), state_dict_file)
    repdistiller_style = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": supervised.model.state_dict(), "epoch": 240}, repdistiller_style)
    want = supervised.model.state_dict()
    for path in (lightning_ckpt, state_dict_file, repdistiller_style):
        module = PLD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(path))
        for key, value in module.teacher.state_dict().items():
            assert torch.equal(value, want[key]), (path.name, key)


def test_teacher_checkpoint_that_does_not_fit_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ten_classes.pt"
    torch.save(TinyNet(num_classes=10).state_dict(), path)
    with pytest.raises(TeacherCheckpointError, match=r"does not fit TinyNet: .*size mismatch"):
        PLD(student=TinyNet(), teacher=TinyNet(num_classes=4), teacher_ckpt=str(path))
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(TeacherCheckpointError, match="keys do not match TinyNet"):
        PLD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(path))


def test_checkpoint_round_trip_and_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DKD(student=TinyNet(), teacher=TinyNet(), beta=2.0, warmup_epochs=3)
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    data = BlobsDataModule()
    trainer.fit(module, datamodule=data)
    ckpt = tmp_path / "dkd.ckpt"
    trainer.save_checkpoint(ckpt)
    # Outside the CLI the networks are not pickled into the checkpoint: pass them again.
    restored = DKD.load_from_checkpoint(ckpt, student=TinyNet(), teacher=TinyNet())
    assert restored.hparams.beta == 2.0 and restored.criterion.warmup_epochs == 3
    x = torch.randn(5, 1, 4, 4)
    module.eval(), restored.eval()
    assert torch.allclose(module(x), restored(x))
    assert torch.allclose(module.teacher(x), restored.teacher(x))
    assert not restored.teacher.training and not any(p.requires_grad for p in restored.teacher.parameters())

    exported = module.export_student(tmp_path / "student.pt")
    payload = torch.load(exported, weights_only=True)  # plain torch, no kd-lightning classes needed
    fresh = TinyNet()
    fresh.load_state_dict(payload["state_dict"])
    fresh.eval()
    assert torch.allclose(fresh(x), module(x))
    assert payload["class_name"] == "TinyNet" and payload["num_classes"] == 4


def test_dkd_warmup_factor_counts_epochs_from_one() -> None:
    from kd_lightning.losses.schedule import Progress

    loss = DKD(student=TinyNet(), teacher=TinyNet(), warmup_epochs=20).criterion
    assert loss.warmup_factor() == 1.0  # no training progress set: the full weights (standalone use)
    loss.set_progress(Progress(epoch=0))
    assert loss.warmup_factor() == pytest.approx(1 / 20)  # epochs count from 1, as mdistiller
    loss.set_progress(Progress(epoch=25))
    assert loss.warmup_factor() == 1.0
    no_warmup = DKD(student=TinyNet(), teacher=TinyNet(), warmup_epochs=0).criterion
    no_warmup.set_progress(Progress(epoch=0))
    assert no_warmup.warmup_factor() == 1.0


def test_dkd_warmup_is_applied_during_fit(tmp_path: Path) -> None:
    module = DKD(student=TinyNet(), teacher=TinyNet(), warmup_epochs=4)
    tiny_trainer(tmp_path, max_epochs=2).fit(module, datamodule=BlobsDataModule())
    assert module.criterion.progress.epoch == 1 and module.criterion.warmup_factor() == pytest.approx(2 / 4)


def test_plain_lightning_usage_with_any_modules(tmp_path: Path) -> None:
    """The README's 'in your own project' snippet: any teacher/student, dataloaders, plain Trainer."""
    from torch.utils.data import DataLoader

    from kd_lightning.losses import PLDLoss

    data = BlobsDataModule()
    data.setup("fit")
    module = PLD(student=TinyNet(), teacher=TinyNet(), num_classes=4, temperature=4.0)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, DataLoader(data.train_set, batch_size=8), DataLoader(data.val_set, batch_size=8))
    assert isinstance(module.criterion, PLDLoss)
    assert "val/acc" in trainer.callback_metrics
