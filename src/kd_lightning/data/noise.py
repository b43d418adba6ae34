"""Noise-only data for data-free distillation of generative models (BOOT): the student never sees a real image.

:class:`NoiseDataModule` serves batches ``(ε, class_label)``: Gaussian noise of the teacher's sample shape and a
class id to condition on (uniform at random for training; balanced and fixed for validation and test, as is
their noise). ``source`` is the real data the *teacher* is trained on when ``kd fit`` trains a missing teacher
(``teacher_data_key = "source"``, :func:`~kd_lightning.teachers.fingerprint.teacher_data`) and the reference set of
the evaluation metrics (FID/KID of generated images against the source's validation/test images, through
:meth:`NoiseDataModule.reference_dataloader`); none of the source's images are in a batch of this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.base import KDDataModule
from kd_lightning.errors import KDConfigError

__all__ = ["NoiseDataModule", "NoiseDataset"]

#: Seeds of the fixed validation and test noise are ``noise_seed + offset``.
_SPLIT_OFFSETS = {"val": 1, "test": 2}


class NoiseDataset(Dataset):
    """``size`` items ``(ε [shape], class_label)``: ``ε ~ N(0, I)``.

    With ``seed=None`` every access draws fresh noise and a uniform class from the global RNG (training: new
    noise every epoch, reproducible under ``seed_everything``); with a seed the items are fixed (item ``i`` from a
    generator seeded ``seed``, class ``i mod num_classes``).
    """

    def __init__(self, size: int, shape: Sequence[int], num_classes: int | None, seed: int | None = None) -> None:
        self.size = int(size)
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = num_classes
        self.seed = seed
        self._fixed: torch.Tensor | None = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            self._fixed = torch.randn((self.size, *self.shape), generator=generator)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._fixed is not None:
            label = index % self.num_classes if self.num_classes else 0
            return self._fixed[index], label
        label = int(torch.randint(self.num_classes, ())) if self.num_classes else 0
        return torch.randn(self.shape), label


class NoiseDataModule(KDDataModule):
    """Gaussian noise (and class labels) as the only data of a data-free student.

    Args:
        source: the real data module the teacher trains on (``kd fit`` trains a missing teacher on it) and the
            reference images of FID/KID; ``None`` when the teacher and the metrics' reference come from elsewhere.
        sample_shape: the shape of one noise sample ``(C, H, W)``; ``None`` takes the source's ``input_shape``.
        num_classes: classes to condition on; ``None`` takes the source's, ``0`` serves label 0 (unconditional).
        train_size: noise samples per training epoch (drawn afresh every epoch).
        val_size: fixed validation noise samples.
        test_size: fixed test noise samples.
        noise_seed: seed of the fixed validation/test noise; ``None`` takes the run's global seed
            (``torch.initial_seed()`` at setup, i.e. ``seed_everything``): the evaluation noise varies with the seed.
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``batch_size``,
            ``eval_batch_size``, ...).
    """

    task: ClassVar[str] = "generation"
    #: A teacher trained for a run that uses this module learns from ``source``.
    teacher_data_key: ClassVar[str] = "source"
    #: Batches hold noise only (checked by the data-free methods).
    noise_only: ClassVar[bool] = True

    def __init__(
        self,
        source: KDDataModule | None = None,
        sample_shape: list[int] | None = None,
        num_classes: int | None = None,
        train_size: int = 1024,
        val_size: int = 360,
        test_size: int = 360,
        noise_seed: int | None = 0,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_workers=num_workers, **kwargs)
        if source is not None and not isinstance(source, KDDataModule):
            raise KDConfigError(
                "source", f"must be a kd-lightning data module, got {type(source).__name__}", "e.g. DigitsDataModule"
            )
        shape = sample_shape if sample_shape is not None else getattr(source, "input_shape", None)
        if shape is None or len(shape) == 0 or any(int(s) < 1 for s in shape):
            raise KDConfigError(
                "sample_shape",
                f"must be the positive shape of one sample, got {shape}",
                "give sample_shape (e.g. [1, 8, 8]) or a source data module",
            )
        classes = num_classes if num_classes is not None else getattr(source, "num_classes", 0)
        if classes is None or classes < 0:
            raise KDConfigError("num_classes", f"must be >= 0, got {classes}")
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if value < 1:
                raise KDConfigError(name, f"must be >= 1, got {value}")
        self.source = source
        self.input_shape = tuple(int(s) for s in shape)
        self.num_classes = int(classes) or None  # type: ignore[assignment]
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = test_size
        self.noise_seed = noise_seed

    def prepare_data(self) -> None:
        if self.source is not None:
            self.source.prepare_data()

    def data_identity(self) -> dict[str, Any]:
        return {"source": self.source.data_identity()} if self.source is not None else {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            seed = self.noise_seed if self.noise_seed is not None else torch.initial_seed() % (2**31)
            self.train_set = NoiseDataset(self.train_size, self.input_shape, self.num_classes)
            self.val_set = NoiseDataset(
                self.val_size, self.input_shape, self.num_classes, seed * 10 + _SPLIT_OFFSETS["val"]
            )
            self.test_set = NoiseDataset(
                self.test_size, self.input_shape, self.num_classes, seed * 10 + _SPLIT_OFFSETS["test"]
            )
        if self.source is not None:
            self.source.setup(stage)

    def reference_dataloader(self, stage: str) -> DataLoader | None:
        """The source's real ``stage`` images (``"val"`` or ``"test"``): the reference set of FID/KID, never a
        training batch. ``None`` without a source."""
        if self.source is None:
            return None
        self.source.setup("fit" if stage == "val" else "test")
        return self.source.val_dataloader() if stage == "val" else self.source.test_dataloader()

    def data_range(self) -> tuple[float, float] | None:
        """``(min, max)`` of the source's training images (to clip denoised images to), ``None`` if unknown."""
        if self.source is None:
            return None
        self.source.setup("fit")
        images = getattr(self.source.train_set, "images", None)
        if not isinstance(images, torch.Tensor):
            return None
        return float(images.min()), float(images.max())
