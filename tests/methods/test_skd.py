"""SKD as a LightningModule on synthetic RadioML frames; CLI fits of the RadioML configs on generated data."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from kd_lightning.callbacks.snr import SNREvaluation
from kd_lightning.data.radioml import RadioMLDataModule
from kd_lightning.data.radioml_synth import generate, write_pickle
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import Supervised
from kd_lightning.methods.skd import SKD
from kd_lightning.models.radioml import KDCNN, ClST
from tests.helpers.cli import CONFIGS_DIR, SHARED_TEACHERS, TINY, fit
from tests.helpers.tiny import tiny_trainer

SIX = ["BPSK", "QPSK", "8PSK", "PAM4", "CPFSK", "GFSK"]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RML2016.10a-layout pickle: 11 modulations x SNRs (-10, 0, 10) x 10 frames (330 frames)."""
    root = tmp_path_factory.mktemp("radioml")
    write_pickle(generate(snrs=[-10, 0, 10], frames_per_key=10, seed=0), root / "RML2016.10a_dict.pkl")
    return root


@pytest.fixture(scope="module")
def six_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The spec's CPU plan: 6 classes x 3 SNRs x 64 frames."""
    root = tmp_path_factory.mktemp("radioml6")
    write_pickle(generate(SIX, snrs=[0, 10, 18], frames_per_key=64, seed=1), root / "RML2016.10a_dict.pkl")
    return root


def small_clst(num_classes: int) -> ClST:
    return ClST(num_classes=num_classes, embed_dims=(8, 16, 32), depths=(1, 1, 1), num_heads=(1, 2, 4))


def test_teacher_frozen_student_learns_and_kd_term_positive(tmp_path: Path, six_root: Path) -> None:
    torch.manual_seed(0)
    data = RadioMLDataModule(root=str(six_root), modulations=SIX, batch_size=64)
    teacher = small_clst(6)
    tiny_trainer(tmp_path, max_epochs=1).fit(Supervised(teacher, num_classes=6), datamodule=data)  # one teacher epoch
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = SKD(KDCNN(num_classes=6), teacher, temperature=4.0, alpha=0.3)
    losses: list[float] = []
    trainer = tiny_trainer(tmp_path, max_epochs=2, log_every_n_steps=1)
    original = module.training_step

    def spy(batch, batch_idx):  # the loss of every step, in order
        loss = original(batch, batch_idx)
        losses.append(loss.item())
        return loss

    module.training_step = spy  # type: ignore[method-assign]
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert metrics["train/kd_epoch"] > 0 and metrics["train/ce_epoch"] > 0
    steps = len(losses) // 2
    assert sum(losses[steps:]) / steps < sum(losses[:steps]) / steps  # epoch 2 below epoch 1
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"model\.init_args\.alpha"):
        SKD(KDCNN(), ClST(), alpha=-0.1)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.temperature"):
        SKD(KDCNN(), ClST(), temperature=0.0)


def logged(cli, name: str) -> list[float]:
    """Values of ``name`` in the run's CSVLogger metrics (``callback_metrics`` are reset by the test pass)."""
    rows = csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open())
    return [float(r[name]) for r in rows if r.get(name)]


def _tiny_radioml(root: Path) -> list[str]:
    return [
        *TINY,
        f"--data.init_args.root={root}",
        "--data.init_args.batch_size=32",
        "--data.init_args.num_workers=0",
        "--teacher_training.max_epochs=1",
        f"--teacher_training.cache_dir={SHARED_TEACHERS}",
        "--test_after_fit=true",
    ]


