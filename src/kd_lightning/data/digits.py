"""scikit-learn's bundled handwritten digits as a data module: offline, tiny, seconds per epoch.

1,797 grey images of 8x8 pixels, 10 classes (UCI optical digits, shipped with scikit-learn, so
nothing is downloaded). Good for smoke tests, notebooks and CI; with ``as_cifar=True`` it feeds
the CIFAR model zoo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kd_lightning.data.base import KDDataModule, TensorImageDataset, stratified_split
from kd_lightning.data.transforms import RandomTranslate
from kd_lightning.errors import KDConfigError

__all__ = ["DigitsDataModule", "load_sklearn_digits"]


def load_sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 bundled digits: images ``[N, 1, 8, 8]`` scaled to ``[0, 1]`` and targets ``[N]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(digits.target, dtype=torch.long)


class DigitsDataModule(KDDataModule):
    """Handwritten digits (``sklearn.datasets.load_digits``) with a fixed stratified split.

    The 1,797 images are split once into train / validation / test parts, stratified by class
    (``val_fraction`` and ``test_fraction`` are fractions of the whole set). Pixels (0..16) are
    divided by 16, then normalised with the scalar mean and std of the training part, so every
    split is normalised the same way. Everything is held in memory as tensors.

    Args:
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``root``,
            ``download``, ``batch_size``, ``num_workers``, ``split_seed``, ``meta_split``, ...).
        num_workers: DataLoader worker processes (0: the data is in memory already).
        val_fraction: share of all images used for validation, in ``(0, 1)``.
        test_fraction: share of all images used for testing, in ``(0, 1)``;
            ``val_fraction + test_fraction`` must be below 1.
        as_cifar: serve images as ``3x32x32`` (bilinear 4x upsampling, grey channel
            replicated, still normalised) so CIFAR models run on them.
        augment: random shift of up to 1 pixel (4 pixels with ``as_cifar``) on each axis for
            training images; the border is filled with the (normalised) background.
        return_index: training samples become ``(image, target, index)``, ``index`` being the
            sample's position in the training set; validation and test samples stay
            ``(image, target)``.

    Example:
        >>> dm = DigitsDataModule(as_cifar=True)
        >>> dm.setup("fit")
        >>> images, targets = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), dm.num_classes
        ((64, 3, 32, 32), 10)
    """

    num_classes = 10

    def __init__(
        self,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        as_cifar: bool = False,
        augment: bool = False,
        return_index: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_workers=num_workers, **kwargs)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise KDConfigError(name, f"must be in (0, 1), got {value}", "it is a share of the 1797 digits")
        if val_fraction + test_fraction >= 1:
            raise KDConfigError(
                "val_fraction",
                f"val_fraction + test_fraction must sum to less than 1, got {val_fraction} + {test_fraction}",
                "leave some digits for training",
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.as_cifar = as_cifar
        self.augment = augment
        self.return_index = return_index
        self.input_shape = (3, 32, 32) if as_cifar else (1, 8, 8)
        self.classes = [str(i) for i in range(10)]
        self.mean: float | None = None
        self.std: float | None = None

    def prepare_data(self) -> None:
        """Nothing to do: the data ships with scikit-learn."""

    def split_indices(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices of the train, validation and test parts (stratified, fixed by ``split_seed``)."""
        rest, test = stratified_split(targets, self.test_fraction, self.split_seed)
        # val_fraction is a share of the whole set: rescale it to the part left after the test split.
        train_pos, val_pos = stratified_split(
            targets[rest], self.val_fraction / (1 - self.test_fraction), self.split_seed + 1
        )
        return rest[train_pos], rest[val_pos], test

    def train_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Random shift of training images (``None`` without ``augment``); needs :meth:`setup`."""
        if not self.augment:
            return None
        assert self.mean is not None and self.std is not None, "call setup() first"
        background = (0.0 - self.mean) / self.std
        return RandomTranslate(padding=4 if self.as_cifar else 1, fill=background)

    def setup(self, stage: str | None = None) -> None:
        """Load the digits, split them and build the (already normalised) datasets."""
        if self.train_set is not None:
            return
        images, targets = load_sklearn_digits()
        if self.as_cifar:
            # Bilinear upsampling keeps values in [0, 1]; the grey channel is replicated to RGB.
            images = F.interpolate(images, scale_factor=4, mode="bilinear", align_corners=False)
            images = images.expand(-1, 3, -1, -1)
        train_idx, val_idx, test_idx = self.split_indices(targets)
        train_images = images[train_idx]
        self.mean = float(train_images.mean())
        self.std = float(train_images.std())

        def normalise(x: torch.Tensor) -> torch.Tensor:
            return ((x - self.mean) / self.std).contiguous()

        self.train_set = TensorImageDataset(
            normalise(train_images),
            targets[train_idx],
            self.train_transform(),
            return_index=self.return_index,
        )
        self.val_set = TensorImageDataset(normalise(images[val_idx]), targets[val_idx])
        self.test_set = TensorImageDataset(normalise(images[test_idx]), targets[test_idx])
