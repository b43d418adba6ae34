"""``kd bench GRID.yaml``: a grid of methods × seeds × settings × data through ``kd fit``, as a table and a plot.

Every cell of the grid is one real ``kd fit`` run, in-process (:func:`kd_lightning.cli.run`), with
``--seed_everything <seed>``, its own log folder and no progress bar. Runs share the cached teacher
(``teacher_training.cache_dir`` of their configs); the time spent training it is not in ``fit_seconds``.

Outputs, in the grid's ``out`` folder:

- ``results.csv``: one row per (run, setting, data, seed): the metric, its best-validation value, agreement with
  the teacher, the teacher's metric, the grid's ``extra_metrics``, fit and total seconds, epochs, best checkpoint;
- ``table.md``: per (data, setting), mean ± std over seeds, the paired difference against the baseline run on the
  same seeds (mean ± std, two-sided paired t-test p-value, and whether it is within noise: p ≥ 0.05), agreement,
  teacher metric and fit time; with several settings an overview (run × setting) and, when the grid names a
  ``ranking_check`` pair of settings (e.g. a budget and its double), the Kendall τ between their rankings;
- ``plot.png``: bars of mean ± std per run, one colour per (setting, data) (matplotlib, the ``plot`` extra).

Rows already in ``results.csv`` are skipped (resume); ``--dry-run`` prints the ``kd fit`` commands.

The grid file (YAML; relative paths are relative to the folder ``kd bench`` runs in)::

    name: digits_e30                    # default: the file's stem
    description: one line for the table header
    out: benchmarks/results/digits_e30  # default: runs/bench/<name>
    logs: runs/bench/digits_e30         # per-run log folders (default: <out>/runs)
    workdir: null                       # run every command from this folder (configs with relative paths)
    seeds: [0, 1, 2]
    metric: test/acc                    # a key of cli.results: test/* is the best-validation checkpoint's test score
    higher_is_better: null              # default: false for ppl/loss/mse/error metrics
    scale: null                         # shown ×scale in tables (default 100 for acc/agreement metrics)
    extra_metrics: [test/agreement]     # more cli.results keys kept in results.csv
    baseline: student                   # the run every other run is compared with (paired, same seeds)
    args: [--trainer.enable_model_summary=false]   # overrides for every run
    runs:                               # name -> config, or {config, args, seeds, label}
      student: configs/digits_student.yaml
      kd: {config: configs/digits_kd.yaml, args: [--model.init_args.temperature=2]}
    settings:                           # optional axis: name -> overrides (default: one setting, "default")
      e30: [--trainer.max_epochs=30]
      e60: [--trainer.max_epochs=60, --model.init_args.lr_scheduler.init_args.T_max=60]
    data: {digits: []}                  # optional axis: name -> overrides
    ranking_check: [e30, e60]           # optional: Kendall τ between the rankings under these two settings
    logger: true                        # point the config's logger (save_dir, name) at the run's log folder
    prepare:                            # optional: kd commands run first, skipped when `creates` exists
      - {kd: [radioml-synth, --out, data/synth, --frames, "64"], creates: data/synth}

In a run's ``args``, ``{best_ckpt:<run>}`` becomes the best checkpoint of ``<run>`` (same setting and data, its
first seed): a teacher trained by one run of the grid and distilled by the others.

    kd bench benchmarks/grids/digits_e30.yaml
    kd bench benchmarks/grids/digits_e30.yaml --dry-run
    kd bench benchmarks/grids/digits_converged.yaml --only student kd --seeds 0 1
    kd bench benchmarks/grids/digits_e30.yaml --table-only    # rebuild table.md and plot.png from results.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_lightning.errors import KDConfigError

__all__ = [
    "Grid",
    "RunSpec",
    "kendall_tau",
    "load_grid",
    "machine_line",
    "main",
    "paired_stats",
    "read_results",
    "render_table",
    "write_plot",
]

KEY_FIELDS = ("run", "setting", "data", "seed")
BASE_FIELDS = (*KEY_FIELDS, "config", "method")
TAIL_FIELDS = ("fit_seconds", "total_seconds", "epochs", "best_checkpoint", "machine")
NOISE_P = 0.05
_PLACEHOLDER = re.compile(r"\{best_ckpt:([A-Za-z0-9_.-]+)\}")
_GRID_KEYS = {
    "name", "description", "out", "logs", "workdir", "seeds", "metric", "higher_is_better", "scale",
    "extra_metrics", "baseline", "args", "runs", "settings", "data", "ranking_check", "logger", "prepare",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the grid
@dataclass
class RunSpec:
    """One run of the grid: a config and its own overrides (and optionally its own seeds)."""

    name: str
    config: Path
    args: list[str] = field(default_factory=list)
    seeds: list[int] | None = None
    label: str | None = None


@dataclass
class Grid:
    """A parsed grid file (see the module docstring for the fields)."""

    name: str
    path: Path
    runs: dict[str, RunSpec]
    seeds: list[int]
    settings: dict[str, list[str]]
    data: dict[str, list[str]]
    metric: str = "test/acc"
    higher_is_better: bool = True
    scale: float = 100.0
    extra_metrics: list[str] = field(default_factory=list)
    baseline: str | None = None
    args: list[str] = field(default_factory=list)
    out: Path = Path("runs/bench")
    logs: Path = Path("runs/bench/runs")
    workdir: Path | None = None
    ranking_check: tuple[str, str] | None = None
    logger: bool = True
    description: str = ""
    prepare: list[dict[str, Any]] = field(default_factory=list)
    base: Path = field(default_factory=Path.cwd)

    @property
    def teacher_metric(self) -> str:
        """The teacher's counterpart of :attr:`metric` (``test/acc`` -> ``test/teacher_acc``)."""
        head, _, tail = self.metric.rpartition("/")
        return f"{head}/teacher_{tail}" if head else f"teacher_{tail}"

    @property
    def val_metric(self) -> str:
        """The best-validation-checkpoint's validation value of the metric (``best/val/acc``)."""
        tail = self.metric.rpartition("/")[2]
        return f"best/val/{tail}"

    @property
    def columns(self) -> list[str]:
        """The columns of ``results.csv``."""
        metrics = [self.metric, self.val_metric, "test/agreement", self.teacher_metric, *self.extra_metrics]
        return [*BASE_FIELDS, *dict.fromkeys(metrics), *TAIL_FIELDS]

    def seeds_of(self, run: str) -> list[int]:
        """The seeds of ``run`` (its own, or the grid's)."""
        own = self.runs[run].seeds
        return list(own) if own is not None else list(self.seeds)


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not all(isinstance(v, str | int | float) for v in value)
    ):
        raise KDConfigError(name, f"must be a list of strings, got {value!r}", "write it as a YAML list")
    return [str(v) for v in value]


