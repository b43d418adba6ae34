"""Cityscapes semantic segmentation (19 trainIds, ignore 255) in the official folder layout. Never downloads.

Layout (as unpacked from ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``; ``kd make-scenes``
writes the same layout offline)::

    root/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png      (mode="fine")
    root/gtCoarse/{split}/<city>/<city>_<seq>_<frame>_gtCoarse_labelIds.png  (mode="coarse")

Label PNGs hold labelIds 0..33 (255 = the license plate, labelId -1 stored as a byte); they are mapped to the 19
trainIds with :data:`LABEL_TABLE`, the table of cityscapesScripts' ``helpers/labels.py``; everything without a
trainId becomes 255 (ignored).

Batches are ``(images, masks)``: ``images`` float32 ``[B, 3, H, W]`` normalised with ``mean``/``std``, ``masks``
int64 ``[B, H, W]`` with trainIds and 255. Training follows the CIRKD protocol (winycg/CIRKD
``dataset/cityscapes.py``, ``train_cirkd.py``): random scale ``0.5 + randint(0..15)/10``, pad to the crop
(image 0 after normalisation, i.e. the mean colour; label 255) at the bottom/right, random crop 512x1024
(H x W), random horizontal flip. Evaluation serves whole images (1024x2048 for Cityscapes), optionally
downscaled by ``eval_scale``; sliding-window inference belongs to the model side.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.coco import RandomScale, decode_rgb, resize_sample
from kd_lightning.errors import DataFileError, DatasetNotFoundError, KDConfigError

__all__ = [
    "CITYSCAPES_CLASSES",
    "IGNORE_INDEX",
    "LABEL_TABLE",
    "CityscapesDataModule",
    "CityscapesDataset",
    "CityscapesLabel",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "labelids_to_trainids",
    "segmentation_collate",
]

IGNORE_INDEX = 255


class CityscapesLabel(NamedTuple):
    """One row of cityscapesScripts' label table: ``name``, ``id`` (labelId in the PNGs), ``train_id``."""

    name: str
    id: int
    train_id: int


#: cityscapesScripts ``helpers/labels.py``: every labelId and its trainId (255 = ignored; the license plate's
#: labelId -1 is stored as 255 in uint8 label PNGs and its trainId -1 is served as 255).
LABEL_TABLE: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255),
    CityscapesLabel("ego vehicle", 1, 255),
    CityscapesLabel("rectification border", 2, 255),
    CityscapesLabel("out of roi", 3, 255),
    CityscapesLabel("static", 4, 255),
    CityscapesLabel("dynamic", 5, 255),
    CityscapesLabel("ground", 6, 255),
    CityscapesLabel("road", 7, 0),
    CityscapesLabel("sidewalk", 8, 1),
    CityscapesLabel("parking", 9, 255),
    CityscapesLabel("rail track", 10, 255),
    CityscapesLabel("building", 11, 2),
    CityscapesLabel("wall", 12, 3),
    CityscapesLabel("fence", 13, 4),
    CityscapesLabel("guard rail", 14, 255),
    CityscapesLabel("bridge", 15, 255),
    CityscapesLabel("tunnel", 16, 255),
    CityscapesLabel("pole", 17, 5),
    CityscapesLabel("polegroup", 18, 255),
    CityscapesLabel("traffic light", 19, 6),
    CityscapesLabel("traffic sign", 20, 7),
    CityscapesLabel("vegetation", 21, 8),
    CityscapesLabel("terrain", 22, 9),
    CityscapesLabel("sky", 23, 10),
    CityscapesLabel("person", 24, 11),
    CityscapesLabel("rider", 25, 12),
    CityscapesLabel("car", 26, 13),
    CityscapesLabel("truck", 27, 14),
    CityscapesLabel("bus", 28, 15),
    CityscapesLabel("caravan", 29, 255),
    CityscapesLabel("trailer", 30, 255),
    CityscapesLabel("train", 31, 16),
    CityscapesLabel("motorcycle", 32, 17),
    CityscapesLabel("bicycle", 33, 18),
    CityscapesLabel("license plate", -1, -1),
)

