"""The ``kd`` and ``kd-fit`` entry points and the extra ``kd`` subcommands.

``kd {fit,validate,test,predict} --config ...`` is :class:`~kd_lightning.cli.KDCLI`; ``kd <command> ...`` runs one
of :data:`COMMANDS`. Every user error ends as one line, ``kd: error: <field>: <problem>. <fix>``, exit status 2.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ArgumentError

from kd_lightning.cli import KDCLI, SUBCOMMANDS, USER_ERRORS, explain
from kd_lightning.errors import KDConfigError, one_line

__all__ = ["COMMANDS", "fit_main", "main"]

#: ``kd <name> ...`` runs ``module:main(argv)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "generations": ("kd_lightning.commands.generations", "Multi-generation self-distillation (Borup & Andersen)"),
    "radioml-synth": ("kd_lightning.commands.radioml_synth", "Write synthetic RadioML-like files (offline)"),
    "model-stats": ("kd_lightning.commands.model_stats", "Parameters and MACs of networks"),
    "lm-teacher-logits": ("kd_lightning.commands.lm_teacher_logits", "Store an LM teacher's top-k log-probabilities"),
}


def _fail(err: BaseException) -> None:
    print(f"kd: error: {one_line(str(err))}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def guarded(function: Callable[[], Any]) -> Any:
    """Run ``function``; user errors become one ``kd: error:`` line and exit status 2."""
    try:
        return function()
    except USER_ERRORS as err:
        _fail(err)
    except ArgumentError as err:
        _fail(explain(str(err)))
    except pickle.UnpicklingError as err:
        _fail(
            KDConfigError("checkpoint", one_line(str(err), 240), "pass --trust_checkpoint true only for your own files")
        )
    return None


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``kd``: ``kd {fit,validate,test,predict} --config ...``, plus :data:`COMMANDS`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        guarded(lambda: module.main(argv[1:]))
        return
    if argv and argv[0] in ("-h", "--help"):
        width = max(len(name) for name in COMMANDS)
        print("Extra commands:\n" + "\n".join(f"  kd {n:<{width}}  {d}" for n, (_, d) in COMMANDS.items()) + "\n")
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        choices = [*SUBCOMMANDS, *COMMANDS]
        import difflib

        close = difflib.get_close_matches(argv[0], choices, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        _fail(KDConfigError("command", f"unknown command {argv[0]!r}", f"{hint}commands: {', '.join(choices)}"))
    guarded(lambda: KDCLI(args=argv))


def fit_main() -> None:
    """Entry point of ``kd-fit``: ``kd fit`` unless another subcommand is given first."""
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        sys.argv.insert(1, "fit")
    main()
