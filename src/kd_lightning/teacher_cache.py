"""Train-if-missing teachers: ``kd fit`` trains a teacher that has no checkpoint, once, and caches it.

The cache key is a fingerprint of the teacher's config, the data config (without settings that
do not change the data: workers, root folder, download flag) and the teacher-training settings.
A run that finds the key reuses the teacher; anything that changes the teacher changes the key.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from kd_lightning.fingerprint import json_digest
from kd_lightning.methods.base import LRSchedulerCallable, OptimizerCallable
from kd_lightning.methods.supervised import Supervised

#: Data-module arguments that do not change which samples or transforms a teacher sees.
DATA_KEYS_NOT_IN_FINGERPRINT = frozenset(
    {"root", "download", "num_workers", "pin_memory", "eval_batch_size", "checksum", "return_index"}
)
_FINGERPRINT_VERSION = 1


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a JSON-able mapping (keys sorted)."""
    return json_digest({"v": _FINGERPRINT_VERSION, **payload})


def data_fingerprint_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a data config that decides what a teacher is trained on."""
    init_args = dict(data_config.get("init_args") or {})
    return {
        "class_path": data_config.get("class_path"),
        "init_args": {k: v for k, v in init_args.items() if k not in DATA_KEYS_NOT_IN_FINGERPRINT},
    }


def reset_parameters(module: nn.Module, seed: int) -> None:
    """Re-initialise every submodule that has ``reset_parameters``, deterministically."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            if sub is not module and hasattr(sub, "reset_parameters"):
                sub.reset_parameters()


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


class TeacherTraining:
    """How ``kd fit`` trains a teacher given without ``teacher_ckpt`` (the ``teacher_training:`` block).

    Args:
        enabled: train missing teachers. ``False`` uses the teacher as constructed (e.g. a
            ``TimmModel`` with ``pretrained: true``).
        max_epochs: epochs of supervised training.
        optimizer: optimiser for the teacher.
        lr_scheduler: scheduler for the teacher (stepped per epoch).
        label_smoothing: label smoothing of the teacher's cross-entropy.
        seed: seed of the teacher's initialisation and data order (the cache key includes it).
        cache_dir: where trained teachers are stored, one folder per fingerprint.
        wait_seconds: how long non-zero ranks of a ``torchrun`` job wait for rank 0's teacher.
    """

    def __init__(
        self,
        enabled: bool = True,
        max_epochs: int = 30,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        seed: int = 0,
        cache_dir: str = "runs/teachers",
        wait_seconds: float = 3600.0,
    ) -> None:
        if max_epochs < 1:
            raise ValueError(f"teacher_training.max_epochs must be >= 1, got {max_epochs}.")
        self.enabled = enabled
        self.max_epochs = max_epochs
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.label_smoothing = label_smoothing
        self.seed = seed
        self.cache_dir = cache_dir
        self.wait_seconds = wait_seconds

    def cache_path(self, key: str, teacher_name: str) -> Path:
        return Path(self.cache_dir) / f"{teacher_name}-{key}" / "teacher.pt"

    def ensure(
        self,
        teacher: nn.Module,
        datamodule: L.LightningDataModule,
        key: str,
        accelerator: str = "auto",
        precision: Any = None,
        description: Mapping[str, Any] | None = None,
        progress_bar: bool | None = None,
    ) -> tuple[Path, bool]:
        """Return ``(path, trained_now)`` of the cached teacher for ``key``, training it if missing."""
        path = self.cache_path(key, type(teacher).__name__)
        if path.is_file():
            return path, False
        if not _is_main_process():
            deadline = time.monotonic() + self.wait_seconds
            while not path.is_file():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank 0 did not write the teacher {path} in {self.wait_seconds} s.")
                time.sleep(2.0)
            return path, False
        self._train(teacher, datamodule, path, accelerator, precision, description or {}, progress_bar)
        return path, True

    def _train(
        self,
        teacher: nn.Module,
        datamodule: L.LightningDataModule,
        path: Path,
        accelerator: str,
        precision: Any,
        description: Mapping[str, Any],
        progress_bar: bool | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        network = copy.deepcopy(teacher).requires_grad_(True).train()
        reset_parameters(network, self.seed)
        module = Supervised(
            network,
            label_smoothing=self.label_smoothing,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            num_classes=getattr(datamodule, "num_classes", None),
        )
        # The student run must not depend on whether its teacher was cached: restore every RNG.
        states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            L.seed_everything(self.seed, workers=True, verbose=False)
            trainer = L.Trainer(
                max_epochs=self.max_epochs,
                accelerator=accelerator,
                devices=1,
                precision=precision,
                logger=CSVLogger(str(path.parent), name="logs"),
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress_bar,
                num_sanity_val_steps=0,
            )
            trainer.fit(module, datamodule=datamodule)
            val_acc = trainer.callback_metrics.get("val/acc")
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)
        tmp = path.with_suffix(".tmp")
        module.export_student(tmp)
        meta = {
            "val_acc": float(val_acc) if val_acc is not None else None,
            "max_epochs": self.max_epochs,
            "seed": self.seed,
            **description,
        }
        path.with_name("meta.json").write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, path)

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        meta_file = Path(path).with_name("meta.json")
        return json.loads(meta_file.read_text()) if meta_file.is_file() else {}
