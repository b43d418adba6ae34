"""BDKD (online, two optimisers): both networks train, optimisers and gradients kept apart, modes, ECE, CLI fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.bd_kd import BDKD
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


def make(**kwargs) -> BDKD:
    torch.manual_seed(0)
    return BDKD(student=TinyNet(), teacher=TinyNet(hidden=32), **{"optimizer": sgd(0.1), **kwargs})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_step_changes_both_networks(tmp_path: Path) -> None:
    module = make()
    student, teacher = snapshot(module.student), snapshot(module.teacher)
    tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0).fit(module, datamodule=BlobsDataModule())
    for name, before, net in (("student", student, module.student), ("teacher", teacher, module.teacher)):
        changed = [k for k, v in net.state_dict().items() if k.endswith("weight") and not torch.equal(v, before[k])]
        assert changed, f"{name} weights did not change"


def test_two_separate_optimisers_each_over_its_own_network() -> None:
    module = make(teacher_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    (student_opt, teacher_opt), schedulers = module.configure_optimizers()
    assert isinstance(student_opt, torch.optim.SGD) and isinstance(teacher_opt, torch.optim.Adam)
    s_ids = {id(p) for g in student_opt.param_groups for p in g["params"]}
    t_ids = {id(p) for g in teacher_opt.param_groups for p in g["params"]}
    assert s_ids == {id(p) for p in module.student.parameters()}
    assert t_ids == {id(p) for p in module.teacher.parameters()}
    assert schedulers == []
    # Without teacher_optimizer the teacher gets the student's recipe (its own instance).
    (student_opt, teacher_opt), _ = make().configure_optimizers()
    assert type(teacher_opt) is torch.optim.SGD and teacher_opt is not student_opt


def test_no_gradient_crosses_between_the_networks() -> None:
    module = make(weighting="sigmoid")
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,))
    parts = module.criterion(module.student(x), module.teacher(x), y)
    (parts["ce"] + parts["kd_forward"] + parts["kd_reverse"]).backward(retain_graph=True)
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    module.student.zero_grad(set_to_none=True)
    (parts["teacher_ce"] + parts["teacher_kl"]).backward()
    assert all(p.grad is not None for p in module.teacher.parameters())
    assert all(p.grad is None for p in module.student.parameters())


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_both_schedulers_are_stepped(tmp_path: Path, interval: str) -> None:
    module = make(
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        teacher_optimizer=sgd(0.2),
        teacher_lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.1),
        lr_scheduler_interval=interval,
    )
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=BlobsDataModule())
    steps = 2 if interval == "epoch" else 4
    student_opt, teacher_opt = trainer.optimizers
    assert student_opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**steps)
    assert teacher_opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.1**steps)


class ModeSpy(Callback):
    def __init__(self) -> None:
        self.train_modes: list[bool] = []
        self.eval_modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train_modes.extend(m.training for m in pl_module.teacher.modules())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.eval_modes.extend(m.training for m in pl_module.teacher.modules())


def test_teacher_trains_in_train_mode_and_is_evaluated_in_eval_mode_with_ece(tmp_path: Path) -> None:
    module = make()
    assert module.teacher.training and all(p.requires_grad for p in module.teacher.parameters())
    spy = ModeSpy()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[spy])
    data = BlobsDataModule()
    trainer.fit(module, datamodule=data)
    assert spy.train_modes and all(spy.train_modes)
    assert spy.eval_modes and not any(spy.eval_modes)
    assert not module.teacher.training  # left in eval mode after fit
    metrics = trainer.callback_metrics
    for name in ("train/student_loss", "train/teacher_loss", "train/teacher_acc", "train/reverse_share"):
        assert torch.isfinite(metrics[name]), name
    for name in ("val/ece", "val/teacher_ece"):
        assert 0 <= metrics[name] <= 1, name

    # The logged ECE is the 15-bin L1 ECE of the softmax probabilities, recomputed here independently.
    module.eval()
    x, y = data.test_set.tensors
    with torch.no_grad():
        probs = {"ece": module.student(x).softmax(-1), "teacher_ece": module.teacher(x).softmax(-1)}
    trainer.test(module, datamodule=data, verbose=False)
    for name, p in probs.items():
        conf, pred = p.max(-1)
        correct = (pred == y).double()
        ece = 0.0
        for lo, hi in zip(torch.linspace(0, 1, 16)[:-1], torch.linspace(0, 1, 16)[1:]):
            in_bin = (conf > lo) & (conf <= hi)
            if in_bin.any():
                ece += in_bin.double().mean() * (correct[in_bin].mean() - conf[in_bin].double().mean()).abs()
        assert trainer.callback_metrics[f"test/{name}"].item() == pytest.approx(float(ece), abs=1e-5), name


def test_teacher_ckpt_initialises_the_teacher(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = TinyNet(hidden=32)
    path = tmp_path / "teacher.pt"
    torch.save(source.state_dict(), path)
    module = make(teacher_ckpt=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[key], value), key
    assert all(p.requires_grad for p in module.teacher.parameters())


def test_checkpoint_keeps_the_trained_teacher(tmp_path: Path) -> None:
    module = make()
    trainer = tiny_trainer(tmp_path, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=BlobsDataModule())
    ckpt = tmp_path / "bdkd.ckpt"
    trainer.save_checkpoint(ckpt)
    assert len(torch.load(ckpt, weights_only=False)["optimizer_states"]) == 2
    restored = BDKD.load_from_checkpoint(ckpt, student=TinyNet(), teacher=TinyNet(hidden=32))
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(restored.teacher.state_dict()[key], value), key


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.weighting must be 'hard' or 'sigmoid'"):
        make(weighting="soft")
    with pytest.raises(KDConfigError, match=r"model.init_args.temperature: must be a finite number > 0"):
        make(temperature=-1.0)


def test_cli_fit_of_the_digits_config(in_tmp: Path) -> None:
    cli = fit_config("digits_bd_kd.yaml")
    model = cli.model
    assert isinstance(model, BDKD)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/teacher_loss"])
    assert "val/ece" in metrics and "val/teacher_ece" in metrics
    _, teacher_opt = cli.trainer.optimizers
    assert isinstance(teacher_opt, torch.optim.AdamW)
    assert len(teacher_opt.state) == len(list(model.teacher.parameters()))  # the teacher's optimiser stepped
    assert not model.teacher.training
    assert not (in_tmp / "runs" / "teachers").exists()  # online: no teacher is trained beforehand