def _axis(value: Any, name: str, default: str) -> dict[str, list[str]]:
    if value is None:
        return {default: []}
    if not isinstance(value, Mapping) or not value:
        raise KDConfigError(name, f"must map names to override lists, got {value!r}", f"e.g. {name}: {{a: [--x=1]}}")
    return {str(k): _str_list(v, f"{name}.{k}") for k, v in value.items()}


def _higher_is_better(metric: str) -> bool:
    tail = metric.rpartition("/")[2].lower()
    return not any(word in tail for word in ("ppl", "perplexity", "loss", "mse", "error", "kl"))


def load_grid(path: str | Path, base: Path | None = None) -> Grid:
    """Read and check a grid file; relative paths in it are resolved against ``base`` (default: the cwd)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise KDConfigError(
            "grid", f"no file {path}", "give the path of a grid YAML, e.g. benchmarks/grids/digits_e30.yaml"
        )
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, Mapping):
        raise KDConfigError("grid", f"{path} is not a YAML mapping", "see `kd bench --help` for the fields")
    unknown = sorted(set(spec) - _GRID_KEYS)
    if unknown:
        raise KDConfigError(f"grid.{unknown[0]}", "unknown field", f"known fields: {', '.join(sorted(_GRID_KEYS))}")
    base = (base or Path.cwd()).resolve()

    def absolute(value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p

    name = str(spec.get("name") or path.stem)
    raw_runs = spec.get("runs")
    if not isinstance(raw_runs, Mapping) or not raw_runs:
        raise KDConfigError(
            "grid.runs", "missing or empty", "map run names to configs: runs: {student: configs/x.yaml}"
        )
    runs: dict[str, RunSpec] = {}
    for run_name, value in raw_runs.items():
        where = f"grid.runs.{run_name}"
        if isinstance(value, str):
            value = {"config": value}
        if not isinstance(value, Mapping) or "config" not in value:
            raise KDConfigError(
                where, f"needs a config, got {value!r}", "write `name: path.yaml` or `name: {config: ...}`"
            )
        extra = sorted(set(value) - {"config", "args", "seeds", "label"})
        if extra:
            raise KDConfigError(f"{where}.{extra[0]}", "unknown field", "a run has config, args, seeds and label")
        config = absolute(value["config"])
        if not config.is_file():
            raise KDConfigError(
                f"{where}.config", f"no file {config}", "fix the path (relative to where kd bench runs)"
            )
        seeds = value.get("seeds")
        runs[str(run_name)] = RunSpec(
            name=str(run_name),
            config=config,
            args=_str_list(value.get("args"), f"{where}.args"),
            seeds=[int(s) for s in seeds] if seeds is not None else None,
            label=value.get("label"),
        )
    seeds = [int(s) for s in spec.get("seeds", [0])]
    if not seeds:
        raise KDConfigError("grid.seeds", "is empty", "give at least one seed")
    settings = _axis(spec.get("settings"), "grid.settings", "default")
    data = _axis(spec.get("data"), "grid.data", "default")
    metric = str(spec.get("metric", "test/acc"))
    baseline = spec.get("baseline")
    if baseline is not None and baseline not in runs:
        raise KDConfigError("grid.baseline", f"{baseline!r} is not a run", f"runs: {', '.join(runs)}")
    check = spec.get("ranking_check")
    if check is not None:
        if not isinstance(check, Sequence) or len(check) != 2 or any(c not in settings for c in check):
            raise KDConfigError(
                "grid.ranking_check", f"must name two settings, got {check!r}", f"settings: {', '.join(settings)}"
            )
        check = (str(check[0]), str(check[1]))
    scale = spec.get("scale")
    if scale is None:
        scale = 100.0 if _percent(metric) else 1.0
    out = absolute(spec.get("out") or f"runs/bench/{name}")
    prepare = spec.get("prepare") or []
    for i, step in enumerate(prepare):
        if not isinstance(step, Mapping) or not isinstance(step.get("kd"), list):
            raise KDConfigError(
                f"grid.prepare[{i}]", f"must be {{kd: [command, args...]}}, got {step!r}", "see kd bench --help"
            )
    return Grid(
        name=name,
        path=path.resolve(),
        runs=runs,
        seeds=seeds,
        settings=settings,
        data=data,
        metric=metric,
        higher_is_better=bool(spec["higher_is_better"])
        if spec.get("higher_is_better") is not None
        else _higher_is_better(metric),
        scale=float(scale),
        extra_metrics=_str_list(spec.get("extra_metrics"), "grid.extra_metrics"),
        baseline=str(baseline) if baseline is not None else None,
        args=_str_list(spec.get("args"), "grid.args"),
        out=out,
        logs=absolute(spec["logs"]) if spec.get("logs") else out / "runs",
        workdir=absolute(spec["workdir"]) if spec.get("workdir") else None,
        ranking_check=check,
        logger=bool(spec.get("logger", True)),
        description=str(spec.get("description") or "").strip(),
        prepare=[dict(step) for step in prepare],
        base=base,
    )


# ---------------------------------------------------------------------------------------------- results.csv
def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``results.csv`` (numbers parsed; empty cells are ``None``)."""
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if key is None:
                    continue
                if value in (None, ""):
                    row[key] = None
                elif key in ("run", "setting", "data", "config", "method", "best_checkpoint", "machine"):
                    row[key] = value
                elif key in ("seed", "epochs"):
                    row[key] = int(float(value))
                else:
                    try:
                        row[key] = float(value)
                    except ValueError:
                        row[key] = value
            rows.append(row)
    return rows


