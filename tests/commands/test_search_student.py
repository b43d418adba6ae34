"""``kd search-student`` end to end on digits (tiny population): ranking, winner configs that ``kd fit`` trains,
the grid-scoring mode, bad inputs as one line, and the correlation script of the validation."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from kd_lightning.commands import COMMANDS, search_student
from kd_lightning.commands import main as kd_main
from kd_lightning.errors import KDConfigError
from kd_lightning.models import SmallCNN
from kd_lightning.models.search import count_cost
from tests.helpers.cli import CONFIGS_DIR, REPO, SHARED_TEACHERS, TINY_DIGITS, fit

SEARCH = str(CONFIGS_DIR / "search" / "digits_diswot.yaml")
TINY_SEARCH = [
    "--evolution.population=4",
    "--evolution.sample_size=2",
    "--evolution.cycles=3",
    "--score.baselines=false",
]


def test_search_writes_a_ranking_and_a_winner_that_kd_fit_trains(in_tmp: Path) -> None:
    assert "search-student" in COMMANDS
    out = in_tmp / "search"
    report = search_student.main(["--config", SEARCH, "--out", str(out), "--budget.max_params=3000", *TINY_SEARCH])
    with (out / "ranking.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["evaluated"] >= 1 and report["evaluations"] == 4 + 3 - report["skipped_children"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for row in rows:  # within the budget, and the reported cost is the real one
        widths = json.loads(row["arch"])
        assert int(row["params"]) == count_cost(SmallCNN(widths=widths), (1, 8, 8))["params"] <= 3000
        assert row["semantic_mode"] == "class_gram"  # widths 4..64 differ from the teacher's 128
    winner = yaml.safe_load((out / "winner_student.yaml").read_text())
    assert winner["init_args"]["widths"] == json.loads(rows[0]["arch"])
    # the full fit config: the base recipe with the student replaced
    fit_config = yaml.safe_load((out / "winner_fit.yaml").read_text())
    assert fit_config["model"]["init_args"]["student"] == winner
    assert fit_config["model"]["init_args"]["teacher"]["init_args"]["widths"] == [32, 64, 128]
    cli = fit(
        ["--config", str(out / "winner_fit.yaml"), *TINY_DIGITS, f"--teacher_training.cache_dir={SHARED_TEACHERS}"]
    )
    assert tuple(cli.model.student.blocks[i][0].out_channels for i in range(len(cli.model.student.blocks))) == tuple(
        winner["init_args"]["widths"]
    )
    assert 0.0 <= cli.results["val/acc"] <= 1.0


def test_search_is_reproducible(tmp_path: Path) -> None:
    args = ["--config", SEARCH, "--budget.max_params=3000", *TINY_SEARCH]
    first = search_student.main([*args, "--out", str(tmp_path / "a")])
    second = search_student.main([*args, "--out", str(tmp_path / "b")])
    assert first["history"] == second["history"] and first["ranking"] == second["ranking"]


def test_empty_budget_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        kd_main(["search-student", "--config", SEARCH, "--out", str(tmp_path), "--budget.max_params=50"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd: error:")]
    assert len(lines) == 1
    assert lines[0].startswith("kd: error: budget.max_params: no candidate of the smallcnn search space fits 50")
    assert "raise budget.max_params to at least 94" in lines[0]
    assert not (tmp_path / "ranking.csv").exists()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("--budget.max_param=5", "budget.max_param"),
        ("--space.widthz=[4]", "space.widthz"),
        ("--spaces.kind=x", "--spaces.kind"),
        ("--evolution.parent_selection=worst", "evolution.parent_selection"),
        ("--score.semantic_mode=channel", "score.semantic_mode"),
    ],
)
def test_bad_settings_name_the_field(override: str, field: str, tmp_path: Path) -> None:
    with pytest.raises(KDConfigError) as info:
        search_student.main(["--config", SEARCH, "--out", str(tmp_path), override, *TINY_SEARCH])
    assert str(info.value).startswith(f"{field}:")


def test_score_grid_scores_every_run_as_kd_fit_builds_it(tmp_path: Path) -> None:
    nb201 = {
        "class_path": "kd_lightning.models.search.NB201Network",
        "init_args": {
            "arch": "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|none~2|",
            "channels": 4,
            "cells_per_stage": 1,
            "in_channels": 1,
            "num_classes": 10,
        },
    }
    grid = {
        "name": "tiny",
        "runs": {
            "narrow": {
                "config": str(CONFIGS_DIR / "digits_kd.yaml"),
                "args": ["--model.init_args.student.init_args.widths=[4]"],
            },
            "cell": {
                "config": str(CONFIGS_DIR / "digits_kd.yaml"),
                "args": ["--model.init_args.student=" + json.dumps(nb201)],
            },
        },
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    rows = search_student.main(["--config", SEARCH, "--out", str(tmp_path / "scores"), "--score-grid", str(path)])
    assert [r["run"] for r in rows] == ["narrow", "cell"]
    assert rows[0]["params"] == 94 and rows[0]["student"]["init_args"]["widths"] == [4]
    assert rows[1]["student"]["class_path"].endswith("NB201Network")
    with (tmp_path / "scores" / "scores.csv").open() as f:
        written = list(csv.DictReader(f))
    assert {"score", "semantic", "relation", "params", "flops", "naswot", "zen"} <= set(written[0])
    assert all(float(r["score"]) < 0 for r in written)


def _correlation_script():
    spec = importlib.util.spec_from_file_location(
        "kd_diswot_correlation", REPO / "benchmarks" / "diswot_correlation.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_correlation_script_by_hand(tmp_path: Path) -> None:
    scores = tmp_path / "scores.csv"
    scores.write_text(
        "run,score,semantic,relation,params,flops,naswot,zen\n"
        "a,-0.3,-0.3,-0.01,100,10,5,1\n"
        "b,-0.2,-0.2,-0.02,300,20,4,2\n"
        "c,-0.1,-0.1,-0.03,200,30,3,\n"
        "d,-0.05,-0.04,-0.04,400,40,2,4\n"
    )
    results = tmp_path / "results.csv"
    lines = ["run,setting,data,seed,test/acc"]
    for run, accs in {"a": (0.5, 0.7), "b": (0.7, 0.7), "c": (0.8, 0.8), "d": (0.9, 0.95)}.items():
        lines += [f"{run},default,default,{seed},{acc}" for seed, acc in enumerate(accs)]
    results.write_text("\n".join(lines) + "\n")
    result = _correlation_script().main(["--scores", str(scores), "--results", str(results), "--out", str(tmp_path)])
    c = result["correlations"]
    # mean accuracies 0.6 < 0.7 < 0.8 < 0.925: the DisWOT score and FLOPs order them exactly, NASWOT inversely
    assert c["score"]["kendall_tau"] == pytest.approx(1.0) and c["flops"]["spearman_rho"] == pytest.approx(1.0)
    assert c["naswot"]["kendall_tau"] == pytest.approx(-1.0)
    # params order a < c < b < d: one discordant pair of six, tau = (5 - 1) / 6
    assert c["params"]["kendall_tau"] == pytest.approx(4 / 6)
    assert c["zen"]["n"] == 3  # the empty cell is left out
    assert (tmp_path / "scatter.png").stat().st_size > 0 and "Kendall" in (tmp_path / "correlations.md").read_text()


def test_search_costs_are_those_of_kd_model_stats() -> None:
    from kd_lightning.commands.model_stats import model_stats
    from kd_lightning.models.search import NB201Network

    for network in (SmallCNN(widths=(8, 16)), NB201Network(channels=4, cells_per_stage=1, in_channels=1)):
        stats = model_stats(network, (1, 8, 8))
        assert count_cost(network, (1, 8, 8)) == {"params": stats["params"], "flops": stats["flops"]}
