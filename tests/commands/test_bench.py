"""``kd bench``: a tiny grid through the real CLI (CSV rows, table, paired statistics, resume, plot)."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest
import yaml
from scipy import stats

from kd_lightning.commands import COMMANDS, bench
from kd_lightning.errors import KDConfigError
from tests.helpers.cli import CONFIGS_DIR, SHARED_TEACHERS

TINY_BENCH = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_model_summary=false",
    "--teacher_training.max_epochs=1",
    f"--teacher_training.cache_dir={SHARED_TEACHERS}",
]


def _grid(tmp_path: Path, **extra) -> Path:
    spec = {
        "name": "tiny",
        "out": str(tmp_path / "out"),
        "seeds": [0, 1],
        "baseline": "student",
        "args": TINY_BENCH,
        "runs": {
            "student": str(CONFIGS_DIR / "digits_student.yaml"),
            "kd": {"config": str(CONFIGS_DIR / "digits_kd.yaml"), "label": "T 4"},
        },
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_registered() -> None:
    assert COMMANDS["bench"][0] == "kd_lightning.commands.bench"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("bench")
    grid = _grid(tmp_path)
    bench.main([str(grid)])
    return tmp_path


def test_csv_rows(tiny_run: Path) -> None:
    rows = _rows(tiny_run / "out" / "results.csv")
    assert [(r["run"], r["seed"]) for r in rows] == [("student", "0"), ("student", "1"), ("kd", "0"), ("kd", "1")]
    for row in rows:
        assert row["setting"] == "default" and row["data"] == "default"
        assert 0.0 <= float(row["test/acc"]) <= 1.0 and float(row["fit_seconds"]) > 0
        assert row["epochs"] == "1" and Path(row["best_checkpoint"]).is_file()
        assert "torch" in row["machine"]
    kd_rows = [r for r in rows if r["run"] == "kd"]
    assert all(r["method"] == "VanillaKD" and r["test/teacher_acc"] and r["test/agreement"] for r in kd_rows)
    assert all(r["test/agreement"] == "" for r in rows if r["run"] == "student")
    # each run logs in its own folder
    assert (tiny_run / "out" / "runs" / "default" / "default" / "kd" / "seed1").is_dir()


def test_table_and_paired_stats(tiny_run: Path) -> None:
    rows = _rows(tiny_run / "out" / "results.csv")
    text = (tiny_run / "out" / "table.md").read_text()
    student = [float(r["test/acc"]) for r in rows if r["run"] == "student"]
    kd = [float(r["test/acc"]) for r in rows if r["run"] == "kd"]
    mean = 100 * statistics.fmean(kd)
    assert f"{mean:.2f} ± {100 * statistics.stdev(kd):.2f}" in text
    diffs = [a - b for a, b in zip(kd, student, strict=True)]
    assert f"{100 * statistics.fmean(diffs):+.2f}" in text
    paired = bench.paired_stats(kd, student)
    if statistics.stdev(diffs) > 0:
        assert paired["p"] == pytest.approx(stats.ttest_rel(kd, student).pvalue)
    assert "(baseline)" in text and "VanillaKD (T 4)" in text and "Machine:" in text and "torch" in text
    assert "| student |" in text and "| kd |" in text
    png = tiny_run / "out" / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_done_rows(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = tiny_run / "grid.yaml"
    csv_path = tiny_run / "out" / "results.csv"
    calls: list[tuple] = []

    def fake_run(grid_, run, setting, data, seed, args):
        calls.append((run, seed))
        return {"run": run, "setting": setting, "data": data, "seed": seed, "test/acc": 0.5, "fit_seconds": 1.0}

    monkeypatch.setattr(bench, "run_cell", fake_run)
    bench.main([str(grid), "--no-plot"])
    assert calls == []  # everything is there
    rows = _rows(csv_path)
    kept = [r for r in rows if not (r["run"] == "kd" and r["seed"] == "1")]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    bench.main([str(grid), "--no-plot"])
    assert calls == [("kd", 1)]
    assert len(_rows(csv_path)) == 4


def test_dry_run_prints_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = _grid(tmp_path, settings={"short": ["--trainer.max_epochs=1"], "long": ["--trainer.max_epochs=2"]})
    bench.main([str(grid), "--dry-run"])
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("kd fit ")]
    assert len(commands) == 2 * 2 * 2
    assert "--seed_everything=1" in commands[1] and "--trainer.max_epochs=2" in commands[-1]
    assert not (tmp_path / "out" / "results.csv").exists()


def test_paired_stats_by_hand() -> None:
    # differences 0.05, 0, 0.05: mean 1/30, std 0.05/sqrt(3), t = 2 with 2 degrees of freedom;
    # for 2 degrees of freedom the two-sided p-value is 1 - t / sqrt(2 + t^2).
    result = bench.paired_stats([0.90, 0.80, 0.85], [0.85, 0.80, 0.80])
    assert result["mean"] == pytest.approx(1 / 30)
    assert result["std"] == pytest.approx(0.05 / math.sqrt(3))
    assert result["t"] == pytest.approx(2.0)
    assert result["p"] == pytest.approx(1 - 2 / math.sqrt(6))
    assert bench.paired_stats([0.9], [0.8])["p"] is None
    assert bench.paired_stats([0.9, 0.8], [0.9, 0.8])["p"] == 1.0  # identical: no difference
    assert bench.paired_stats([0.9, 0.8], [0.8, 0.7])["p"] == 0.0  # the same nonzero difference every seed


def test_kendall_tau_by_hand() -> None:
    assert bench.kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert bench.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert bench.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    expected = stats.kendalltau([1, 2, 3], [0.5, 0.7, 0.6]).statistic
    assert bench.kendall_tau([1.0, 2.0, 3.0], [0.5, 0.7, 0.6]) == pytest.approx(expected)


def test_table_ranking_check_and_noise_column(tmp_path: Path) -> None:
    grid = bench.load_grid(
        _grid(tmp_path, settings={"b": [], "b2": []}, ranking_check=["b", "b2"]),
    )
    rows = []
    values = {  # run -> setting -> per-seed accuracies
        "student": {"b": [0.80, 0.82], "b2": [0.81, 0.83]},
        "kd": {"b": [0.90, 0.93], "b2": [0.78, 0.82]},
    }
    for run, by_setting in values.items():
        for setting, accs in by_setting.items():
            for seed, acc in enumerate(accs):
                rows.append({"run": run, "setting": setting, "data": "default", "seed": seed, "test/acc": acc,
                             "fit_seconds": 1.0, "config": "c.yaml", "method": "M"})  # fmt: skip
    text = bench.render_table(grid, rows, machine="test machine")
    assert "Kendall τ-b between the rankings of the 2 runs" in text and "**-1.000**" in text
    assert "- `b`: kd > student" in text and "- `b2`: student > kd" in text
    # kd under b: differences 0.10 and 0.11 -> t = 21 with 1 degree of freedom, p = 2 * sf(21) ≈ 0.030: better
    assert "+10.50 ± 0.71" in text and "| better |" in text
    # kd under b2: differences -0.03 and -0.01: t = -2 with 1 degree of freedom, p = 0.295: within noise
    assert "-2.00 ± 1.41 | 0.295 | within noise |" in text
    assert "## Overview: every setting" in text


def test_ranking_check_compares_the_seeds_run_under_both_settings(tmp_path: Path) -> None:
    grid = bench.load_grid(_grid(tmp_path, settings={"b": [], "b2": []}, ranking_check=["b", "b2"]))
    values = {  # b2 has seed 0 only: under b, seed 1 alone would reverse the order
        "student": {"b": [0.80, 0.99], "b2": [0.81]},
        "kd": {"b": [0.90, 0.70], "b2": [0.91]},
    }
    rows = [
        {"run": run, "setting": setting, "data": "default", "seed": seed, "test/acc": acc, "fit_seconds": 1.0}
        for run, by_setting in values.items()
        for setting, accs in by_setting.items()
        for seed, acc in enumerate(accs)
    ]
    text = bench.render_table(grid, rows, machine="test machine")
    assert "(seeds 0): **1.000**" in text and "- `b`: kd > student" in text
    single = bench.load_grid(_grid(tmp_path, settings={"b": [], "b2": []}, ranking_check=["b", "b2"]))
    one_run = [r for r in rows if r["run"] == "kd"]
    assert "Ranking check" not in bench.render_table(single, one_run, machine="m")  # nothing to rank


def test_grid_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"runs": {"a": str(CONFIGS_DIR / "digits_student.yaml")}, "baseline": "b"}))
    with pytest.raises(KDConfigError, match=r"grid\.baseline"):
        bench.load_grid(path)
    path.write_text(yaml.safe_dump({"runs": {"a": "nowhere.yaml"}}))
    with pytest.raises(KDConfigError, match=r"grid\.runs\.a\.config"):
        bench.load_grid(path)
    path.write_text(yaml.safe_dump({"runs": {"a": str(CONFIGS_DIR / "digits_student.yaml")}, "seedz": [1]}))
    with pytest.raises(KDConfigError, match=r"grid\.seedz"):
        bench.load_grid(path)


SHIPPED_GRIDS = sorted((Path(__file__).parents[2] / "benchmarks" / "grids").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_GRIDS, ids=lambda p: p.name)
def test_shipped_grids_load_and_name_existing_configs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = path.parents[2]
    monkeypatch.chdir(repo)  # grids' relative paths start at the repository root, where kd bench runs
    grid = bench.load_grid(path)
    assert grid.runs and grid.seeds and grid.metric
    for spec in grid.runs.values():
        assert Path(spec.config).is_file(), spec.config
    if grid.ranking_check is not None:
        assert set(grid.ranking_check) <= set(grid.settings)
