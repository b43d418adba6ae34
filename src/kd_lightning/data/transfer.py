"""Distil on a transfer set: other data than the teacher was trained on (KD³'s webly collected images).

:class:`TransferSetDataModule` trains the student on the *inputs* of another data module's training set (its
labels are dropped: batches are ``{"unlabeled": (x, position)}``) while validation and test, and the training
of a missing teacher, use ``source`` — the task's own data, which the student never trains on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.semi_supervised import UNLABELED, UnlabeledView
from kd_lightning.data.wrappers import WrappedDataModule
from kd_lightning.errors import KDConfigError

__all__ = ["TransferSetDataModule"]


class TransferSetDataModule(WrappedDataModule):
    """Training inputs from ``transfer``, everything else from ``source``.

    Args:
        source: the task's data module (the teacher's training data; validation and test).
        transfer: the data module whose training inputs the student distils on (any classification data
            module: another dataset, :class:`~kd_lightning.data.digits_web.DigitsWebDataModule`, ...); its
            labels are never served. Its inputs must have the source's shape (the teacher's input).
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``batch_size`` of the
            transfer batches, ...).
    """

    regime = "unlabeled"
    teacher_data_key = "source"

    def __init__(self, source: KDDataModule, transfer: KDDataModule, **kwargs: Any) -> None:
        super().__init__(source=source, **kwargs)
        if not isinstance(transfer, KDDataModule):
            raise KDConfigError(
                "data.init_args.transfer", f"must be a kd-lightning data module, got {type(transfer).__name__}"
            )
        shape, teacher_shape = tuple(getattr(transfer, "input_shape", ())), self.input_shape
        if shape and teacher_shape and shape != teacher_shape:
            raise KDConfigError(
                "data.init_args.transfer",
                f"{type(transfer).__name__} serves inputs of shape {shape} but the teacher's data "
                f"({type(source).__name__}) has {teacher_shape}",
                "render the transfer set at the teacher's input size and channels",
            )
        self.transfer = transfer
        self.transfer_set: UnlabeledView | None = None
        self._teacher_training = False

    def prepare_data(self) -> None:
        super().prepare_data()
        self.transfer.prepare_data()

    def data_identity(self) -> dict[str, Any]:
        return {**super().data_identity(), "transfer": self.transfer.data_identity()}

    def setup(self, stage: str | None = None) -> None:
        self.setup_source(stage)
        if stage in (None, "fit") and self.transfer_set is None:
            self.transfer.setup("fit")
            self.train_set = self.source.train_set
            self.transfer_set = UnlabeledView(self.transfer.train_set)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def full_training_set(self) -> Iterator[None]:
        """Within the block the training loader is the source's (a teacher trained through this module)."""
        self._teacher_training = True
        try:
            yield
        finally:
            self._teacher_training = False

    def transfer_dataloader(self, shuffle: bool = True) -> DataLoader:
        """``(x, position)`` batches of the transfer set."""
        if self.transfer_set is None:
            raise RuntimeError("TransferSetDataModule.setup('fit') has not run.")
        return DataLoader(
            self.transfer_set,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and shuffle,
        )

    def train_dataloader(self) -> Any:
        if self._teacher_training:
            return self.source.train_dataloader()
        return CombinedLoader({UNLABELED: self.transfer_dataloader()}, mode="max_size_cycle")
