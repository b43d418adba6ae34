"""``kd generations``: generation 0 on the ground truth, each next teacher the previous generation, auto α."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd_lightning.commands import main
from kd_lightning.commands.generations import format_table, parse_alpha
from kd_lightning.models.checkpoints import load_weights
from tests.helpers.cli import CONFIGS_DIR, TINY

CONFIG = str(CONFIGS_DIR / "digits_self_distill.yaml")
TINY_GENERATIONS = [*TINY, "--trainer.limit_val_batches=1.0", "--trainer.limit_test_batches=2"]


def test_two_generations_fixed_alpha(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(
        ["generations", "--config", CONFIG, "--generations", "2", "--alpha", "0.5", "--out", "gens", *TINY_GENERATIONS]
    )
    out = capsys.readouterr().out
    assert "| generation | alpha |" in out
    summary = json.loads((in_tmp / "gens" / "generations.json").read_text())
    gen0, gen1 = summary["generations"]
    assert (gen0["generation"], gen0["alpha"], gen0["teacher_ckpt"]) == (0, 1.0, None)
    assert (gen1["generation"], gen1["alpha"], gen1["alpha_from"]) == (1, 0.5, "fixed")
    assert gen1["teacher_ckpt"] == gen0["student_ckpt"]  # generation k learns from generation k-1
    for row in (gen0, gen1):
        assert 0.0 <= row["val_acc"] <= 1.0 and row["test_acc"] is not None and row["val_mse"] > 0
        assert Path(row["student_ckpt"]).is_file()
    # generation 0 ran no teacher: no teacher metrics were logged, and no teacher was trained or cached
    assert "kd: teacher_training.enabled is false" in out
    assert not (in_tmp / "runs" / "teachers").exists()
    # generation 1's teacher holds generation 0's selected weights
    from kd_lightning.models import SmallCNN

    teacher = load_weights(SmallCNN(in_channels=1, widths=[8, 16], num_classes=10), gen1["teacher_ckpt"])
    exported = torch.load(gen0["student_ckpt"], weights_only=True)["state_dict"]
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, exported[key]), key


def test_two_generations_auto_alpha(in_tmp: Path) -> None:
    rows = main_rows(["--generations", "2", "--alpha", "auto", "--out", "auto"])
    gen1 = rows[1]
    estimate = gen1["estimate"]
    assert gen1["alpha_from"] == "auto" and 0.0 <= gen1["alpha"] <= 1.0
    assert gen1["alpha"] == pytest.approx(min(max(estimate["alpha_unclipped"], 0.0), 1.0))
    assert estimate["probes"] == ["gen1_probe_alpha0", "gen0"]  # the alpha=1 probe is generation 0
    assert (in_tmp / "auto" / "gen1_probe_alpha0").is_dir()
    # the closed-form alpha cannot be worse on the held-out set than either probe
    assert estimate["predicted_val_mse"] <= min(estimate["probe_val_mse"].values()) + 1e-9


def main_rows(extra: list[str]) -> list[dict]:
    from kd_lightning.commands.generations import main as generations_main

    return generations_main(["--config", CONFIG, *extra, *TINY_GENERATIONS])


def test_arguments_checked(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_alpha("auto") == "auto" and parse_alpha("0.25") == 0.25
    for bad in (["--alpha", "1.5"], ["--alpha", "x"]):
        with pytest.raises(SystemExit):
            main(["generations", "--config", CONFIG, "--generations", "2", *bad])
    with pytest.raises(SystemExit):
        main(["generations", "--config", CONFIG, "--generations", "0", "--alpha", "0.5"])
    with pytest.raises(SystemExit):
        main(["generations", "--config", CONFIG, "--generations", "2", "--alpha", "0.5", "--model.init_args.alpha=0.1"])
    assert "set by kd generations" in capsys.readouterr().err


def test_format_table() -> None:
    row = {"generation": 0, "alpha": 1.0, "alpha_from": "ground truth only", "val_acc": 0.5, "val_mse": 0.1}
    assert "| 0 | 1.0000 | ground truth only | 50.00 | 0.10000 | n/a |" in format_table([{**row, "test_acc": None}])
