"""Test-session settings: offline, headless, no stray command-line arguments reaching LightningCLI."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI(args=...) warns when sys.argv also holds arguments (pytest's own)."""
    monkeypatch.setattr(sys, "argv", ["kd"])


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Undo environment changes of a test: Lightning's ddp_spawn leaves MASTER_PORT set in this process, and the
    next two-process test would then reuse that port (still in TIME_WAIT) instead of a free one."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _hub_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nothing may be fetched into the user's hub cache during tests."""
    import torch

    torch.hub.set_dir(str(tmp_path_factory.getbasetemp() / "hub"))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from an empty folder: configs write runs/ relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
