"""Labeled + unlabeled training data for semi-supervised distillation (DHO, LLKD, KD on unlabeled data).

:class:`SemiSupervisedDataModule` splits any classification data module's training set into a stratified,
seeded labeled part and an unlabeled pool whose labels never reach the method: the pool's items are
``(input, pool_index)`` (:class:`UnlabeledView` drops the label and has no ``targets``). Training batches are
``{"labeled": (x, y), "unlabeled": (x_u, pool_index)}`` from Lightning's ``CombinedLoader``; the labeled stream
is over-sampled (a fresh permutation each pass) so that one epoch is one pass over the unlabeled pool.
Validation and test are the source's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from kd_lightning.data.base import KDDataModule, targets_of
from kd_lightning.data.wrappers import WrappedDataModule
from kd_lightning.errors import KDConfigError

__all__ = [
    "LABELED",
    "UNLABELED",
    "SemiSupervisedDataModule",
    "UnlabeledView",
    "labeled_split",
]

#: Keys of a training batch of the data regimes (labeled part ``(x, y)``, unlabeled part ``(x, pool_index)``).
LABELED, UNLABELED = "labeled", "unlabeled"


class UnlabeledView(Dataset):
    """The inputs of some items of a ``(input, target, ...)`` dataset, as ``(input, position)``; no labels.

    The label of each item is read by the wrapped dataset and dropped here; nothing of this object exposes it
    (no ``targets`` attribute), so a method that receives these batches cannot use the labels.
    """

    def __init__(self, dataset: Dataset, indices: torch.Tensor | list[int] | None = None) -> None:
        self._dataset = dataset
        self._indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self._dataset[self._indices[index]][0], index


def labeled_split(
    targets: torch.Tensor,
    labeled_fraction: float | None,
    labels_per_class: int | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified ``(labeled, unlabeled)`` indices: ``labels_per_class`` items of each class, or
    ``round(labeled_fraction · n_c)`` (at least one) of each class ``c``; deterministic for ``seed``.

    Raises:
        KDConfigError: a class has too few items for its share (naming the class and the count).
    """
    generator = torch.Generator().manual_seed(seed)
    labeled, unlabeled = [], []
    for c in torch.unique(targets).tolist():
        idx = (targets == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        if labels_per_class is not None:
            n = labels_per_class
            field, fix = "data.init_args.labels_per_class", "lower labels_per_class"
        else:
            n = round(float(labeled_fraction) * len(idx))  # type: ignore[arg-type]
            field, fix = "data.init_args.labeled_fraction", "raise labeled_fraction or use labels_per_class"
            if n < 1:
                raise KDConfigError(
                    field,
                    f"{labeled_fraction} of class {c}'s {len(idx)} training items is less than one label",
                    f"{fix} (at least 1/{len(idx)} gives every class a label)",
                )
        if n >= len(idx):
            raise KDConfigError(
                field, f"class {c} has {len(idx)} training items: {n} labeled leaves no unlabeled item", fix
            )
        labeled.append(idx[:n])
        unlabeled.append(idx[n:])
    return torch.cat(labeled).sort().values, torch.cat(unlabeled).sort().values


class SemiSupervisedDataModule(WrappedDataModule):
    """A labeled fraction and an unlabeled pool of ``source``'s training set, served together.

    Args:
        source: the classification data module to split (its validation and test splits are kept).
        labeled_fraction: share of each class that keeps its label, in ``(0, 1)``.
        labels_per_class: labeled items per class instead of a fraction (give one of the two).
        labeled_seed: seed of the labeled/unlabeled split (independent of the training seed, so every seed of
            a benchmark sees the same labels unless this changes).
        unlabeled_batch_size: batch size of the unlabeled stream (``batch_size`` is the labeled stream's);
            ``None``: ``batch_size``.
        teacher_sees: what a teacher trained by ``kd fit`` for this run learns from: ``"source"`` (the whole
            labeled source training set: a stand-in for a teacher pre-trained elsewhere, such as CLIP) or
            ``"labeled"`` (only the labeled part). A teacher from ``teacher_ckpt`` is used as given.
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule`.
    """

    regime = "semi_supervised"

    def __init__(
        self,
        source: KDDataModule,
        labeled_fraction: float | None = 0.1,
        labels_per_class: int | None = None,
        labeled_seed: int = 0,
        unlabeled_batch_size: int | None = None,
        teacher_sees: Literal["source", "labeled"] = "source",
        **kwargs: Any,
    ) -> None:
        super().__init__(source=source, **kwargs)
        if labels_per_class is not None:
            if labels_per_class < 1:
                raise KDConfigError("data.init_args.labels_per_class", f"must be >= 1, got {labels_per_class}")
            labeled_fraction = None
        elif labeled_fraction is None:
            raise KDConfigError(
                "data.init_args.labeled_fraction", "and labels_per_class are both empty", "give one of them"
            )
        elif not 0.0 < labeled_fraction < 1.0:
            raise KDConfigError(
                "data.init_args.labeled_fraction",
                f"must be in (0, 1), got {labeled_fraction}",
                "it is the share of each class that keeps its label, e.g. 0.05",
            )
        if unlabeled_batch_size is not None and unlabeled_batch_size < 1:
            raise KDConfigError(
                "data.init_args.unlabeled_batch_size", f"must be >= 1 or null, got {unlabeled_batch_size}"
            )
        if teacher_sees not in ("source", "labeled"):
            raise KDConfigError("data.init_args.teacher_sees", f"must be 'source' or 'labeled', got {teacher_sees!r}")
        self.labeled_fraction = labeled_fraction
        self.labels_per_class = labels_per_class
        self.labeled_seed = labeled_seed
        self.unlabeled_batch_size = unlabeled_batch_size or self.batch_size
        self.teacher_sees = teacher_sees
        self.labeled_set: Dataset | None = None
        self.unlabeled_set: UnlabeledView | None = None
        self._teacher_training = False

    @property
    def teacher_data_key(self) -> str | None:  # type: ignore[override]
        return "source" if self.teacher_sees == "source" else None

    def setup(self, stage: str | None = None) -> None:
        self.setup_source(stage)
        source_train = self.source.train_set
        if source_train is None or self.labeled_set is not None:
            return
        labeled, unlabeled = labeled_split(
            targets_of(source_train), self.labeled_fraction, self.labels_per_class, self.labeled_seed
        )
        self.labeled_set = Subset(source_train, labeled.tolist())
        self.unlabeled_set = UnlabeledView(source_train, unlabeled)
        self.train_set = self.labeled_set  # what train_targets()/hold_out() and the teacher's training see

    def check_before_teacher(self) -> None:
        """Split now, so that a labeled fraction the classes cannot give fails before a teacher trains."""
        self.setup("fit")

    @contextlib.contextmanager
    def full_training_set(self) -> Iterator[None]:
        """Within the block the training loader serves plain ``(x, y)`` batches of the labeled part (the
        teacher's training with ``teacher_sees: labeled``)."""
        self._teacher_training = True
        try:
            yield
        finally:
            self._teacher_training = False

    def unlabeled_batches(self) -> int:
        """Batches in one pass over the unlabeled pool (the epoch length)."""
        assert self.unlabeled_set is not None, "call setup('fit') first"
        return math.ceil(len(self.unlabeled_set) / self.unlabeled_batch_size)

    def labeled_dataloader(self, num_samples: int | None = None) -> DataLoader:
        """Labeled ``(x, y)`` batches; ``num_samples``: draw that many items (several permutations when more
        than the labeled part holds)."""
        if self.labeled_set is None:
            raise RuntimeError("SemiSupervisedDataModule.setup('fit') has not run.")
        generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        sampler = RandomSampler(self.labeled_set, num_samples=num_samples, generator=generator)
        return DataLoader(
            self.labeled_set,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def unlabeled_dataloader(self, shuffle: bool = True) -> DataLoader:
        """Unlabeled ``(x, pool_index)`` batches (one pass over the pool)."""
        if self.unlabeled_set is None:
            raise RuntimeError("SemiSupervisedDataModule.setup('fit') has not run.")
        return DataLoader(
            self.unlabeled_set,
            batch_size=self.unlabeled_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and shuffle,
        )

    def train_dataloader(self) -> Any:
        if self._teacher_training:
            return self._loader(self.labeled_set, "labeled", train=True)
        draws = self.unlabeled_batches() * self.batch_size
        loaders = {LABELED: self.labeled_dataloader(num_samples=draws), UNLABELED: self.unlabeled_dataloader()}
        return CombinedLoader(loaders, mode="max_size_cycle")