def write_results(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Write ``rows`` to ``path`` (atomically), ``columns`` first, then any other key the rows have."""
    names = list(dict.fromkeys([*columns, *(k for r in rows for k in r)]))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in names})
    tmp.replace(path)


def add_result(path: Path, row: dict[str, Any], columns: list[str]) -> list[dict[str, Any]]:
    """Add ``row`` to ``path`` (replacing a row with its key) and return every row of the file.

    The file is re-read under a lock, so several ``kd bench`` processes can share one grid (e.g. ``--only`` or
    ``--seeds`` subsets in parallel) without losing each other's rows.
    """
    import hashlib
    import tempfile

    from filelock import FileLock

    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"kd-bench-{digest}.lock")):  # not in the (committed) out folder
        rows = [r for r in read_results(path) if row_key(r) != row_key(row)]
        rows.append(row)
        write_results(path, rows, columns)
    return rows


def row_key(row: Mapping[str, Any]) -> tuple[str, str, str, int]:
    """``(run, setting, data, seed)`` of a results row."""
    return (str(row["run"]), str(row["setting"]), str(row["data"]), int(row["seed"]))


# ---------------------------------------------------------------------------------------------- statistics
def _t_sf(t: float, dof: int) -> float:
    """Two-sided p-value of Student's t with ``dof`` degrees of freedom."""
    try:
        from scipy import stats

        return float(2 * stats.t.sf(abs(t), dof))
    except ImportError:  # regularised incomplete beta by continued fraction is overkill: normal approximation
        return math.erfc(abs(t) / math.sqrt(2))


def paired_stats(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float | int | None]:
    """Paired differences ``values - baseline`` (same seeds): mean, std, t statistic, two-sided p-value, n.

    With fewer than two pairs std, t and p are ``None``; with identical differences (std 0) p is 1 when they
    are all 0 and 0 otherwise.
    """
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "t": None, "p": None}
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "t": None, "p": None}
    std = statistics.stdev(diffs)
    if std <= 1e-12 * max(1.0, abs(mean)):  # identical differences (up to float rounding)
        return {"n": n, "mean": mean, "std": 0.0, "t": None, "p": 1.0 if abs(mean) <= 1e-12 else 0.0}
    t = mean / (std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "t": t, "p": _t_sf(t, n - 1)}


