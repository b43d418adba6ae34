"""Shared pieces for tests that drive the `kd` CLI in-process."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kd_lightning.cli import KDCLI, run

REPO = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO / "configs"

#: Overrides that turn any config into a seconds-long run on tiny data.
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=false",
    "--compare_student_alone=false",  # the quickstart config turns it on; tests that want it say so
]
#: TINY plus a one-epoch teacher and no test pass: for the digits configs.
TINY_DIGITS = [*TINY, "--teacher_training.max_epochs=1"]


#: The quickstart config as a tiny digits run (for CLI tests that need a complete, fast run).
QUICKSTART_ARGS = ["--config", str(CONFIGS_DIR / "quickstart.yaml"), *TINY_DIGITS]


def fit(args: list[str]) -> KDCLI:
    """``kd fit <args>`` in-process; exceptions propagate."""
    return run(["fit", *args])


#: One teacher cache for the whole test process: the digits configs share their teacher, so it is
#: trained once (one epoch) instead of once per test.
SHARED_TEACHERS = Path(tempfile.gettempdir()) / f"kd-test-teachers-{os.getpid()}"


def fit_config(name: str, *extra: str) -> KDCLI:
    """A tiny ``kd fit`` of ``configs/<name>`` (a digits config: no files needed), teacher cache shared."""
    return fit(
        ["--config", str(CONFIGS_DIR / name), *TINY_DIGITS, f"--teacher_training.cache_dir={SHARED_TEACHERS}", *extra]
    )


#: Shrinks a reasoning config (configs/reasoning_*.yaml) to seconds: few problems, short generations.
TINY_REASONING = [
    "--data.init_args.num_train=48",
    "--data.init_args.num_val=8",
    "--data.init_args.num_test=8",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=8",
    "--model.init_args.eval_max_new_tokens=6",
]

#: Shrinks a VQA config (configs/vqa_*.yaml) to seconds: few questions, tiny teacher budget, short generations.
TINY_VQA = [
    "--data.init_args.num_train=32",
    "--data.init_args.num_val=8",
    "--data.init_args.num_test=8",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=8",
    "--model.init_args.eval_max_new_tokens=4",
    # the configs' vision towers pretrain for 300 steps at construction: 3 steps here (same code path)
    "--model.init_args.student.init_args.vision.init_args.pretrain_steps=3",
    "--model.init_args.teacher.init_args.vision.init_args.pretrain_steps=3",
]

#: Shrinks a translation config (configs/translation_*.yaml) to seconds: few sentences, short translations.
TINY_TRANSLATION = [
    "--data.init_args.num_train=48",
    "--data.init_args.num_val=8",
    "--data.init_args.num_test=8",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=8",
    "--model.init_args.eval_max_new_tokens=6",
]

#: Shrinks an embodied config (configs/babyai_*.yaml, configs/crafter_*.yaml) to seconds: 2 environments, 2 short
#: DAgger iterations, a 1-iteration teacher, 2 evaluation episodes.
TINY_EMBODIED = [
    "--trainer.max_epochs=2",
    "--trainer.check_val_every_n_epoch=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.num_envs=2",
    "--data.init_args.steps_per_iteration=128",
    "--data.init_args.batch_size=32",
    "--data.init_args.passes=1",
    "--data.init_args.eval_episodes=2",
    "--teacher_training.max_epochs=1",
    "--test_after_fit=false",
]
