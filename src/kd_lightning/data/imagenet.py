"""ImageNet (ILSVRC-2012) classification data module. Never downloads.

Two on-disk layouts are read:

* ImageFolder: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (the validation
  images sorted into class folders, e.g. with the usual ``valprep.sh``);
* torchvision's ``ImageNet`` layout: the same two folders plus ``root/meta.bin``, as written by
  ``torchvision.datasets.ImageNet`` from the official archives. When those archives
  (``ILSVRC2012_img_train.tar``, ``ILSVRC2012_img_val.tar``, ``ILSVRC2012_devkit_t12.tar.gz``)
  sit in ``root`` and the folders do not, :meth:`ImageNetDataModule.prepare_data` has
  torchvision extract them (no network).

Subsets with fewer classes (ImageNet-100, Imagenette, ...) work in the ImageFolder layout with
``num_classes`` set to the number of class folders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.datasets import ImageFolder
from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE
from torchvision.transforms import InterpolationMode, v2

from kd_lightning.data.base import KDDataModule, TransformedSubset, stratified_split
from kd_lightning.errors import DatasetNotFoundError, KDConfigError

__all__ = ["ImageNetDataModule"]

_HOW_TO_GET = (
    "ImageNet cannot be downloaded automatically: request ILSVRC-2012 from https://image-net.org, "
    "then arrange it as <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (ImageFolder layout; "
    "the validation images sorted into class folders), or put ILSVRC2012_img_train.tar, "
    "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in <root> and let torchvision's ImageNet "
    "layout be built from them. Then set --data.init_args.root to that folder."
)


class ImageNetDataModule(KDDataModule):
    """ImageNet classification with the standard ResNet training recipe transforms.

    Training: ``RandomResizedCrop(image_size)`` + horizontal flip + ``ToTensor`` + ``Normalize``
    (ImageNet mean/std). Evaluation: ``Resize(resize_size)`` + ``CenterCrop(image_size)`` +
    ``ToTensor`` + ``Normalize``. Images are decoded with PIL in the loader workers.

    Args:
        root: folder holding ``train/`` and ``val/`` (and ``meta.bin`` for torchvision's
            layout).
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``root``,
            ``download``, ``batch_size``, ``num_workers``, ``split_seed``, ``meta_split``, ...).
        num_workers: DataLoader worker processes (JPEG decoding is the bottleneck: use many).
        val_split: fraction of ``train/`` held out (stratified, evaluation transform) as the
            validation set. ``0`` validates on ``val/``, as every ImageNet KD paper does. The
            test set is always ``val/``.
        num_classes: number of classes; must match the class folders found (set it for
            subsets such as ImageNet-100).
        image_size: side of the (square) crops fed to the model.
        resize_size: shorter side after resizing, before the evaluation centre crop.
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"``, ... (a
            ``torchvision.transforms.InterpolationMode`` value).
        return_index: training samples become ``(image, target, index)``, ``index`` being the
            sample's position in the training set (memory-bank methods such as CRD).

    Example:
        >>> dm = ImageNetDataModule(root="/datasets/imagenet", num_workers=16)  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str = "data/imagenet",
        num_workers: int = 8,
        val_split: float = 0.0,
        num_classes: int = 1000,
        image_size: int = 224,
        resize_size: int = 256,
        interpolation: str = "bilinear",
        return_index: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, num_workers=num_workers, **kwargs)
        if not 0.0 <= val_split < 1.0:
            raise KDConfigError("val_split", f"must be in [0, 1), got {val_split}")
        self.val_split = val_split
        if self.download:
            raise KDConfigError(f"data.init_args.download=true is not supported for ImageNet. {_HOW_TO_GET}")
        if num_classes < 2:
            raise KDConfigError(f"data.init_args.num_classes must be >= 2, got {num_classes}.")
        if not 0 < image_size <= resize_size:
            raise KDConfigError(
                "data.init_args.image_size must be positive and at most data.init_args.resize_size, "
                f"got image_size={image_size}, resize_size={resize_size}."
            )
        try:
            self._interpolation = InterpolationMode(interpolation.lower())
        except ValueError:
            valid = ", ".join(m.value for m in InterpolationMode)
            raise KDConfigError(
                f"data.init_args.interpolation must be one of {valid}; got {interpolation!r}."
            ) from None
        self.num_classes = num_classes
        self.image_size = image_size
        self.resize_size = resize_size
        self.interpolation = interpolation
        self.return_index = return_index
        self.input_shape = (3, image_size, image_size)
        self.classes: list[str] = []

    # ----------------------------------------------------------------------------- layout
    @property
    def layout(self) -> str:
        """``"torchvision"`` when ``root/meta.bin`` exists, else ``"imagefolder"``."""
        return "torchvision" if (Path(self.root).expanduser() / META_FILE).is_file() else "imagefolder"

    def prepare_data(self) -> None:
        """Have torchvision extract official archives found in ``root`` (no network).

        Does nothing when ``train/`` and ``val/`` exist or when no archive is there.
        """
        root = Path(self.root).expanduser()
        for split in ("train", "val"):
            if not (root / split).is_dir() and (root / ARCHIVE_META[split][0]).is_file():
                torchvision.datasets.ImageNet(str(root), split=split)

    def _scan(self, split: str) -> Any:
        root = Path(self.root).expanduser()
        try:
            if self.layout == "torchvision":
                return torchvision.datasets.ImageNet(str(root), split=split)
            return ImageFolder(str(root / split))
        except FileNotFoundError as err:  # no class folder, or a class folder without images
            raise DatasetNotFoundError(
                "ImageNet", root, ["train/<wnid>/*.JPEG", "val/<wnid>/*.JPEG"], f"{err} {_HOW_TO_GET}"
            ) from err

    @staticmethod
    def _wnids(dataset: Any) -> list[str]:
        return list(getattr(dataset, "wnids", dataset.classes))

    # ----------------------------------------------------------------------------- transforms
    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        """``RandomResizedCrop`` + flip + to float tensor + ``Normalize`` (PIL image in)."""
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.image_size, interpolation=self._interpolation, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """``Resize`` + ``CenterCrop`` + to float tensor + ``Normalize`` (PIL image in)."""
        return v2.Compose(
            [
                v2.Resize(self.resize_size, interpolation=self._interpolation, antialias=True),
                v2.CenterCrop(self.image_size),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    # ----------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Scan ``train/`` and ``val/`` (once) and build the datasets.

        Raises:
            DatasetNotFoundError: if ``train/`` or ``val/`` is missing or holds no images.
            KDConfigError: if the number of class folders differs from ``num_classes``.
            ValueError: if ``train/`` and ``val/`` hold different class folders.
        """
        if self.train_set is not None:
            return
        root = Path(self.root).expanduser()
        missing = [f"{split}/" for split in ("train", "val") if not (root / split).is_dir()]
        if missing:
            raise DatasetNotFoundError(
                "ImageNet",
                root,
                ["train/<wnid>/*.JPEG", "val/<wnid>/*.JPEG"],
                f"Missing: {', '.join(missing)}. {_HOW_TO_GET}",
            )
        train_full, val_full = self._scan("train"), self._scan("val")
        train_wnids, val_wnids = self._wnids(train_full), self._wnids(val_full)
        if len(train_wnids) != self.num_classes:
            raise KDConfigError(
                f"ImageNet under {root.resolve()} has {len(train_wnids)} class folders in train/, but "
                f"data.init_args.num_classes is {self.num_classes}. Set --data.init_args.num_classes "
                f"{len(train_wnids)} (for a subset) or point --data.init_args.root at the full dataset."
            )
        if train_wnids != val_wnids:
            only_train = sorted(set(train_wnids) - set(val_wnids))
            only_val = sorted(set(val_wnids) - set(train_wnids))
            raise KDConfigError(
                f"ImageNet under {root.resolve()}: train/ and val/ must hold the same class folders "
                f"(labels follow their sorted order). Only in train/: {only_train[:5]}; "
                f"only in val/: {only_val[:5]}."
            )
        self.classes = train_wnids

        self.test_set = TransformedSubset(val_full, transform=self.eval_transform())
        train_indices = None
        if self.val_split > 0:
            train_indices, held = stratified_split(train_full.targets, self.val_split, self.split_seed)
            self.val_set = TransformedSubset(train_full, held, self.eval_transform())
        else:
            self.val_set = self.test_set
        self.train_set = TransformedSubset(
            train_full, train_indices, self.train_transform(), return_index=self.return_index
        )