def kendall_tau(first: Sequence[float], second: Sequence[float]) -> float | None:
    """Kendall's τ-b between two scorings of the same items (ties handled); ``None`` for fewer than two items."""
    n = len(first)
    if n < 2:
        return None
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            a = (first[i] > first[j]) - (first[i] < first[j])
            b = (second[i] > second[j]) - (second[i] < second[j])
            if a == 0 and b == 0:
                continue
            if a == 0:
                ties_a += 1
            elif b == 0:
                ties_b += 1
            elif a == b:
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denominator if denominator else None


# ---------------------------------------------------------------------------------------------- the table
def machine_line() -> str:
    """CPU model, core count, torch version and thread count of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (
        f"{cpu} ({os.cpu_count()} cores){gpu}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}"
    )


def _mean_std(values: list[float], scale: float, digits: int) -> str:
    if not values:
        return "–"
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), float | int) and not math.isnan(r[key])]


def _percent(metric: str) -> bool:
    return any(word in metric.rpartition("/")[2] for word in ("acc", "agreement"))


def _format_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _verdict(stats: Mapping[str, Any], higher_is_better: bool) -> str:
    if stats["p"] is None:
        return "n/a (< 2 paired seeds)" if stats["n"] else "–"
    if stats["p"] >= NOISE_P:
        return "within noise"
    better = (stats["mean"] > 0) == higher_is_better
    return "better" if better else "worse"


def _cell_rows(rows: list[dict[str, Any]], run: str, setting: str, data: str) -> list[dict[str, Any]]:
    return sorted(
        (r for r in rows if r["run"] == run and r["setting"] == setting and r["data"] == data), key=lambda r: r["seed"]
    )


def summarise(grid: Grid, rows: list[dict[str, Any]], run: str, setting: str, data: str) -> dict[str, Any]:
    """Mean, std and paired statistics of one (run, setting, data) cell."""
    cell = [r for r in _cell_rows(rows, run, setting, data) if r.get(grid.metric) is not None]
    out: dict[str, Any] = {"rows": cell, "values": [r[grid.metric] for r in cell]}
    if grid.baseline is not None and run != grid.baseline:
        base = {r["seed"]: r[grid.metric] for r in _cell_rows(rows, grid.baseline, setting, data)
                if r.get(grid.metric) is not None}  # fmt: skip
        pairs = [(r[grid.metric], base[r["seed"]]) for r in cell if r["seed"] in base]
        out["paired"] = paired_stats([a for a, _ in pairs], [b for _, b in pairs])
    return out


def _digits(grid: Grid) -> int:
    return 2 if grid.scale != 1.0 else 3


def render_table(grid: Grid, rows: list[dict[str, Any]], machine: str | None = None, command: str | None = None) -> str:
    """The markdown report of ``rows`` (see the module docstring)."""
    scale, digits = grid.scale, _digits(grid)
    unit = " %" if scale == 100.0 else ""
    arrow = "↑" if grid.higher_is_better else "↓"
    present = {(r["setting"], r["data"]) for r in rows}
    runs = [r for r in grid.runs if any(row["run"] == r for row in rows)]
    settings = [s for s in grid.settings if any(s == k[0] for k in present)]
    datas = [d for d in grid.data if any(d == k[1] for k in present)]
    lines = [f"# kd bench: {grid.name}", ""]
    if grid.description:
        lines += [grid.description, ""]
    if command:
        lines.append(f"Command: `{command}`  ")
    machines = list(dict.fromkeys(r["machine"] for r in rows if r.get("machine"))) or [machine or machine_line()]
    lines.append(f"Machine: {'; '.join(machines)}  ")
    total = sum(_values(rows, "total_seconds"))
    lines.append(
        f"Metric: `{grid.metric}` {arrow} (the best-validation checkpoint's score), mean ± std over seeds; "
        f"{len(rows)} runs, {total / 60:.1f} min of run wall time in all.  "
    )
    if grid.baseline:
        lines.append(
            f"Δ: paired difference against `{grid.baseline}` on the same seeds (mean ± std of the per-seed "
            f"differences), p: two-sided paired t-test; *within noise*: p ≥ {NOISE_P}."
        )
    lines.append("")
    for name in settings:
        overrides = " ".join(grid.settings[name]) or "(the configs as they are)"
        lines.append(f"- setting `{name}`: `{overrides}`")
    for name in datas:
        if grid.data[name]:
            lines.append(f"- data `{name}`: `{' '.join(grid.data[name])}`")
    lines.append("")

    for data in datas:
        for setting in settings:
            title = f"## {setting}" + (f", data {data}" if len(datas) > 1 or data != "default" else "")
            lines += [title, ""]
            header = f"| run | config | method | {grid.metric}{unit} {arrow} |"
            rule = "|---|---|---|---:|"
            if grid.baseline:
                header += f" Δ vs {grid.baseline}{unit} | p | difference |"
                rule += "---:|---:|---|"
            teacher_name = grid.metric.rpartition("/")[2]
            header += f" agreement % | teacher {teacher_name}{unit} |"
            rule += "---:|---:|"
            for extra in grid.extra_metrics:
                header += f" {extra}{' %' if _percent(extra) else ''} |"
                rule += "---:|"
            header += " fit s/run | seeds |"
            rule += "---:|---|"
            lines += [header, rule]
            for run in runs:
                cell = summarise(grid, rows, run, setting, data)
                if not cell["rows"]:
                    continue
                first = cell["rows"][0]
                label = grid.runs[run].label
                config = first.get("config") or ""
                line = (
                    f"| {run} | `{config}` | {first.get('method') or ''}{f' ({label})' if label else ''} | "
                    f"{_mean_std(cell['values'], scale, digits)} |"
                )
                if grid.baseline:
                    paired = cell.get("paired")
                    if paired is None:
                        line += " (baseline) | | |"
                    elif paired["mean"] is None:
                        line += " – | – | no paired seeds |"
                    else:
                        std = f" ± {scale * paired['std']:.{digits}f}" if paired["std"] is not None else ""
                        line += (
                            f" {scale * paired['mean']:+.{digits}f}{std} | {_format_p(paired['p'])} | "
                            f"{_verdict(paired, grid.higher_is_better)} |"
                        )
                agreement = _values(cell["rows"], "test/agreement")
                teacher = _values(cell["rows"], grid.teacher_metric)
                fit = _values(cell["rows"], "fit_seconds")
                seeds = ", ".join(str(r["seed"]) for r in cell["rows"])
                line += f" {_mean_std(agreement, 100.0, 2)} | {_mean_std(teacher, scale, digits)} |"
                for extra in grid.extra_metrics:
                    percent = _percent(extra)
                    line += (
                        f" {_mean_std(_values(cell['rows'], extra), 100.0 if percent else 1.0, 2 if percent else 3)} |"
                    )
                line += f" {statistics.fmean(fit) if fit else float('nan'):.1f} | {seeds} |"
                lines.append(line)
            lines.append("")

    if len(settings) > 1:
        for data in datas:
            title = "## Overview: every setting" + (f", data {data}" if data != "default" else "")
            head = "| run | " + " | ".join(f"{s}{unit}" for s in settings) + " |"
            lines += [title, "", head, "|---|" + "---:|" * len(settings)]
            for run in runs:
                cells = [summarise(grid, rows, run, s, data)["values"] for s in settings]
                lines.append(f"| {run} | " + " | ".join(_mean_std(v, scale, digits) for v in cells) + " |")
            lines.append("")
    if grid.ranking_check is not None:
        first, second = grid.ranking_check
        for data in datas:
            pairs, seeds_used = [], set()
            for run in runs:  # the same seeds under both settings, so only the budget differs
                a = {
                    r["seed"]: r[grid.metric]
                    for r in _cell_rows(rows, run, first, data)
                    if r.get(grid.metric) is not None
                }
                b = {
                    r["seed"]: r[grid.metric]
                    for r in _cell_rows(rows, run, second, data)
                    if r.get(grid.metric) is not None
                }
                common = sorted(set(a) & set(b))
                if common:
                    seeds_used.update(common)
                    pairs.append((run, statistics.fmean(a[s] for s in common), statistics.fmean(b[s] for s in common)))
            if len(pairs) < 2:
                continue
            tau = kendall_tau([p[1] for p in pairs], [p[2] for p in pairs])
            sign = 1 if grid.higher_is_better else -1
            order_a = [p[0] for p in sorted(pairs, key=lambda p: -sign * p[1])]
            order_b = [p[0] for p in sorted(pairs, key=lambda p: -sign * p[2])]
            where = f" (data {data})" if data != "default" else ""
            lines += [
                f"## Ranking check{where}: `{first}` against `{second}`",
                "",
                f"Kendall τ-b between the rankings of the {len(pairs)} runs by mean {grid.metric} over the seeds run "
                f"under both settings (seeds {', '.join(map(str, sorted(seeds_used)))}): "
                + (f"**{tau:.3f}**" if tau is not None else "n/a")
                + ".",
                "",
                f"- `{first}`: " + " > ".join(order_a),
                f"- `{second}`: " + " > ".join(order_b),
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def write_plot(grid: Grid, rows: list[dict[str, Any]], path: Path) -> Path:
    """Bars of mean ± std per run, one colour per (setting, data); needs matplotlib (the ``plot`` extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise KDConfigError(
            "plot", "matplotlib is not installed", "pip install 'kd-lightning[plot]', or pass --no-plot"
        ) from None
    runs = [r for r in grid.runs if any(row["run"] == r for row in rows)]
    groups = [
        (s, d) for d in grid.data for s in grid.settings if any(r["setting"] == s and r["data"] == d for r in rows)
    ]
    width = 0.8 / max(1, len(groups))
    fig = Figure(figsize=(max(6.0, 0.55 * len(runs) * max(1, len(groups)) ** 0.5 + 2), 4.2))
    ax = fig.subplots()
    lows = []
    for i, (setting, data) in enumerate(groups):
        means, stds = [], []
        for run in runs:
            values = summarise(grid, rows, run, setting, data)["values"]
            means.append(grid.scale * statistics.fmean(values) if values else math.nan)
            stds.append(grid.scale * statistics.stdev(values) if len(values) > 1 else 0.0)
        lows += [m - s for m, s in zip(means, stds, strict=True) if not math.isnan(m)]
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(runs))]
        label = setting if len(grid.data) == 1 else f"{setting}, {data}"
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=label)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(runs, rotation=45, ha="right")
    ax.set_ylabel(f"{grid.metric}{' (%)' if grid.scale == 100.0 else ''}")
    if lows and grid.higher_is_better:
        ax.set_ylim(bottom=max(0.0, min(lows) - 0.05 * abs(min(lows))))
    ax.set_title(f"kd bench: {grid.name}")
    ax.grid(True, axis="y", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


# ---------------------------------------------------------------------------------------------- running
def cells(grid: Grid) -> Iterator[tuple[str, str, str, int]]:
    """Every (run, setting, data, seed) of the grid, in order: data, setting, run, seed."""
    for data in grid.data:
        for setting in grid.settings:
            for run in grid.runs:
                for seed in grid.seeds_of(run):
                    yield run, setting, data, seed


def fit_args(grid: Grid, run: str, setting: str, data: str, seed: int, rows: list[dict[str, Any]]) -> list[str]:
    """The ``kd fit`` arguments of one cell."""
    spec = grid.runs[run]
    logs = grid.logs / setting / data / run
    args = [
        "fit",
        f"--config={spec.config}",
        f"--seed_everything={seed}",
        "--test_after_fit=true",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={logs}",
    ]
    if grid.logger:
        args += [f"--trainer.logger.init_args.save_dir={logs}", f"--trainer.logger.init_args.name=seed{seed}"]
    args += [*grid.args, *grid.data[data], *grid.settings[setting], *spec.args]

    def checkpoint(match: re.Match[str]) -> str:
        source = match.group(1)
        if source not in grid.runs:
            raise KDConfigError(
                f"grid.runs.{run}.args", f"{{best_ckpt:{source}}} names no run", f"runs: {', '.join(grid.runs)}"
            )
        done = [r for r in _cell_rows(rows, source, setting, data) if r.get("best_checkpoint")]
        if not done:
            return f"<best checkpoint of {source}>"
        return str(grid.base / done[0]["best_checkpoint"])  # stored relative to the grid's base

    return [_PLACEHOLDER.sub(checkpoint, a) for a in args]


@contextlib.contextmanager
def _in_folder(folder: Path | None) -> Iterator[None]:
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _bare_argv() -> Iterator[None]:
    saved = sys.argv
    sys.argv = saved[:1]  # LightningCLI must not see kd bench's arguments
    try:
        yield
    finally:
        sys.argv = saved


def _relative(path: Path, base: Path | None = None) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(base or Path.cwd()))
    return str(path)


