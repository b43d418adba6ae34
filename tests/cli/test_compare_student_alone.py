"""``kd fit --compare_student_alone true``: the student's network trained alone, side by side, cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_lightning.models import SmallCNN
from tests.helpers.cli import QUICKSTART_ARGS, fit

ALONE = [*QUICKSTART_ARGS, "--compare_student_alone=true", "--trainer.max_epochs=2", "--trainer.limit_val_batches=3"]


def test_student_alone_side_by_side_then_cached(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = fit(ALONE)
    out = capsys.readouterr().out
    results = cli.results
    for key in ("alone/val/acc", "alone/test/acc", "val/acc"):
        assert 0.0 <= results[key] <= 1.0, key
    # With test_after_fit false the distilled side is the last epoch's validation accuracy.
    line = next(ln for ln in out.splitlines() if "student alone SmallCNN" in ln)
    alone, distilled = 100 * results["alone/val/acc"], 100 * results["val/acc"]
    assert line.strip() == (
        f"student alone SmallCNN: val acc {alone:.2f}%   distilled ({type(cli.model).__name__}): {distilled:.2f}% "
        f"({distilled - alone:+.2f})"
    )
    entries = list(Path("runs/teachers").glob("SmallCNN-alone-*/student.safetensors"))
    assert len(entries) == 1 and f"kd: trained and cached student alone {entries[0]}" in out
    meta = json.loads(entries[0].with_name("student.json").read_text())
    assert meta["task"] == "Supervised" and meta["recipe"]["trainer"]["max_epochs"] == 2
    assert meta["recipe"]["seed"] == 0 and meta["recipe"]["monitor"] == "val/acc"

    # The reported accuracy is that of the cached weights (the best-validation checkpoint) on the 3 val batches.
    network = SmallCNN(in_channels=1, widths=[8, 16], num_classes=10)
    network.load_state_dict(load_file(str(entries[0])))
    network.eval()
    correct = total = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(cli.datamodule.val_dataloader()):
            if i == 3:
                break
            correct += int((network(x).argmax(-1) == y).sum())
            total += len(y)
    assert results["alone/val/acc"] == pytest.approx(correct / total, abs=1e-6)

    # Same recipe: read back from the cache, same numbers, nothing trained.
    again = fit(ALONE)
    assert f"kd: reused cached student alone {entries[0]}" in capsys.readouterr().out
    assert again.results["alone/val/acc"] == results["alone/val/acc"]
    assert again.results["alone/test/acc"] == results["alone/test/acc"]

    # Another seed is another baseline.
    fit([*ALONE, "--seed_everything=1"])
    assert "kd: trained and cached student alone" in capsys.readouterr().out
    assert len(list(Path("runs/teachers").glob("SmallCNN-alone-*/student.safetensors"))) == 2
