"""RadioML table: ClST-like teacher, KD-CNN / KD-MobileNet alone and with SKD, accuracy vs SNR over seeds.

One command, through the real ``kd fit`` CLI and the configs ``configs/radioml2016a_*.yaml``:

1. data: the RadioML file given by ``--data-root`` (and ``--file``), or else a SYNTHETIC RML2016.10a-like pickle
   written with ``kd radioml-synth`` into ``<out>/data`` (``--synth-frames`` frames per (modulation, SNR),
   ``--synth-snrs`` grid);
2. the ClST teacher once (``radioml2016a_clst_teacher.yaml``, seed ``--teacher-seed``; its best validation
   checkpoint becomes the SKD teacher);
3. for every seed: KD-CNN alone, KD-CNN + SKD, KD-MobileNet alone, KD-MobileNet + SKD;
4. test accuracy of the best validation checkpoint, overall and per SNR (from the :class:`SNREvaluation`
   callback of the configs), mean ± std over seeds, with parameters and MACs of each network.

    python benchmarks/radioml_table.py --seeds 0 1 2 --epochs 10 --teacher-epochs 10 --out runs/radioml_table
    python benchmarks/radioml_table.py --data-root data/radioml --epochs 100 --teacher-epochs 100   # real 2016.10a

Writes ``<out>/radioml_table.{md,json}`` and ``<out>/radioml_acc_vs_snr.png`` (matplotlib) and prints the tables.
Numbers measured on the synthetic data say nothing about the real datasets.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TEACHER = ("ClST teacher", "radioml2016a_clst_teacher.yaml")
STUDENTS = [
    ("KD-CNN alone", "radioml2016a_kdcnn_alone.yaml"),
    ("KD-CNN + SKD", "radioml2016a_skd_kdcnn.yaml"),
    ("KD-MobileNet alone", "radioml2016a_kdmobilenet_alone.yaml"),
    ("KD-MobileNet + SKD", "radioml2016a_skd_kdmobilenet.yaml"),
]


def synthesize(out: Path, frames: int, snrs: list[int], seed: int) -> Path:
    """Write a synthetic RML2016.10a-layout pickle with ``kd radioml-synth``; returns its folder."""
    from kd_lightning.commands.radioml_synth import main as synth_main

    root = out / "data"
    started = time.perf_counter()
    synth_main(["--out", str(root), "--format", "2016.10a", "--frames", str(frames), "--seed", str(seed),
                "--snrs", *map(str, snrs)])  # fmt: skip
    print(f"generated in {time.perf_counter() - started:.1f} s", flush=True)
    return root


def run_one(config: str, name: str, seed: int, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    from kd_lightning.cli import run
    from kd_lightning.commands.model_stats import model_stats

    stem = Path(config).stem
    overrides = [
        "fit",
        f"--config={CONFIGS / config}",
        f"--seed_everything={seed}",
        "--test_after_fit=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out / stem}",
        f"--trainer.logger.init_args.save_dir={out / stem}",
        f"--trainer.logger.init_args.name=seed{seed}",
        f"--data.init_args.root={args.data_root}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.num_workers={args.num_workers}",
        f"--trainer.max_epochs={args.epochs}",
        f"--model.init_args.lr_scheduler.init_args.T_max={args.epochs}",
        *([f"--data.init_args.file={args.file}"] if args.file else []),
        *extra,
    ]
    started = time.perf_counter()
    cli = run(overrides)
    results = cli.results
    snrs = sorted(int(k.rsplit("_", 1)[1]) for k in results if k.startswith("test/acc_snr_"))
    shape = tuple(cli.datamodule.input_shape)
    row: dict[str, Any] = {
        "name": name,
        "config": f"configs/{config}",
        "seed": seed,
        "network": type(cli.model.network).__name__,
        **{k: v for k, v in model_stats(cli.model.network, shape).items() if k in ("params", "macs")},
        "test_acc": results.get("test/acc"),
        "acc_snr": {s: results[f"test/acc_snr_{s}"] for s in snrs},
        "acc_band": {k.rsplit("_", 1)[1]: v for k, v in results.items() if k.startswith("test/acc_band_")},
        "teacher_test_acc": results.get("test/teacher_acc"),
        "agreement": results.get("test/agreement"),
        "best_checkpoint": cli.trainer.checkpoint_callback.best_model_path,
        "log_dir": cli.trainer.log_dir,
        "fit_seconds": cli.fit_seconds,
        "total_seconds": time.perf_counter() - started,
    }
    return row


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def tables(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["name"] for r in rows))
    by_name = {n: [r for r in rows if r["name"] == n] for n in names}
    bands = list(dict.fromkeys(b for r in rows for b in r["acc_band"]))
    lines = [
        "| model | network | params | MACs | test acc % (mean ± std) | "
        + " | ".join(f"{b} SNR %" for b in bands)
        + " | agreement with teacher % | runs |",
        "|---|---|---:|---:|---|" + "---|" * len(bands) + "---|---:|",
    ]
    for name, runs in by_name.items():
        agreement = [r["agreement"] for r in runs if r["agreement"] is not None]
        lines.append(
            f"| {name} | {runs[0]['network']} | {runs[0]['params']:,} | {runs[0]['macs'] / 1e6:.2f} M | "
            f"{mean_std([r['test_acc'] for r in runs])} | "
            + " | ".join(mean_std([r["acc_band"].get(b) for r in runs]) for b in bands)
            + f" | {mean_std(agreement) if agreement else '–'} | {len(runs)} |"
        )
    snrs = sorted({s for r in rows for s in r["acc_snr"]})
    lines += ["", "Test accuracy % per SNR (mean ± std over runs):", ""]
    lines.append("| SNR dB | " + " | ".join(names) + " |")
    lines.append("|---:|" + "---|" * len(names))
    for s in snrs:
        lines.append(
            f"| {s} | " + " | ".join(mean_std([r["acc_snr"].get(s) for r in by_name[n]]) for n in names) + " |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib missing (pip install 'kd-lightning[plot]'): no plot written", flush=True)
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = [r for r in rows if r["name"] == name]
        snrs = sorted({s for r in runs for s in r["acc_snr"]})
        means = [100 * statistics.fmean(r["acc_snr"][s] for r in runs) for s in snrs]
        stds = [100 * statistics.stdev([r["acc_snr"][s] for r in runs]) if len(runs) > 1 else 0.0 for s in snrs]
        ax.errorbar(snrs, means, yerr=stds, marker="o", capsize=2, label=name)
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None, help="folder with a RadioML 2016.10a file")
    parser.add_argument("--file", default=None, help="file name inside --data-root (default: the official name)")
    parser.add_argument("--synth-frames", type=int, default=64, help="synthetic frames per (modulation, SNR)")
    parser.add_argument("--synth-snrs", type=int, nargs="+", default=list(range(-20, 19, 2)))
    parser.add_argument("--synth-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-seed", type=int, default=0)
    parser.add_argument("--teacher-ckpt", default=None, help="skip training the teacher: use this checkpoint")
    parser.add_argument("--epochs", type=int, default=10, help="student epochs (and cosine T_max)")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=400)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--extra", nargs="*", default=[], help="dotted overrides for every run, e.g. --extra ...")
    parser.add_argument("--out", type=Path, default=Path("runs/radioml_table"))
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # LightningCLI must not see this script's arguments
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    synthetic = args.data_root is None
    if synthetic:
        args.data_root = synthesize(out, args.synth_frames, args.synth_snrs, args.synth_seed)
    args.data_root = args.data_root.resolve()
    extra = [e if e.startswith("--") else f"--{e}" for e in args.extra]

    rows: list[dict] = []
    teacher_ckpt = args.teacher_ckpt
    if teacher_ckpt is None:
        student_epochs, args.epochs = args.epochs, args.teacher_epochs
        rows.append(run_one(TEACHER[1], TEACHER[0], args.teacher_seed, out, args, extra))
        args.epochs = student_epochs
        teacher_ckpt = rows[-1]["best_checkpoint"]
        print(json.dumps(rows[-1]), flush=True)
    for seed in args.seeds:
        for name, config in STUDENTS:
            teacher = [f"--model.init_args.teacher_ckpt={teacher_ckpt}"] if "skd" in config else []
            rows.append(run_one(config, name, seed, out, args, [*teacher, *extra]))
            print(json.dumps(rows[-1]), flush=True)

    text = tables(rows)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    source = (
        f"SYNTHETIC RML2016.10a-like data (kd radioml-synth, {args.synth_frames} frames per (modulation, SNR), "
        f"seed {args.synth_seed}): not comparable with published RadioML numbers"
        if synthetic
        else f"data: {args.data_root}"
    )
    settings = (
        f"{source}. Teacher {args.teacher_epochs} epochs (seed {args.teacher_seed}), students {args.epochs} epochs, "
        f"batch {args.batch_size}, seeds {args.seeds}; test accuracy of the best validation checkpoint."
    )
    png = plot(rows, out / "radioml_acc_vs_snr.png")
    (out / "radioml_table.json").write_text(
        json.dumps({"machine": machine, "settings": settings, "teacher_ckpt": teacher_ckpt, "runs": rows}, indent=2)
    )
    (out / "radioml_table.md").write_text(f"{settings}\n\n{text}\n\nMachine: {machine}.\n")
    print(f"\n{settings}\n\n{text}\n\nMachine: {machine}. Written to {out}/radioml_table.{{md,json}}")
    if png is not None:
        print(f"Plot: {png}")


if __name__ == "__main__":
    main()