def run_cell(grid: Grid, run: str, setting: str, data: str, seed: int, args: list[str]) -> dict[str, Any]:
    """Run one ``kd fit`` in-process and return its results row."""
    from kd_lightning.cli import run as cli_run

    started = time.perf_counter()
    with _bare_argv():
        cli = cli_run(args)
    total = time.perf_counter() - started
    results = getattr(cli, "results", {}) or {}
    callback = getattr(cli.trainer, "checkpoint_callback", None)
    best = getattr(callback, "best_model_path", "") or ""
    row: dict[str, Any] = {
        "run": run,
        "setting": setting,
        "data": data,
        "seed": seed,
        "config": _relative(grid.runs[run].config, grid.base),
        "method": type(cli.model).__name__,
    }
    for key in grid.columns:
        if key not in row and key not in TAIL_FIELDS:
            row[key] = results.get(key)
    row.update(
        {
            "fit_seconds": round(float(getattr(cli, "fit_seconds", math.nan)), 3),
            "total_seconds": round(total, 3),
            "epochs": int(results.get("last_epoch", 0)),
            "best_checkpoint": _relative(Path(best).resolve(), grid.base) if best else None,  # no machine paths
            "machine": machine_line(),
        }
    )
    del cli
    gc.collect()
    return row


def _prepare(grid: Grid, dry_run: bool) -> None:
    from kd_lightning.commands import COMMANDS

    for step in grid.prepare:
        argv = [str(a) for a in step["kd"]]
        creates = step.get("creates")
        if creates and Path(creates).exists():
            continue
        print(("would run: " if dry_run else "kd bench: ") + "kd " + shlex.join(argv), flush=True)
        if dry_run:
            continue
        if not argv or argv[0] not in COMMANDS:
            raise KDConfigError("grid.prepare", f"{argv[:1]} is not a kd command", f"commands: {', '.join(COMMANDS)}")
        importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


