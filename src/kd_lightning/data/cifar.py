"""CIFAR-10 and CIFAR-100 data modules.

The python-pickle releases are read directly (no torchvision dataset object, no PIL): each
split lives in memory as one ``uint8`` tensor ``[N, 3, 32, 32]`` plus ``int64`` targets, and
the benchmark augmentation (``RandomCrop(32, padding=4)`` + horizontal flip, then
``Normalize``) runs on tensors.

Two options serve speed. ``return_view=True`` numbers each training sample's augmentation (one of
162 crop+flip views, :mod:`kd_lightning.data.views`), which lets
:class:`~kd_lightning.callbacks.TeacherLogitCache` replace the teacher by stored logits.
``fast=True`` holds the training set as one ``uint8`` tensor on the training device and crops, flips
and normalises whole batches there (:class:`~kd_lightning.data.fast.DeviceImageLoader`): same
augmentation distribution, no workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, Subset
from torchvision.datasets.utils import extract_archive

from kd_lightning.data.base import KDDataModule, TensorImageDataset, read_data_pickle, stratified_split
from kd_lightning.data.fast import DeviceImageLoader
from kd_lightning.data.transforms import Compose, RandomHorizontalFlip, RandomTranslate, ToFloatNormalize
from kd_lightning.data.views import (
    CROP_PADDING,
    VIEW_ENCODING_VERSION,
    RandomCropFlipView,
    TensorImageViewDataset,
    ViewSpace,
    crop_flip_batch,
    decode_view,
    encode_view,
    num_views,
    pad_images,
)
from kd_lightning.errors import DatasetChecksumError, DatasetNotFoundError, KDConfigError, one_line

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "DatasetChecksumError", "load_cifar_batches"]


def _normalise_keys(entry: dict[Any, Any]) -> dict[str, Any]:
    # Real CIFAR files are Python 2 pickles (str keys under encoding="latin1");
    # files written by Python 3 have bytes keys. Accept both.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


def _load_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR python batch, read with the restricted unpickler (arrays, dicts, lists, strings, numbers only)."""
    entry = read_data_pickle(path, "CIFAR")
    if not isinstance(entry, dict):
        raise KDConfigError(
            "data.init_args.root", f"{path} is not a CIFAR pickle: expected a dict, got {type(entry).__name__}"
        )
    return _normalise_keys(entry)


