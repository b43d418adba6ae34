"""TGeoKD: the fusion network is really trained (bilevel, one-step unroll), the student's step is the inner step."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.tgeo_kd import geometry_features
from kd_lightning.methods.tgeo_kd import TGeoKD
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet
from tests.helpers.tiny import tiny_trainer as tiny_trainer_base


def tiny_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return tiny_trainer_base(tmp_path, **{"num_sanity_val_steps": 0, **kwargs})


def make(**kwargs) -> TGeoKD:
    torch.manual_seed(0)
    defaults = dict(
        student=TinyNet(),
        teacher=TinyNet(hidden=32),
        temperature=2.0,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        fusion_optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
    )
    return TGeoKD(**{**defaults, **kwargs})


class StepRecorder(Callback):
    """Batch and weights around the first training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.batch = [b.clone() for b in batch]
            self.student_before = copy.deepcopy(pl_module.student.state_dict())
            self.fusion_before = copy.deepcopy(pl_module.fusion_net.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.student_after = copy.deepcopy(pl_module.student.state_dict())
            self.fusion_after = copy.deepcopy(pl_module.fusion_net.state_dict())


def hand_sgd_step(module: TGeoKD, rec: StepRecorder, fusion_state: dict, lr: float) -> dict[str, torch.Tensor]:
    """θ − lr·∇θ mean_i[α_i τ² KL_i + (1 − α_i) CE_i], α from ``fusion_state`` and detached, by hand."""
    x, y = rec.batch
    student = copy.deepcopy(module.student)
    student.load_state_dict(rec.student_before)
    student.train()
    fusion = copy.deepcopy(module.fusion_net)
    fusion.load_state_dict(fusion_state)
    logits = student(x)
    with torch.no_grad():
        teacher_logits = module.teacher(x)
        alpha = fusion(geometry_features(logits, teacher_logits, y, module.class_means, module.features))
    tau = module.temperature
    kl = F.kl_div(F.log_softmax(logits / tau, -1), F.softmax(teacher_logits / tau, -1), reduction="none").sum(-1)
    loss = (alpha * tau**2 * kl + (1 - alpha) * F.cross_entropy(logits, y, reduction="none")).mean()
    names, params = zip(*student.named_parameters())
    grads = torch.autograd.grad(loss, params)
    return {name: p.detach() - lr * g for name, p, g in zip(names, params, grads)}


@pytest.fixture(scope="module")
def one_step(tmp_path_factory: pytest.TempPathFactory) -> tuple[TGeoKD, StepRecorder]:
    module = make()
    rec = StepRecorder()
    trainer = tiny_trainer(tmp_path_factory.mktemp("tgeo"), max_steps=1, limit_val_batches=0, callbacks=[rec])
    trainer.fit(module, datamodule=BlobsDataModule(meta_split=0.25))
    return module, rec


def test_fusion_network_weights_change_after_one_step(one_step) -> None:
    _, rec = one_step
    changed = [not torch.equal(rec.fusion_before[k], rec.fusion_after[k]) for k in rec.fusion_before]
    assert all(changed), changed


def test_student_step_is_the_inner_step_with_alpha_from_the_updated_fusion_net(one_step) -> None:
    module, rec = one_step
    want = hand_sgd_step(module, rec, rec.fusion_after, lr=0.5)
    for name, value in want.items():
        assert torch.allclose(rec.student_after[name], value, atol=1e-6), name
    # The check can fail: the pre-update ω gives a different step.
    stale = hand_sgd_step(module, rec, rec.fusion_before, lr=0.5)
    assert any(not torch.allclose(rec.student_after[n], v, atol=1e-6) for n, v in stale.items())


def test_class_means_are_the_teacher_means_over_the_held_out_split(one_step) -> None:
    module, _ = one_step
    assert bool(module.class_means_ready)
    held = module.trainer.datamodule.meta_set
    x, y = next(iter(DataLoader(held, batch_size=len(held))))
    with torch.no_grad():
        probs = module.teacher(x).softmax(-1)
    want = torch.stack([probs[y == c].mean(0) for c in range(4)])
    assert torch.allclose(module.class_means, want, atol=1e-6)
    assert len(held) == 16  # 25 % of each class of 4 x 16 training samples


@pytest.mark.parametrize("unroll", ["full", "last_layer"])
def test_hypergradient_matches_finite_differences_and_leaves_the_student_alone(unroll: str) -> None:
    module = make(unroll=unroll, num_classes=4).double()
    assert module._unrolled == (["fc.weight", "fc.bias"] if unroll == "last_layer" else module._unrolled)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)
    xv, yv = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    teacher_logits = module.teacher(x)
    eta = 0.7

    def outer() -> tuple[torch.Tensor, list[torch.Tensor]]:
        return module.hypergradient(module.student(x), teacher_logits, y, xv, yv, eta)

    loss, grads = outer()
    assert loss > 0 and not loss.requires_grad
    assert all(p.grad is None for p in module.student.parameters())  # the outer loss gives the student nothing
    assert all(p.grad is None for p in module.fusion_net.parameters())
    assert sum(gr.abs().sum() for gr in grads) > 0
    direction = [torch.randn_like(p) for p in module.fusion_net.parameters()]
    eps = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(module.fusion_net.parameters(), direction):
                p.add_(sign * eps * d)
        values.append(outer()[0].item())
        with torch.no_grad():
            for p, d in zip(module.fusion_net.parameters(), direction):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction)).item()
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-10)
    assert abs(analytic) > 1e-8