def _select(values: list[str], chosen: list[str] | None, what: str, known: Sequence[str]) -> list[str]:
    if not chosen:
        return values
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise KDConfigError(f"--{what}", f"{unknown[0]!r} is not in the grid", f"choices: {', '.join(known)}")
    return [v for v in values if v in chosen]


def main(argv: list[str] | None = None) -> None:
    """``kd bench GRID.yaml [--dry-run] [--only RUN ...] [--settings ...] [--data ...] [--seeds ...]``."""
    parser = argparse.ArgumentParser(
        prog="kd bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", type=Path, help="the grid YAML")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the grid's `out`)")
    parser.add_argument("--logs", type=Path, default=None, help="per-run log folders (default: the grid's `logs`)")
    parser.add_argument("--dry-run", action="store_true", help="print the kd fit commands, run nothing")
    parser.add_argument("--only", nargs="+", default=None, metavar="RUN", help="run only these runs")
    parser.add_argument("--settings", nargs="+", default=None, help="run only these settings")
    parser.add_argument("--data", nargs="+", default=None, help="run only these data entries")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="replace the grid's seeds")
    parser.add_argument("--table-only", action="store_true", help="rebuild table.md and plot.png from results.csv")
    parser.add_argument("--no-plot", action="store_true", help="do not write plot.png")
    args = parser.parse_args(argv)

    grid = load_grid(args.grid)
    if args.out is not None:  # the logs move with the outputs unless --logs says otherwise
        grid.out = args.out.resolve()
        grid.logs = grid.out / "runs"
    if args.logs is not None:
        grid.logs = args.logs.resolve()
    if args.seeds:
        grid.seeds = list(args.seeds)
        for spec in grid.runs.values():
            spec.seeds = None
    only_runs = set(_select(list(grid.runs), args.only, "only", list(grid.runs)))
    only_settings = set(_select(list(grid.settings), args.settings, "settings", list(grid.settings)))
    only_data = set(_select(list(grid.data), args.data, "data", list(grid.data)))

    command = f"kd bench {_relative(grid.path)}"  # subsets (--only, --seeds, ...) all add to the same results
    grid.out.mkdir(parents=True, exist_ok=True)
    csv_path = grid.out / "results.csv"
    rows = read_results(csv_path)
    done = {row_key(r) for r in rows}
    machine = machine_line()
    if not args.table_only:
        with _in_folder(grid.workdir):
            _prepare(grid, args.dry_run)
            todo = [c for c in cells(grid) if c[0] in only_runs and c[1] in only_settings and c[2] in only_data]
            print(f"kd bench: {grid.name}: {len(todo)} runs, {sum(c in done for c in todo)} already in {csv_path}",
                  flush=True)  # fmt: skip
            for cell in todo:
                run, setting, data, seed = cell
                if not args.dry_run:  # another kd bench process may share this grid
                    rows = read_results(csv_path) or rows
                    done = {row_key(r) for r in rows}
                fargs = fit_args(grid, run, setting, data, seed, rows)
                if cell in done:
                    if args.dry_run:
                        print(f"# done: kd {shlex.join(fargs)}")
                    continue
                if args.dry_run:
                    print(f"kd {shlex.join(fargs)}")
                    continue
                print(f"kd bench: [{run} | {setting} | {data} | seed {seed}] kd {shlex.join(fargs)}", flush=True)
                row = run_cell(grid, run, setting, data, seed, fargs)
                rows = add_result(csv_path, row, grid.columns)
                done.add(cell)
                value = row.get(grid.metric)
                print(
                    f"kd bench: [{run} | {setting} | {data} | seed {seed}] {grid.metric} = {value}, "
                    f"fit {row['fit_seconds']:.1f} s",
                    flush=True,
                )
    if args.dry_run:
        return
    if not rows:
        print(f"kd bench: no results in {csv_path}: nothing to tabulate", flush=True)
        return
    text = render_table(grid, rows, machine, command)
    (grid.out / "table.md").write_text(text)
    print(text)
    print(f"kd bench: wrote {csv_path} and {grid.out / 'table.md'}", flush=True)
    if not args.no_plot:
        path = write_plot(grid, rows, grid.out / "plot.png")
        print(f"kd bench: wrote {path}", flush=True)
