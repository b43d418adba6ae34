"""Data modules built on another data module: the shared delegation base and the few-class view.

A wrapper takes any classification data module as ``source`` (a nested ``class_path`` in a config) and changes
what the training loader serves while validation and test stay the source's. The data regimes of the seed
methods are wrappers: :class:`ClassGroupsDataModule` (few classes, LELP),
:class:`~kd_lightning.data.semi_supervised.SemiSupervisedDataModule` (labeled + unlabeled, DHO, LLKD) and
:class:`~kd_lightning.data.transfer.TransferSetDataModule` (distil on other data than the teacher's, KD³).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.base import KDDataModule, targets_of
from kd_lightning.errors import KDConfigError

__all__ = ["ClassGroupsDataModule", "RelabeledDataset", "WrappedDataModule", "class_group_table"]


class WrappedDataModule(KDDataModule):
    """Base of the data modules that wrap ``source``: validation, test, ``prepare_data`` and the data identity
    are the source's; ``num_classes`` and ``input_shape`` too unless the wrapper changes them.

    Args:
        source: the classification data module to wrap.
        num_workers: DataLoader workers of the training loader; ``None``: the source's.
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule`; ``batch_size`` is the
            wrapper's training batch size (the source's own batch sizes serve validation and test).
    """

    #: The init argument that names the data a *teacher* trained for this run learns from (``"source"``), or
    #: ``None`` when the teacher trains on this wrapper's own training loader (see
    #: :func:`~kd_lightning.teachers.fingerprint.teacher_data`).
    teacher_data_key: str | None = None

    def __init__(self, source: KDDataModule, num_workers: int | None = None, **kwargs: Any) -> None:
        if not isinstance(source, KDDataModule):
            raise KDConfigError(
                "data.init_args.source",
                f"must be a kd-lightning data module, got {type(source).__name__}",
                "give class_path and init_args of one, e.g. class_path: DigitsDataModule",
            )
        if source.task != "classification":
            raise KDConfigError(
                "data.init_args.source",
                f"{type(source).__name__} serves a {source.task!r} task; this wrapper needs classification data",
                "wrap a classification data module (digits, CIFAR, ImageNet, RadioML)",
            )
        super().__init__(num_workers=source.num_workers if num_workers is None else num_workers, **kwargs)
        self.source = source
        self.num_classes = source.num_classes
        self.input_shape = tuple(getattr(source, "input_shape", ()))

    def prepare_data(self) -> None:
        self.source.prepare_data()

    def data_identity(self) -> dict[str, Any]:
        return {"source": self.source.data_identity()}

    def setup_source(self, stage: str | None) -> None:
        """Set the source up for ``stage`` and take its sets (training: its whole training set)."""
        self.source.setup(stage)
        self.val_set = self.source.val_set
        self.test_set = self.source.test_set

    def val_dataloader(self) -> DataLoader:
        return self.source.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.source.test_dataloader()


def class_group_table(class_groups: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """``[num_classes]`` table: original class -> group index.

    Raises:
        KDConfigError: a class is in no group or in two, a group is empty, or an id is out of range.
    """
    field = "data.init_args.class_groups"
    if len(class_groups) < 2:
        raise KDConfigError(
            field, f"needs at least two groups, got {len(class_groups)}", "e.g. [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]"
        )
    table = torch.full((num_classes,), -1, dtype=torch.long)
    for g, group in enumerate(class_groups):
        if not group:
            raise KDConfigError(field, f"group {g} is empty", "every group needs at least one class")
        for c in group:
            if not 0 <= int(c) < num_classes:
                raise KDConfigError(
                    field, f"class {c} is not a class id of the source (0..{num_classes - 1})", "fix the id"
                )
            if table[int(c)] >= 0:
                raise KDConfigError(
                    field, f"class {c} is in groups {int(table[int(c)])} and {g}", "put each class in one group"
                )
            table[int(c)] = g
    missing = (table < 0).nonzero().flatten().tolist()
    if missing:
        raise KDConfigError(
            field, f"classes {missing} are in no group", "add them to a group (every sample needs a label)"
        )
    return table


class RelabeledDataset(Dataset):
    """A ``(sample, target, *extras)`` dataset whose targets go through ``table`` (original class -> new class)."""

    def __init__(self, dataset: Dataset, table: torch.Tensor) -> None:
        self.dataset = dataset
        self.table = table

    @property
    def targets(self) -> torch.Tensor:
        return self.table[targets_of(self.dataset)]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        return (item[0], int(self.table[int(item[1])]), *item[2:])


class ClassGroupsDataModule(WrappedDataModule):
    """Few-class view of a classification data module: each group of source classes becomes one class.

    ``class_groups: [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]`` turns digits into even/odd; ``[[0, 1, 2, 3, 4],
    [5, 6, 7, 8, 9]]`` into low/high. Every split is relabelled (training, validation, test); the images,
    transforms and splits are the source's. The few-class regime of LELP (Loo et al., 2024).

    Args:
        source: the data module to regroup.
        class_groups: the groups, a partition of the source's class ids.
        group_names: one name per group (default ``"g0"``, ``"g1"``, ...).
        **kwargs: the shared arguments (``batch_size`` of the training loader, ...).
    """

    def __init__(
        self,
        source: KDDataModule,
        class_groups: list[list[int]],
        group_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(source=source, **kwargs)
        self.table = class_group_table(class_groups, source.num_classes)
        self.class_groups = [list(map(int, g)) for g in class_groups]
        if group_names is not None and len(group_names) != len(class_groups):
            raise KDConfigError(
                "data.init_args.group_names",
                f"has {len(group_names)} names for {len(class_groups)} groups",
                "give one name per group or leave it empty",
            )
        self.classes = list(group_names) if group_names else [f"g{g}" for g in range(len(class_groups))]
        self.num_classes = len(class_groups)

    def data_identity(self) -> dict[str, Any]:
        return {**super().data_identity(), "class_groups": self.class_groups}

    def setup(self, stage: str | None = None) -> None:
        self.setup_source(stage)
        if self.source.train_set is not None and self.train_set is None:
            self.train_set = RelabeledDataset(self.source.train_set, self.table)
        self.val_set = None if self.source.val_set is None else RelabeledDataset(self.source.val_set, self.table)
        self.test_set = None if self.source.test_set is None else RelabeledDataset(self.source.test_set, self.table)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", train=False)
