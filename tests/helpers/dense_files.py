"""Writers of tiny fake COCO and Cityscapes sets in the real on-disk formats (no download, deterministic).

COCO (:func:`write_fake_coco`): ``root/annotations/instances_{split}.json`` + ``root/{split}/*`` with PNG and JPEG
images, categories with NON-contiguous ids (1 "cat", 3 "dog", 7 "bird"), polygon, compressed-RLE and (crowd)
uncompressed-RLE segmentations, a crowd annotation, an image without annotations and a zero-width box. Objects
are painted as solid rectangles whose colour is the category's, so image, boxes and masks can be checked
against each other after a transform.

Cityscapes (:func:`write_fake_cityscapes`, :func:`write_cityscapes_pair`):
``root/leftImg8bit/{split}/<city>/<city>_000000_<frame>_leftImg8bit.png`` and
``root/gtFine/{split}/<city>/..._gtFine_labelIds.png`` (or ``gtCoarse``) with uint8 labelIds (255 = the license
plate's -1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "COCO_CATEGORIES",
    "COCO_COLOURS",
    "COCO_SIZE",
    "FakeCOCO",
    "FakeCityscapes",
    "write_cityscapes_pair",
    "write_coco_split",
    "write_fake_cityscapes",
    "write_fake_coco",
]

#: Non-contiguous category ids: labels 1, 2, 3 are COCO ids 1, 3, 7.
COCO_CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]
#: Colour each category's objects are painted with.
COCO_COLOURS = {1: (255, 0, 0), 3: (0, 255, 0), 7: (0, 0, 255)}
#: (H, W) of every fake COCO image.
COCO_SIZE = (40, 60)
_BACKGROUND = 128


def _rect_mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros(COCO_SIZE, dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def _segmentation(kind: str, x: int, y: int, w: int, h: int) -> Any:
    """The rectangle as a polygon, a compressed RLE or an uncompressed RLE (column-major run lengths)."""
    if kind == "polygon":
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    mask = _rect_mask(x, y, w, h)
    if kind == "rle":
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": list(COCO_SIZE), "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(COCO_SIZE), "counts": counts}


#: The images of each split: (file name, format, [(category id, (x, y, w, h), segmentation kind, iscrowd), ...]).
COCO_LAYOUT: list[tuple[str, str, list[tuple[int, tuple[int, int, int, int], str, int]]]] = [
    ("a.png", "PNG", [(3, (5, 10, 20, 15), "polygon", 0), (7, (30, 5, 10, 30), "rle", 0)]),
    ("b.jpg", "JPEG", [(1, (10, 10, 30, 20), "polygon", 0), (1, (44, 20, 15, 12), "uncompressed", 1)]),
    ("c.png", "PNG", []),  # an image without annotations
    ("d.png", "PNG", [(3, (20, 20, 0, 5), "polygon", 0), (7, (2, 2, 8, 8), "polygon", 0)]),  # a zero-width box
]


@dataclass
class FakeCOCO:
    """What :func:`write_fake_coco` wrote.

    Attributes:
        root: the data module's ``root``.
        splits: split names written.
        files: per split, the annotation json path.
        image_ids: per split, ``{file name: image id}``.
    """

    root: Path
    splits: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)
    image_ids: dict[str, dict[str, int]] = field(default_factory=dict)


def write_coco_split(
    root: Path,
    split: str,
    first_id: int = 1,
    categories: list[dict[str, Any]] | None = None,
    layout: list[Any] | None = None,
) -> tuple[Path, dict[str, int]]:
    """Write one split (``annotations/instances_{split}.json`` + ``{split}/`` images) of :data:`COCO_LAYOUT`.

    Returns:
        The annotation file and ``{file name: image id}``.
    """
    categories = COCO_CATEGORIES if categories is None else categories
    layout = COCO_LAYOUT if layout is None else layout
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations, ids = [], [], {}
    for i, (name, fmt, objects) in enumerate(layout):
        image_id = first_id + i
        ids[name] = image_id
        pixels = np.full((*COCO_SIZE, 3), _BACKGROUND, dtype=np.uint8)
        for category, (x, y, w, h), kind, crowd in objects:
            pixels[y : y + h, x : x + w] = COCO_COLOURS.get(category, (255, 255, 255))
            annotations.append(
                {
                    "id": 100 * first_id + len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": float(w * h),
                    "iscrowd": crowd,
                    "segmentation": _segmentation(kind, x, y, w, h),
                }
            )
        Image.fromarray(pixels).save(folder / name, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
        images.append({"id": image_id, "file_name": name, "height": COCO_SIZE[0], "width": COCO_SIZE[1]})
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, ids


def write_fake_coco(
    root: Path,
    splits: tuple[str, ...] = ("train2017", "val2017"),
    categories: dict[str, list[dict[str, Any]]] | None = None,
) -> FakeCOCO:
    """Write every split in :data:`COCO_LAYOUT` (ids of split ``i`` start at ``1 + 1000 i``).

    Args:
        root: output folder.
        splits: split names.
        categories: per split, a category list replacing :data:`COCO_CATEGORIES` (to make the splits disagree).
    """
    fake = FakeCOCO(root=root, splits=splits)
    for i, split in enumerate(splits):
        path, ids = write_coco_split(root, split, first_id=1 + 1000 * i, categories=(categories or {}).get(split))
        fake.files[split] = path
        fake.image_ids[split] = ids
    return fake


@dataclass
class FakeCityscapes:
    """What :func:`write_fake_cityscapes` wrote.

    Attributes:
        root: the data module's ``root``.
        pairs: per split, ``(image path, label path)`` sorted like the data module's scan.
        label_ids: per split, the uint8 labelIds arrays in the same order.
    """

    root: Path
    pairs: dict[str, list[tuple[Path, Path]]] = field(default_factory=dict)
    label_ids: dict[str, list[np.ndarray]] = field(default_factory=dict)


def write_cityscapes_pair(
    root: Path,
    split: str,
    city: str,
    frame: int,
    image: np.ndarray,
    label_ids: np.ndarray,
    mode: str = "fine",
) -> tuple[Path, Path]:
    """Write one ``leftImg8bit`` PNG (uint8 ``[H, W, 3]``) and its labelIds PNG (uint8 ``[H, W]``)."""
    folder = "gtFine" if mode == "fine" else "gtCoarse"
    stem = f"{city}_000000_{frame:06d}"
    image_path = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
    label_path = root / folder / split / city / f"{stem}_{folder}_labelIds.png"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(image_path)
    Image.fromarray(np.asarray(label_ids, dtype=np.uint8)).save(label_path)
    return image_path, label_path


def write_fake_cityscapes(
    root: Path,
    counts: dict[str, int] | None = None,
    size: tuple[int, int] = (32, 64),
    cities: tuple[str, ...] = ("aachen", "bochum"),
    mode: str = "fine",
    seed: int = 0,
) -> FakeCityscapes:
    """Write a tiny Cityscapes tree: random RGB images, labelIds made of 8x8 blocks of random valid ids (0..33 and
    255 for the license plate).

    Args:
        root: output folder.
        counts: images per split (default train 3, val 2); image ``i`` goes to ``cities[i % len(cities)]``.
        size: ``(H, W)`` of every image.
        cities: city folder names.
        mode: ``"fine"`` (gtFine) or ``"coarse"`` (gtCoarse).
        seed: seed of the pixels and labels.
    """
    counts = {"train": 3, "val": 2} if counts is None else counts
    rng = np.random.default_rng(seed)
    valid = np.array([*range(34), 255], dtype=np.uint8)
    fake = FakeCityscapes(root=root)
    for split, n in counts.items():
        fake.pairs[split], fake.label_ids[split] = [], []
        for i in range(n):
            image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            blocks = rng.choice(valid, size=(-(-size[0] // 8), -(-size[1] // 8)))
            label = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))[: size[0], : size[1]].astype(np.uint8)
            pair = write_cityscapes_pair(root, split, cities[i % len(cities)], i, image, label, mode)
            fake.pairs[split].append(pair)
            fake.label_ids[split].append(label)
        order = sorted(range(n), key=lambda j: fake.pairs[split][j][0])
        fake.pairs[split] = [fake.pairs[split][j] for j in order]
        fake.label_ids[split] = [fake.label_ids[split][j] for j in order]
    return fake
