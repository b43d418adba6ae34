"""Tiny, fast data and networks for method and CLI tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kd_lightning.data.base import KDDataModule


class BlobsDataModule(KDDataModule):
    """Gaussian blobs shaped like 1x4x4 images: ``num_classes`` well-separated classes, no files.

    Args:
        num_classes: classes.
        per_class: training samples per class (validation/test get half as many).
        noise: standard deviation around each class mean.
        seed: seed of the means and samples.
        return_index: training samples are ``(x, y, index)``.
    """

    input_shape = (1, 4, 4)

    def __init__(
        self,
        num_classes: int = 4,
        per_class: int = 16,
        noise: float = 0.5,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        return_index: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        self.num_classes = num_classes
        self.per_class = per_class
        self.noise = noise
        self.seed = seed
        self.return_index = return_index

    def _make(self, n_per_class: int, generator: torch.Generator, means: torch.Tensor) -> list[torch.Tensor]:
        y = torch.arange(self.num_classes).repeat_interleave(n_per_class)
        x = means[y] + self.noise * torch.randn(len(y), 16, generator=generator)
        return [x.reshape(-1, *self.input_shape), y]

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(self.seed)
        means = 2.0 * torch.randn(self.num_classes, 16, generator=g)
        train = self._make(self.per_class, g, means)
        if self.return_index:
            train.append(torch.arange(len(train[1])))
        self.train_set = TensorDataset(*train)
        self.val_set = TensorDataset(*self._make(max(1, self.per_class // 2), g, means))
        self.test_set = TensorDataset(*self._make(max(1, self.per_class // 2), g, means))


class TinyNet(nn.Module):
    """Flatten + MLP with BatchNorm (so train/eval mode matters) for 1x4x4 inputs."""

    def __init__(self, num_classes: int = 4, hidden: int = 16, in_features: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def tiny_trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    """A quiet one-epoch CPU Trainer writing nothing but under ``tmp_path``; ``kwargs`` override."""
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})