#: Names of the 19 trainIds, in trainId order.
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(
    label.name for label in sorted((r for r in LABEL_TABLE if 0 <= r.train_id < 255), key=lambda r: r.train_id)
)

_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # labelId byte -> trainId
_VALID = np.zeros(256, dtype=bool)  # bytes a labelIds PNG may hold
for _row in LABEL_TABLE:
    _byte = _row.id % 256  # -1 -> 255
    _LUT[_byte] = _row.train_id if _row.train_id >= 0 else IGNORE_INDEX
    _VALID[_byte] = True

_HOW_TO_GET = (
    "download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com "
    "(free registration) and unpack both into the root, or write the offline digit scenes with `kd make-scenes OUT` "
    "and pass --data.init_args.root OUT/cityscapes"
)


def labelids_to_trainids(label: np.ndarray | torch.Tensor, path: str | Path = "label image") -> torch.Tensor:
    """Map a labelIds image (uint8 bytes, 255 = the license plate's -1) to trainIds (uint8, 255 = ignore).

    Raises:
        DataFileError: a value is not a Cityscapes labelId (0..33 or 255); the message names ``path`` and the values.
    """
    array = np.asarray(label)
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            bad = np.unique(array[(array < 0) | (array > 255)])[:8].tolist()
            raise DataFileError(
                "data.init_args.root",
                f"{path} holds values {bad} that are not Cityscapes labelIds (0..33, 255 for -1)",
                "point the root at gtFine/gtCoarse *_labelIds.png files",
            )
        array = array.astype(np.uint8)
    if not _VALID[array].all():
        bad = np.unique(array[~_VALID[array]])[:8].tolist()
        raise DataFileError(
            "data.init_args.root",
            f"{path} holds values {bad} that are not Cityscapes labelIds (0..33, 255 for -1)",
            "point the root at gtFine/gtCoarse *_labelIds.png files",
        )
    return torch.from_numpy(_LUT[array])


def _read_label(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError) as err:
        raise DataFileError(
            "data.init_args.root",
            f"cannot decode the label image {path} ({type(err).__name__}: {err})",
            "replace the file, or pass --data.init_args.skip_bad_images true to skip it with a warning",
        ) from None


def _normalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return v2.functional.normalize(image.as_subclass(torch.Tensor).float().div_(255.0), list(mean), list(std))


