"""DHO: two heads on one backbone, isolated gradients, the validation-only (α, β) search, checkpoints, CLI fits."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kd_lightning.data import SemiSupervisedDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.losses.dho import search_mixing
from kd_lightning.methods import DHO
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


def make(**kwargs: Any) -> DHO:
    torch.manual_seed(0)
    return DHO(TinyNet(), TinyNet(hidden=32), **kwargs)


def semi_data(**kwargs: Any) -> SemiSupervisedDataModule:
    blobs = BlobsDataModule(per_class=32, batch_size=16)
    return SemiSupervisedDataModule(
        source=blobs, labeled_fraction=0.25, batch_size=8, unlabeled_batch_size=16, **kwargs
    )


def batch(n_l: int = 4, n_u: int = 6) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return {
        "labeled": (torch.randn(n_l, 1, 4, 4, generator=g), torch.randint(0, 4, (n_l,), generator=g)),
        "unlabeled": (torch.randn(n_u, 1, 4, 4, generator=g), torch.arange(n_u)),
    }


def kl_batchmean(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    p_t = (teacher / tau).softmax(-1)
    return tau**2 * (p_t * (p_t.log() - (student / tau).log_softmax(-1))).sum(-1).mean()


# ------------------------------------------------------------------ loss and heads
def test_training_loss_by_hand_with_official_few_shot_weights() -> None:
    model = make()
    model.student.eval()  # BatchNorm in eval: the reference below sees the same statistics
    b = batch()
    (x_l, y), (x_u, _) = b["labeled"], b["unlabeled"]
    terms, prediction, targets = model.training_loss(b)
    body, fc, kd_head, teacher = model.student.body, model.student.fc, model.kd_head, model.teacher
    with torch.no_grad():
        ce = F.cross_entropy(fc(body(x_l)), y)
        kd_l = kl_batchmean(kd_head(body(x_l)), teacher(x_l), 2.0)
        kd_u = kl_batchmean(kd_head(body(x_u)), teacher(x_u), 2.0)
    assert terms["ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-5)
    assert terms["kd_labeled"].item() == pytest.approx(0.5 * kd_l.item(), rel=1e-5)
    assert terms["kd_unlabeled"].item() == pytest.approx(0.5 * kd_u.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(0.5 * (ce + kd_l + kd_u).item(), rel=1e-5)
    assert torch.equal(targets, y) and prediction.shape == (4, 4)
    imagenet = DHO(model.student, model.teacher, loss_weights="imagenet", kd_unlabeled_weight=0.25)
    imagenet.kd_head.load_state_dict(kd_head.state_dict())
    terms = imagenet.training_loss(b)[0]
    assert terms["loss"].item() == pytest.approx((ce + kd_l + 0.25 * kd_u).item(), rel=1e-5)


@pytest.mark.parametrize("forward_parts", ["separate", "joint"])
def test_backbone_runs_once_per_input(forward_parts: str) -> None:
    model = make(forward_parts=forward_parts)
    rows: list[int] = []
    model.student.body.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    model.training_loss(batch(4, 6))
    assert sum(rows) == 10 and len(rows) == (2 if forward_parts == "separate" else 1)
    rows.clear()
    model.eval()
    model(torch.randn(5, 1, 4, 4))
    assert rows == [5]


def test_joint_forward_equals_separate_forward_without_batch_statistics() -> None:
    model = make(forward_parts="joint")
    model.student.eval()
    joint = model.training_loss(batch())[0]
    model.forward_parts = "separate"
    separate = model.training_loss(batch())[0]
    for name in ("loss", "ce", "kd_labeled", "kd_unlabeled"):
        assert joint[name].item() == pytest.approx(separate[name].item(), rel=1e-5), name


def _grads(loss: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, bool]:
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {name: g is not None and bool(g.abs().sum() > 0) for name, g in zip(params, grads, strict=True)}


def test_gradient_isolation_ce_to_ce_head_kd_to_kd_head() -> None:
    model = make()
    terms = model.training_loss(batch())[0]
    params = {
        "backbone": model.student.body[1].weight,
        "ce_head": model.student.fc.weight,
        "kd_head": model.kd_head.weight,
    }
    assert _grads(terms["ce"], params) == {"backbone": True, "ce_head": True, "kd_head": False}
    for name in ("kd_labeled", "kd_unlabeled"):
        assert _grads(terms[name], params) == {"backbone": True, "ce_head": False, "kd_head": True}, name
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert {id(p) for p in model.kd_head.parameters()} <= {id(p) for p in model.trainable_parameters()}


def test_single_head_ablation_puts_every_loss_on_the_one_head() -> None:
    model = make(dual_head=False)
    assert model.kd_head is None and not hasattr(model, "mix_alpha")
    terms = model.training_loss(batch())[0]
    params = {"backbone": model.student.body[1].weight, "head": model.student.fc.weight}
    for name in ("ce", "kd_labeled", "kd_unlabeled"):
        assert _grads(terms[name], params) == {"backbone": True, "head": True}, name
    model.eval()
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(model(x), model.student(x))
    assert torch.allclose(model.predict_step((x, torch.zeros(3)), 0), model.student(x).softmax(-1))


def test_forward_is_the_log_of_the_probability_mixture() -> None:
    model = make()
    model.mix_alpha.fill_(0.3)
    model.mix_beta.fill_(1.5)
    model.eval()
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        feature = model.student.body(x)
        want = 0.3 * model.student.fc(feature).softmax(-1) + 0.7 * (model.kd_head(feature) / 1.5).softmax(-1)
        assert torch.allclose(model(x).exp(), want, atol=1e-6)
        assert torch.allclose(model.predict_step((x, torch.zeros(5)), 0), want, atol=1e-6)


def test_no_hooks_stay_on_the_student_and_the_module_pickles() -> None:
    model = make()
    model.training_loss(batch())
    model.eval()
    model(torch.randn(2, 1, 4, 4))
    for module in model.student.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module
    restored = pickle.loads(pickle.dumps(model))  # ddp_spawn sends the module to its processes
    x = torch.randn(3, 1, 4, 4)
    restored.eval()
    with torch.no_grad():
        assert torch.allclose(restored(x), model(x))


def test_kd_head_init_and_feature_scale() -> None:
    copied = make(kd_head_init="copy")
    assert torch.equal(copied.kd_head.weight, copied.student.fc.weight)
    assert copied.kd_head.weight is not copied.student.fc.weight
    fresh = make()
    assert fresh.kd_head.weight.shape == fresh.student.fc.weight.shape
    assert not torch.equal(fresh.kd_head.weight, fresh.student.fc.weight)
    scaled = make(kd_feature_scale=100.0)
    scaled.eval()
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        feature = scaled.student.body(x)
        z_ce, z_kd = scaled.heads(x)
        assert torch.allclose(z_ce, scaled.student.fc(feature), atol=1e-6)  # the CE head reads the raw feature
        assert torch.allclose(z_kd, scaled.kd_head(100 * F.normalize(feature, dim=-1)), atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_weights": "cifar"}, r"model.init_args.loss_weights: must be one of \['few_shot', 'imagenet'\]"),
        ({"ce_weight": -1.0}, "model.init_args.ce_weight: must be a finite number >= 0"),
        ({"temperature": 0.0}, "model.init_args.temperature: must be a finite number > 0"),
        ({"head": "fcc"}, "model.init_args.head: .*no submodule 'fcc'.*'fc'"),
        ({"head": "body"}, "model.init_args.head: TinyNet.body is a Sequential, not an nn.Linear"),
        ({"kd_head_init": "zeros"}, "model.init_args.kd_head_init: must be one of"),
        ({"mixing": "learned"}, "model.init_args.mixing: must be one of"),
        ({"forward_parts": "both"}, "model.init_args.forward_parts: must be one of"),
        ({"alpha": 1.5}, r"model.init_args.alpha: must be in \[0, 1\]"),
        ({"beta": 0.0}, "model.init_args.beta: must be a finite number > 0"),
        ({"alpha_grid": []}, "model.init_args.alpha_grid: is empty"),
        ({"beta_grid": [1.0, -2.0]}, "model.init_args.beta_grid: must be a finite number > 0"),
        ({"kd_feature_scale": -1.0}, "model.init_args.kd_feature_scale: must be a finite number > 0"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(KDConfigError, match=message):
        make(**kwargs)


def test_plain_supervised_data_is_refused() -> None:
    with pytest.raises(KDConfigError, match=r"data: BlobsDataModule serves labeled batches but DHO trains on labeled"):
        make().check_data(BlobsDataModule())


# ------------------------------------------------------------------ trainer: search, test, checkpoints
def _val_heads(model: DHO, dm: SemiSupervisedDataModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = dm.val_set.tensors
    model.eval()
    with torch.no_grad():
        z_ce, z_kd = model.heads(x)
    return z_ce, z_kd, y


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[DHO, SemiSupervisedDataModule, L.Trainer, dict]:
    tmp = tmp_path_factory.mktemp("dho")
    model = make(optimizer=lambda p: torch.optim.AdamW(p, lr=0.01))
    dm = semi_data()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    trainer = tiny_trainer(tmp, max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return model, dm, trainer, teacher_before


def pair(model: DHO) -> tuple[float, float]:
    """The stored (α, β) (float32 buffers), compared with ``pytest.approx``."""
    return float(model.mix_alpha), float(model.mix_beta)


def test_fit_searches_on_the_validation_split_and_stores_the_pair(fitted) -> None:
    model, dm, trainer, _ = fitted
    z_ce, z_kd, y = _val_heads(model, dm)
    alpha, beta, acc = search_mixing(z_ce, z_kd, y)
    assert pair(model) == pytest.approx((alpha, beta))
    metrics = trainer.callback_metrics
    assert metrics["val/acc_mixed_searched"].item() == pytest.approx(acc)
    assert metrics["val/acc"].item() == pytest.approx(acc)  # the pass is scored with the pair it chose
    assert (metrics["val/mix_alpha"].item(), metrics["val/mix_beta"].item()) == pytest.approx((alpha, beta))
    assert metrics["val/acc_ce_head"].item() == pytest.approx((z_ce.argmax(-1) == y).float().mean().item())
    assert metrics["val/acc_kd_head"].item() == pytest.approx((z_kd.argmax(-1) == y).float().mean().item())
    for name in ("train/ce", "train/kd_labeled", "train/kd_unlabeled", "train/acc", "val/agreement"):
        assert torch.isfinite(metrics[name]), name


def test_teacher_stays_frozen_in_eval_mode_and_unchanged(fitted) -> None:
    model, _, _, teacher_before = fitted
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


def test_test_stage_uses_the_stored_pair_and_never_searches(fitted, tmp_path: Path) -> None:
    model, dm, _, _ = fitted
    model.mix_alpha.fill_(0.35)
    model.mix_beta.fill_(4.0)
    out = tiny_trainer(tmp_path).test(model, datamodule=dm, verbose=False)[0]
    assert pair(model) == pytest.approx((0.35, 4.0))
    x, y = dm.test_set.tensors
    with torch.no_grad():
        z_ce, z_kd = model.heads(x)
    mixed = 0.35 * z_ce.softmax(-1) + 0.65 * (z_kd / 4.0).softmax(-1)
    assert out["test/acc"] == pytest.approx((mixed.argmax(-1) == y).float().mean().item())
    assert out["test/loss"] == pytest.approx(F.nll_loss(mixed.log(), y).item(), rel=1e-5)
    assert "test/acc_ce_head" in out and "test/acc_mixed_searched" not in out
    tiny_trainer(tmp_path).validate(model, datamodule=dm, verbose=False)  # post-hoc re-tuning on validation
    z_ce, z_kd, y = _val_heads(model, dm)
    assert pair(model) == pytest.approx(search_mixing(z_ce, z_kd, y)[:2])


def test_alpha_beta_and_kd_head_round_trip_through_a_checkpoint(fitted, tmp_path: Path) -> None:
    model, _, trainer, _ = fitted
    model.mix_alpha.fill_(0.65)
    model.mix_beta.fill_(1.25)
    path = tmp_path / "dho.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(5)
    loaded = DHO.load_from_checkpoint(path, student=TinyNet(), teacher=TinyNet(hidden=32), weights_only=False)
    assert pair(loaded) == pytest.approx((0.65, 1.25))
    assert torch.equal(loaded.kd_head.weight, model.kd_head.weight)
    loaded.eval()
    model.eval()
    x = torch.randn(4, 1, 4, 4)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))


def test_export_carries_the_kd_head_and_the_pair(tmp_path: Path) -> None:
    model = make()
    model.mix_alpha.fill_(0.25)
    payload = torch.load(model.export_student(tmp_path / "student.pt"), weights_only=True)
    dho = payload["dho"]
    assert dho["head"] == "fc" and dho["alpha"] == 0.25 and dho["beta"] == 0.5
    assert torch.equal(dho["kd_head"]["weight"], model.kd_head.weight.detach())
    assert "dho" not in torch.load(make(dual_head=False).export_student(tmp_path / "s.pt"), weights_only=True)


def test_fixed_mixing_keeps_alpha_and_beta(tmp_path: Path) -> None:
    model = make(mixing="fixed")
    trainer = tiny_trainer(tmp_path, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=semi_data())
    assert pair(model) == (0.5, 0.5)
    assert "val/acc_mixed_searched" not in trainer.callback_metrics
    assert "val/acc_kd_head" in trainer.callback_metrics


class PairAfterSanityCheck(L.Callback):
    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: DHO) -> None:
        self.pair = pair(pl_module)


def test_sanity_check_does_not_search(tmp_path: Path) -> None:
    model, seen = make(alpha=0.2, beta=2.0), PairAfterSanityCheck()
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, num_sanity_val_steps=2, callbacks=[seen])
    trainer.fit(model, datamodule=semi_data())
    assert seen.pair == pytest.approx((0.2, 2.0))
    assert pair(model) != pytest.approx((0.2, 2.0))  # the epoch's validation searched


# ------------------------------------------------------------------ DDP and CLI
class SameSearchOnEveryRank(L.Callback):
    """After each validation: every rank holds the same (α, β), the search result on the whole validation split."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: DHO) -> None:
        if trainer.sanity_checking:
            return
        stored = torch.stack([pl_module.mix_alpha, pl_module.mix_beta])
        gathered = [torch.zeros_like(stored) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, stored)
        z_ce, z_kd, y = _val_heads(pl_module, trainer.datamodule)
        pl_module.train()
        expected = torch.tensor(search_mixing(z_ce, z_kd, y)[:2], dtype=stored.dtype)
        assert all(torch.equal(g, expected) for g in gathered), (gathered, expected)
        assert not math.isnan(float(trainer.callback_metrics["val/acc_mixed_searched"]))


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_search_sees_the_whole_validation_split(tmp_path: Path) -> None:
    model = make()
    trainer = tiny_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        limit_train_batches=1,
        num_sanity_val_steps=0,
        callbacks=[SameSearchOnEveryRank()],
    )
    trainer.fit(model, datamodule=semi_data())  # validation: 64 items, 32 per rank, 2 batches of 16
    assert trainer.state.finished


def test_cli_fit_dual_and_single_head(in_tmp: Path) -> None:
    cli = fit_config("digits_dho.yaml")
    results, model = cli.results, cli.model
    assert isinstance(model, DHO) and model.dual_head and model.criterion.ce_weight == 0.5
    for name in ("train/ce", "train/kd_labeled", "train/kd_unlabeled", "val/acc_ce_head", "val/acc_kd_head"):
        assert math.isfinite(results[name]), name
    assert results["val/mix_alpha"] == float(model.mix_alpha) and results["val/mix_beta"] == float(model.mix_beta)
    assert results["val/acc"] == pytest.approx(results["val/acc_mixed_searched"])
    assert not model.teacher.training
    ckpt = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert float(ckpt["state_dict"]["mix_alpha"]) == float(model.mix_alpha)
    assert "kd_head.weight" in ckpt["state_dict"]
    single = fit_config("digits_dho.yaml", "--model.init_args.dual_head=false")
    assert not single.model.dual_head and single.model.kd_head is None
    assert math.isfinite(single.results["train/kd_unlabeled"]) and "val/acc_kd_head" not in single.results
