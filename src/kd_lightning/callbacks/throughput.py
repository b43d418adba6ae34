"""Training throughput (samples per second), logged once per epoch."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 0


class SamplesPerSecond(Callback):
    """Log ``train/samples_per_sec``: samples seen by all ranks / wall time of the epoch.

    The time includes data loading, as a user experiences it. No device synchronisation
    happens per step; one at the end of the epoch makes the figure exact on GPUs. Under DDP the
    ranks' estimates are averaged (one all-reduce per epoch).
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._samples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._samples = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += _batch_size(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._start
        if elapsed > 0 and self._samples:
            rate = self._samples * trainer.world_size / elapsed
            pl_module.log("train/samples_per_sec", rate, on_step=False, on_epoch=True, sync_dist=True)
