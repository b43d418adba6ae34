"""Shared base for kd-lightning data modules, plus the small dataset and transform helpers they share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


class KDDataModule(L.LightningDataModule):
    """Base for every data module of the zoo.

    Subclasses set ``num_classes`` (linked into the model by the CLI) and ``input_shape``
    (one sample, without batch dimension: used for early shape checks) and fill
    ``self.train_set``, ``self.val_set``, ``self.test_set`` in :meth:`setup`. Batches are
    ``(inputs, targets)`` tuples (``(inputs, targets, indices)`` for training sets built with
    ``return_index=True``).

    Args:
        root: folder that holds (or will hold) the data.
        download: fetch the data in :meth:`prepare_data` when missing. Never on by default.
        batch_size: training batch size (per process under DDP).
        eval_batch_size: validation/test batch size; ``None`` means ``batch_size``.
        num_workers: DataLoader worker processes.
        val_split: fraction of the training set held out as the validation set (stratified,
            fixed ``split_seed``). ``0`` uses the official test split for validation, as the
            CIFAR benchmark protocol does.
        split_seed: seed of the held-out split; independent of the training seed.
        pin_memory: pin host memory for faster host-to-GPU copies.
        drop_last: drop the last incomplete training batch.
    """

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_split: float = 0.0,
        split_seed: int = 0,
        pin_memory: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"data.val_split must be in [0, 1), got {val_split}.")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1 or null, got {eval_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}.")
        self.root = root
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.split_seed = split_seed
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._held_out: tuple[Dataset, Dataset, float] | None = None  # (kept train part, held-out, fraction)

    def data_identity(self) -> dict[str, Any]:
        """What identifies the data beyond the config, for the teacher-cache fingerprint.

        The fingerprint leaves out ``root`` (a moved copy of CIFAR is the same data); a data module whose
        files can differ under the same config (a generated RadioML file, a custom folder) returns what
        tells them apart, e.g. file names and sizes.
        """
        return {}

    def hold_out(self, fraction: float, seed: int | None = None) -> Dataset:
        """Carve a stratified part of the training set out of it and return that part.

        For methods that learn something on data the student does not train on (TGeo-KD's
        fusion-ratio network, self-distillation's α). ``train_set`` shrinks to the rest; calling
        again with the same fraction returns the same part. Uses the training transforms.

        Args:
            fraction: share of each class to hold out, in ``(0, 1)``.
            seed: seed of the split; defaults to ``split_seed + 1`` (independent of ``val_split``).
        """
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.hold_out() needs setup('fit') to have run.")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"hold-out fraction must be in (0, 1), got {fraction}.")
        if self._held_out is not None and self.train_set is self._held_out[0] and self._held_out[2] == fraction:
            return self._held_out[1]
        source = self.train_set
        kept, held = stratified_split(targets_of(source), fraction, self.split_seed + 1 if seed is None else seed)
        self.train_set = Subset(source, kept.tolist())
        held_out = Subset(source, held.tolist())
        self._held_out = (self.train_set, held_out, fraction)
        return held_out

    def _loader(self, dataset: Dataset | None, split: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create the {split} set.")
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = True
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=self.drop_last if train else False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", train=False)


def targets_of(dataset: Dataset) -> torch.Tensor:
    """Class index of every item of ``dataset`` (``targets`` attribute, Subset, TensorDataset, or a scan)."""
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets, dtype=torch.long)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


def stratified_split(
    targets: torch.Tensor | Sequence[int], fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices so that each class keeps ``fraction`` of its items in the second part.

    Deterministic for a given ``seed``. When ``fraction > 0``, every class with two or more
    items puts at least one item in each part (so no class vanishes from either side); a class
    with a single item keeps it in the first part.

    Args:
        targets: class index of every item.
        fraction: share of each class that goes to the held-out part, in ``[0, 1)``.
        seed: seed of the permutation.

    Returns:
        ``(kept_indices, held_out_indices)``, each sorted, int64.

    Raises:
        ValueError: if ``fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"stratified_split: fraction must be in [0, 1), got {fraction}.")
    targets = torch.as_tensor(targets).flatten()
    generator = torch.Generator().manual_seed(seed)
    kept, held = [torch.empty(0, dtype=torch.long)], [torch.empty(0, dtype=torch.long)]
    # Indices grouped by class (ascending class, ascending index inside a class): one sort
    # instead of one pass over all targets per class, which matters for ImageNet.
    order = torch.argsort(targets, stable=True)
    counts = torch.unique(targets, return_counts=True)[1].tolist()
    for idx in torch.split(order, counts):
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = round(fraction * len(idx))
        if len(idx) == 1:
            n_held = 0  # a lone item stays on the training side
        elif fraction > 0:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


class TensorImageDataset(Dataset):
    """Images held in one tensor, with an optional per-sample transform.

    Fast for small datasets (CIFAR, digits): no files and no PIL per sample.

    Args:
        images: ``[N, C, H, W]`` tensor (any dtype; CIFAR keeps ``uint8``).
        targets: ``[N]`` class indices.
        transform: called on one ``[C, H, W]`` image; ``None`` returns the stored image.
        return_index: return ``(image, target, index)`` instead of ``(image, target)``, where
            ``index`` is the position of the sample in this dataset (what memory-bank methods
            such as CRD need).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        return_index: bool = False,
    ) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if images.ndim != 4 or len(images) != len(targets):
            raise ValueError(
                f"TensorImageDataset needs images [N, C, H, W] and N targets, "
                f"got {tuple(images.shape)} and {tuple(targets.shape)}."
            )
        self.images = images
        self.targets = targets
        self.transform = transform
        self.return_index = return_index

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        target = int(self.targets[index])
        return (image, target, index) if self.return_index else (image, target)


class TransformedSubset(Dataset):
    """A view on some items of a ``(sample, target)`` dataset, with its own transform.

    Lets one scanned dataset (an ``ImageFolder`` built with ``transform=None``) serve as both
    a training part (augmenting transform) and a held-out part (evaluation transform) without
    scanning the files twice.

    Args:
        dataset: a dataset whose items are ``(sample, target)``.
        indices: which items to expose, in order; ``None`` exposes all of them.
        transform: applied to the sample.
        return_index: return ``(sample, target, index)``, ``index`` being the position in
            this subset.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int] | torch.Tensor | None = None,
        transform: Callable[[Any], Any] | None = None,
        return_index: bool = False,
    ) -> None:
        self.dataset = dataset
        self.indices = (
            torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)  # type: ignore[arg-type]
        )
        self.transform = transform
        self.return_index = return_index

    @property
    def targets(self) -> torch.Tensor:
        """Class index of every exposed item (read from ``dataset.targets``)."""
        return torch.as_tensor(self.dataset.targets, dtype=torch.long)[self.indices]  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        sample, target = self.dataset[int(self.indices[index])]
        if self.transform is not None:
            sample = self.transform(sample)
        return (sample, target, index) if self.return_index else (sample, target)
