"""COCO-format object detection: boxes, labels and optional instance masks. Never downloads.

Layout (the official one; both patterns are arguments, so any COCO-format set drops in, e.g. the offline digit
scenes of ``kd make-scenes``)::

    root/annotations/instances_{split}.json      annotation_pattern
    root/{split}/<file_name of each image>       image_pattern

Batches are ``(images, targets)`` (:func:`detection_collate`): ``images`` a list of float32 ``[3, H, W]`` in
``[0, 1]`` (not normalised: torchvision detectors normalise inside), ``targets`` a list of dicts with ``boxes``
float32 ``[N, 4]`` XYXY in pixels of the served image, ``labels`` int64 ``[N]`` in ``1..K`` (0 = background),
``image_id`` int64 scalar (the COCO id), ``area`` float32 ``[N]`` (COCO area times the resize factors), ``iscrowd``
int64 ``[N]`` and, with ``masks=True``, ``masks`` uint8 ``[N, H, W]``.

Annotation reader: pycocotools rather than faster-coco-eval. Both read the json with Python's ``json`` and
build the same dict indexes (faster-coco-eval's ``COCO`` class is a port of pycocotools'), so neither is faster
at what a data module does (an unrecorded one-off timing on a 20k-image file agreed; no benchmark in this
repository backs a number). faster-coco-eval's speed-up is in ``COCOeval``, which the metric side can still use
(torchmetrics' ``backend="faster_coco_eval"``).
pycocotools is the format's reference implementation (what ``annToMask`` and RLE mean), ships binary wheels for
Linux, macOS and Windows since 2.0.7, and its API has been frozen for years; both are in the
``kd-lightning[dense]`` extra. It is imported inside functions, so ``import kd_lightning`` works without it.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from kd_lightning.data.base import KDDataModule
from kd_lightning.errors import DataFileError, DatasetNotFoundError, KDConfigError

__all__ = [
    "COCODetectionDataModule",
    "COCODetectionDataset",
    "RandomScale",
    "ResizeShorter",
    "decode_rgb",
    "detection_collate",
    "require_pycocotools",
    "resize_sample",
]

_HOW_TO_GET = (
    "get annotations_trainval2017.zip and the image zips from https://cocodataset.org/#download and unpack them "
    "under the root, or run `kd make-scenes OUT` for the offline digit scenes (root OUT/coco, train_split train, "
    "val_split val)"
)


def require_pycocotools() -> Any:
    """``pycocotools`` (its ``coco`` module), or a one-line error naming the extra that installs it."""
    try:
        from pycocotools import coco
    except ImportError:
        raise KDConfigError(
            "data",
            "COCO-format data needs pycocotools, which is not installed",
            "pip install 'kd-lightning[dense]' (or pip install pycocotools)",
        ) from None
    return coco


def decode_rgb(path: Path) -> torch.Tensor:
    """The image file at ``path`` as uint8 ``[3, H, W]`` RGB (EXIF orientation ignored, as in COCO's annotations).

    Raises:
        DataFileError: the file is missing or cannot be decoded; the message names it.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError, truncated data, bad headers
        raise DataFileError(
            "data.init_args.root",
            f"cannot decode the image {path} ({type(err).__name__}: {err})",
            "replace the file, or pass --data.init_args.skip_bad_images true to skip it with a warning",
        ) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def resize_sample(sample: Any, size: Sequence[int]) -> Any:
    """Resize every tv_tensor in ``sample`` (tuples, lists and dicts are walked) to ``size = (H, W)``.

    ``Image``: bilinear, antialiased; ``BoundingBoxes``: scaled with their canvas; ``Mask``: nearest neighbour with
    pixel centres aligned like the bilinear image (``NEAREST_EXACT``; the legacy ``NEAREST`` of torch and cv2
    shifts labels by up to half a source pixel against the image). Other values pass through.
    """
    if isinstance(sample, tv_tensors.Mask):
        return v2.functional.resize(sample, list(size), interpolation=InterpolationMode.NEAREST_EXACT)
    if isinstance(sample, tv_tensors.Image | tv_tensors.BoundingBoxes):
        return v2.functional.resize(sample, list(size), antialias=True)
    if isinstance(sample, dict):
        return {key: resize_sample(value, size) for key, value in sample.items()}
    if isinstance(sample, tuple | list):
        return type(sample)(resize_sample(value, size) for value in sample)
    return sample


def _image_size(sample: Any) -> tuple[int, int]:
    first = sample[0] if isinstance(sample, tuple | list) else sample
    height, width = v2.functional.get_size(first)
    return height, width


class ResizeShorter:
    """Resize so the shorter side is ``min_size`` and the longer at most ``max_size`` (aspect ratio kept), like
    torchvision's ``GeneralizedRCNNTransform`` and mmdet's ``(1333, 800)`` keep-ratio resize."""

    def __init__(self, min_size: int, max_size: int | None = None) -> None:
        self.min_size, self.max_size = min_size, max_size

    def size(self, height: int, width: int) -> tuple[int, int]:
        """Output ``(H, W)`` for an input of ``(height, width)``."""
        factor = self.min_size / min(height, width)
        if self.max_size is not None:
            factor = min(factor, self.max_size / max(height, width))
        return max(1, round(height * factor)), max(1, round(width * factor))

    def __call__(self, *inputs: Any) -> Any:
        out = resize_sample(inputs, self.size(*_image_size(inputs)))
        return out if len(out) > 1 else out[0]


class RandomScale:
    """Resize every tv_tensor of the sample by one random factor ``f`` (boxes and masks move with the image).

    ``f`` is uniform in ``scale_range`` (``step=None``) or drawn from ``lo, lo + step, ..., hi`` (CIRKD: 0.5..2.0
    in steps of 0.1); resizing as :func:`resize_sample`. Uses torch's global generator (seeded per worker).
    """

    def __init__(self, scale_range: Sequence[float], step: float | None = None) -> None:
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise KDConfigError("scale_range", f"must be (low, high) with 0 < low <= high, got {tuple(scale_range)}")
        if step is not None and step <= 0:
            raise KDConfigError("scale_step", f"must be > 0 or null, got {step}")
        self.lo, self.hi, self.step = lo, hi, step

    def draw(self) -> float:
        """One factor."""
        if self.step is None:
            return self.lo + (self.hi - self.lo) * float(torch.rand(()))
        n = round((self.hi - self.lo) / self.step)
        return self.lo + self.step * int(torch.randint(0, n + 1, ()))

    def __call__(self, *inputs: Any) -> Any:
        factor = self.draw()
        height, width = _image_size(inputs)
        out = resize_sample(inputs, (max(1, round(height * factor)), max(1, round(width * factor))))
        return out if len(out) > 1 else out[0]


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(torch.Tensor)


def detection_collate(batch: Sequence[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``[(image, target), ...]`` -> ``(list of images, list of targets)``; items that are ``None`` (images skipped
    by ``skip_bad_images``) are left out. Box counts differ between images, so nothing is stacked."""
    items = [item for item in batch if item is not None]
    return [image for image, _ in items], [target for _, target in items]


@dataclass
class _ImageRecord:
    """One image of a split: where it is and its annotations (already mapped, cleaned and filtered)."""

    image_id: int
    path: Path
    height: int
    width: int
    boxes: np.ndarray  # float32 [N, 4] XYXY, clamped to the image
    labels: np.ndarray  # int64 [N], 1..K
    area: np.ndarray  # float32 [N]
    iscrowd: np.ndarray  # int64 [N]
    segmentations: list[Any] = field(default_factory=list)  # COCO segmentation of each annotation (masks=True)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> uint8 ``[H, W]`` mask (pycocotools'
    ``annToMask`` without a ``COCO`` object)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons of one object: merged
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE (crowd regions)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def _instance_index(inputs: Any) -> torch.Tensor:
    """What ``SanitizeBoundingBoxes`` filters along with the boxes: the instance positions, with which every other
    per-instance field is indexed afterwards (a module-level function: datasets must pickle for spawned workers)."""
    return inputs[1]["index"]


class COCODetectionDataset(Dataset):
    """The images of one COCO-format split with their targets (see the module docstring for the format).

    Args:
        records: the images, built by :class:`COCODetectionDataModule`.
        transform: v2 transform called as ``transform(image, target)`` on tv_tensors (``Image``, ``BoundingBoxes``
            XYXY, ``Mask``); ``None``: none.
        masks: serve ``masks``.
        train: substitute a following image for an undecodable one (training); otherwise return ``None`` for it
            (left out by :func:`detection_collate`). Only with ``skip_bad_images``.
        skip_bad_images: warn about an undecodable image and go on instead of raising.
        min_box_size: boxes narrower or lower than this after ``transform`` are removed (``SanitizeBoundingBoxes``,
            training); ``None``: no sanitising (evaluation keeps every ground-truth box).
    """

    def __init__(
        self,
        records: list[_ImageRecord],
        transform: Callable[..., Any] | None = None,
        masks: bool = False,
        train: bool = False,
        skip_bad_images: bool = False,
        min_box_size: float | None = None,
    ) -> None:
        self.records = records
        self.transform = transform
        self.masks = masks
        self.train = train
        self.skip_bad_images = skip_bad_images
        self.sanitize = (
            v2.SanitizeBoundingBoxes(min_size=min_box_size, labels_getter=_instance_index)
            if min_box_size is not None
            else None
        )
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        """COCO image id of every item, in order."""
        return [r.image_id for r in self.records]

    def _decode(self, index: int) -> torch.Tensor | None:
        record = self.records[index]
        try:
            return decode_rgb(record.path)
        except DataFileError as err:
            if not self.skip_bad_images:
                raise
            if record.path not in self._warned:
                self._warned.add(record.path)
                warnings.warn(f"skip_bad_images: skipped {record.path} ({err.problem})", stacklevel=2)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        image = self._decode(index)
        if image is None and self.train:  # a training batch keeps its size: the next readable image stands in
            for step in range(1, len(self.records)):
                candidate = (index + step) % len(self.records)
                image = self._decode(candidate)
                if image is not None:
                    index = candidate
                    break
            else:
                raise DataFileError("data.init_args.root", "no training image could be decoded")
        if image is None:
            return None
        return self.sample(index, image)

    def sample(self, index: int, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Item ``index`` from its decoded uint8 image (transforms applied)."""
        record = self.records[index]
        height, width = image.shape[-2:]
        if (height, width) != (record.height, record.width):
            raise DataFileError(
                "data.init_args.root",
                f"{record.path} is {width}x{height} pixels but its annotation file says {record.width}x{record.height}",
                "the image and the annotation json do not belong together",
            )
        n = len(record.labels)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(record.boxes).reshape(n, 4), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(record.labels),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
            "area": torch.from_numpy(record.area),
            "iscrowd": torch.from_numpy(record.iscrowd),
            "index": torch.arange(n),
        }
        if self.masks:
            stacked = np.zeros((n, height, width), dtype=np.uint8)
            for i, segmentation in enumerate(record.segmentations):
                stacked[i] = segmentation_to_mask(segmentation, height, width)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))
        out_image: Any = tv_tensors.Image(image)
        if self.transform is not None:
            out_image, target = self.transform(out_image, target)
        if self.sanitize is not None:
            out_image, target = self.sanitize(out_image, target)
        kept = target.pop("index")
        new_h, new_w = out_image.shape[-2:]
        result = {
            "boxes": _plain(target["boxes"]).to(torch.float32).reshape(-1, 4).clone(),  # never a view of the records
            "labels": target["labels"][kept],
            "image_id": target["image_id"],
            "area": target["area"][kept] * ((new_h / height) * (new_w / width)),
            "iscrowd": target["iscrowd"][kept],
        }
        if self.masks:
            result["masks"] = _plain(target["masks"]).to(torch.uint8)
        return _plain(out_image).to(torch.float32).div_(255.0), result


