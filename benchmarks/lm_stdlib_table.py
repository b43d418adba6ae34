"""The stdlib language-model demo: a teacher GPT, a student a quarter of its size, each distillation objective.

Trains the teacher of ``configs/lm_stdlib_teacher.yaml`` once (or reuses the one already under ``<out>``),
then the student alone (``lm_stdlib_student.yaml``) and the student distilled with each objective
(``lm_stdlib_<name>.yaml``), every run through the real ``kd fit`` CLI with the same data, steps, schedule
and seed. Reports the held-out (test split) perplexity, token top-1 accuracy, teacher-student top-1
agreement and KL(p_T ‖ p_S) of the best validation checkpoint, and the wall time of ``trainer.fit``.

    python benchmarks/lm_stdlib_table.py                                  # the configs' recipe
    python benchmarks/lm_stdlib_table.py --steps 100 --teacher-steps 200 --max-bytes 300000   # smaller

Runs from ``<out>`` (default ``runs/lm_stdlib_table``): the configs' relative ``runs/...`` folders land there.
Writes ``<out>/lm_stdlib_table.json`` and ``<out>/lm_stdlib_table.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TEACHER = CONFIGS / "lm_stdlib_teacher.yaml"
TEACHER_CKPT = Path("runs/lm_stdlib_teacher/checkpoints/last.ckpt")  # relative to <out>, as in the configs
DEFAULT_RUNS = ["student", "fkl", "rkl", "jsd", "taid", "onpolicy", "decoupled"]
METRICS = ("ppl", "acc", "agreement", "kl_to_teacher", "teacher_ppl", "teacher_acc")


def overrides(args: argparse.Namespace, steps: int | None, seed: int) -> list[str]:
    out = [
        f"--seed_everything={seed}",
        "--test_after_fit=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if steps is not None:
        out += [
            f"--trainer.max_steps={steps}",
            f"--model.init_args.lr_scheduler.init_args.T_max={steps}",
            f"--trainer.val_check_interval={max(1, min(args.val_every, steps))}",
        ]
    if args.max_bytes is not None:
        out.append(f"--data.init_args.max_bytes={args.max_bytes}")
    if args.limit_val_batches is not None:
        out.append(f"--trainer.limit_val_batches={args.limit_val_batches}")
    if args.limit_test_batches is not None:
        out.append(f"--trainer.limit_test_batches={args.limit_test_batches}")
    return out


def run_one(config: Path, extra: list[str]) -> dict:
    from kd_lightning.cli import run

    started = time.perf_counter()
    cli = run(["fit", f"--config={config}", *extra])
    results = cli.results
    row = {
        "config": config.name,
        "method": type(cli.model).__name__,
        "student_parameters": sum(p.numel() for p in cli.model.network.parameters()),
        "fit_seconds": cli.fit_seconds,
        "total_seconds": time.perf_counter() - started,
        "steps": cli.trainer.global_step,
    }
    row.update({f"test_{name}": results.get(f"test/{name}") for name in METRICS})
    return row


def fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "–" if value is None else f"{scale * value:.{digits}f}"


def table(teacher: dict | None, rows: list[dict]) -> str:
    lines = [
        "| run | method | params | test ppl ↓ | token acc % | top-1 agreement with teacher % | KL(p_T‖p_S) | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    teacher_ppl = next((r["test_teacher_ppl"] for r in rows if r.get("test_teacher_ppl") is not None), None)
    teacher_acc = next((r["test_teacher_acc"] for r in rows if r.get("test_teacher_acc") is not None), None)
    if teacher is not None:
        teacher_ppl, teacher_acc = teacher["test_ppl"], teacher["test_acc"]
    t_params = f"{teacher['student_parameters'] / 1e6:.2f} M" if teacher else "0.84 M"
    t_fit = fmt(teacher["fit_seconds"], digits=0) if teacher else "(reused)"
    lines.append(
        f"| teacher (`lm_stdlib_teacher.yaml`) | LMSupervised | {t_params} | {fmt(teacher_ppl)} | "
        f"{fmt(teacher_acc, 100, 2)} | – | – | {t_fit} |"
    )
    for r in rows:
        lines.append(
            f"| `{r['config']}` | {r['method']} | {r['student_parameters'] / 1e6:.2f} M | {fmt(r['test_ppl'])} | "
            f"{fmt(r['test_acc'], 100, 2)} | {fmt(r['test_agreement'], 100, 2)} | {fmt(r['test_kl_to_teacher'])} | "
            f"{r['fit_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="lm_stdlib_<name>.yaml configs to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the configs' 400)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the config's 800)")
    parser.add_argument("--val-every", type=int, default=100, help="validation interval in steps (with --steps)")
    parser.add_argument("--max-bytes", type=int, default=None, help="stdlib bytes to read (default: the configs')")
    parser.add_argument("--limit-val-batches", type=int, default=None)
    parser.add_argument("--limit-test-batches", type=int, default=None)
    parser.add_argument("--retrain-teacher", action="store_true", help="train the teacher even if one is there")
    parser.add_argument("--out", type=Path, default=Path("runs/lm_stdlib_table"))
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # LightningCLI must not see this script's arguments
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)

    teacher = None
    if args.retrain_teacher or not TEACHER_CKPT.is_file():
        teacher = run_one(TEACHER, overrides(args, args.teacher_steps, args.seed))
        print(json.dumps(teacher), flush=True)
    rows = []
    for name in args.runs:
        rows.append(run_one(CONFIGS / f"lm_stdlib_{name}.yaml", overrides(args, args.steps, args.seed)))
        print(json.dumps(rows[-1]), flush=True)
    text = table(teacher, rows)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "lm_stdlib_table.json").write_text(
        json.dumps({"machine": machine, "settings": settings, "teacher": teacher, "runs": rows}, indent=2, default=str)
    )
    (out / "lm_stdlib_table.md").write_text(text + f"\n\nMachine: {machine}. Settings: {settings}.\n")
    print(text)
    print(f"\nMachine: {machine}. Written to {out}/lm_stdlib_table.{{md,json}}")


if __name__ == "__main__":
    main()
