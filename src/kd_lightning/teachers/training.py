"""Train-if-missing teachers: ``kd fit`` trains a teacher that has no checkpoint, once, and caches it.

- **Its own task.** The teacher is trained by the method's task sibling's supervised module
  (``type(method).teacher_training_module``): cross-entropy on labels for classification methods, next-token
  cross-entropy for language-model methods.
- **Cache key**: :func:`~kd_lightning.teachers.fingerprint.fingerprint` of the teacher's resolved config, the
  data config (without settings that do not change the data) plus the data's identity, and the training
  settings. Anything that changes the teacher changes the key; the same teacher reached through two config
  files has one key.
- **Format**: ``<cache_dir>/<Class>-<key>/teacher.safetensors`` (tensors only: it cannot carry code) and
  ``teacher.json`` (the key's ingredients, the validation metrics, the file's SHA-256).
- **Once**: a ``filelock`` around check-and-train, so concurrent runs (two shells, DDP ranks, a torchrun job)
  train the teacher once; the others wait and reuse it.
- **Integrity**: a cached file whose SHA-256 does not match its sidecar (truncated, edited) is reported and
  retrained; a teacher whose training diverges (non-finite loss or weights) is refused and nothing is cached;
  a failed training leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from kd_lightning.errors import KDConfigError, TrainingDivergedError
from kd_lightning.methods.core import DistillationModule, probe_optimizer
from kd_lightning.utils.random_state import capture_random_state, restore_random_state
from kd_lightning.utils.trainable import trainable_copy

__all__ = ["CachedTeacher", "TeacherTraining", "reset_parameters"]

WEIGHTS_FILE = "teacher.safetensors"
SIDECAR_FILE = "teacher.json"
#: Fields of the teacher's supervised module that the teacher_training block sets, as named in messages.
_FIELD_MAP = {
    "model.init_args.optimizer": "teacher_training.optimizer",
    "model.init_args.lr_scheduler": "teacher_training.lr_scheduler",
    "model.init_args.label_smoothing": "teacher_training.label_smoothing",
    "model.init_args.lr_scheduler_interval": "teacher_training.lr_scheduler_interval",
}


def reset_parameters(module: nn.Module, seed: int) -> None:
    """Re-initialise every submodule that has ``reset_parameters``, deterministically.

    A Hugging Face model inside (anything with a ``config`` and its own ``_init_weights``) is re-initialised by its
    own rule (BERT's N(0, 0.02) embeddings, not ``nn.Embedding``'s N(0, 1)), after the generic resets; so is a
    network with an ``init_weights()`` method (TinyGPT: GPT-2's scheme). Without this a TinyGPT teacher trained by
    ``kd fit`` started from ``nn.Embedding``'s N(0, 1) and, on the reasoning demo, never left a plateau.
    Submodules that say ``is_pretrained = True`` (a pretrained vision tower such as a pretrained
    :class:`~kd_lightning.models.vlm.DigitPatchEncoder`) keep their weights, with everything inside them.
    """
    kept = {id(inner) for sub in module.modules() if getattr(sub, "is_pretrained", False) for inner in sub.modules()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            if sub is not module and id(sub) not in kept and hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        for sub in module.modules():
            if id(sub) in kept:
                continue
            if hasattr(sub, "config") and callable(getattr(sub, "_init_weights", None)):
                sub.apply(sub._init_weights)
            elif callable(getattr(sub, "init_weights", None)):
                sub.init_weights()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CachedTeacher:
    """One cache entry: ``<folder>/teacher.safetensors`` + ``teacher.json``."""

    def __init__(self, folder: Path, weights_name: str = WEIGHTS_FILE, sidecar_name: str = SIDECAR_FILE) -> None:
        self.folder = Path(folder)
        self.weights = self.folder / weights_name
        self.sidecar = self.folder / sidecar_name

    def problem(self) -> str | None:
        """``None`` when the entry is complete and intact, else what is wrong with it."""
        if not self.weights.is_file() and not self.sidecar.is_file():
            return "missing"
        if not self.sidecar.is_file():
            return f"{self.sidecar.name} is missing"
        try:
            meta = json.loads(self.sidecar.read_text())
        except (OSError, ValueError) as err:
            return f"{self.sidecar.name} is unreadable ({type(err).__name__})"
        if not self.weights.is_file():
            return f"{self.weights.name} is missing"
        if meta.get("sha256") != _sha256(self.weights):
            return f"{self.weights.name} does not match its SHA-256 (truncated or modified)"
        return None

    def meta(self) -> dict[str, Any]:
        return json.loads(self.sidecar.read_text()) if self.sidecar.is_file() else {}

    def write(self, network: nn.Module, meta: Mapping[str, Any]) -> None:
        """Write weights then sidecar, each through a temporary name (a reader never sees half a file)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.weights.with_suffix(".tmp")
        state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        save_file(_untied(state), str(tmp), metadata={"format": "kd-lightning-teacher"})
        tmp.replace(self.weights)
        sidecar_tmp = self.sidecar.with_suffix(".tmp")
        sidecar_tmp.write_text(json.dumps({**meta, "sha256": _sha256(self.weights)}, indent=2, default=str))
        sidecar_tmp.replace(self.sidecar)


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): store each as its own copy."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (0, id(tensor))
        out[key] = tensor.clone() if ident in seen else tensor
        seen.setdefault(ident, key)
    return out


