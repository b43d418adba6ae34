"""A missing teacher inside a ``--trainer.strategy ddp`` run: trained once (rank 0, before the launch), reused by
every rank, and the two-process run ends cleanly (gloo on CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.teachers import CachedTeacher
from tests.helpers.cli import CONFIGS_DIR, TINY_DIGITS


@pytest.mark.ddp
def test_ddp_run_trains_the_missing_teacher_once(tmp_path: Path) -> None:
    cache = tmp_path / "teachers"
    args = [*TINY_DIGITS, "--test_after_fit=true"]  # the after-fit evaluation runs under DDP too
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "kd-fit"),
            "--config",
            str(CONFIGS_DIR / "quickstart.yaml"),
            *args,
            f"--teacher_training.cache_dir={cache}",
            "--trainer.accelerator=cpu",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
        ],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "terminate called" not in output and "Traceback" not in output
    assert "MEMBER: 2/2" in output  # two processes ran
    said = dict(re.findall(r"kd: \[rank (\d)\] (trained and cached|reused cached) teacher", output))
    assert said == {"0": "trained and cached", "1": "reused cached"}, output[-4000:]
    # One cache entry, trained once (one log version), intact; both ranks name the same file.
    paths = set(re.findall(r"kd: \[rank \d\] \w+(?: and)? \w+ teacher (\S+)", output))
    assert len(paths) == 1
    entry = CachedTeacher(Path(paths.pop()).parent)
    assert entry.folder.parent == cache and entry.problem() is None
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [entry.folder.name, entry.folder.name + ".logs"]
    assert [p.name for p in (cache / f"{entry.folder.name}.logs" / "logs").iterdir()] == ["version_0"]
    assert output.count("kd: fit finished") == 1
