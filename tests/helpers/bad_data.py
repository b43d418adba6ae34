"""Data modules that serve broken data on purpose, for the bad-input CLI tests (``tests/cli/test_bad_inputs.py``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kd_lightning.data.digits import DigitsDataModule


class _Mapped(Dataset):
    """``dataset`` with ``fn`` applied to every item."""

    def __init__(self, dataset: Dataset, fn: Any) -> None:
        self.dataset = dataset
        self.fn = fn

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.fn(self.dataset[index])


class OneHotDigitsDataModule(DigitsDataModule):
    """Digits whose training targets are one-hot float vectors ``[10]`` instead of class indices."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if not isinstance(self.train_set, _Mapped):
            self.train_set = _Mapped(
                self.train_set, lambda item: (item[0], F.one_hot(torch.as_tensor(item[1]), 10).float(), *item[2:])
            )


class NaNDigitsDataModule(DigitsDataModule):
    """Digits whose training images contain a NaN pixel."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if not isinstance(self.train_set, _Mapped):

            def poison(item: Any) -> Any:
                image = item[0].clone()
                image.view(-1)[0] = torch.nan
                return (image, *item[1:])

            self.train_set = _Mapped(self.train_set, poison)