def test_cli_teacher_config_then_skd_config_with_its_checkpoint(in_tmp: Path, synth_root: Path) -> None:
    teacher_run = fit(["--config", str(CONFIGS_DIR / "radioml2016a_clst_teacher.yaml"), *_tiny_radioml(synth_root)])
    assert isinstance(teacher_run.model.model, ClST)
    assert {"test/acc", "test/acc_snr_-10", "test/acc_snr_10", "test/acc_band_high"} <= set(teacher_run.results)
    log_dir = Path(teacher_run.trainer.log_dir)
    rows = list(csv.reader((log_dir / "snr_test_accuracy.csv").open()))
    assert [r[0] for r in rows[1:4]] == ["-10", "0", "10"] and rows[4][:2] == ["all", "66"]
    assert (log_dir / "snr_test_accuracy.png").is_file()

    best = teacher_run.trainer.checkpoint_callback.best_model_path
    skd = fit(
        [
            "--config",
            str(CONFIGS_DIR / "radioml2016a_skd_kdcnn.yaml"),
            *_tiny_radioml(synth_root),
            f"--model.init_args.teacher_ckpt={best}",
        ]
    )
    model = skd.model
    assert isinstance(model, SKD) and isinstance(model.student, KDCNN)
    assert all(v > 0 and torch.isfinite(torch.tensor(v)) for v in logged(skd, "train/kd_epoch"))
    # The teacher is the supervised run's network, untouched and frozen.
    for key, value in teacher_run.model.model.state_dict().items():
        assert torch.equal(value, model.teacher.state_dict()[key]), key
    assert not model.teacher.training
    assert {"test/acc_snr_0", "test/teacher_acc_snr_0"} <= set(skd.results)
    assert skd.results["test/teacher_acc"] == pytest.approx(teacher_run.results["test/acc"])
    callback = next(c for c in skd.trainer.callbacks if isinstance(c, SNREvaluation))
    assert set(callback.results["test"]) == {"student", "teacher"}


@pytest.mark.parametrize("config", ["radioml2016a_skd_kdmobilenet.yaml", "radioml2016a_kdmobilenet_alone.yaml"])
def test_cli_other_radioml_configs_fit(config: str, in_tmp: Path, synth_root: Path) -> None:
    cli = fit(["--config", str(CONFIGS_DIR / config), *_tiny_radioml(synth_root)])
    assert logged(cli, "train/loss_epoch") and all(torch.isfinite(torch.tensor(logged(cli, "train/loss_epoch"))))
    assert "test/acc_snr_10" in cli.results


def test_quick_config_runs_on_the_generator_output(in_tmp: Path) -> None:
    # What the config's header says to run, on fewer frames.
    from kd_lightning.commands.radioml_synth import main as synth_main

    synth_main(
        ["--out", "data/radioml_synth", "--format", "2016.10a", "--frames", "4", "--snr-range", "-10", "10", "10"]
    )
    cli = fit(
        ["--config", str(CONFIGS_DIR / "radioml_synth_quick.yaml"), *_tiny_radioml(in_tmp / "data/radioml_synth")]
    )
    assert isinstance(cli.model, SKD) and cli.model.teacher_ckpt is not None
    assert (Path(cli.trainer.log_dir) / "snr_test_confusion.csv").is_file()


def test_skd_on_the_2018_layout_with_1024_samples(tmp_path: Path) -> None:
    """RML2018.01A layout (HDF5, 24 classes, L = 1024): ClST strides (4, 2, 2), students and per-SNR callback."""
    from kd_lightning.data.radioml import CLASSES_2018
    from kd_lightning.data.radioml_synth import write_hdf5

    frames = generate(list(CLASSES_2018), snrs=[0, 20], frames_per_key=5, frame_length=1024, seed=0)
    write_hdf5(frames, tmp_path / "GOLD_XYZ_OSC.0001_1024.hdf5")
    data = RadioMLDataModule(root=str(tmp_path), version="2018.01A", batch_size=32)
    teacher = ClST(num_classes=24, input_length=1024, embed_dims=(8, 16, 32), depths=(1, 1, 1))
    assert teacher.strides == (4, 2, 2)
    callback = SNREvaluation(dirpath=str(tmp_path / "snr"))
    module = SKD(KDCNN(num_classes=24, input_length=1024), teacher)
    trainer = tiny_trainer(tmp_path, callbacks=[callback], limit_train_batches=2)
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    assert data.input_shape == (2, 1024)
    assert callback.results["test"]["student"].snrs == [0, 20]
    assert (tmp_path / "snr" / "snr_test_accuracy.csv").is_file()
