"""The grid that chose the quickstart's recipe, on the digits VALIDATION split (the test split is not looked at).

Methods: VanillaKD with T in {1, 2, 4} x kd_weight in {0.5, 0.9} (ce_weight = 1 - kd_weight), LogitStandardKD with
its official defaults, and the student alone (configs/digits_student.yaml); budgets of 30 and 60 epochs (cosine
T_max = budget); seeds 0, 1, 2. Everything else is configs/quickstart.yaml (teacher, data, optimiser). Each run goes
through the real ``kd fit`` CLI in-process and records the validation accuracy of every epoch (CSV logger).

    python benchmarks/quickstart_grid.py                     # the whole grid (~48 runs; resumable)
    python benchmarks/quickstart_grid.py --seeds 0 --budgets 30

Writes ``<out>/grid.jsonl`` (one line per run) and ``<out>/grid.md`` (mean ± std over seeds) and prints the table.
Selection rule: the best mean last-epoch validation accuracy among the budgets that keep the whole quickstart
(teacher + student + student alone) near 30 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALONE = "student alone (CE)"
METHODS: dict[str, list[str]] = {
    ALONE: [],
    **{
        f"KD T={t:g} kd_weight={w:g}": [
            "--model.class_path=VanillaKD",
            f"--model.init_args.temperature={t}",
            f"--model.init_args.kd_weight={w}",
            f"--model.init_args.ce_weight={1 - w:.1f}",
        ]
        for t in (1.0, 2.0, 4.0)
        for w in (0.5, 0.9)
    },
    "LogitStandardKD defaults (T=2, CE 0.1, KD 9)": [
        "--model.class_path=LogitStandardKD",
        "--model.init_args.temperature=2.0",
        "--model.init_args.ce_weight=0.1",
        "--model.init_args.kd_weight=9.0",
    ],
}


def run_one(method: str, budget: int, seed: int, out: Path) -> dict:
    import torch

    from kd_lightning.cli import run

    torch.set_num_threads(1)  # many small runs: one thread each is the fastest on a shared CPU
    config = "configs/digits_student.yaml" if method == ALONE else "configs/quickstart.yaml"
    folder = out / "runs" / f"{''.join(c if c.isalnum() else '_' for c in method)}-e{budget}-s{seed}"
    started = time.perf_counter()
    cli = run(
        [
            "fit",
            f"--config={REPO / config}",
            f"--seed_everything={seed}",
            f"--trainer.max_epochs={budget}",
            f"--model.init_args.lr_scheduler.init_args.T_max={budget}",
            *METHODS[method],
            "--test_after_fit=false",
            "--compare_student_alone=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={folder}",
            f"--trainer.logger.init_args.save_dir={folder}",
            f"--teacher_training.cache_dir={out / 'runs' / 'teachers'}",
        ]
    )
    with open(Path(cli.trainer.log_dir) / "metrics.csv") as handle:
        curve = [float(row["val/acc"]) for row in csv.DictReader(handle) if row.get("val/acc")]
    return {
        "method": method,
        "budget": budget,
        "seed": seed,
        "last_val_acc": curve[-1],
        "best_val_acc": max(curve),
        "epochs": len(curve),
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(records: list[dict]) -> str:
    """Markdown: validation accuracy (%), mean ± std over seeds, last epoch and best epoch."""
    lines = [
        "| method | epochs | val acc, last epoch | val acc, best epoch | seeds |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        for budget in sorted({r["budget"] for r in records}):
            runs = [r for r in records if r["method"] == method and r["budget"] == budget]
            if not runs:
                continue
            cells = []
            for key in ("last_val_acc", "best_val_acc"):
                values = [100 * r[key] for r in runs]
                spread = statistics.stdev(values) if len(values) > 1 else float("nan")
                cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
            lines.append(f"| {method} | {budget} | {cells[0]} | {cells[1]} | {len(runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[30, 60])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quickstart_grid")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "grid.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(r["method"], r["budget"], r["seed"]) for r in records}
    for seed in args.seeds:
        for budget in args.budgets:
            for method in METHODS:
                if (method, budget, seed) in done:
                    continue
                record = run_one(method, budget, seed, args.out)
                records.append(record)
                with path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    text = table(records)
    (args.out / "grid.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
