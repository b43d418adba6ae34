"""CRD: a real fit, memory sized from the data, checkpoint round trip and resume, clear errors, the CLI."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.crd import CRD
from kd_lightning.models import SmallCNN
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


def make(**kwargs) -> CRD:
    kwargs.setdefault("num_negatives", 20)
    kwargs.setdefault("optimizer", lambda p: torch.optim.Adam(p, lr=0.01))
    return CRD(TinyNet(), TinyNet(hidden=32), student_layers=["body"], teacher_layers=["body"], **kwargs)


def test_fit_builds_memory_from_the_data_and_trains_heads_not_teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = make()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    data = BlobsDataModule(return_index=True)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/crd"] > 0
    assert {"train/ce", "train/crd", "val/acc", "val/teacher_acc"} <= set(metrics)
    memory = module.crd.memory
    assert memory.num_samples == 64 and module.crd.num_negatives == 20
    assert torch.equal(memory.labels, data.train_set.tensors[1])  # "exact" sampling reads the training labels
    assert memory.student_bank.norm(dim=1).tolist() == pytest.approx([1.0] * 64, rel=1e-5)  # every row updated
    assert module.crd.z_is_set
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in module.crd.parameters())  # both embedding heads
    assert not any(id(p) in optimised for p in module.teacher.parameters())
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert not module.teacher.training
    # the banks keep themselves identical across ranks: DDP must not broadcast them every step
    banks = ["crd.memory.student_bank", "crd.memory.teacher_bank", "crd.memory.labels"]
    assert module._ddp_params_and_buffers_to_ignore == banks


def test_total_is_weighted_sum_and_kd_term_optional(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = make(ce_weight=0.5, crd_weight=2.0, kd_weight=0.3, sampling="instance", num_samples=8, num_negatives=5)
    module.build_from_input((1, 4, 4))
    module._build_memory(8, None)
    x, y, index = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 3, 5, 7])
    parts, logits = module.training_loss((x, y, index))
    assert set(parts) == {"loss", "ce", "crd", "kd"}
    assert parts["loss"].item() == pytest.approx((parts["ce"] + parts["crd"] + parts["kd"]).item(), rel=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert parts["ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-6)


def test_checkpoint_round_trip_and_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = make()
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=BlobsDataModule(return_index=True))
    ckpt = tmp_path / "crd.ckpt"
    trainer.save_checkpoint(ckpt)

    restored = CRD.load_from_checkpoint(ckpt, student=TinyNet(), teacher=TinyNet(hidden=32))
    for name, value in module.crd.state_dict().items():
        assert torch.equal(restored.crd.state_dict()[name], value), name
    assert restored.crd.z_is_set and restored.crd.memory.has_labels

    seen: dict[str, torch.Tensor] = {}

    class Peek(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: CRD) -> None:
            seen["bank"] = pl_module.crd.memory.teacher_bank.clone()
            seen["log_z"] = pl_module.crd.log_z.clone()

    resumed = make()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[Peek()])
    trainer.fit(resumed, datamodule=BlobsDataModule(return_index=True), ckpt_path=ckpt)
    assert torch.equal(seen["bank"], module.crd.memory.teacher_bank)  # the saved banks, not fresh random ones
    assert torch.equal(seen["log_z"], module.crd.log_z)
    assert trainer.global_step == 8  # 4 batches per epoch, continued from epoch 1
    assert not torch.equal(resumed.crd.memory.teacher_bank, module.crd.memory.teacher_bank)


def test_resume_on_a_different_training_set_fails_clearly(tmp_path: Path) -> None:
    module = make()
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, datamodule=BlobsDataModule(return_index=True))
    ckpt = tmp_path / "crd.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(KDConfigError, match=r"checkpoint's CRD memory has 64 rows but this run's training set has 32"):
        tiny_trainer(tmp_path, max_epochs=2).fit(
            make(), datamodule=BlobsDataModule(per_class=8, return_index=True), ckpt_path=ckpt
        )


def test_num_negatives_above_the_data_is_clipped_with_a_warning(tmp_path: Path) -> None:
    module = make(num_negatives=16384)
    with pytest.warns(UserWarning, match=r"num_negatives=16384 exceeds the 63 other samples"):
        tiny_trainer(tmp_path).fit(module, datamodule=BlobsDataModule(return_index=True))
    assert module.crd.num_negatives == 63


def test_missing_indices_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match=r"BlobsDataModule serves no indices: set data.init_args.return_index"):
        tiny_trainer(tmp_path).fit(make(), datamodule=BlobsDataModule(return_index=False))
    with pytest.raises(KDConfigError, match=r"carries no indices: set data.init_args.return_index"):
        CRD.batch_index((torch.randn(2, 1, 4, 4), torch.tensor([0, 1])))
    module = make(sampling="instance", num_samples=8, num_negatives=5, input_shape=[1, 4, 4])
    module._build_memory(8, None)
    with pytest.raises(KDConfigError, match=r"dataset index 9 but its memory has 8 rows"):
        module.training_loss((torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), torch.tensor([3, 9])))


def test_bad_arguments_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.nce_temperature must be > 0"):
        make(nce_temperature=0.0)
    with pytest.raises(KDConfigError, match=r"model.init_args.sampling must be one of"):
        make(sampling="hard")
    with pytest.raises(KDConfigError, match=r"model.init_args.student_layers: CRD embeds one feature"):
        CRD(TinyNet(), TinyNet(), student_layers=["body.1", "body.3"], teacher_layers=["body"])
    with pytest.raises(KDConfigError, match=r"model.init_args.num_samples=10 but BlobsDataModule's training set has"):
        tiny_trainer(tmp_path).fit(make(num_samples=10), datamodule=BlobsDataModule(return_index=True))


def test_default_layers_are_the_pooled_features() -> None:
    module = CRD(SmallCNN(widths=[8, 16]), SmallCNN(widths=[32]))
    assert module.student_layers == ["flatten"] and module.teacher_layers == ["flatten"]
    module.build_from_input((1, 8, 8))
    assert module.crd.embed_student.linear.in_features == 16 and module.crd.embed_teacher.linear.in_features == 32


def test_cli_fit_of_the_digits_config(in_tmp: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = fit_config("digits_crd.yaml")
    assert not [w for w in caught if "num_negatives" in str(w.message)]  # K = 512 fits the 1,077 digits
    model = cli.model
    assert isinstance(model, CRD) and cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.trainer.callback_metrics["train/crd"] > 0
    assert model.crd.memory.num_samples == len(cli.datamodule.train_set) and model.crd.num_negatives == 512
    assert not model.teacher.training


class _CheckBanksAcrossRanks(L.Callback):
    """Inside each DDP worker: DDP ignores the banks, and after training every rank holds the same banks."""

    def on_train_start(self, trainer: L.Trainer, pl_module: CRD) -> None:
        ignored = trainer.strategy.model.parameters_to_ignore
        assert {"crd.memory.student_bank", "crd.memory.teacher_bank", "crd.memory.labels"} <= ignored

    def on_train_end(self, trainer: L.Trainer, pl_module: CRD) -> None:
        for name in ("student_bank", "teacher_bank"):
            bank = getattr(pl_module.crd.memory, name)
            other = trainer.strategy.all_gather(bank)
            assert torch.equal(other[0], other[1]), name
        log_z = trainer.strategy.all_gather(pl_module.crd.log_z)
        assert torch.equal(log_z[0], log_z[1])
        assert pl_module.crd.memory.student_bank.norm(dim=1).tolist() == pytest.approx([1.0] * 64, rel=1e-5)


def _lightning_ddp_worker(rank: int, port: int, root: str) -> None:
    # Launched here (not by Lightning): FeatureTaps' hooks cannot be pickled, which rules out ddp_spawn.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0")
    os.environ["LOCAL_RANK"] = os.environ["RANK"] = str(rank)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different initial banks per rank: CRD must broadcast rank 0's
    module = make()
    trainer = tiny_trainer(Path(root), max_epochs=2, devices=2, strategy="ddp", callbacks=[_CheckBanksAcrossRanks()])
    trainer.fit(module, datamodule=BlobsDataModule(return_index=True, batch_size=8))


@pytest.mark.slow
@pytest.mark.ddp
def test_lightning_ddp_fit_keeps_banks_identical(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_lightning_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