class TeacherTraining:
    """How ``kd fit`` trains a teacher given without ``teacher_ckpt`` (the ``teacher_training:`` block).

    Args:
        enabled: train missing teachers. ``False`` uses the teacher as constructed (e.g. a
            ``TimmModel`` with ``pretrained: true``).
        max_epochs: epochs of the teacher's training (with ``max_steps``, whichever ends first).
        max_steps: optimizer steps of the teacher's training; ``-1``: no limit.
        optimizer: optimiser for the teacher.
        lr_scheduler: scheduler for the teacher.
        lr_scheduler_interval: step the teacher's scheduler every ``"epoch"`` or ``"step"``.
        label_smoothing: label smoothing of the teacher's cross-entropy.
        seed: seed of the teacher's initialisation and data order (the cache key includes it).
        cache_dir: where trained teachers are stored, one folder per fingerprint.
        wait_seconds: how long a run waits for another process that is training the same teacher.
        gradient_clip_val: clip the teacher's gradient norm to this value (``None``: no clipping; DETRs use 0.1).
    """

    def __init__(
        self,
        enabled: bool = True,
        max_epochs: int = 30,
        max_steps: int = -1,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        label_smoothing: float = 0.0,
        seed: int = 0,
        cache_dir: str = "runs/teachers",
        wait_seconds: float = 3600.0,
        gradient_clip_val: float | None = None,
    ) -> None:
        if max_epochs < 1:
            raise KDConfigError("teacher_training.max_epochs", f"must be >= 1, got {max_epochs}")
        if max_steps == 0 or max_steps < -1:
            raise KDConfigError("teacher_training.max_steps", f"must be >= 1 or -1 (no limit), got {max_steps}")
        if not 0.0 <= label_smoothing < 1.0:
            raise KDConfigError("teacher_training.label_smoothing", f"must be in [0, 1), got {label_smoothing}")
        if wait_seconds <= 0:
            raise KDConfigError("teacher_training.wait_seconds", f"must be > 0, got {wait_seconds}")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise KDConfigError("teacher_training.gradient_clip_val", f"must be > 0 or null, got {gradient_clip_val}")
        probe_optimizer("teacher_training.optimizer", optimizer)
        self.gradient_clip_val = gradient_clip_val
        self.enabled = enabled
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.label_smoothing = label_smoothing
        self.seed = seed
        self.cache_dir = cache_dir
        self.wait_seconds = wait_seconds

    def entry(self, key: str, teacher_name: str) -> CachedTeacher:
        return CachedTeacher(Path(self.cache_dir) / f"{teacher_name}-{key}")

    def ensure(
        self,
        method: type[DistillationModule],
        teacher: nn.Module,
        datamodule: L.LightningDataModule,
        key: str,
        accelerator: str = "auto",
        precision: Any = None,
        description: Mapping[str, Any] | None = None,
        progress_bar: bool | None = None,
        field: str = "model.init_args.teacher",
        callbacks: Sequence[Callback] = (),
    ) -> tuple[Path, bool]:
        """Return ``(weights path, trained_now)`` of the cached teacher for ``key``, training it if missing.

        Args:
            method: the distillation method's class; its ``teacher_training_module`` trains the teacher.
            teacher: the teacher network as configured (copied, re-initialised with ``seed``, trained).
            datamodule: the run's data module.
            key: the cache key.
            field: the config field of this teacher (for messages).
            callbacks: extra callbacks of the teacher's Trainer (the kd CLI's per-epoch progress lines).
        """
        entry = self.entry(key, type(teacher).__name__)
        entry.folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry.folder) + ".lock")
        try:
            with lock.acquire(timeout=self.wait_seconds):
                problem = entry.problem()
                if problem is None:
                    return entry.weights, False
                if problem != "missing":
                    warnings.warn(
                        f"kd: the cached teacher in {entry.folder} is unusable ({problem}): training it again.",
                        stacklevel=2,
                    )
                    shutil.rmtree(entry.folder, ignore_errors=True)
                self._train(
                    method,
                    teacher,
                    datamodule,
                    entry,
                    accelerator,
                    precision,
                    description or {},
                    progress_bar,
                    field,
                    callbacks=callbacks,
                )
                return entry.weights, True
        except Timeout:
            raise KDConfigError(
                "teacher_training.wait_seconds",
                f"waited {self.wait_seconds:.0f} s for another process training the teacher ({lock.lock_file})",
                "raise wait_seconds, or delete the lock file if no other run is alive",
            ) from None

    def _module(self, method: type[DistillationModule], network: nn.Module, field: str) -> DistillationModule:
        module_class = method.teacher_training_module
        if module_class is None:
            raise KDConfigError(
                field,
                f"{method.__name__} defines no supervised task module to train a missing teacher with",
                "give model.init_args.teacher_ckpt",
            )
        try:
            return module_class(
                model=network,
                label_smoothing=self.label_smoothing,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                lr_scheduler_interval=self.lr_scheduler_interval,
            )
        except KDConfigError as err:
            raise _teacher_error(err, field) from None

    def _train(
        self,
        method: type[DistillationModule],
        teacher: nn.Module,
        datamodule: L.LightningDataModule,
        entry: CachedTeacher,
        accelerator: str,
        precision: Any,
        description: Mapping[str, Any],
        progress_bar: bool | None,
        field: str,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        network = trainable_copy(teacher)  # parameters frozen by design (e.g. a detector's stem) stay frozen
        reset_parameters(network, self.seed)
        module = self._module(method, network, field)
        # The student run must not depend on whether its teacher was cached: restore every RNG.
        saved_random_state = capture_random_state()
        logs = entry.folder.parent / f"{entry.folder.name}.logs"
        started = time.perf_counter()
        try:
            L.seed_everything(self.seed, workers=True, verbose=False)
            trainer = L.Trainer(
                max_epochs=self.max_epochs,
                max_steps=self.max_steps,
                gradient_clip_val=self.gradient_clip_val,
                accelerator=accelerator,
                devices=1,
                strategy="auto",
                precision=precision,
                logger=CSVLogger(str(logs), name="logs"),
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress_bar,
                num_sanity_val_steps=0,
                callbacks=list(callbacks),
            )
            full = getattr(datamodule, "full_training_set", None)
            with full() if callable(full) else contextlib.nullcontext(), warnings.catch_warnings():
                # The teacher's Trainer is ours, not the user's: its logging interval is not theirs to tune.
                warnings.filterwarnings("ignore", r"The number of training batches \(\d+\) is smaller than the logging")
                trainer.fit(module, datamodule=datamodule)
            metrics = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1
            }
        except KDConfigError as err:
            shutil.rmtree(logs, ignore_errors=True)
            raise _teacher_error(err, field) from None
        except TrainingDivergedError as err:
            shutil.rmtree(logs, ignore_errors=True)
            raise TrainingDivergedError(
                f"{field}: the teacher's training diverged, nothing was cached ({err}). Lower "
                "teacher_training.optimizer's lr or give model.init_args.teacher_ckpt."
            ) from None
        except BaseException:
            shutil.rmtree(logs, ignore_errors=True)
            raise
        finally:
            restore_random_state(saved_random_state)
        bad = [
            name
            for name, p in module.student.state_dict().items()
            if p.is_floating_point() and not torch.isfinite(p).all()
        ]
        if bad:
            shutil.rmtree(logs, ignore_errors=True)
            raise TrainingDivergedError(
                f"{field}: the trained teacher has non-finite weights ({', '.join(bad[:3])}); nothing was cached. "
                "Lower teacher_training.optimizer's lr or give model.init_args.teacher_ckpt."
            )
        entry.write(
            module.student,
            {
                "format": "kd-lightning-teacher/1",
                "task_module": type(module).__name__,
                "metrics": metrics,
                "val_acc": metrics.get("val/acc"),
                "max_epochs": self.max_epochs,
                "max_steps": self.max_steps,
                "seed": self.seed,
                "seconds": round(time.perf_counter() - started, 2),
                "logs": str(logs),
                **description,
            },
        )

    @staticmethod
    def read_meta(path: str | Path) -> dict[str, Any]:
        """The sidecar of a cached teacher's weights file (empty for other files)."""
        sidecar = Path(path).with_name(SIDECAR_FILE)
        if Path(path).name != WEIGHTS_FILE or not sidecar.is_file():
            return {}
        try:
            return json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return {}


def _teacher_error(err: KDConfigError, field: str) -> KDConfigError:
    """Name the teacher's own fields in an error raised while building or training it."""
    for old, new in _FIELD_MAP.items():
        err.with_field(old, new)
    err.with_field("model.init_args.model", field)
    return err
