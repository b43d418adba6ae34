"""Rank correlation between training-free student scores and distilled accuracy (DisWOT validation).

Reads the scores of ``kd search-student --score-grid GRID`` (``scores.csv``: one row per run of the grid) and the
``results.csv`` of ``kd bench GRID`` (one row per run and seed), averages the metric over seeds per run and gives,
for the DisWOT score, its two terms and the baselines (parameters, FLOPs, NASWOT, Zen), Kendall's tau and
Spearman's rho with the distilled metric (``scipy.stats``, two-sided p-values), as ``correlations.json``,
``correlations.md`` and a scatter plot ``scatter.png`` (one panel per score) in ``--out``.

    python benchmarks/diswot_correlation.py \
        --scores benchmarks/results/digits_diswot_students/scores/scores.csv \
        --results benchmarks/results/digits_diswot_students/results.csv \
        --out benchmarks/results/digits_diswot_students
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: score column -> label (higher score = predicted better, for every column)
PROXIES: dict[str, str] = {
    "score": "DisWOT score",
    "semantic": "DisWOT semantic term",
    "relation": "DisWOT relation term",
    "params": "parameters",
    "flops": "FLOPs",
    "naswot": "NASWOT",
    "zen": "Zen-score proxy",
}


def _float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_scores(path: Path) -> dict[str, dict[str, float]]:
    """``{run: {proxy: value}}`` from a ``scores.csv``."""
    with path.open(newline="") as f:
        return {row["run"]: {k: _float(row.get(k)) for k in PROXIES} for row in csv.DictReader(f)}


def read_metric(path: Path, metric: str, setting: str | None = None, data: str | None = None) -> dict[str, list[float]]:
    """``{run: [metric per seed]}`` from a ``kd bench`` ``results.csv`` (one setting and data axis value)."""
    values: dict[str, list[float]] = defaultdict(list)
    seen = set()
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if setting is not None and row.get("setting") != setting:
                continue
            if data is not None and row.get("data") != data:
                continue
            seen.add((row.get("setting"), row.get("data")))
            value = _float(row.get(metric))
            if math.isfinite(value):
                values[row["run"]].append(value)
    if len(seen) > 1:
        raise SystemExit(f"{path} has several (setting, data) pairs {sorted(seen)}: choose one with --setting/--data")
    return dict(values)


def correlations(scores: dict[str, dict[str, float]], metric: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Kendall's tau and Spearman's rho of every proxy with the metric, over the runs that have both."""
    from scipy import stats

    out = {}
    for proxy in PROXIES:
        runs = [r for r in metric if r in scores and math.isfinite(scores[r][proxy])]
        if len(runs) < 3:
            out[proxy] = {
                "n": len(runs),
                "kendall_tau": None,
                "kendall_p": None,
                "spearman_rho": None,
                "spearman_p": None,
            }
            continue
        x = [scores[r][proxy] for r in runs]
        y = [metric[r] for r in runs]
        tau = stats.kendalltau(x, y)
        rho = stats.spearmanr(x, y)
        out[proxy] = {
            "n": len(runs),
            "kendall_tau": float(tau.statistic),
            "kendall_p": float(tau.pvalue),
            "spearman_rho": float(rho.statistic),
            "spearman_p": float(rho.pvalue),
        }
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def render_markdown(result: dict[str, Any], metric: str) -> str:
    """The correlation table and the per-run table."""
    lines = [
        f"Rank correlation with the distilled {metric} (mean over seeds; {result['runs']} students)",
        "",
        "| score | n | Kendall tau | p | Spearman rho | p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for proxy, c in result["correlations"].items():
        lines.append(
            f"| {PROXIES[proxy]} | {c['n']} | {_fmt(c['kendall_tau'])} | {_fmt(c['kendall_p'])} "
            f"| {_fmt(c['spearman_rho'])} | {_fmt(c['spearman_p'])} |"
        )
    lines += [
        "",
        f"| run | {metric} (mean ± std, n) | DisWOT score | params | FLOPs | NASWOT | Zen |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run, row in sorted(result["per_run"].items(), key=lambda kv: -kv[1]["metric_mean"]):
        s = row["scores"]
        lines.append(
            f"| {run} | {100 * row['metric_mean']:.2f} ± {100 * row['metric_std']:.2f} ({row['seeds']}) "
            f"| {_fmt(s['score'], 4)} | {s['params']:,.0f} | {s['flops']:,.0f} | {_fmt(s['naswot'], 1)} "
            f"| {_fmt(s['zen'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def write_scatter(result: dict[str, Any], path: Path, metric: str) -> None:
    """One scatter panel per proxy: proxy (x) against the mean metric (y), with tau and rho in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxies = list(PROXIES)
    cols = 4
    rows = math.ceil(len(proxies) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    runs = sorted(result["per_run"])
    y = [100 * result["per_run"][r]["metric_mean"] for r in runs]
    for ax, proxy in zip(axes.flat, proxies):
        x = [result["per_run"][r]["scores"][proxy] for r in runs]
        pairs = [(a, b, r) for a, b, r in zip(x, y, runs) if math.isfinite(a)]
        ax.scatter([p[0] for p in pairs], [p[1] for p in pairs], s=18)
        for a, b, r in pairs:
            ax.annotate(r, (a, b), fontsize=5, alpha=0.7)
        if proxy in ("params", "flops") and pairs and min(p[0] for p in pairs) > 0:
            ax.set_xscale("log")
        c = result["correlations"][proxy]
        ax.set_title(f"{PROXIES[proxy]}\ntau {_fmt(c['kendall_tau'], 2)}, rho {_fmt(c['spearman_rho'], 2)}", fontsize=9)
        ax.set_ylabel(f"{metric} (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(proxies) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=Path, required=True, help="scores.csv of kd search-student --score-grid")
    parser.add_argument("--results", type=Path, required=True, help="results.csv of kd bench")
    parser.add_argument("--out", type=Path, required=True, help="folder for correlations.{json,md} and scatter.png")
    parser.add_argument("--metric", default="test/acc", help="the results.csv column (default test/acc)")
    parser.add_argument("--setting", default=None, help="the grid setting to use (when it has several)")
    parser.add_argument("--data", default=None, help="the grid data value to use (when it has several)")
    parser.add_argument("--min-params", type=float, default=None, help="only students with at least this many params")
    parser.add_argument("--max-params", type=float, default=None, help="only students with at most this many params")
    args = parser.parse_args(argv)
    scores = {
        run: values
        for run, values in read_scores(args.scores).items()
        if (args.min_params is None or values["params"] >= args.min_params)
        and (args.max_params is None or values["params"] <= args.max_params)
    }
    per_seed = read_metric(args.results, args.metric, args.setting, args.data)
    missing = sorted(set(per_seed) - set(scores))
    if missing:
        print(f"note: runs left out (no score, or outside the parameter range): {missing}")
    metric = {run: statistics.fmean(v) for run, v in per_seed.items() if run in scores and v}
    result = {
        "metric": args.metric,
        "params_range": [args.min_params, args.max_params],
        "runs": len(metric),
        "correlations": correlations(scores, metric),
        "per_run": {
            run: {
                "metric_mean": metric[run],
                "metric_std": statistics.stdev(per_seed[run]) if len(per_seed[run]) > 1 else 0.0,
                "seeds": len(per_seed[run]),
                "scores": scores[run],
            }
            for run in metric
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "correlations.json").write_text(json.dumps(result, indent=2))
    table = render_markdown(result, args.metric)
    (args.out / "correlations.md").write_text(table)
    write_scatter(result, args.out / "scatter.png", args.metric)
    print(table)
    return result


if __name__ == "__main__":
    main()