def load_cifar_batches(paths: Sequence[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR python-pickle batch files into tensors.

    Args:
        paths: batch files of one split, concatenated in this order.
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).

    Returns:
        ``(images, targets)``: ``uint8 [N, 3, 32, 32]`` and ``int64 [N]``.

    Raises:
        ValueError: if a file lacks ``data`` or ``label_key`` or has the wrong shape.
    """
    images, targets = [], []
    for path in paths:
        entry = _load_pickle(path)
        missing = [k for k in ("data", label_key) if k not in entry]
        if missing:
            raise KDConfigError(f"{path} has no key {missing[0]!r} (keys: {sorted(entry)}).")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise KDConfigError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}.")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        targets.append(torch.from_numpy(labels))
    return torch.cat(images), torch.cat(targets)


def _md5(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


_ARGS_DOC = """
    Args:
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``root``,
            ``download``, ``batch_size``, ``num_workers``, ``split_seed``, ``meta_split``, ...).
        val_split: fraction of the training set held out (stratified, evaluation transform)
            as the validation set. ``0`` validates on the official test split, as the
            benchmark protocol does.
        augment: ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` on the training set.
        checksum: verify the md5 of every file against torchvision's published values in
            :meth:`setup` (slower; fails on anything but the official files).
        return_index: training samples become ``(image, target, index)``, ``index`` being the
            sample's position in the training set (``0 .. len(train_set) - 1``); needed by
            memory-bank methods such as CRD. Validation and test samples stay
            ``(image, target)``.
        return_view: training samples become ``(image, target, index, view)``: ``view`` numbers the
            sample's augmentation, ``(dy·9 + dx)·2 + flip`` with ``dy, dx`` the crop window's offset in
            the 4-padded image (0..8) and ``flip`` 0/1, so 0..161 (``80``: no shift, no flip, the
            evaluation view; every sample has view 80 with ``augment=False``). The images are the
            same as without it for the same seed. Needed by the teacher-logit cache
            (:class:`~kd_lightning.callbacks.TeacherLogitCache`).
        fast: the GPU input path. The training set is held as one ``uint8`` tensor on the training
            device (moved there at the first ``train_dataloader`` call), padded once; each batch is
            one gather with per-sample crop offsets, a flip by index, and a normalisation on the
            device, in channels-last layout. No per-image Python, no workers (``num_workers`` and
            ``pin_memory`` are ignored); sharded by DDP rank, reshuffled every epoch from a generator
            seeded by ``torch.initial_seed()`` (``seed_everything``) and the epoch. Same augmentation
            distribution and view numbering as the per-sample path, but other random draws.
            Validation and test batches are gathered the same way (no augmentation).
"""


class _CIFARDataModule(KDDataModule):
    """Shared logic of the CIFAR data modules; use :class:`CIFAR10DataModule` or :class:`CIFAR100DataModule`."""

    name: ClassVar[str]
    base_folder: ClassVar[str]
    train_files: ClassVar[tuple[str, ...]]
    test_files: ClassVar[tuple[str, ...]]
    meta_file: ClassVar[str]
    label_key: ClassVar[str]
    label_names_key: ClassVar[str]
    torchvision_name: ClassVar[str]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    input_shape: tuple[int, ...] = (3, 32, 32)

    def __init__(
        self,
        val_split: float = 0.0,
        augment: bool = True,
        checksum: bool = False,
        return_index: bool = False,
        return_view: bool = False,
        fast: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= val_split < 1.0:
            raise KDConfigError("val_split", f"must be in [0, 1), got {val_split}")
        self.val_split = val_split
        self.augment = augment
        self.checksum = checksum
        self.return_index = return_index
        self.return_view = return_view
        self.fast = fast
        self.classes: list[str] = []
        self._test_data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._padded: dict[tuple[int, str], torch.Tensor] = {}  # (id of an image tensor, device) -> padded stack
        self._fast_seed: int | None = None
        self._identity_digest: tuple[int, str] | None = None

    # ----------------------------------------------------------------------------- files
    @property
    def expected_files(self) -> tuple[str, ...]:
        """Files of the release, relative to the dataset folder."""
        return (*self.train_files, *self.test_files, self.meta_file)

    def _folder(self) -> Path:
        """The dataset folder: ``root/<base_folder>``, or ``root`` itself if it holds the files."""
        root = Path(self.root).expanduser()
        nested = root / self.base_folder
        if not nested.is_dir() and all((root / f).is_file() for f in self.expected_files):
            return root
        return nested

    def _missing_files(self) -> list[str]:
        folder = self._folder()
        return [f for f in self.expected_files if not (folder / f).is_file()]

    def _torchvision_class(self) -> Any:
        # Looked up at call time so that tests can monkeypatch torchvision.datasets.
        return getattr(torchvision.datasets, self.torchvision_name)

    def _published_md5s(self) -> dict[str, str]:
        tv = self._torchvision_class()
        md5s = {name: md5 for name, md5 in [*tv.train_list, *tv.test_list]}
        md5s[tv.meta["filename"]] = tv.meta["md5"]
        return md5s

    def verify_checksums(self) -> None:
        """Compare every file's md5 with torchvision's published value.

        Raises:
            DatasetChecksumError: naming the first file whose md5 differs.
        """
        folder = self._folder()
        for filename, expected in self._published_md5s().items():
            actual = _md5(folder / filename)
            if actual != expected:
                raise DatasetChecksumError(
                    f"{self.name} file {folder / filename} is corrupted or not the official release: "
                    f"md5 {actual}, expected {expected}. Delete {folder} and pass "
                    "--data.init_args.download true (needs internet), or set "
                    "--data.init_args.checksum false to skip the check (e.g. for test data)."
                )

    def prepare_data(self) -> None:
        """Extract a local archive or, with ``download=True``, download the release when missing.

        Runs on one process per node. Never touches the network unless ``download=True``.
        """
        if not self._missing_files():
            return
        root = Path(self.root).expanduser()
        archive = root / self._torchvision_class().filename
        if archive.is_file():
            extract_archive(str(archive), str(root))
            if not self._missing_files():
                return
        if self.download:
            dataset = self._torchvision_class()
            try:
                dataset(str(root), train=True, download=True)
            except OSError as err:  # no network, proxy, DNS (urllib's URLError is an OSError)
                missing = self._missing_files()
                raise KDConfigError(
                    "data.init_args.download",
                    f"could not download {self.name} ({type(err).__name__}: {one_line(str(err), 80)}), so "
                    f"{root.resolve() / self.base_folder} lacks {len(missing)} files "
                    f"({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''})",
                    f"fetch {dataset.url} on a machine with internet and put it in that root folder (kd extracts "
                    f"it), or point data.init_args.root at a folder that holds {self.base_folder}/",
                ) from None

    # ----------------------------------------------------------------------------- transforms
    def train_transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Transform of training images (``uint8 [3, 32, 32]`` in, normalised float out)."""
        if not self.augment:
            return self.eval_transform()
        return Compose([RandomTranslate(padding=4), RandomHorizontalFlip(), ToFloatNormalize(self.mean, self.std)])

    def eval_transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Transform of validation and test images: ``Normalize`` only."""
        return ToFloatNormalize(self.mean, self.std)

    def view_transform(self) -> RandomCropFlipView:
        """The numbered crop+flip of ``return_view`` (identity view only when ``augment`` is off)."""
        return RandomCropFlipView(padding=CROP_PADDING, enabled=self.augment)

    def _builtin_train_transform(self) -> bool:
        return type(self).train_transform is _CIFARDataModule.train_transform

    def _check_view_options(self) -> None:
        if (self.return_view or self.fast) and not self._builtin_train_transform():
            option = "return_view" if self.return_view else "fast"
            raise KDConfigError(
                f"data.init_args.{option}=true needs the built-in RandomCrop(32, padding=4) + flip, but "
                f"{type(self).__name__} overrides train_transform (a custom transform has no numbered views and no "
                f"batched GPU version): set data.init_args.{option}=false."
            )

    # ----------------------------------------------------------------------------- setup
    def _load(self, files: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        folder = self._folder()
        return load_cifar_batches([folder / f for f in files], self.label_key)

    def _check_ready(self) -> None:
        missing = self._missing_files()
        if missing:
            archive = self._torchvision_class().filename
            raise DatasetNotFoundError(
                self.name,
                self.root,
                [f"{self.base_folder}/{f}" for f in missing],
                (f"Missing: {', '.join(missing)}. " if len(missing) < len(self.expected_files) else "")
                + "Pass --data.init_args.download true (needs internet) "
                f"or set --data.init_args.root to the folder that holds {self.base_folder}/ "
                f"(or the archive {archive}).",
            )
        if self.checksum:
            self.verify_checksums()

    def setup(self, stage: str | None = None) -> None:
        """Read the splits into memory (once) and build the datasets.

        Raises:
            DatasetNotFoundError: if a file of the release is missing.
            DatasetChecksumError: with ``checksum=True``, if a file differs from the release.
        """
        if self.train_set is not None and self.test_set is not None:
            return
        self._check_ready()
        meta = _load_pickle(self._folder() / self.meta_file)
        self.classes = [
            c.decode("latin1") if isinstance(c, bytes) else str(c) for c in meta.get(self.label_names_key, [])
        ]

        test_images, test_targets = self._load(self.test_files)
        self.test_set = TensorImageDataset(test_images, test_targets, self.eval_transform())

        images, targets = self._load(self.train_files)
        if self.val_split > 0:
            kept, held = stratified_split(targets, self.val_split, self.split_seed)
            self.val_set = TensorImageDataset(images[held], targets[held], self.eval_transform())
            images, targets = images[kept], targets[kept]
        else:
            self.val_set = self.test_set
        self._check_view_options()
        if self.return_view:
            self.train_set = TensorImageViewDataset(images, targets, self.view_transform(), self.eval_transform())
        else:
            self.train_set = TensorImageDataset(images, targets, self.train_transform(), return_index=self.return_index)

    # ----------------------------------------------------------------------------- fast input path
    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @staticmethod
    def _tensor_source(dataset: Dataset | None, split: str) -> tuple[TensorImageDataset, torch.Tensor | None]:
        """The tensor dataset behind ``dataset`` and the positions it exposes (``None``: all)."""
        if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorImageDataset):
            return dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
        if isinstance(dataset, TensorImageDataset):
            return dataset, None
        raise RuntimeError(f"data.init_args.fast=true: the {split} set is {type(dataset).__name__}, not image tensors.")

    def padded_images(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``images`` padded by 4 (``uint8``, channels-last ``[N, 40, 40, 3]``) on ``device``, built once per device."""
        key = (id(images), str(device))
        if key not in self._padded:
            for old in [k for k in self._padded if k[0] == id(images)]:
                del self._padded[old]  # moved to another device: keep one copy
            self._padded[key] = pad_images(images.to(device), CROP_PADDING, fill=0, channels_last=True)
        return self._padded[key]

    def _seed(self) -> int:
        if self._fast_seed is None:
            seed = torch.initial_seed() % (2**63 - 1)
            trainer = getattr(self, "trainer", None)
            if trainer is not None and trainer.world_size > 1:
                seed = int(trainer.strategy.broadcast(seed, src=0))  # every rank must shuffle alike
            self._fast_seed = int(seed)
        return self._fast_seed

    def _fast_loader(self, dataset: Dataset | None, split: str, train: bool) -> DeviceImageLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create the {split} set.")
        source, pool = self._tensor_source(dataset, split)
        rank, world = self._rank()
        return DeviceImageLoader(
            self.padded_images(source.images, self._device()),
            source.targets,
            pool,
            batch_size=self.batch_size if train else self.eval_batch_size,
            mean=self.mean,
            std=self.std,
            size=tuple(source.images.shape[-2:]),
            padding=CROP_PADDING,
            shuffle=train,
            augment=train and self.augment,
            drop_last=self.drop_last if train else False,
            return_index=train and self.return_index,
            return_view=train and self.return_view,
            seed=self._seed() if train else 0,
            rank=rank,
            world_size=world,
        )

    def train_dataloader(self) -> Any:
        if self.fast:
            return self._fast_loader(self.train_set, "train", train=True)
        return super().train_dataloader()

    def val_dataloader(self) -> Any:
        if self.fast:
            return self._fast_loader(self.val_set, "validation", train=False)
        return super().val_dataloader()

    def test_dataloader(self) -> Any:
        if self.fast:
            return self._fast_loader(self.test_set, "test", train=False)
        return super().test_dataloader()

    # ----------------------------------------------------------------------------- numbered views
    def _train_source(self) -> TensorImageDataset:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.teacher_view_space() needs setup('fit') to have run.")
        return self._tensor_source(self.train_set, "train")[0]

    def _digest(self, source: TensorImageDataset) -> str:
        if self._identity_digest is None or self._identity_digest[0] != id(source.images):
            digest = hashlib.blake2b(digest_size=16)
            digest.update(source.images.contiguous().numpy().tobytes())
            digest.update(source.targets.numpy().tobytes())
            self._identity_digest = (id(source.images), digest.hexdigest())
        return self._identity_digest[1]

    def teacher_view_space(self) -> ViewSpace:
        """The enumerated training views, for :class:`~kd_lightning.callbacks.TeacherLogitCache`.

        Raises:
            KDConfigError: when the training batches carry no view ids (``return_view`` is off) or the
                transform is not the built-in crop+flip.
        """
        if not self.return_view:
            raise KDConfigError(
                f"{type(self).__name__} does not number its training views: set data.init_args.return_view=true "
                "so that batches are (x, y, index, view) and the teacher-logit cache can look each view up."
            )
        self._check_view_options()
        source = self._train_source()
        padding = CROP_PADDING
        views = torch.arange(num_views(padding)) if self.augment else torch.tensor([encode_view(padding, padding, 0)])
        identity = {
            "data": f"{type(self).__module__}.{type(self).__qualname__}",
            "samples": len(source),
            "images_targets_blake2b": self._digest(source),
            "transform": {
                "kind": "crop+flip",
                "padding": padding,
                "fill": 0,
                "size": list(source.images.shape[-2:]),
                "mean": list(self.mean),
                "std": list(self.std),
                "view_encoding": VIEW_ENCODING_VERSION,
            },
        }
        mean = torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32).reshape(-1, 1, 1)
        size = tuple(source.images.shape[-2:])

        def render(indices: torch.Tensor, view_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
            padded = self.padded_images(source.images, device)
            dy, dx, flip = decode_view(view_ids.to(device).long(), padding)
            images = crop_flip_batch(padded, indices.to(device), dy, dx, flip, size, channels_last=True)
            return (images.to(torch.float32) * (1 / 255) - mean.to(device)) / std.to(device)

        return ViewSpace(
            num_samples=len(source), num_views=num_views(padding), views=views, identity=identity, render=render
        )


class CIFAR10DataModule(_CIFARDataModule):
    __doc__ = f"""CIFAR-10 (10 classes, 50,000 train / 10,000 test images of 32x32).

    Reads ``root/cifar-10-batches-py/{{data_batch_1..5, test_batch, batches.meta}}`` (targets:
    ``labels``). Normalisation uses the usual CIFAR-10 mean/std.

{_ARGS_DOC}
    Example:
        >>> dm = CIFAR10DataModule(root="data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> images, targets = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    name = "CIFAR-10"
    base_folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = "labels"
    label_names_key = "label_names"
    torchvision_name = "CIFAR10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    num_classes = 10


class CIFAR100DataModule(_CIFARDataModule):
    __doc__ = f"""CIFAR-100 (100 fine classes, 50,000 train / 10,000 test images of 32x32).

    Reads ``root/cifar-100-python/{{train, test, meta}}`` (targets: ``fine_labels``).
    Mean/std are those of the CIFAR-100 KD benchmark recipe (RepDistiller, mdistiller):
    ``(0.5071, 0.4867, 0.4408)`` / ``(0.2675, 0.2565, 0.2761)``.

{_ARGS_DOC}
    Example:
        >>> dm = CIFAR100DataModule(root="data", download=True)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> images, targets = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    name = "CIFAR-100"
    base_folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"
    label_names_key = "fine_label_names"
    torchvision_name = "CIFAR100"
    mean = (0.5071, 0.4867, 0.4408)
    std = (0.2675, 0.2565, 0.2761)
    num_classes = 100