def test_virtual_step_does_not_move_batchnorm_statistics() -> None:
    module = make(num_classes=4)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,))
    logits = module.student(x)
    before = copy.deepcopy(module.student.state_dict())
    module.hypergradient(logits, module.teacher(x), y, torch.randn(6, 1, 4, 4), torch.randint(0, 4, (6,)), 0.1)
    for key, value in module.student.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_class_means_from_training_batches(tmp_path: Path) -> None:
    module = make(class_mean_source="train_batches")
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=BlobsDataModule(meta_split=0.25))
    assert bool(module.class_means_ready)
    counts = module.class_mean_accumulator.counts
    assert counts.sum() == 48  # the 64 training samples minus the 16 held out, each seen once
    assert torch.allclose(module.class_means.sum(-1), torch.ones(4), atol=1e-6)
    assert torch.isfinite(trainer.callback_metrics["train/alpha_mean"])


def test_clear_errors(tmp_path: Path) -> None:
    module = make(num_classes=4)
    data = BlobsDataModule()
    data.setup("fit")
    with pytest.raises(KDConfigError, match=r"data: TGeoKD learns its fusion network on a held-out meta split"):
        tiny_trainer(tmp_path).fit(module, train_dataloaders=DataLoader(data.train_set, batch_size=8))
    with pytest.raises(KDConfigError, match=r"data.init_args.meta_split: is 0: TGeoKD learns"):
        tiny_trainer(tmp_path).fit(make(num_classes=4), datamodule=BlobsDataModule())
    with pytest.raises(KDConfigError, match=r"model.init_args.last_layer='head' is not a submodule"):
        make(unroll="last_layer", last_layer="head")
    with pytest.raises(KDConfigError, match=r"data.init_args.meta_split: must be in \[0, 1\)"):
        BlobsDataModule(meta_split=1.5)
    with pytest.raises(KDConfigError, match=r"model.init_args.features must be one of"):
        make(features="angles")


def test_checkpoint_round_trip_keeps_fusion_net_and_class_means(one_step, tmp_path: Path) -> None:
    module, _ = one_step
    path = tmp_path / "tgeo.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    fresh = make()  # num_classes unknown: the parts are built from the checkpoint's shapes
    assert fresh.fusion_net is None
    checkpoint = torch.load(path, weights_only=True)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(fresh.class_means, module.class_means) and bool(fresh.class_means_ready)
    for key, value in module.fusion_net.state_dict().items():
        assert torch.equal(fresh.fusion_net.state_dict()[key], value), key


def test_cli_fit_on_digits(in_tmp: Path) -> None:
    cli = fit_config("digits_tgeo_kd.yaml", "--model.init_args.unroll=last_layer")
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    for name in ("train/kd", "train/ce", "train/holdout_ce", "train/alpha_mean", "train/alpha_std", "val/acc"):
        assert name in metrics, name
    assert 0 < metrics["train/alpha_mean"] < 1
    assert not cli.model.teacher.training
    assert all(not p.requires_grad for p in cli.model.teacher.parameters())
    assert cli.model._unrolled == ["fc.weight", "fc.bias"]
    teacher = torch.load(cli.model.teacher_ckpt, weights_only=False)
    state = teacher.get("state_dict", teacher)
    for key, value in cli.model.teacher.state_dict().items():  # teacher unchanged by the student run
        stored = [v for k, v in state.items() if k == key or k.endswith("." + key)]
        assert len(stored) == 1 and torch.equal(stored[0], value), key


class RanksAgree(Callback):
    """At the end of a DDP fit, whether student and fusion network are identical on every rank."""

    def on_train_end(self, trainer, pl_module) -> None:
        for name, module in (("student", pl_module.student), ("fusion", pl_module.fusion_net)):
            flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, flat)
            assert all(torch.equal(gathered[0], other) for other in gathered[1:]), name
        assert bool(pl_module.class_means_ready)


@pytest.mark.ddp
def test_two_process_ddp_fit_keeps_student_and_fusion_net_in_sync(tmp_path: Path) -> None:
    """Ranks see different training and held-out batches; the manual all-reduce of both gradients keeps them equal."""
    module = make(optimizer=functools.partial(torch.optim.SGD, lr=0.1), fusion_optimizer=torch.optim.Adam)
    trainer = tiny_trainer(tmp_path, max_epochs=2, devices=2, strategy="ddp_spawn", callbacks=[RanksAgree()])
    trainer.fit(module, datamodule=BlobsDataModule(per_class=32, meta_split=0.25))
    assert trainer.state.finished
