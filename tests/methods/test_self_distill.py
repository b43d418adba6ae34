"""GTSelfDistill: the official loss in the step, α = 1 never runs the teacher, same-architecture check, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.self_distill import GTSelfDistillLoss
from kd_lightning.methods.self_distill import GTSelfDistill
from kd_lightning.models import CIFARResNet18
from tests.data_generators import write_fake_cifar10
from tests.helpers.cli import CONFIGS_DIR, TINY, fit, fit_config
from tests.helpers.tiny import TinyNet


def test_training_loss_is_official_loss_plus_norm_penalty_of_the_student() -> None:
    torch.manual_seed(0)
    module = GTSelfDistill(TinyNet(), TinyNet(), alpha=0.6, reg_coef=1e-3)
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 3, 0])
    parts, _ = module.training_loss((x, y))
    expected = GTSelfDistillLoss(alpha=0.6)(module.student(x), module.teacher(x), y)
    norms = sum(p.norm() for p in module.student.parameters())
    assert parts["reg"].item() == pytest.approx(1e-3 * norms.item(), rel=1e-6)
    assert parts["gt"].item() == pytest.approx(expected["gt"].item(), rel=1e-6)
    assert parts["distill"].item() == pytest.approx(expected["distill"].item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(expected["loss"].item() + parts["reg"].item(), rel=1e-6)
    parts["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.student.parameters())


def test_alpha_one_never_runs_the_teacher() -> None:
    module = GTSelfDistill(TinyNet(), TinyNet(), alpha=1.0)

    def boom(*args, **kwargs):
        raise AssertionError("the teacher ran")

    module.teacher.forward = boom  # type: ignore[method-assign]
    parts, _ = module.training_loss((torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])))
    assert "distill" not in parts and torch.isfinite(parts["loss"])


def test_reg_coef_zero_drops_the_penalty_and_variant_loss() -> None:
    module = GTSelfDistill(TinyNet(), TinyNet(), alpha=0.5, reg_coef=0.0, loss="ce_kl", temperature=2.0)
    parts, _ = module.training_loss((torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])))
    assert "reg" not in parts
    assert parts["loss"].item() == pytest.approx(parts["gt"].item() + parts["distill"].item(), rel=1e-6)


def test_same_architecture_is_required_unless_disabled() -> None:
    with pytest.raises(KDConfigError, match=r"must be the same architecture.*same_architecture=false"):
        GTSelfDistill(TinyNet(hidden=16), TinyNet(hidden=32))
    GTSelfDistill(TinyNet(hidden=16), TinyNet(hidden=32), same_architecture=False)
    with pytest.raises(KDConfigError, match=r"model.init_args: alpha \(the ground-truth weight\)"):
        GTSelfDistill(TinyNet(), TinyNet(), alpha=2.0)
    with pytest.raises(KDConfigError, match="reg_coef"):
        GTSelfDistill(TinyNet(), TinyNet(), reg_coef=-1.0)


def test_cli_fit_digits(in_tmp: Path) -> None:
    cli = fit_config("digits_self_distill.yaml")
    metrics = cli.trainer.callback_metrics
    for name in ("train/loss", "train/gt", "train/distill", "train/reg", "val/acc", "val/teacher_acc"):
        assert name in metrics, name
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/distill"] > 0
    assert type(cli.model.teacher) is type(cli.model.student)
    assert not cli.model.teacher.training


def test_cli_fit_cifar10_config_on_fake_cifar10(in_tmp: Path) -> None:
    write_fake_cifar10(in_tmp / "cifar", n_train=64, n_test=16)
    teacher = in_tmp / "teacher.pt"
    torch.manual_seed(0)
    torch.save(CIFARResNet18(num_classes=10).state_dict(), teacher)
    cli = fit(
        [
            "--config",
            str(CONFIGS_DIR / "cifar10_self_distill.yaml"),
            *TINY,
            f"--data.init_args.root={in_tmp / 'cifar'}",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            f"--model.init_args.teacher_ckpt={teacher}",
        ]
    )
    assert cli.trainer.state.finished
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert (in_tmp / "runs" / "cifar10_self_distill").is_dir()
    assert len(cli.datamodule.val_set) < 64 and cli.datamodule.val_set is not cli.datamodule.test_set
