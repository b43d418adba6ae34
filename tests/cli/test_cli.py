"""The `kd` / `kd-fit` command lines, driven in-process (and by subprocess where a process is the point)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.cli import run
from kd_lightning.commands import main
from kd_lightning.methods import DistillationModule, LogitStandardKD
from kd_lightning.models import ResNet32x4
from tests.data_generators import write_fake_cifar100
from tests.helpers.cli import CONFIGS_DIR, REPO, TINY, TINY_DIGITS, fit

CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))
QUICKSTART = str(CONFIGS_DIR / "quickstart.yaml")
CIFAR_CONFIGS = [p for p in CONFIGS if p.name.startswith("cifar100_")]


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar100(root, n_train=64, n_test=32)
    return root


@pytest.fixture(scope="module")
def random_resnet32x4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "resnet32x4.pth"
    torch.manual_seed(0)
    torch.save({"model": ResNet32x4(num_classes=100).state_dict()}, path)  # RepDistiller's layout
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_prints(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: kd_lightning.methods." in printed
    assert "teacher_training:" in printed


@pytest.mark.parametrize("config", CIFAR_CONFIGS, ids=lambda p: p.name)
def test_cifar100_configs_fit_on_tiny_cifar(
    config: Path, in_tmp: Path, fake_cifar: Path, random_resnet32x4: Path
) -> None:
    cli = fit(
        [
            "--config",
            str(config),
            *TINY,
            f"--data.init_args.root={fake_cifar}",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            f"--model.init_args.teacher_ckpt={random_resnet32x4}",
        ]
    )
    assert cli.trainer.state.finished
    assert isinstance(cli.model, DistillationModule)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert (in_tmp / "runs" / config.stem).is_dir()
    assert not cli.model.teacher.training


def test_cifar100_missing_data_names_folder_files_and_flag(
    in_tmp: Path, random_resnet32x4: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "cifar100_pld.yaml"),
                *TINY,
                f"--model.init_args.teacher_ckpt={random_resnet32x4}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(in_tmp / "data") in err
    assert "cifar-100-python" in err
    assert "--data.init_args.download true" in err


def test_quickstart_trains_teacher_once_then_reuses_it(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = fit(["--config", QUICKSTART, *TINY_DIGITS])
    out = capsys.readouterr().out
    assert "kd: trained and cached teacher runs/teachers/SmallCNN-" in out
    assert "kd: fit finished" in out and "teacher SmallCNN: val acc" in out and "student SmallCNN" in out
    teacher_path = Path(first.model.teacher_ckpt)
    assert teacher_path.name == "teacher.safetensors" and (teacher_path.parent / "teacher.json").is_file()

    second = fit(["--config", QUICKSTART, *TINY_DIGITS])
    assert f"kd: reused cached teacher {teacher_path}" in capsys.readouterr().out
    for key, value in first.model.teacher.state_dict().items():
        assert torch.equal(value, second.model.teacher.state_dict()[key])

    # Anything that changes the teacher changes the cache key.
    fit(["--config", QUICKSTART, *TINY_DIGITS, "--teacher_training.max_epochs=2"])
    assert "kd: trained and cached teacher" in capsys.readouterr().out


def test_cached_teacher_does_not_change_the_student_run(in_tmp: Path) -> None:
    """Training the teacher restores every RNG: the student run is the same whether it was cached or not."""
    first = fit(["--config", QUICKSTART, *TINY_DIGITS])
    second = fit(["--config", QUICKSTART, *TINY_DIGITS])
    for key, value in first.model.student.state_dict().items():
        assert torch.equal(value, second.model.student.state_dict()[key]), key


def test_dotted_overrides_reach_the_method(in_tmp: Path) -> None:
    cli = fit(
        [
            "--config",
            QUICKSTART,
            *TINY_DIGITS,
            "--model.init_args.temperature=2",
            "--model.init_args.optimizer=torch.optim.SGD",
            "--model.init_args.optimizer.lr=0.01",
        ]
    )
    assert isinstance(cli.model, LogitStandardKD)
    assert cli.model.criterion.temperature == 2.0
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.01)


def test_bf16_mixed_on_cpu(in_tmp: Path) -> None:
    cli = fit(["--config", QUICKSTART, *TINY_DIGITS, "--trainer.precision=bf16-mixed", "--trainer.accelerator=cpu"])
    assert cli.trainer.precision == "bf16-mixed"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_checkpoint_round_trip_validate_and_load(in_tmp: Path) -> None:
    cli = fit(["--config", QUICKSTART, *TINY_DIGITS, "--trainer.limit_val_batches=1.0"])
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    val_acc = float(cli.trainer.callback_metrics["val/acc"])
    validated = run(["validate", "--config", QUICKSTART, f"--ckpt_path={last}", "--trainer.enable_progress_bar=false"])
    assert float(validated.trainer.callback_metrics["val/acc"]) == pytest.approx(val_acc)
    tested = run(["test", "--config", QUICKSTART, f"--ckpt_path={last}", "--trainer.enable_progress_bar=false"])
    assert "test/acc" in tested.trainer.callback_metrics
    # CLI checkpoints carry the networks' configs: no need to pass them again.
    restored = LogitStandardKD.load_from_checkpoint(last)
    restored.eval(), cli.model.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(restored(x), cli.model(x))
    assert not restored.teacher.training


def test_class_count_mismatch_names_the_field(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *TINY_DIGITS, "--model.init_args.student.init_args.num_classes=7"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "kd: error: model.init_args.student: SmallCNN outputs 7 classes but DigitsDataModule has 10" in err
    assert "num_classes=10" in err


def test_missing_teacher_checkpoint_is_an_error(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *TINY_DIGITS, "--model.init_args.teacher_ckpt=missing/teacher.ckpt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.teacher_ckpt: no file at" in err and "missing/teacher.ckpt" in err


def test_unknown_class_path_names_the_field(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--model.init_args.student=NotAModel"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kd: error: model.init_args.student: unknown class 'NotAModel'") and "SmallCNN" in err

    with pytest.raises(SystemExit):
        main(["fit", "--config", QUICKSTART, "--model=VanilaKD"])
    err = capsys.readouterr().err
    assert "kd: error: model: unknown class 'VanilaKD'. did you mean 'VanillaKD'?" in err and "DKD" in err


def test_console_scripts_help() -> None:
    exe = Path(sys.executable).parent
    kd, kd_fit = exe / "kd", exe / "kd-fit"
    assert kd.exists() and kd_fit.exists(), "install the package (pip install -e .) to get the console scripts"
    top = subprocess.run([str(kd), "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "fit" in top.stdout and "validate" in top.stdout
    sub = subprocess.run([str(kd_fit), "--help"], capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0 and "--teacher_training.max_epochs" in sub.stdout and "--ckpt_path" in sub.stdout


# ~20 s; the default run keeps two-process DDP through kd-fit in tests/cli/test_dense_configs.py (det_cwd),
# tests/teachers/test_ddp_teacher.py and the methods' DDP cases.
@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_processes_on_cpu(in_tmp: Path) -> None:
    exe = Path(sys.executable).parent / "kd-fit"
    result = subprocess.run(
        [
            str(exe),
            "--config",
            QUICKSTART,
            *TINY_DIGITS,
            "--trainer.accelerator=cpu",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=in_tmp,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1" in output or "MEMBER: 2/2" in output
    assert output.count("kd: fit finished") == 1  # the summary prints on rank 0 only


def test_teacher_training_disabled_uses_teacher_as_constructed(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = fit(["--config", QUICKSTART, *TINY_DIGITS, "--teacher_training.enabled=false"])
    assert "the teacher is used as constructed" in capsys.readouterr().out
    assert cli.model.teacher_ckpt is None
    assert not (in_tmp / "runs" / "teachers").exists()
