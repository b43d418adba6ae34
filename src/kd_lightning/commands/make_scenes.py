"""``kd make-scenes``: write the offline digit scenes in the COCO and Cityscapes formats.

    kd make-scenes data/scenes
    kd make-scenes data/scenes_tiny --seed 1 --train 24 --val 12 --size 64 --overwrite

The generator itself is :mod:`kd_lightning.data.digit_scenes`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from kd_lightning.data.digit_scenes import SceneConfig, make_scenes

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    defaults = SceneConfig()
    parser = argparse.ArgumentParser(
        prog="kd make-scenes",
        description="Write digit scenes (sklearn's handwritten digits on cluttered canvases) as a COCO-format "
        "detection set (OUT/coco) and a Cityscapes-format segmentation tree (OUT/cityscapes), offline.",
    )
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="same seed and settings: byte-identical files")
    parser.add_argument("--train", type=int, default=2400, help="training images")
    parser.add_argument("--val", type=int, default=600, help="validation images")
    parser.add_argument("--size", type=int, default=defaults.size, help="image side in pixels")
    parser.add_argument("--min-digits", type=int, default=defaults.min_digits)
    parser.add_argument("--max-digits", type=int, default=defaults.max_digits)
    parser.add_argument(
        "--digit-size",
        type=int,
        nargs=2,
        default=list(defaults.digit_size),
        metavar=("LOW", "HIGH"),
        help="digit height range in pixels",
    )
    parser.add_argument(
        "--aspect-range", type=float, nargs=2, default=list(defaults.aspect_range), metavar=("LOW", "HIGH")
    )
    parser.add_argument("--max-rotation", type=float, default=defaults.max_rotation, help="degrees")
    parser.add_argument(
        "--clutter",
        type=int,
        nargs=2,
        default=list(defaults.clutter),
        metavar=("LOW", "HIGH"),
        help="distractor shapes per image",
    )
    parser.add_argument("--max-occlusion", type=float, default=defaults.max_occlusion)
    parser.add_argument("--noise", type=float, default=defaults.noise, help="pixel noise std (0..255 scale)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/coco and OUT/cityscapes if present")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``kd make-scenes OUT [--seed 0 --train 2400 --val 600 --size 96 ...]``."""
    args = _parser().parse_args(argv)
    summary = make_scenes(
        args.out,
        seed=args.seed,
        train=args.train,
        val=args.val,
        overwrite=args.overwrite,
        size=args.size,
        min_digits=args.min_digits,
        max_digits=args.max_digits,
        digit_size=tuple(args.digit_size),
        aspect_range=tuple(args.aspect_range),
        max_rotation=args.max_rotation,
        clutter=tuple(args.clutter),
        max_occlusion=args.max_occlusion,
        noise=args.noise,
    )
    out = Path(args.out).expanduser().resolve()
    splits = summary["splits"]
    print(
        f"wrote digit scenes (seed {args.seed}) to {out} in {summary['seconds']:.1f} s, "
        f"{summary['bytes'] / 1e6:.1f} MB: train {splits['train']['images']} images / "
        f"{splits['train']['instances']} digits, val {splits['val']['images']} images / "
        f"{splits['val']['instances']} digits\n"
        f"  COCO format:       {out / 'coco'}  (annotations/instances_{{train,val}}.json, {{train,val}}/*.png)\n"
        f"  Cityscapes format: {out / 'cityscapes'}  (leftImg8bit/, gtFine/ labelIds + instanceIds)\n"
        f"  README.md and scenes.json: sizes, class mapping, seed\n"
        "Point the configs at them:\n"
        f"  detection:    --data COCODetectionDataModule --data.init_args.root {out / 'coco'} "
        "--data.init_args.train_split train --data.init_args.val_split val\n"
        f"  segmentation: --data CityscapesDataModule --data.init_args.root {out / 'cityscapes'}",
        flush=True,
    )
