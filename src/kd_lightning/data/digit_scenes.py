"""Digit scenes: an offline dense-prediction set written in BOTH the COCO and the Cityscapes on-disk formats.

Each image is an RGB canvas with a textured, noisy background and clutter that is not a digit (lines, blobs,
arcs, stroke-like polylines, box outlines), on which 1-5 handwritten digits from scikit-learn's bundled 8x8
set (:func:`~kd_lightning.data.digits.load_sklearn_digits`) are pasted: upscaled bilinearly to 14-32 pixels
high with a random aspect ratio and a slight rotation, in a random colour that contrasts with the background
under it. Later digits occlude earlier ones; a placement that would hide more than ``max_occlusion`` of an
earlier digit is retried elsewhere. Instance masks are the VISIBLE digit pixels, boxes are their tight boxes,
``area`` is the visible pixel count. Validation digits come from a different part of the 1,797 sklearn digits
(every 5th) than training digits. Everything is drawn from ``numpy.random.default_rng((seed, split))``, so the
same seed writes byte-identical files (with the same numpy, Pillow and torch versions).

Written under ``out_dir``::

    coco/annotations/instances_{train,val}.json    COCO instances: bbox XYWH, area, iscrowd 0, compressed RLE
    coco/{train,val}/<image_id:012d>.png           category id d + 1 for digit d, name "d"
    cityscapes/leftImg8bit/{train,val}/<city>/<city>_000000_<frame:06d>_leftImg8bit.png   (same pixels; hard links
                                                                                            when possible)
    cityscapes/gtFine/{train,val}/<city>/<city>_000000_<frame:06d>_gtFine_labelIds.png    background labelId 7
    cityscapes/gtFine/{train,val}/<city>/<city>_000000_<frame:06d>_gtFine_instanceIds.png (road, trainId 0); digit d
                                                                    the labelId of trainId d + 1; instances
                                                                    labelId * 1000 + k (16-bit)
    README.md, scenes.json                          settings, counts, class mapping, seed

so :class:`~kd_lightning.data.coco.COCODetectionDataModule` (``root=OUT/coco, train_split="train",
val_split="val"``) and :class:`~kd_lightning.data.cityscapes.CityscapesDataModule` (``root=OUT/cityscapes``)
read it unchanged. Clutter pixels are background in both formats.

Default set (``kd make-scenes OUT``: seed 0, 2,400 train + 600 val images of 96x96), measured single-threaded on
the development machine (2 shared cores): 9,007 digit instances (7,179 train, 1,828 val; 3.0 per image), 61 MB
(images hard-linked between the two formats; 117 MB where links are impossible and they are copied), written in
about 20 s plus 5-10 s of Python imports; peak memory is the interpreter's (torch imported).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.errors import KDConfigError

__all__ = [
    "BACKGROUND_LABEL_ID",
    "DIGIT_LABEL_IDS",
    "SceneConfig",
    "encode_rle",
    "make_scenes",
    "render_scene",
]

#: labelId of background pixels: Cityscapes' "road" (trainId 0).
BACKGROUND_LABEL_ID = 7
#: labelId of the pixels of digit d: the Cityscapes labelId whose trainId is d + 1 (sidewalk, building, wall, fence,
#: pole, traffic light, traffic sign, vegetation, terrain, sky).
DIGIT_LABEL_IDS: tuple[int, ...] = (8, 11, 12, 13, 17, 19, 20, 21, 22, 23)
SPLITS = ("train", "val")
CITIES = {"train": ("digitdorf", "numburg"), "val": ("zifferstadt",)}
_VAL_OFFSET = 1_000_000  # image and annotation ids of val start above it (unique across splits, as in COCO)


@dataclass(frozen=True)
class SceneConfig:
    """Settings of the generator (all recorded in ``scenes.json``).

    Args:
        size: side of the square images in pixels.
        min_digits, max_digits: digits per image (uniform).
        digit_size: ``(low, high)`` height of a pasted digit in pixels before rotation.
        aspect_range: ``(low, high)`` width/height ratio of a pasted digit.
        max_rotation: rotation uniform in ``[-max_rotation, max_rotation]`` degrees.
        clutter: ``(low, high)`` number of distractor shapes per image.
        max_occlusion: largest share of an earlier digit a later one may hide.
        noise: standard deviation of the per-pixel Gaussian noise (0..255 scale), over digits too.
        min_contrast: smallest luminance difference between a digit and the background under it.
    """

    size: int = 96
    min_digits: int = 1
    max_digits: int = 5
    digit_size: tuple[int, int] = (14, 32)
    aspect_range: tuple[float, float] = (0.75, 1.25)
    max_rotation: float = 15.0
    clutter: tuple[int, int] = (3, 8)
    max_occlusion: float = 0.5
    noise: float = 6.0
    min_contrast: float = 70.0

    def __post_init__(self) -> None:
        if self.size < 16:
            raise KDConfigError("size", f"must be >= 16 pixels, got {self.size}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise KDConfigError(
                "min_digits", f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}"
            )
        low, high = self.digit_size
        if not 6 <= low <= high <= self.size // 2:
            raise KDConfigError(
                "digit_size", f"need 6 <= low <= high <= size / 2 = {self.size // 2}, got {tuple(self.digit_size)}"
            )
        if not 0 < self.aspect_range[0] <= self.aspect_range[1]:
            raise KDConfigError("aspect_range", f"need 0 < low <= high, got {tuple(self.aspect_range)}")
        if not 0 <= self.clutter[0] <= self.clutter[1]:
            raise KDConfigError("clutter", f"need 0 <= low <= high, got {tuple(self.clutter)}")
        if not 0 <= self.max_occlusion < 1:
            raise KDConfigError("max_occlusion", f"must be in [0, 1), got {self.max_occlusion}")
        if self.noise < 0 or self.max_rotation < 0 or self.min_contrast < 0:
            raise KDConfigError("noise", "noise, max_rotation and min_contrast must be >= 0")


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a binary ``[H, W]`` mask (pycocotools' ``rleToString`` in pure Python)."""
    height, width = mask.shape
    flat = np.asarray(mask, dtype=bool).flatten(order="F")  # column-major, as COCO
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # runs start with zeros
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [int(height), int(width)], "counts": "".join(chars)}


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float ``[S, S, 3]``: base colour + smooth blotches + a gradient + sometimes stripes."""
    import torch
    import torch.nn.functional as F

    base = rng.uniform(30, 225, size=3)
    grid = int(rng.integers(2, 7))
    low = torch.from_numpy(rng.normal(0.0, 1.0, (1, 3, grid, grid)))
    smooth = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-50, 50, size=3)
    canvas = base + smooth * rng.uniform(10, 40) + gradient
    if rng.random() < 0.4:
        theta, period = rng.uniform(0, math.pi), rng.uniform(4, 16)
        stripes = np.sin(2 * math.pi * (np.cos(theta) * xx + np.sin(theta) * yy) * size / period)
        canvas = canvas + stripes[..., None] * rng.uniform(5, 25) * rng.choice([-1.0, 1.0], size=3)
    return canvas


def _clutter(rng: np.random.Generator, canvas: np.ndarray, count: int) -> np.ndarray:
    """Draw ``count`` distractor shapes (lines, blobs, arcs, strokes, box outlines) on the uint8 canvas."""
    from PIL import Image, ImageDraw

    size = canvas.shape[0]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    def point() -> tuple[float, float]:
        return (float(rng.uniform(-0.1, 1.1) * size), float(rng.uniform(-0.1, 1.1) * size))

    for _ in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        kind = int(rng.integers(0, 5))
        width = int(rng.integers(1, 4))
        if kind == 0:  # straight line
            draw.line([point(), point()], fill=colour, width=width)
        elif kind == 1:  # blob
            cx, cy = point()
            rx, ry = rng.uniform(2, size / 8, size=2)
            box = [cx - rx, cy - ry, cx + rx, cy + ry]
            if rng.random() < 0.5:
                draw.ellipse(box, fill=colour)
            else:
                draw.ellipse(box, outline=colour, width=width)
        elif kind == 2:  # arc: part of a circle, like a stroke of a 0, 3, 6 or 9
            cx, cy = point()
            r = rng.uniform(4, size / 6)
            start = float(rng.uniform(0, 360))
            draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + float(rng.uniform(60, 220)), colour, width + 1)
        elif kind == 3:  # random-walk stroke
            x, y = point()
            points = [(x, y)]
            for _ in range(int(rng.integers(2, 5))):
                x, y = x + rng.uniform(-12, 12), y + rng.uniform(-12, 12)
                points.append((float(x), float(y)))
            draw.line(points, fill=colour, width=width + 1, joint="curve")
        else:  # box outline
            x, y = point()
            w, h = rng.uniform(4, size / 4, size=2)
            draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
    return np.asarray(image).astype(np.float64)


def _glyph(rng: np.random.Generator, digit: np.ndarray, config: SceneConfig) -> np.ndarray:
    """Opacity ``[h, w]`` in [0, 1] of one digit: 8x8 upscaled bilinearly, random aspect, slight rotation."""
    from PIL import Image

    height = rng.uniform(*config.digit_size)
    width = height * rng.uniform(*config.aspect_range) * 0.85  # the 8x8 glyphs are a little wide
    image = Image.fromarray(digit.astype(np.float32), mode="F")
    image = image.resize((max(4, round(width)), max(4, round(height))), Image.Resampling.BILINEAR)
    if config.max_rotation > 0:
        angle = float(rng.uniform(-config.max_rotation, config.max_rotation))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)


def render_scene(
    rng: np.random.Generator, digits: np.ndarray, targets: np.ndarray, config: SceneConfig
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One scene.

    Args:
        rng: the generator (advanced).
        digits: float ``[N, 8, 8]`` in [0, 1], the pool to draw from.
        targets: ``[N]`` digit of each.
        config: settings.

    Returns:
        ``(image, instances, classes)``: uint8 ``[S, S, 3]``; int32 ``[S, S]`` with 0 for background and ``k`` for
        the visible pixels of the ``k``-th digit (1-based, paint order); ``classes[k - 1]`` is that digit.
    """
    size = config.size
    canvas = _background(rng, size)
    canvas = _clutter(rng, canvas, int(rng.integers(config.clutter[0], config.clutter[1] + 1)))
    instances = np.zeros((size, size), dtype=np.int32)
    full: list[int] = []  # pixel count of each digit when pasted
    classes: list[int] = []
    for _ in range(int(rng.integers(config.min_digits, config.max_digits + 1))):
        pick = int(rng.integers(0, len(digits)))
        alpha = _glyph(rng, digits[pick], config)
        soft = np.clip((alpha - 0.35) / 0.3, 0.0, 1.0)  # opaque from 0.65; the mask is alpha >= 0.5
        mask = soft >= 0.5
        ph, pw = mask.shape
        if mask.sum() < 8 or ph > size or pw > size:
            continue
        visible = np.bincount(instances.ravel(), minlength=len(full) + 1)[1:]
        for _attempt in range(30):
            top, left = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
            window = instances[top : top + ph, left : left + pw]
            hidden = np.bincount(window[mask], minlength=len(full) + 1)[1:]
            if all(v - h >= (1 - config.max_occlusion) * f for v, h, f in zip(visible, hidden, full)):
                break
        else:
            continue
        region = canvas[top : top + ph, left : left + pw]
        under = float(_luminance(region.mean(axis=(0, 1))))
        for _try in range(10):
            colour = rng.uniform(0, 255, size=3)
            if abs(float(_luminance(colour)) - under) >= config.min_contrast:
                break
        else:
            colour = np.zeros(3) if under > 127.5 else np.full(3, 255.0)
        canvas[top : top + ph, left : left + pw] = region * (1 - soft[..., None]) + colour * soft[..., None]
        window[mask] = len(full) + 1
        full.append(int(mask.sum()))
        classes.append(int(targets[pick]))
    if config.noise > 0:
        canvas = canvas + rng.normal(0.0, config.noise, canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, instances, classes


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def _link_or_copy(source: Path, target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copyfile(source, target)
        return False


def _pools(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits of ``split``: every 5th (index % 5 == 4) for val, the others for train."""
    from kd_lightning.data.digits import load_sklearn_digits

    images, targets = load_sklearn_digits()
    chosen = (np.arange(len(targets)) % 5 == 4) if split == "val" else (np.arange(len(targets)) % 5 != 4)
    return images[:, 0].numpy().astype(np.float64)[chosen], targets.numpy()[chosen]


def _write_split(out: Path, split: str, count: int, seed: int, config: SceneConfig) -> dict[str, Any]:
    rng = np.random.default_rng((seed, SPLITS.index(split)))
    pool, pool_targets = _pools(split)
    offset = _VAL_OFFSET if split == "val" else 0
    coco_images, annotations = [], []
    cities = CITIES[split]
    linked = True
    per_class = [0] * 10
    for i in range(count):
        image, instances, classes = render_scene(rng, pool, pool_targets, config)
        image_id = offset + i + 1
        file_name = f"{image_id:012d}.png"
        coco_path = out / "coco" / split / file_name
        _save_png(image, coco_path)
        coco_images.append({"id": image_id, "file_name": file_name, "height": config.size, "width": config.size})
        label_ids = np.full(instances.shape, BACKGROUND_LABEL_ID, dtype=np.uint8)
        instance_ids = np.full(instances.shape, BACKGROUND_LABEL_ID, dtype=np.uint16)
        seen = [0] * 10
        for k, digit in enumerate(classes, start=1):
            visible = instances == k
            if not visible.any():  # cannot happen with max_occlusion < 1; kept as a guard
                continue
            rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
            x0, y0, x1, y1 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
            annotations.append(
                {
                    "id": offset + len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(visible.sum()),
                    "iscrowd": 0,
                    "segmentation": encode_rle(visible),
                }
            )
            label_ids[visible] = DIGIT_LABEL_IDS[digit]
            instance_ids[visible] = DIGIT_LABEL_IDS[digit] * 1000 + seen[digit]
            seen[digit] += 1
            per_class[digit] += 1
        city = cities[i % len(cities)]
        stem = f"{city}_000000_{i:06d}"
        linked &= _link_or_copy(
            coco_path, out / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        )
        gt = out / "cityscapes" / "gtFine" / split / city
        _save_png(label_ids, gt / f"{stem}_gtFine_labelIds.png")
        _save_png(instance_ids, gt / f"{stem}_gtFine_instanceIds.png")
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    coco = {
        "info": {"description": f"kd-lightning digit scenes, {split}, seed {seed}", "version": "1"},
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": categories,
    }
    annotation_file = out / "coco" / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(coco, separators=(",", ":")) + "\n")
    return {"images": count, "instances": len(annotations), "instances_per_digit": per_class, "linked": linked}


def _folder_bytes(folder: Path) -> int:
    seen, total = set(), 0
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


def _readme(summary: dict[str, Any]) -> str:
    config, counts = summary["config"], summary["splits"]
    digit_rows = "\n".join(f"| {d} | {d + 1} | {DIGIT_LABEL_IDS[d]} | {d + 1} |" for d in range(10))
    return f"""# Digit scenes (kd-lightning, generated offline)

Seed {summary["seed"]}; {config["size"]}x{config["size"]} RGB images; {config["min_digits"]}-{config["max_digits"]} \
handwritten digits (scikit-learn's 8x8 set, upscaled to {config["digit_size"][0]}-{config["digit_size"][1]} px) per \
image on textured backgrounds with non-digit clutter. Masks are the visible digit pixels; boxes their tight boxes.

| split | images | instances |
|---|---|---|
| train | {counts["train"]["images"]} | {counts["train"]["instances"]} |
| val | {counts["val"]["images"]} | {counts["val"]["instances"]} |

## COCO format: `coco/`
`annotations/instances_{{train,val}}.json` + `{{train,val}}/*.png`; bbox XYWH, area = visible pixels, iscrowd 0,
segmentation = compressed RLE. Read it with

    kd fit ... --data COCODetectionDataModule --data.init_args.root <this folder>/coco \\
        --data.init_args.train_split train --data.init_args.val_split val

## Cityscapes format: `cityscapes/`
`leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png`, `gtFine/{{train,val}}/<city>/*_gtFine_labelIds.png` (and
`*_gtFine_instanceIds.png`, labelId * 1000 + k). Background (and clutter) is labelId {BACKGROUND_LABEL_ID} (road,
trainId 0). Read it with

    kd fit ... --data CityscapesDataModule --data.init_args.root <this folder>/cityscapes

## Classes
| digit | COCO category id (name = digit) | Cityscapes labelId | trainId |
|---|---|---|---|
{digit_rows}

Settings: see `scenes.json`. Regenerate with `kd make-scenes <folder> --seed {summary["seed"]} \
--train {counts["train"]["images"]} --val {counts["val"]["images"]} --size {config["size"]} --overwrite`.
"""


def make_scenes(
    out_dir: str | Path,
    seed: int = 0,
    train: int = 2400,
    val: int = 600,
    overwrite: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Write the digit scenes under ``out_dir`` in the COCO and the Cityscapes formats (see the module docstring).

    Args:
        out_dir: output folder (gets ``coco/``, ``cityscapes/``, ``README.md``, ``scenes.json``).
        seed: seed; the same seed and settings give byte-identical files.
        train, val: number of images per split.
        overwrite: delete an existing ``coco/`` and ``cityscapes/`` under ``out_dir`` first (otherwise refused:
            stale files would be read as part of the set).
        **settings: :class:`SceneConfig` fields (``size``, ``min_digits``, ``max_digits``, ``digit_size``, ...).

    Returns:
        The summary written to ``scenes.json`` plus ``seconds`` and ``bytes`` (disk use).

    Raises:
        KDConfigError: a bad setting, or ``out_dir`` already holds a set and ``overwrite`` is false.
    """
    unknown = sorted(set(settings) - set(SceneConfig.__dataclass_fields__))
    if unknown:
        raise KDConfigError(
            unknown[0], "is not a digit-scenes setting", f"use {sorted(SceneConfig.__dataclass_fields__)}"
        )
    for name, value in (("train", train), ("val", val)):
        if value < 1:
            raise KDConfigError(name, f"must be >= 1 image, got {value}")
    config = SceneConfig(**{k: tuple(v) if isinstance(v, Sequence) else v for k, v in settings.items()})
    out = Path(out_dir).expanduser()
    existing = [out / name for name in ("coco", "cityscapes") if (out / name).exists()]
    if existing:
        if not overwrite:
            raise KDConfigError(
                "out",
                f"{existing[0]} already exists",
                "choose another folder or pass --overwrite (deletes coco/ and cityscapes/ there)",
            )
        for folder in existing:
            shutil.rmtree(folder)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = {split: _write_split(out, split, n, seed, config) for split, n in (("train", train), ("val", val))}
    linked = all(s.pop("linked") for s in splits.values())
    summary: dict[str, Any] = {
        "generator": "kd_lightning.data.digit_scenes.make_scenes",
        "format_version": 1,
        "seed": seed,
        "config": asdict(config),
        "splits": splits,
        "coco": {
            "root": "coco",
            "annotations": {s: f"annotations/instances_{s}.json" for s in SPLITS},
            "images": {s: f"{s}/" for s in SPLITS},
            "categories": {str(d): d + 1 for d in range(10)},
        },
        "cityscapes": {
            "root": "cityscapes",
            "cities": {s: list(CITIES[s]) for s in SPLITS},
            "background": {"labelId": BACKGROUND_LABEL_ID, "trainId": 0, "name": "road"},
            "digits": {str(d): {"labelId": DIGIT_LABEL_IDS[d], "trainId": d + 1} for d in range(10)},
        },
    }
    (out / "scenes.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(_readme(summary))
    return {
        **summary,
        "images_linked": linked,
        "seconds": time.perf_counter() - started,
        "bytes": _folder_bytes(out),
    }
