"""The diagnostic's alignment on correct vs incorrect rollouts, on students of the reasoning bench (README results).

"Unmasking On-Policy Distillation" (arXiv 2605.10889) reports that distillation gradients align much better with the
ideal "raise P(success)" gradient on INCORRECT rollouts than on correct ones. This script checks that on the CPU
reasoning demo: for each named student of a finished ``kd bench`` reasoning grid (best checkpoint of one seed), it
runs ``kd diagnose-opd`` (configs/reasoning_diagnose_opd.yaml) with configurations ``teacher`` (the reasoning teacher
of configs/fragments/reasoning_teacher_tinygpt.yaml on the student's prompt) and ``self_privileged`` (the student on
problem + reference solution: OPSD's teacher), both divergences, and writes ``<out>/<student>/`` (alignment.csv,
summary.json, alignment.png) and ``<out>/table.md`` (incorrect vs correct, with 95 % CIs over questions)::

    python benchmarks/diagnose_opd_reasoning.py --results benchmarks/results/reasoning/results.csv \\
        --student sft=student --student opsd=opsd --questions 64 --out benchmarks/results/diagnose_opd

``--student NAME=RUN`` (repeatable): a run of the grid whose checkpoint holds the student (``student.*``).
``--teacher_run RUN``: a run whose checkpoint holds that teacher (``teacher.*``); default: the first run of the seed
whose checkpoint has a teacher of that architecture. ``--teacher_ckpt PATH`` instead gives the teacher file directly.
Extra arguments go to ``kd diagnose-opd`` (e.g. ``--candidates 8 --continuations 8 --every 16 --top_entropy 32``,
the defaults). Expect about 5-10 s per question per student on 1 CPU thread (the cost is |nodes| x 9 x 8 rollouts).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "reasoning_diagnose_opd.yaml"


def _rows(results: Path) -> list[dict[str, str]]:
    with results.open() as f:
        return list(csv.DictReader(f))


def _checkpoint(rows: list[dict[str, str]], run: str, seed: int, base: Path) -> Path:
    for row in rows:
        if row["run"] == run and int(row["seed"]) == seed and row.get("best_checkpoint"):
            return (base / row["best_checkpoint"]).resolve()
    runs = sorted({r["run"] for r in rows})
    raise SystemExit(f"diagnose_opd_reasoning: no checkpoint of run {run!r}, seed {seed}; runs: {', '.join(runs)}")


def _teacher_shapes() -> dict[str, tuple[int, ...]]:
    from kd_lightning.models.lm import TinyGPT

    config = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["teacher"]
    fragment = yaml.safe_load((CONFIG.parent / config).read_text()) if isinstance(config, str) else config
    teacher = TinyGPT(**fragment["init_args"])
    return {k: tuple(v.shape) for k, v in teacher.state_dict().items()}


def _find_teacher(rows: list[dict[str, str]], seed: int, base: Path) -> Path:
    from kd_lightning.models.checkpoints import read_checkpoint, state_dict_of

    shapes = _teacher_shapes()
    for row in rows:
        if int(row["seed"]) != seed or not row.get("best_checkpoint"):
            continue
        path = (base / row["best_checkpoint"]).resolve()
        if not path.is_file():
            continue
        state = state_dict_of(read_checkpoint(path, "best_checkpoint"))
        teacher = {k[len("teacher.") :]: tuple(v.shape) for k, v in state.items() if k.startswith("teacher.")}
        if teacher == shapes:
            print(f"diagnose_opd_reasoning: teacher from run {row['run']} ({path})", flush=True)
            return path
    raise SystemExit("diagnose_opd_reasoning: no run of the grid holds the reasoning teacher: pass --teacher_run/_ckpt")


def _cell(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "n/a"
    ci = f" [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]" if stats["ci_low"] is not None else ""
    return f"{stats['mean']:.3f}{ci} ({stats['n_questions']} q, {stats['n_nodes']} nodes)"


def table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| student | rollout acc | configuration / divergence | incorrect rollouts | correct rollouts | "
        "incorrect - correct |",
        "|---|---|---|---|---|---|",
    ]
    for student, summary in summaries.items():
        for name, groups in summary["by_correctness"].items():
            gap = summary["incorrect_minus_correct"][name]
            diff = "n/a" if gap["difference"] is None else f"{gap['difference']:+.3f}"
            if gap["ci_low"] is not None:
                diff += f" [{gap['ci_low']:+.3f}, {gap['ci_high']:+.3f}]"
            lines.append(
                f"| {student} | {summary['rollout_accuracy']:.3f} ({summary['questions']} q) | {name} | "
                f"{_cell(groups['incorrect'])} | {_cell(groups['correct'])} | {diff} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="results.csv of the kd bench reasoning grid")
    parser.add_argument("--base", type=Path, default=REPO, help="folder the best_checkpoint paths are relative to")
    parser.add_argument("--student", action="append", required=True, help="NAME=RUN (repeatable)")
    parser.add_argument("--teacher_run", default=None)
    parser.add_argument("--teacher_ckpt", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0, help="which seed's checkpoints (default 0)")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "diagnose_opd")
    args, extra = parser.parse_known_args(argv)
    import torch

    from kd_lightning.commands import diagnose_opd

    torch.set_num_threads(1)  # tiny models: one thread is faster, and the numbers are reproducible
    rows = _rows(args.results)
    teacher = args.teacher_ckpt or (
        _checkpoint(rows, args.teacher_run, args.seed, args.base)
        if args.teacher_run
        else _find_teacher(rows, args.seed, args.base)
    )
    summaries: dict[str, dict[str, Any]] = {}
    for item in args.student:
        name, _, run = item.partition("=")
        student = _checkpoint(rows, run or name, args.seed, args.base)
        summaries[name] = diagnose_opd.main(
            [
                *("--config", str(CONFIG), "--student_ckpt", str(student), "--teacher_ckpt", str(teacher)),
                *("--questions", str(args.questions), "--output", str(args.out / name), *extra),
            ]
        )
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(summaries)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "sources.json").write_text(
        json.dumps({n: s["source"] for n, s in summaries.items()} | {"argv": sys.argv[1:]}, indent=2) + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
