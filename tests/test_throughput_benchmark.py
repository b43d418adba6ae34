"""Smoke test of benchmarks/throughput.py with minimal settings (tiny networks, one step, CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("kd_throughput_benchmark", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


TINY = ["--teacher", "ResNet8", "--student", "ResNet8", "--threads", "1", "--rounds", "1"]


def test_step_mode_measures_every_configuration_and_writes_json(tmp_path: Path) -> None:
    bench = _benchmark()
    out = tmp_path / "step.json"
    configs = "plain,lightning,cached,torchdistill,student_only"
    report = bench.main(
        [*TINY, "--batch-sizes", "4", "--warmup", "1", "--steps", "1", "--configs", configs, "--out", str(out)]
    )
    assert json.loads(out.read_text())["mode"] == "step"
    measured = report["results"]["4"]
    expected = {"plain", "lightning", "cached", "student_only"}
    if "torchdistill" not in report["skipped"]:
        expected.add("torchdistill")
    assert set(measured) == expected
    assert all(entry["median"] > 0 for entry in measured.values())
    assert report["ratios"]["4"]["lightning/plain"] > 0 and "cached/lightning" in report["ratios"]["4"]


def test_epoch_mode_times_epochs_after_a_warm_up(tmp_path: Path) -> None:
    bench = _benchmark()
    out = tmp_path / "epoch.json"
    args = ["--mode", "epoch", "--images", "32", "--batch-sizes", "16", "--epochs", "1", "--workers", "0"]
    report = bench.main([*TINY, *args, "--configs", "plain,lightning,cached,torchdistill", "--out", str(out)])
    measured = report["results"]["16"]
    expected = {"plain", "lightning", "cached"} | (
        {"torchdistill"} if bench.torchdistill_available() is None else set()
    )
    assert set(measured) == expected, report["skipped"]
    assert all(len(entry["values"]) == 1 and entry["median"] > 0 for entry in measured.values())


def test_unknown_configuration_is_an_error() -> None:
    with pytest.raises(SystemExit):
        _benchmark().main(["--configs", "plain,nope"])
