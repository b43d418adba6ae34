"""``kd radioml-synth``: write synthetic RadioML-like files in the published layouts (offline).

    kd radioml-synth --out data/radioml_synth --format 2016.10a --frames 64
    kd radioml-synth --out data/radioml_synth --format 2016.10b 2018.01A --snr-range -10 18 2

The generator itself is :mod:`kd_lightning.data.radioml_synth`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from kd_lightning.data.radioml import CLASSES, CLASSES_2018, FILE_NAMES, FRAME_LENGTHS, SNRS
from kd_lightning.data.radioml_synth import ALIASES_2018, SynthConfig, generate, write_hdf5, write_pickle

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    defaults = SynthConfig()
    parser = argparse.ArgumentParser(
        prog="kd radioml-synth",
        description="Write synthetic RadioML-like files (an approximation of DeepSig's datasets, not a copy) "
        "in the layouts RadioMLDataModule reads.",
    )
    parser.add_argument("--out", required=True, help="output folder (the data module's root)")
    parser.add_argument(
        "--format",
        nargs="+",
        choices=sorted(FILE_NAMES),
        default=["2016.10a"],
        help="layouts to write: 2016.10a / 2016.10b (pickle), 2018.01A (HDF5, needs h5py)",
    )
    parser.add_argument("--file", default=None, help="file name (one format only); default: the official name")
    parser.add_argument(
        "--modulations",
        nargs="+",
        default=None,
        help="modulations (default: all of the format; RML2016 names are mapped to RML2018 classes for 2018.01A)",
    )
    parser.add_argument("--snrs", nargs="+", type=int, default=None, help="SNRs in dB (default: the format's grid)")
    parser.add_argument(
        "--snr-range", nargs=3, type=int, metavar=("START", "STOP", "STEP"), help="SNR grid, STOP included"
    )
    parser.add_argument(
        "--frames", type=int, default=None, help="frames per (modulation, SNR) (default 200; 32 for 2018.01A)"
    )
    parser.add_argument("--length", type=int, default=None, help="frame length L (default 128; 1024 for 2018.01A)")
    parser.add_argument("--seed", type=int, default=0)
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "multipath_profile":
            parser.add_argument(flag, nargs="*", type=float, default=list(value), help="tap powers; none: no fading")
        elif name == "phase_offset":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif name == "frame_rms":
            parser.add_argument(flag, type=float, default=value, help="RMS of each frame; 0: unscaled")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``kd radioml-synth --out DIR [--format 2016.10a 2018.01A] ...``: write synthetic RadioML files."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.file and len(args.format) > 1:
        parser.error("--file needs exactly one --format")
    for flag, value in (("--frames", args.frames), ("--length", args.length)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    settings = {name: getattr(args, name) for name in asdict(SynthConfig())}
    settings["multipath_profile"] = tuple(settings["multipath_profile"])
    settings["frame_rms"] = settings["frame_rms"] or None
    try:
        config = SynthConfig(**settings)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    for version in args.format:
        modulations = list(CLASSES[version]) if args.modulations is None else list(args.modulations)
        if version == "2018.01A":
            modulations = [ALIASES_2018.get(m, m) for m in modulations]
            bad = [m for m in modulations if m not in CLASSES_2018]
        else:
            bad = [m for m in modulations if m not in CLASSES[version]]
        if bad:
            parser.error(f"--modulations: {bad} are not RadioML {version} modulations ({list(CLASSES[version])})")
        if args.snr_range:
            start, stop, step = args.snr_range
            snrs = list(range(start, stop + (1 if step > 0 else -1), step))
        else:
            snrs = args.snrs or list(SNRS[version])
        frames_per_key = args.frames or (32 if version == "2018.01A" else 200)
        length = args.length or FRAME_LENGTHS[version]
        frames = generate(modulations, snrs, frames_per_key, length, args.seed, config)
        path = out / (args.file or FILE_NAMES[version])
        if version == "2018.01A":
            write_hdf5(frames, path)  # type: ignore[arg-type]
        else:
            write_pickle(frames, path)  # type: ignore[arg-type]
        n = len(modulations) * len(snrs) * frames_per_key
        print(
            f"wrote {path}: RadioML {version} layout (synthetic approximation), {len(modulations)} modulations x "
            f"{len(snrs)} SNRs x {frames_per_key} frames = {n} frames of [2, {length}]; read it with "
            f"RadioMLDataModule(root={str(out)!r}, version={version!r}"
            + (f", file={args.file!r}" if args.file else "")
            + (f", modulations={modulations}" if set(modulations) != set(CLASSES[version]) else "")
            + ")",
            flush=True,
        )
