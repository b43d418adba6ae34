"""Student alone: the distilled student's architecture trained without a teacher, for a side-by-side comparison.

``kd fit --compare_student_alone true`` trains, after the distillation run, the same student network with the
method's task module (``type(method).teacher_training_module``: cross-entropy on labels for classifiers), from
the same initial weights, with the same optimiser and scheduler factories, Trainer budget, seed and data, and
picks its best-validation checkpoint like the student run. The result is cached like a trained teacher
(:mod:`kd_lightning.teachers.training`): ``<cache_dir>/<Class>-alone-<key>/student.safetensors`` +
``student.json`` (the key's ingredients, the validation/test metrics of the selected checkpoint, SHA-256), under
a file lock, so a second run reads the numbers back instead of training again.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.core import DistillationModule
from kd_lightning.teachers.training import CachedTeacher
from kd_lightning.utils.random_state import capture_random_state, restore_random_state
from kd_lightning.utils.trainable import trainable_copy

__all__ = ["TRAINER_BUDGET_KEYS", "StudentAlone"]

#: Trainer arguments the student-alone run copies from the student run (its budget and numerics).
TRAINER_BUDGET_KEYS = (
    "accelerator",
    "precision",
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "max_time",
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "deterministic",
)


class StudentAlone:
    """Train-if-missing cache of student-alone baselines.

    Args:
        cache_dir: folder of the cache (the kd CLI uses ``teacher_training.cache_dir``).
        wait_seconds: how long to wait for another process training the same baseline.
    """

    def __init__(self, cache_dir: str | Path, wait_seconds: float = 3600.0) -> None:
        self.cache_dir = Path(cache_dir)
        self.wait_seconds = wait_seconds

    def entry(self, key: str, network: nn.Module) -> CachedTeacher:
        """The cache entry of ``key`` (``<cache_dir>/<Class>-alone-<key>/student.safetensors``)."""
        folder = self.cache_dir / f"{type(network).__name__}-alone-{key}"
        return CachedTeacher(folder, weights_name="student.safetensors", sidecar_name="student.json")

    def ensure(
        self,
        method: DistillationModule,
        initial: nn.Module,
        datamodule: L.LightningDataModule,
        key: str,
        trainer_kwargs: Mapping[str, Any],
        seed: int | None = None,
        monitor: str | None = "val/acc",
        mode: str = "max",
        test: bool = True,
        callbacks: Sequence[Callback] = (),
        description: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, float], Path, bool]:
        """``(metrics, weights path, trained_now)`` of the student trained alone, training it if not cached.

        Args:
            method: the distillation run's module: its task's supervised module, optimiser and scheduler
                factories and scheduler interval are reused.
            initial: the student network with the weights the distillation run started from (copied).
            datamodule: the run's data module.
            key: the cache key (student config, data, recipe, budget, seed).
            trainer_kwargs: the Trainer's budget (:data:`TRAINER_BUDGET_KEYS` of the student run's Trainer).
            seed: seeds the run (``lightning.seed_everything``); ``None``: not reseeded.
            monitor: metric that selects the checkpoint (the student run's ``ModelCheckpoint.monitor``);
                ``None``: the last weights.
            mode: ``"max"`` or ``"min"`` for ``monitor``.
            test: also evaluate the selected weights on the test split.
            callbacks: extra callbacks (progress lines).
            description: stored in the sidecar (what the key covers).

        Returns:
            ``val/...`` and ``test/...`` metrics of the selected weights, plus ``best_epoch``.
        """
        entry = self.entry(key, initial)
        entry.folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry.folder) + ".lock")
        try:
            with lock.acquire(timeout=self.wait_seconds):
                problem = entry.problem()
                if problem is None and "metrics" in entry.meta():
                    return dict(entry.meta()["metrics"]), entry.weights, False
                if problem != "missing":
                    warnings.warn(
                        f"kd: the cached student-alone run in {entry.folder} is unusable ({problem}): training it "
                        "again.",
                        stacklevel=2,
                    )
                    shutil.rmtree(entry.folder, ignore_errors=True)
                metrics = self._train(
                    method,
                    initial,
                    datamodule,
                    entry,
                    trainer_kwargs,
                    seed,
                    monitor,
                    mode,
                    test,
                    callbacks,
                    description,
                )
                return metrics, entry.weights, True
        except Timeout:
            raise KDConfigError(
                "compare_student_alone",
                f"waited {self.wait_seconds:.0f} s for another process training the same baseline ({lock.lock_file})",
                "delete the lock file if no other run is alive",
            ) from None

    def _train(
        self,
        method: DistillationModule,
        initial: nn.Module,
        datamodule: L.LightningDataModule,
        entry: CachedTeacher,
        trainer_kwargs: Mapping[str, Any],
        seed: int | None,
        monitor: str | None,
        mode: str,
        test: bool,
        callbacks: Sequence[Callback],
        description: Mapping[str, Any] | None,
    ) -> dict[str, float]:
        module_class = type(method).teacher_training_module
        if module_class is None:
            raise KDConfigError(
                "compare_student_alone",
                f"{type(method).__name__} defines no supervised task module to train the student alone with",
                "set compare_student_alone false",
            )
        network = trainable_copy(initial)  # parameters frozen by design (e.g. a detector's stem) stay frozen
        module = module_class(
            model=network,
            optimizer=method.optimizer_factory,
            lr_scheduler=method.lr_scheduler_factory,
            lr_scheduler_interval=method.lr_scheduler_interval,
        )
        logs = entry.folder.parent / f"{entry.folder.name}.logs"
        checkpoint = (
            ModelCheckpoint(dirpath=logs / "checkpoints", monitor=monitor, mode=mode, save_top_k=1, filename="best")
            if monitor
            else None
        )
        saved_random_state = capture_random_state()
        started = time.perf_counter()
        try:
            if seed is not None:
                L.seed_everything(seed, workers=True, verbose=False)
            trainer = L.Trainer(
                **{k: v for k, v in trainer_kwargs.items() if k in TRAINER_BUDGET_KEYS},
                devices=1,
                strategy="auto",
                logger=CSVLogger(str(logs), name="logs"),
                callbacks=[*callbacks, *([checkpoint] if checkpoint is not None else [])],
                enable_checkpointing=checkpoint is not None,
                enable_model_summary=False,
                enable_progress_bar=bool(trainer_kwargs.get("enable_progress_bar", False)),
                log_every_n_steps=int(trainer_kwargs.get("log_every_n_steps") or 50),
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"The number of training batches \(\d+\) is smaller than the logging")
                trainer.fit(module, datamodule=datamodule)
                best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
                metrics: dict[str, float] = {}
                stages = [("val", trainer.validate)] + ([("test", trainer.test)] if test else [])
                for _, evaluate in stages:
                    values = evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
                    metrics.update({k: float(v) for k, v in (values[0] if values else {}).items()})
            best_epoch = _epoch_of(best) if best else trainer.current_epoch - 1
        except BaseException:
            shutil.rmtree(logs, ignore_errors=True)
            raise
        finally:
            restore_random_state(saved_random_state)
        # ``validate``/``test`` with ``ckpt_path`` loaded the selected weights: those are cached.
        shutil.rmtree(logs / "checkpoints", ignore_errors=True)
        metrics["best_epoch"] = float(best_epoch)
        entry.write(
            module.student,
            {
                "format": "kd-lightning-student-alone/1",
                "task_module": type(module).__name__,
                "metrics": metrics,
                "monitor": monitor,
                "seed": seed,
                "seconds": round(time.perf_counter() - started, 2),
                "logs": str(logs),
                **(description or {}),
            },
        )
        return metrics


def _epoch_of(path: str) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch", -1))
    except Exception:
        return -1
