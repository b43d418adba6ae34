"""Error types that name the offending field and the fix, and the one-line form the CLI prints.

Every configuration error reads ``<field>: <problem>. <fix>``; the command line prints it as one line,
``kd: error: <field>: <problem>. <fix>``. Plain-torch code (losses, models) names its own argument
(``temperature``); :class:`ConfigFieldPrefix`, the metaclass of the LightningModules and data modules,
adds the config path (``model.init_args.temperature``) when such an error leaves their constructor, so
the same message reads right inside and outside the CLI.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigFieldPrefix",
    "DataFileError",
    "DatasetChecksumError",
    "DatasetNotFoundError",
    "KDConfigError",
    "TeacherCheckpointError",
    "TrainingDivergedError",
    "UnsafeCheckpointError",
    "last_config_error",
    "one_line",
]

#: The most recent configuration error that left a constructor: jsonargparse folds such errors into long
#: ``Union``/subclass reports; the CLI prints this one instead.
_LAST_ERROR: contextvars.ContextVar[Exception | None] = contextvars.ContextVar("kd_last_config_error", default=None)

_BARE_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(: )| )")


def one_line(text: str, limit: int = 600) -> str:
    """``text`` on one line (whitespace runs collapsed), cut at ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class KDConfigError(ValueError):
    """A configuration value is wrong; the message names the field and how to fix it.

    ``KDConfigError("temperature", "must be > 0, got -1", "use a positive value")`` reads
    ``temperature: must be > 0, got -1. use a positive value``; a single argument is the whole message.

    Args:
        field: the config field (``"temperature"``, ``"model.init_args.student"``, ``"data.init_args.root"``).
        problem: what is wrong with it.
        fix: how to fix it (optional).
    """

    def __init__(self, field: str, problem: str | None = None, fix: str | None = None) -> None:
        if problem is None:  # one argument: the whole message
            self.field: str | None = None
            self.problem = field
            self.fix = None
        else:
            self.field, self.problem, self.fix = field, problem, fix
        super().__init__(self._render())

    def _render(self) -> str:
        problem = self.problem.rstrip()
        text = f"{self.field}: {problem}" if self.field else problem
        if self.fix:
            text = f"{text.rstrip('.')}. {self.fix}"
        return text

    def __str__(self) -> str:
        return self._render()

    def with_prefix(self, prefix: str) -> KDConfigError:
        """Put ``prefix`` (e.g. ``"model.init_args."``) in front of a bare field name; other fields stay."""
        if self.field is not None:
            if "." not in self.field and not self.field.startswith(prefix):
                self.field = prefix + self.field
        else:
            match = _BARE_FIELD.match(self.problem)
            if match and "." not in match.group(1) and not match.group(1)[0].isupper():
                rest = self.problem[match.end() :]
                self.field, self.problem = prefix + match.group(1), rest
        self.args = (self._render(),)
        return self

    def with_field(self, old: str, new: str) -> KDConfigError:
        """Rename the field ``old`` (or a field starting with ``old.``) to ``new``; other fields stay."""
        if self.field is not None and (self.field == old or self.field.startswith(old + ".")):
            self.field = new + self.field[len(old) :]
        elif self.field is None and self.problem.startswith(old):
            self.problem = new + self.problem[len(old) :]
        self.args = (self._render(),)
        return self


class DataFileError(KDConfigError):
    """A data file cannot be decoded or holds invalid values; the message names the file.

    Raised inside DataLoader workers too: PyTorch re-raises a worker's exception as ``type(err)(text)`` where
    ``text`` carries the worker's traceback; this class keeps only the original one-line message from it.
    """

    def __init__(self, field: str, problem: str | None = None, fix: str | None = None) -> None:
        if problem is None and "Original Traceback" in field:
            last = field.rstrip().splitlines()[-1]
            marker = f"{type(self).__name__}: "
            field = last.split(marker, 1)[1] if marker in last else last
        super().__init__(field, problem, fix)


class ConfigFieldPrefix(type):
    """Metaclass: a :class:`KDConfigError` leaving the constructor gets the class's ``config_prefix``.

    Used by :class:`~kd_lightning.methods.core.DistillationModule` (``model.init_args.``) and
    :class:`~kd_lightning.data.base.KDDataModule` (``data.init_args.``). The error is also remembered
    (:func:`last_config_error`) for the CLI, which otherwise sees it folded into jsonargparse's report.
    """

    config_prefix: str = ""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except KDConfigError as err:
            prefix = getattr(cls, "config_prefix", "")
            if prefix:
                err.with_prefix(prefix)
            _LAST_ERROR.set(err)
            raise
        except (TeacherCheckpointError, DatasetNotFoundError) as err:  # already name their field
            _LAST_ERROR.set(err)
            raise


def last_config_error(reset: bool = False) -> Exception | None:
    """The configuration error that last left a kd-lightning constructor (``reset``: forget it)."""
    err = _LAST_ERROR.get()
    if reset:
        _LAST_ERROR.set(None)
    return err


def remember_config_error(err: Exception) -> None:
    """Record ``err`` as the error the CLI should print (see :func:`last_config_error`)."""
    _LAST_ERROR.set(err)


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
        super().__init__(
            f"data.init_args.root: {name} not found under {Path(root).expanduser().resolve()}: expected {shown}. {fix}"
        )
        self.root = Path(root)
        self.expected = expected

    def __str__(self) -> str:
        return str(self.args[0])


class DatasetChecksumError(RuntimeError):
    """A dataset file exists but its md5 differs from the published one."""


class TeacherCheckpointError(FileNotFoundError):
    """The teacher checkpoint is missing, unreadable, or does not fit the teacher."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnsafeCheckpointError(TeacherCheckpointError):
    """A checkpoint holds Python objects that only full unpickling (which can run code) would restore."""


class TrainingDivergedError(RuntimeError):
    """The loss (or a teacher's training) became non-finite; the message names the step, term and batch."""
