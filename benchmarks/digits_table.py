"""Digits comparison table: every given config, several seeds, through the real `kd fit` CLI.

Each run trains the student of one config with ``--seed_everything <seed>``, evaluates its best
validation checkpoint on the held-out test split and records the wall time of ``trainer.fit``
(the cached teacher is trained once, by the first distillation run, and not counted).

    python benchmarks/digits_table.py                       # every configs/digits_*.yaml; seeds 0 1 2
    python benchmarks/digits_table.py --configs configs/digits_kd.yaml --seeds 0 1 --epochs 5

Writes ``<out>/digits_table.json`` and ``<out>/digits_table.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIRST = ("student", "kd")
DEFAULT_CONFIGS = [f"configs/digits_{name}.yaml" for name in FIRST] + sorted(
    str(p.relative_to(REPO)) for p in (REPO / "configs").glob("digits_*.yaml") if p.stem[len("digits_") :] not in FIRST
)


def run_one(config: Path, seed: int, out: Path, epochs: int | None) -> dict:
    from kd_lightning.cli import run

    args = [
        "fit",
        f"--config={config}",
        f"--seed_everything={seed}",
        "--test_after_fit=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out / config.stem}",
        f"--trainer.logger.init_args.save_dir={out / config.stem}",
        f"--trainer.logger.init_args.name=seed{seed}",
    ]
    if epochs is not None:
        args += [f"--trainer.max_epochs={epochs}", f"--model.init_args.lr_scheduler.init_args.T_max={epochs}"]
    started = time.perf_counter()
    cli = run(args)
    return {
        "config": str(config.relative_to(REPO) if config.is_relative_to(REPO) else config),
        "method": type(cli.model).__name__,
        "seed": seed,
        "test_acc": cli.results.get("test/acc"),
        "val_acc": cli.results.get("val/acc"),
        "teacher_test_acc": cli.results.get("test/teacher_acc"),
        "agreement": cli.results.get("test/agreement"),
        "fit_seconds": cli.fit_seconds,
        "total_seconds": time.perf_counter() - started,
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| config | method | test acc % (mean ± std) | top-1 agreement with teacher % | teacher test acc % "
        "| fit s/run | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in dict.fromkeys(r["config"] for r in rows):
        runs = [r for r in rows if r["config"] == config]
        agreement = [r["agreement"] for r in runs if r["agreement"] is not None]
        teacher = [r["teacher_test_acc"] for r in runs if r["teacher_test_acc"] is not None]
        lines.append(
            f"| `{config}` | {runs[0]['method']} | {mean_std([r['test_acc'] for r in runs])} | "
            f"{mean_std(agreement) if agreement else '–'} | {mean_std(teacher) if teacher else '–'} | "
            f"{statistics.fmean(r['fit_seconds'] for r in runs):.1f} | {len(runs)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="configs to compare (paths)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override max_epochs (and the cosine T_max)")
    parser.add_argument("--out", type=Path, default=Path("runs/digits_table"))
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # LightningCLI must not see this script's arguments
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in args.configs:
        path = Path(config) if Path(config).is_absolute() else (Path.cwd() / config)
        for seed in args.seeds:
            rows.append(run_one(path.resolve(), seed, args.out.resolve(), args.epochs))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    (args.out / "digits_table.json").write_text(json.dumps({"machine": machine, "runs": rows}, indent=2))
    (args.out / "digits_table.md").write_text(text + f"\n\nMachine: {machine}.\n")
    print(text)
    print(f"\nMachine: {machine}. Written to {args.out}/digits_table.{{md,json}}")


if __name__ == "__main__":
    main()