class COCODetectionDataModule(KDDataModule):
    """COCO-format object detection (``instances_*.json`` + image folders) for torchvision detectors.

    Categories are mapped to contiguous labels ``1..K`` in the order of their COCO ids (0 is background):
    :attr:`category_ids` ``[i]`` is the COCO id of label ``i + 1``. Training drops crowd regions (``iscrowd=1``)
    from the targets and skips images left without boxes; validation and test keep both (crowd boxes with
    ``iscrowd=1``, so COCO mAP ignores detections on them). Boxes with zero width or height are dropped at loading
    (with a warning giving their count); boxes are clamped to the image.

    Transforms (torchvision ``transforms.v2`` on ``tv_tensors``, so boxes and masks move with the image):
    training = horizontal flip (``hflip_prob``), optional resize, optional random scale, then
    ``SanitizeBoundingBoxes``; evaluation = the optional resize only. Resizing is off by default because
    torchvision detectors resize inside (``GeneralizedRCNNTransform``: shorter side 800, longer at most 1333).

    Args:
        root: folder holding the annotation files and image folders.
        train_split, val_split: split names put into the patterns (``train2017``, ``val2017``).
        test_split: split of the test loader; ``None``: ``val_split`` (COCO test-dev has no public annotations).
        annotation_pattern: annotation file of a split, relative to ``root``.
        image_pattern: image folder of a split, relative to ``root`` (holds the json's ``file_name`` paths).
        hflip_prob: probability of the training horizontal flip.
        min_size: resize so the shorter side is ``min_size`` (keeping the aspect ratio), train and eval; ``None``: no.
        max_size: cap of the longer side after the resize (needs ``min_size``); ``None``: no cap.
        scale_range: training scale jitter ``(low, high)``: every image and its boxes/masks resized by a factor
            uniform in it (after ``min_size``); ``None``: off.
        masks: serve instance masks (``annToMask`` of each annotation's segmentation).
        drop_crowd_train: remove ``iscrowd=1`` annotations from training targets.
        skip_empty_train: leave training images without (non-crowd) boxes out of the training set.
        skip_bad_images: an undecodable image is skipped with a warning (training: the next image stands in;
            evaluation: it is left out of its batch) instead of stopping the run.
        min_box_size: training boxes smaller than this (pixels, after the transforms) are removed.
        batch_size: images per training batch (per process).
        num_workers: DataLoader worker processes.
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``download``,
            ``eval_batch_size``, ``pin_memory``, ``drop_last``, ...). ``download=True`` is refused: COCO has no
            torchvision downloader.

    Attributes:
        num_classes: number of foreground categories K (read from the annotation file on first use).
        class_names: category names, label order (``class_names[i]`` is label ``i + 1``).
        category_ids: COCO category id of each label (``category_ids[i]`` is label ``i + 1``).
        task: ``"detection"``.
        input_shape: ``(3, H, W)`` of the first validation image as served: a probe shape for early checks only
            (image sizes vary).

    Example:
        >>> dm = COCODetectionDataModule("data/scenes/coco", train_split="train", val_split="val")  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> images, targets = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    task = "detection"
    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        root: str = "data/coco",
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        annotation_pattern: str = "annotations/instances_{split}.json",
        image_pattern: str = "{split}",
        hflip_prob: float = 0.5,
        min_size: int | None = None,
        max_size: int | None = None,
        scale_range: tuple[float, float] | None = None,
        masks: bool = False,
        drop_crowd_train: bool = True,
        skip_empty_train: bool = True,
        skip_bad_images: bool = False,
        min_box_size: float = 1.0,
        batch_size: int = 2,
        num_workers: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, **kwargs)
        if self.download:
            raise KDConfigError(
                "download", "COCO cannot be downloaded by kd-lightning", "fetch it from https://cocodataset.org"
            )
        if self.meta_split:
            raise KDConfigError("meta_split", "is not supported for detection data", "set it to 0")
        for name, pattern in (("annotation_pattern", annotation_pattern), ("image_pattern", image_pattern)):
            if "{split}" not in pattern:
                raise KDConfigError(name, f"must contain {{split}}, got {pattern!r}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise KDConfigError("hflip_prob", f"must be in [0, 1], got {hflip_prob}")
        if min_size is not None and min_size < 1:
            raise KDConfigError("min_size", f"must be >= 1 or null, got {min_size}")
        if max_size is not None and (min_size is None or max_size < min_size):
            raise KDConfigError(
                "max_size", f"needs min_size and must be >= it, got max_size={max_size}, min_size={min_size}"
            )
        if min_box_size < 0:
            raise KDConfigError("min_box_size", f"must be >= 0, got {min_box_size}")
        self.scale = RandomScale(scale_range) if scale_range is not None else None
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.annotation_pattern = annotation_pattern
        self.image_pattern = image_pattern
        self.hflip_prob = hflip_prob
        self.min_size = min_size
        self.max_size = max_size
        self.scale_range = scale_range
        self.masks = masks
        self.drop_crowd_train = drop_crowd_train
        self.skip_empty_train = skip_empty_train
        self.skip_bad_images = skip_bad_images
        self.min_box_size = min_box_size
        self._categories: list[dict[str, Any]] | None = None  # sorted by id, from the first annotation file read
        self._categories_from: Path | None = None
        self._first_size: tuple[int, int] | None = None
        self._coco_cache: dict[Path, Any] = {}

    # ----------------------------------------------------------------------------- files
    def annotation_file(self, split: str) -> Path:
        """The annotation json of ``split``."""
        return Path(self.root).expanduser() / self.annotation_pattern.format(split=split)

    def image_folder(self, split: str) -> Path:
        """The image folder of ``split``."""
        return Path(self.root).expanduser() / self.image_pattern.format(split=split)

    @property
    def splits(self) -> dict[str, str]:
        """Split name of each stage: ``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": self.train_split, "val": self.val_split, "test": self.test_split or self.val_split}

    def _check_present(self, split: str) -> None:
        path = self.annotation_file(split)
        if not path.is_file():
            raise DatasetNotFoundError(
                "COCO annotations",
                self.root,
                [self.annotation_pattern.format(split=split)],
                f"No file {path}: {_HOW_TO_GET}",
            )
        folder = self.image_folder(split)
        if not folder.is_dir():
            raise DatasetNotFoundError(
                "COCO images",
                self.root,
                [self.image_pattern.format(split=split) + "/"],
                f"No folder {folder} (the images of {path.name}): {_HOW_TO_GET}",
            )

    def _load(self, split: str) -> Any:
        """The pycocotools ``COCO`` object of ``split`` (cached until :meth:`setup` has built the records)."""
        path = self.annotation_file(split)
        if path in self._coco_cache:
            return self._coco_cache[path]
        self._check_present(split)
        coco_module = require_pycocotools()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                coco = coco_module.COCO(str(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataFileError(
                "data.init_args.root", f"{path} is not valid JSON ({err})", "the file may be truncated: fetch it again"
            ) from None
        except (KeyError, TypeError, AssertionError) as err:
            raise DataFileError(
                "data.init_args.root",
                f"{path} is not a COCO instances file ({type(err).__name__}: {err})",
                "it needs 'images', 'annotations' and 'categories' lists",
            ) from None
        if "categories" not in coco.dataset or not coco.dataset["categories"]:
            raise DataFileError("data.init_args.root", f"{path} has no 'categories'", "is it an instances_*.json file?")
        self._remember_categories(coco, path)
        self._coco_cache[path] = coco
        return coco

    def _remember_categories(self, coco: Any, path: Path) -> None:
        categories = sorted(
            ({"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in coco.dataset["categories"]),
            key=lambda c: c["id"],
        )
        if self._categories is None:
            self._categories, self._categories_from = categories, path
            if coco.dataset.get("images"):
                first = min(coco.dataset["images"], key=lambda image: image["id"])
                self._first_size = (int(first["height"]), int(first["width"]))
            return
        if categories != self._categories:
            mine = {c["id"]: c["name"] for c in self._categories}
            theirs = {c["id"]: c["name"] for c in categories}
            differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            shown = ", ".join(f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in differ[:5])
            raise KDConfigError(
                "data.init_args.root",
                f"{self._categories_from} and {path} have different categories ({shown})",
                "every split must use the same category list (labels follow it)",
            )

    def _meta(self) -> list[dict[str, Any]]:
        if self._categories is None:
            self._load(self.val_split)  # usually the smaller file
        assert self._categories is not None
        return self._categories

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """Number of foreground categories K (models build K + 1 outputs)."""
        return len(self._meta())

    @property
    def class_names(self) -> list[str]:
        """Category names in label order (label ``i + 1`` is ``class_names[i]``)."""
        return [c["name"] for c in self._meta()]

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label (label ``i + 1`` is ``category_ids[i]``)."""
        return [c["id"] for c in self._meta()]

    @property
    def input_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        """``(3, H, W)`` of the first validation image as served (after ``min_size``/``max_size``)."""
        self._meta()
        height, width = self._first_size or (self.min_size or 512, self.min_size or 512)
        if self.min_size is not None:
            height, width = ResizeShorter(self.min_size, self.max_size).size(height, width)
        return (3, height, width)

    def data_identity(self) -> dict[str, Any]:
        """Annotation file names and sizes of the three splits (what tells two COCO-format sets apart)."""
        identity: dict[str, Any] = {}
        for stage, split in self.splits.items():
            path = self.annotation_file(split)
            identity[stage] = {"file": path.name, "size": path.stat().st_size if path.is_file() else None}
        return identity

    # ----------------------------------------------------------------------------- records
    def _records(self, split: str, train: bool) -> list[_ImageRecord]:
        coco = self._load(split)
        path = self.annotation_file(split)
        folder = self.image_folder(split)
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        records: list[_ImageRecord] = []
        degenerate = 0
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            height, width = int(info["height"]), int(info["width"])
            boxes, labels, areas, crowd, segmentations = [], [], [], [], []
            for ann in coco.imgToAnns.get(image_id, []):
                category = int(ann["category_id"])
                if category not in label_of:
                    raise DataFileError(
                        "data.init_args.root",
                        f"{path}: annotation {ann.get('id')} has category_id {category}, which is not in its "
                        f"'categories' ({sorted(label_of)})",
                        "fix the annotation file",
                    )
                is_crowd = int(ann.get("iscrowd", 0))
                if is_crowd and train and self.drop_crowd_train:
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
                x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
                if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
                    degenerate += 1
                    continue
                if self.masks:
                    if "segmentation" not in ann or not ann["segmentation"]:
                        raise DataFileError(
                            "data.init_args.masks",
                            f"{path}: annotation {ann.get('id')} has no segmentation",
                            "set masks false for box-only annotations",
                        )
                    segmentations.append(ann["segmentation"])
                boxes.append((x1, y1, x2, y2))
                labels.append(label_of[category])
                areas.append(float(ann.get("area", w * h)))
                crowd.append(is_crowd)
            if train and self.skip_empty_train and not any(c == 0 for c in crowd):
                continue
            records.append(
                _ImageRecord(
                    image_id=int(image_id),
                    path=folder / info["file_name"],
                    height=height,
                    width=width,
                    boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, dtype=np.int64),
                    area=np.asarray(areas, dtype=np.float32),
                    iscrowd=np.asarray(crowd, dtype=np.int64),
                    segmentations=segmentations,
                )
            )
        if degenerate:
            warnings.warn(
                f"{path.name}: dropped {degenerate} annotation(s) whose box has no width or height (w or h <= 0, "
                "or outside the image)",
                stacklevel=3,
            )
        if not records:
            raise KDConfigError(
                "data.init_args.root",
                f"{path} yields no {'training ' if train else ''}image"
                + (" with boxes (skip_empty_train drops images without them)" if train else ""),
                "check the annotation file",
            )
        return records

    # ----------------------------------------------------------------------------- transforms
    def _resize(self) -> list[Any]:
        return [] if self.min_size is None else [ResizeShorter(self.min_size, self.max_size)]

    def train_transform(self) -> Callable[..., Any]:
        """Horizontal flip, the optional resize and scale jitter (on tv_tensors; sanitising comes after)."""
        steps: list[Any] = [v2.RandomHorizontalFlip(self.hflip_prob), *self._resize()]
        if self.scale is not None:
            steps.append(self.scale)
        return v2.Compose(steps)

    def eval_transform(self) -> Callable[..., Any] | None:
        """The optional resize; ``None`` without ``min_size``."""
        steps = self._resize()
        return v2.Compose(steps) if steps else None

    # ----------------------------------------------------------------------------- setup
    def _dataset(self, split: str, train: bool) -> COCODetectionDataset:
        return COCODetectionDataset(
            self._records(split, train),
            transform=self.train_transform() if train else self.eval_transform(),
            masks=self.masks,
            train=train,
            skip_bad_images=self.skip_bad_images,
            min_box_size=self.min_box_size if train else None,
        )

    def setup(self, stage: str | None = None) -> None:
        """Read the annotation files the stage needs and build the datasets.

        Raises:
            DatasetNotFoundError: an annotation file or image folder is missing.
            KDConfigError: the splits' category lists differ, or a file is not a COCO instances json.
        """
        splits = self.splits
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        stages = wanted.get(stage or "", ("train", "val", "test"))
        for name in stages:  # every file present and the categories agree, before any record is built
            self._load(splits[name])
        if "train" in stages and self.train_set is None:
            self.train_set = self._dataset(splits["train"], train=True)
        if "val" in stages and self.val_set is None:
            self.val_set = self._dataset(splits["val"], train=False)
        if "test" in stages and self.test_set is None:
            self.test_set = (
                self.val_set
                if splits["test"] == splits["val"] and self.val_set is not None
                else self._dataset(splits["test"], train=False)
            )
        self._coco_cache.clear()
