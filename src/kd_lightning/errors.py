"""Error types that name the offending field and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class KDConfigError(ValueError):
    """A configuration value is wrong; the message names the field and how to fix it."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where the data module was told to look.

    Args:
        name: dataset name, e.g. ``"CIFAR-100"``.
        root: the folder that was searched.
        expected: the files or folders that should be there (relative to ``root``).
        fix: what to do, e.g. ``"pass --data.init_args.download true"``.
    """

    def __init__(self, name: str, root: str | Path, expected: Iterable[str], fix: str) -> None:
        expected = list(expected)
        shown = ", ".join(expected[:8]) + (" ..." if len(expected) > 8 else "")
        super().__init__(f"{name} not found under {Path(root).expanduser().resolve()}: expected {shown}. {fix}")
        self.root = Path(root)
        self.expected = expected


class DatasetChecksumError(RuntimeError):
    """A dataset file exists but its md5 differs from the published one."""


class TeacherCheckpointError(FileNotFoundError):
    """The teacher checkpoint is missing or does not fit the teacher."""
