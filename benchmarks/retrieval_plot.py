"""nDCG@10 against document sparsity for a retrieval grid: one point per run, mean ± std over its seeds.

    python benchmarks/retrieval_plot.py benchmarks/results/stdlib_retrieval
    python benchmarks/retrieval_plot.py benchmarks/results/stdlib_retrieval --x test/doc_nnz --y test/ndcg10

Reads ``results.csv`` of ``kd bench benchmarks/grids/stdlib_retrieval.yaml`` (its ``extra_metrics`` hold
``test/doc_nnz``, the mean number of non-zero terms of the corpus' document vectors) and writes
``ndcg_vs_nnz.png`` next to it (matplotlib, the ``plot`` extra). Runs without the x metric are skipped; a dense
teacher's "non-zeros" are its embedding size and BM25's its distinct terms per document, so the x axis is
logarithmic.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from kd_lightning.commands.bench import read_results


def points(rows: list[dict], x: str, y: str) -> dict[str, tuple[float, float, float, float]]:
    """``{run: (mean x, std x, mean y, std y)}`` over the rows (seeds) of each run that have both metrics."""
    out = {}
    for run in dict.fromkeys(r["run"] for r in rows):
        xs = [r[x] for r in rows if r["run"] == run and r.get(x) is not None and r.get(y) is not None]
        ys = [r[y] for r in rows if r["run"] == run and r.get(x) is not None and r.get(y) is not None]
        if xs:
            sx = statistics.stdev(xs) if len(xs) > 1 else 0.0
            sy = statistics.stdev(ys) if len(ys) > 1 else 0.0
            out[run] = (statistics.fmean(xs), sx, statistics.fmean(ys), sy)
    return out


def plot(results: Path, x: str = "test/doc_nnz", y: str = "test/ndcg10", out: Path | None = None) -> Path:
    """Write the scatter plot of ``y`` (×100) against ``x`` and return its path."""
    from matplotlib.figure import Figure

    rows = read_results(results / "results.csv" if results.is_dir() else results)
    found = points(rows, x, y)
    if not found:
        raise SystemExit(f"no run of {results} has both {x} and {y}")
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.subplots()
    for run, (mx, sx, my, sy) in found.items():
        ax.errorbar(mx, 100 * my, xerr=sx, yerr=100 * sy, fmt="o", capsize=3)
        ax.annotate(run, (mx, 100 * my), textcoords="offset points", xytext=(5, 4), fontsize="small")
    ax.set_xscale("log")
    ax.set_xlabel(f"{x} (mean non-zero terms per document vector)")
    ax.set_ylabel(f"{y} (×100)")
    ax.set_title(f"{results.name if results.is_dir() else results.parent.name}: effectiveness vs sparsity")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = out or (results if results.is_dir() else results.parent) / "ndcg_vs_nnz.png"
    fig.savefig(path, dpi=90)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="the grid's out folder (or its results.csv)")
    parser.add_argument("--x", default="test/doc_nnz", help="sparsity metric (x axis, log scale)")
    parser.add_argument("--y", default="test/ndcg10", help="effectiveness metric (y axis, ×100)")
    parser.add_argument("--out", type=Path, default=None, help="image path (default: <results>/ndcg_vs_nnz.png)")
    args = parser.parse_args()
    print(plot(args.results, args.x, args.y, args.out))


if __name__ == "__main__":
    main()