class SegmentationTrainTransform:
    """CIRKD's training augmentation on a (uint8 image, label) pair; returns (normalised float image, int64 label).

    Random scale (:class:`~kd_lightning.data.coco.RandomScale`: image bilinear, label nearest with aligned pixel
    centres), random crop of ``crop_size`` from the scaled pair padded at the bottom/right to at least the crop
    (image 0 after normalisation = the mean colour, label ``ignore_index``), horizontal flip with ``hflip_prob``.
    Cropping happens before the float conversion, so a 2x-scaled 1024x2048 image never exists in float32.
    """

    def __init__(
        self,
        crop_size: Sequence[int] = (512, 1024),
        scale_range: Sequence[float] | None = (0.5, 2.0),
        scale_step: float | None = 0.1,
        hflip_prob: float = 0.5,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.crop_h, self.crop_w = (int(v) for v in crop_size)
        self.scale = RandomScale(scale_range, scale_step) if scale_range is not None else None
        self.hflip_prob = hflip_prob
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        F = v2.functional
        pair: tuple[Any, Any] = (tv_tensors.Image(image), tv_tensors.Mask(label))
        if self.scale is not None:
            pair = self.scale(*pair)
        height, width = pair[0].shape[-2:]
        top = int(torch.randint(0, max(height - self.crop_h, 0) + 1, ()))
        left = int(torch.randint(0, max(width - self.crop_w, 0) + 1, ()))
        crop_h, crop_w = min(self.crop_h, height), min(self.crop_w, width)
        image_t = _normalise(F.crop(pair[0], top, left, crop_h, crop_w), self.mean, self.std)
        label_t = F.crop(pair[1], top, left, crop_h, crop_w).as_subclass(torch.Tensor).long()
        pad_h, pad_w = self.crop_h - crop_h, self.crop_w - crop_w
        if pad_h or pad_w:  # bottom/right, as CIRKD's cv2.copyMakeBorder(0, pad_h, 0, pad_w)
            image_t = torch.nn.functional.pad(image_t, (0, pad_w, 0, pad_h), value=0.0)
            label_t = torch.nn.functional.pad(label_t, (0, pad_w, 0, pad_h), value=self.ignore_index)
        if float(torch.rand(())) < self.hflip_prob:
            image_t, label_t = image_t.flip(-1), label_t.flip(-1)
        return image_t.contiguous(), label_t[0].contiguous()


class SegmentationEvalTransform:
    """Whole image, optionally resized by ``scale`` (image bilinear, label nearest; see
    :func:`~kd_lightning.data.coco.resize_sample`), normalised."""

    def __init__(
        self,
        scale: float = 1.0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        self.scale, self.mean, self.std = scale, tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair: tuple[Any, Any] = (tv_tensors.Image(image), tv_tensors.Mask(label))
        if self.scale != 1.0:
            height, width = image.shape[-2:]
            pair = resize_sample(pair, (max(1, round(height * self.scale)), max(1, round(width * self.scale))))
        return _normalise(pair[0], self.mean, self.std).contiguous(), pair[1].as_subclass(torch.Tensor)[0].long()


def segmentation_collate(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, mask)`` pairs; ``None`` items (skipped bad images) are left out. An all-skipped batch is
    ``(float32 [0, 3, 0, 0], int64 [0, 0, 0])``."""
    items = [item for item in batch if item is not None]
    if not items:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.long)
    return default_collate(items)


class CityscapesDataset(Dataset):
    """(image, labelIds) file pairs of one split, served as (image, trainIds) after ``transform``.

    Args:
        pairs: ``(image path, label path)`` of every item.
        transform: ``transform(uint8 image [3, H, W], uint8 trainIds [1, H, W]) -> (image, int64 mask [H, W])``.
        train: an unreadable item is replaced by the next readable one (training) or served as ``None``
            (evaluation; left out by :func:`segmentation_collate`). Only with ``skip_bad_images``.
        skip_bad_images: warn about an undecodable image or label file and go on instead of raising.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        train: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        self.pairs = pairs
        self.transform = transform
        self.train = train
        self.skip_bad_images = skip_bad_images
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``index`` before the transform: uint8 image ``[3, H, W]`` and uint8 trainIds ``[1, H, W]``."""
        image_path, label_path = self.pairs[index]
        image = decode_rgb(image_path)
        label = _read_label(label_path)
        if label.ndim != 2:
            raise DataFileError(
                "data.init_args.root",
                f"{label_path} has shape {label.shape}, not a single-channel labelIds image",
                "use the *_labelIds.png files",
            )
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise DataFileError(
                "data.init_args.root",
                f"{label_path} is {label.shape[1]}x{label.shape[0]} but {image_path} is "
                f"{image.shape[2]}x{image.shape[1]} pixels",
                "the image and its label must have the same size",
            )
        return image, labelids_to_trainids(label, label_path).unsqueeze(0)

    def _try(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            return self.read(index)
        except DataFileError as err:
            if not self.skip_bad_images or "cannot decode" not in err.problem:
                raise
            path = self.pairs[index][0]
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skip_bad_images: skipped {path} ({err.problem})", stacklevel=2)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        item = self._try(index)
        if item is None and self.train:
            for step in range(1, len(self.pairs)):
                item = self._try((index + step) % len(self.pairs))
                if item is not None:
                    break
            else:
                raise DataFileError("data.init_args.root", "no training image could be decoded")
        if item is None:
            return None
        return self.transform(*item)


class CityscapesDataModule(KDDataModule):
    """Cityscapes semantic segmentation: 19 trainIds, ignore index 255, CIRKD's training augmentation.

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/`` (or ``gtCoarse/``).
        mode: ``"fine"`` (gtFine) or ``"coarse"`` (gtCoarse labels for every split).
        train_extra: add ``train_extra`` (19,998 coarsely annotated images) to training; ``mode="coarse"`` only.
        train_split, val_split: splits of the training and validation loaders.
        test_split: split of the test loader; ``"val"`` by default because the test labels are withheld (the
            public gtFine test PNGs are all ignore).
        crop_size: ``(H, W)`` of training crops (CIRKD: 512x1024).
        scale_range: random training scale ``(low, high)``; ``None``: no scaling.
        scale_step: step of the scale factors (CIRKD: 0.1, i.e. 0.5, 0.6, ..., 2.0); ``None``: continuous.
        hflip_prob: probability of the training horizontal flip.
        eval_scale: resize factor of validation/test images and labels (labels nearest); ``1.0``: full resolution.
            Below 1 for quick CPU runs only: mIoU on downscaled labels is not the benchmark's.
        mean, std: per-channel normalisation of images in ``[0, 1]`` (ImageNet statistics).
        skip_bad_images: an undecodable image or label file is skipped with a warning (training: the next item
            stands in; evaluation: it is left out of its batch) instead of stopping the run.
        batch_size: training crops per batch (per process; CIRKD: 2 per GPU on 8 GPUs).
        num_workers: DataLoader worker processes.
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``eval_batch_size``,
            ``pin_memory``, ``drop_last``, ...). ``download=True`` is refused (registration required).

    Attributes:
        num_classes: 19. ignore_index: 255. class_names: the 19 trainId names. task: ``"segmentation"``.
        input_shape: ``(3, crop_h, crop_w)``.
    """

    task = "segmentation"
    collate_fn = staticmethod(segmentation_collate)
    num_classes = 19
    ignore_index = IGNORE_INDEX
    class_names = list(CITYSCAPES_CLASSES)

    def __init__(
        self,
        root: str = "data/cityscapes",
        mode: str = "fine",
        train_extra: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        crop_size: tuple[int, int] = (512, 1024),
        scale_range: tuple[float, float] | None = (0.5, 2.0),
        scale_step: float | None = 0.1,
        hflip_prob: float = 0.5,
        eval_scale: float = 1.0,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        skip_bad_images: bool = False,
        batch_size: int = 2,
        num_workers: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, **kwargs)
        if self.download:
            raise KDConfigError(
                "download", "Cityscapes cannot be downloaded by kd-lightning (registration required)", _HOW_TO_GET
            )
        if self.meta_split:
            raise KDConfigError("meta_split", "is not supported for segmentation data", "set it to 0")
        if mode not in ("fine", "coarse"):
            raise KDConfigError("mode", f"must be 'fine' or 'coarse', got {mode!r}")
        if train_extra and mode != "coarse":
            raise KDConfigError("train_extra", "needs mode 'coarse' (train_extra has only coarse labels)")
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise KDConfigError("crop_size", f"must be (H, W) with positive sides, got {tuple(crop_size)}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise KDConfigError("hflip_prob", f"must be in [0, 1], got {hflip_prob}")
        if not eval_scale > 0:
            raise KDConfigError("eval_scale", f"must be > 0, got {eval_scale}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise KDConfigError("std", f"mean and std need 3 values each, std > 0; got mean={mean}, std={std}")
        if scale_range is not None:
            RandomScale(scale_range, scale_step)  # validates both
        self.mode = mode
        self.train_extra = train_extra
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = scale_range
        self.scale_step = scale_step
        self.hflip_prob = hflip_prob
        self.eval_scale = eval_scale
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.skip_bad_images = skip_bad_images
        self.input_shape = (3, *self.crop_size)

    # ----------------------------------------------------------------------------- files
    @property
    def label_folder(self) -> str:
        """``gtFine`` or ``gtCoarse``."""
        return "gtFine" if self.mode == "fine" else "gtCoarse"

    @property
    def label_suffix(self) -> str:
        """``_gtFine_labelIds.png`` or ``_gtCoarse_labelIds.png``."""
        return f"_{self.label_folder}_labelIds.png"

    def pairs(self, split: str) -> list[tuple[Path, Path]]:
        """Sorted ``(image, label)`` paths of ``split``.

        Raises:
            DatasetNotFoundError: a split folder is missing, holds no image, or an image has no label file.
        """
        root = Path(self.root).expanduser()
        images_dir, labels_dir = root / "leftImg8bit" / split, root / self.label_folder / split
        expected = [
            f"leftImg8bit/{split}/<city>/*_leftImg8bit.png",
            f"{self.label_folder}/{split}/<city>/*{self.label_suffix}",
        ]
        missing = [str(p) for p in (images_dir, labels_dir) if not p.is_dir()]
        if missing:
            raise DatasetNotFoundError("Cityscapes", root, expected, f"Missing: {', '.join(missing)}. {_HOW_TO_GET}")
        images = sorted(images_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise DatasetNotFoundError("Cityscapes", root, expected, f"No image in {images_dir}. {_HOW_TO_GET}")
        pairs = []
        for image in images:
            label = labels_dir / image.parent.name / image.name.replace("_leftImg8bit.png", self.label_suffix)
            if not label.is_file():
                raise DatasetNotFoundError(
                    "Cityscapes", root, expected, f"{image} has no label file {label}. {_HOW_TO_GET}"
                )
            pairs.append((image, label))
        return pairs

    def data_identity(self) -> dict[str, Any]:
        """Mode and, per split, the number and total bytes of the label files (two trees of the same layout
        differ there)."""
        root = Path(self.root).expanduser()
        identity: dict[str, Any] = {"mode": self.mode, "train_extra": self.train_extra}
        for stage, split in (("train", self.train_split), ("val", self.val_split), ("test", self.test_split)):
            files = sorted((root / self.label_folder / split).glob(f"*/*{self.label_suffix}"))
            identity[stage] = {"split": split, "labels": len(files), "bytes": sum(f.stat().st_size for f in files)}
        return identity

    # ----------------------------------------------------------------------------- transforms
    def train_transform(self) -> SegmentationTrainTransform:
        """Random scale, pad, crop and flip (CIRKD), then normalisation."""
        return SegmentationTrainTransform(
            self.crop_size, self.scale_range, self.scale_step, self.hflip_prob, self.mean, self.std, self.ignore_index
        )

    def eval_transform(self) -> SegmentationEvalTransform:
        """Whole image at ``eval_scale``, normalised."""
        return SegmentationEvalTransform(self.eval_scale, self.mean, self.std)

    # ----------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Scan the split folders the stage needs and build the datasets.

        Raises:
            DatasetNotFoundError: a folder or label file is missing (the message names it and where to get it).
        """
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        stages = wanted.get(stage or "", ("train", "val", "test"))
        if "train" in stages and self.train_set is None:
            pairs = self.pairs(self.train_split)
            if self.train_extra:
                pairs += self.pairs("train_extra")
            self.train_set = CityscapesDataset(pairs, self.train_transform(), True, self.skip_bad_images)
        if "val" in stages and self.val_set is None:
            self.val_set = CityscapesDataset(
                self.pairs(self.val_split), self.eval_transform(), False, self.skip_bad_images
            )
        if "test" in stages and self.test_set is None:
            if self.test_split == self.val_split and self.val_set is not None:
                self.test_set = self.val_set
            else:
                pairs = self.pairs(self.test_split)
                self.test_set = CityscapesDataset(pairs, self.eval_transform(), False, self.skip_bad_images)
