"""Shared base for kd-lightning data modules, plus the small dataset and transform helpers they share."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kd_lightning.errors import ConfigFieldPrefix, KDConfigError
from kd_lightning.utils.safe_pickle import UnsafePickleError, restricted_load


class KDDataModule(L.LightningDataModule, metaclass=ConfigFieldPrefix):
    """Base for every data module of the zoo; subclasses pass these arguments through ``**kwargs``.

    Subclasses set ``num_classes`` (read by the task's checks) and ``input_shape`` (one sample, without batch
    dimension: used for early shape checks) and fill ``self.train_set``, ``self.val_set``, ``self.test_set`` in
    :meth:`setup`. Batches are ``(inputs, targets)`` tuples (``(inputs, targets, indices)`` for training sets
    built with ``return_index=True``).

    Args:
        root: folder that holds (or will hold) the data.
        download: fetch the data in :meth:`prepare_data` when missing. Never on by default.
        batch_size: training batch size (per process under DDP).
        eval_batch_size: validation/test batch size; ``None`` means ``batch_size``.
        num_workers: DataLoader worker processes.
        split_seed: seed of the held-out splits; independent of the training seed.
        pin_memory: pin host memory for faster host-to-GPU copies.
        drop_last: drop the last incomplete training batch.
        meta_split: share of each class of the training set held out as a *meta* split that the student does
            not train on, served by :meth:`meta_dataloader` (bilevel methods: TGeo-KD's fusion network learns on
            it). ``0``: none.
        meta_batch_size: batch size of :meth:`meta_dataloader`; ``None`` means ``batch_size``.
    """

    config_prefix = "data.init_args."
    num_classes: int
    input_shape: tuple[int, ...]
    #: How a list of samples becomes a batch (``None``: PyTorch's default stacking); e.g. lists of images and
    #: box dicts for detection.
    collate_fn: ClassVar[Callable[[list[Any]], Any] | None] = None
    #: The task the batches serve (``"classification"``, ``"language_modeling"``, ``"detection"``,
    #: ``"segmentation"``); methods of another task refuse the data module at setup.
    task: ClassVar[str] = "classification"
    #: What the training batches carry: ``"supervised"`` (labeled batches), ``"semi_supervised"`` (labeled and
    #: unlabeled parts, :mod:`kd_lightning.data.semi_supervised`) or ``"unlabeled"`` (inputs only: a transfer
    #: set). Methods declare the regimes they train on and refuse the others at setup.
    regime: ClassVar[str] = "supervised"

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        split_seed: int = 0,
        pin_memory: bool = True,
        drop_last: bool = False,
        meta_split: float = 0.0,
        meta_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise KDConfigError("batch_size", f"must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise KDConfigError("eval_batch_size", f"must be >= 1 or null, got {eval_batch_size}")
        if num_workers < 0:
            raise KDConfigError("num_workers", f"must be >= 0, got {num_workers}")
        if not 0.0 <= meta_split < 1.0:
            raise KDConfigError("meta_split", f"must be in [0, 1), got {meta_split}")
        if meta_batch_size is not None and meta_batch_size < 1:
            raise KDConfigError("meta_batch_size", f"must be >= 1 or null, got {meta_batch_size}")
        self.root = root
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.meta_split = meta_split
        self.meta_batch_size = meta_batch_size
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

    def check_before_teacher(self) -> None:
        """Checks that should fail before a missing teacher is trained (minutes); the kd CLI calls it first.

        Nothing by default; a data module whose arguments can only be checked against the data (a labeled
        fraction against the class sizes) sets itself up here.
        """

    def train_targets(self) -> torch.Tensor:
        """Class index of every item of the training set's index space (what ``return_index`` numbers)."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.train_targets() needs setup('fit') to have run.")
        return targets_of(index_space(self.train_set))

    def train_index_size(self) -> int:
        """Size of the training set's index space (a held-out part keeps its positions in it)."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.train_index_size() needs setup('fit') to have run.")
        return len(index_space(self.train_set))  # type: ignore[arg-type]

    def hold_out(self, fraction: float, seed: int | None = None) -> Dataset:
        """Carve a stratified part of the training set out of it and return that part.

        ``train_set`` shrinks to the rest; calling again with the same fraction returns the same part. Uses
        the training transforms. :attr:`meta_split` uses it; call it yourself for other held-out data.

        Args:
            fraction: share of each class to hold out, in ``(0, 1)``.
            seed: seed of the split; defaults to ``split_seed + 1`` (independent of the validation split).
        """
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.hold_out() needs setup('fit') to have run.")
        if not 0.0 < fraction < 1.0:
            raise KDConfigError("hold-out fraction", f"must be in (0, 1), got {fraction}")
        if self._held_out is not None and self.train_set is self._held_out[0] and self._held_out[2] == fraction:
            return self._held_out[1]
        source = self.train_set
        kept, held = stratified_split(targets_of(source), fraction, self.split_seed + 1 if seed is None else seed)
        self.train_set = Subset(source, kept.tolist())
        held_out = Subset(source, held.tolist())
        self._held_out = (self.train_set, held_out, fraction)
        return held_out

    @contextlib.contextmanager
    def full_training_set(self) -> Iterator[None]:
        """Within the block the training loader serves the whole training set (no meta split carved out):
        a teacher trained for a run is trained on all of it, like a teacher trained elsewhere."""
        saved = self.meta_split
        self.meta_split = 0.0
        try:
            yield
        finally:
            self.meta_split = saved

    @property
    def meta_set(self) -> Dataset | None:
        """The meta split (``meta_split`` of each class of the training set, after ``setup("fit")``), or ``None``."""
        if self.meta_split == 0 or self.train_set is None:
            return None
        return self.hold_out(self.meta_split)

    def meta_dataloader(self, shuffle: bool = True, shard: bool = False, seed: int = 0) -> DataLoader:
        """Batches of the meta split.

        Args:
            shuffle: reshuffle every pass (generator seeded with ``seed`` + the DDP rank); ``False``: in order.
            shard: under DDP, each rank reads every world-size-th item (to split a pass over the split).
            seed: seed of the order.

        Raises:
            KDConfigError: ``meta_split`` is 0.
        """
        held_out = self.meta_set
        if held_out is None:
            raise KDConfigError(
                "data.init_args.meta_split",
                "is 0: this method learns on a held-out meta split of the training set",
                "set data.init_args.meta_split, e.g. 0.1",
            )
        if len(held_out) == 0:  # type: ignore[arg-type]
            rank_zero_warn(
                f"data.init_args.meta_split={self.meta_split} holds out no sample (every class has at most one "
                "training sample): the meta batches come from the training set itself. Only sensible on toy data."
            )
            held_out = self.train_set
        rank, world = _rank_and_world()
        dataset = held_out
        if shard and world > 1:
            dataset = Subset(dataset, list(range(rank, len(dataset), world)))  # type: ignore[arg-type]
        batch_size = self.meta_batch_size or self.batch_size
        generator = torch.Generator().manual_seed(seed + rank) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=shuffle and len(dataset) > batch_size,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and shuffle,
        )

    def _loader(self, dataset: Dataset | None, split: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create the {split} set.")
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = True
        if self.collate_fn is not None:
            kwargs["collate_fn"] = self.collate_fn
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
        _ = self.meta_set  # carve the meta split out of the training set first
        return self._loader(self.train_set, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", train=False)


def read_data_pickle(path: Path, dataset: str) -> Any:
    """A published dataset pickle, read with :func:`~kd_lightning.utils.safe_pickle.restricted_load`.

    Raises:
        KDConfigError: the file names code (refused before anything ran) or is not a complete pickle.
    """
    try:
        return restricted_load(path)
    except UnsafePickleError as err:
        raise KDConfigError("data.init_args.root", str(err)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as err:
        raise KDConfigError(
            "data.init_args.root",
            f"{path} is not a readable {dataset} pickle ({type(err).__name__}: {err})",
            "the file may be truncated: download the dataset again",
        ) from None


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def index_space(dataset: Dataset) -> Dataset:
    """The dataset whose positions a training set's sample indices refer to (a ``Subset`` numbers its base)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


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
        raise KDConfigError(f"stratified_split: fraction must be in [0, 1), got {fraction}.")
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
            raise KDConfigError(
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
