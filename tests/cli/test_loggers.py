"""The logger switch: CSV in the configs, TensorBoard by one flag (configs/fragments/logger_tensorboard.yaml)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

from tests.helpers.cli import CONFIGS_DIR, QUICKSTART_ARGS, SHARED_TEACHERS, fit

TENSORBOARD = str(CONFIGS_DIR / "fragments" / "logger_tensorboard.yaml")


def test_tensorboard_fragment_writes_events_in_the_run_folder(in_tmp: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = fit(
        [
            *QUICKSTART_ARGS,
            "--trainer.logger",
            TENSORBOARD,
            "--trainer.log_every_n_steps=1",
            f"--teacher_training.cache_dir={SHARED_TEACHERS}",
        ]
    )
    logger = cli.trainer.logger
    assert isinstance(logger, TensorBoardLogger)
    # Only the class changed: the config's save_dir and name carried over.
    log_dir = Path(logger.log_dir)
    assert log_dir.resolve() == (in_tmp / "runs" / "quickstart" / "kd" / "version_0").resolve()
    events = sorted(log_dir.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events file in {log_dir}"
    accumulator = EventAccumulator(str(log_dir)).Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/loss_step", "val/acc"} <= scalars, sorted(scalars)
    assert "hp_metric" not in scalars  # default_hp_metric: false in the fragment


def test_tensorboard_by_class_name_and_save_dir(in_tmp: Path) -> None:
    cli = fit(
        [
            *QUICKSTART_ARGS,
            "--trainer.logger",
            "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir",
            "runs/x",
            f"--teacher_training.cache_dir={SHARED_TEACHERS}",
        ]
    )
    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert list((in_tmp / "runs" / "x" / "kd").glob("version_*/events.out.tfevents.*"))
