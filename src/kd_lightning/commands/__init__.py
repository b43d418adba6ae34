"""The ``kd`` and ``kd-fit`` entry points and the extra ``kd`` subcommands.

``kd {fit,validate,test,predict} --config ...`` is :class:`~kd_lightning.cli.KDCLI`; ``kd <command> ...`` runs one
of :data:`COMMANDS`. Every user error ends as one line, ``kd: error: <field>: <problem>. <fix>``, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import pickle
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError

from kd_lightning.cli import KDCLI, SUBCOMMANDS, USER_ERRORS, explain
from kd_lightning.errors import KDConfigError, one_line

__all__ = ["COMMANDS", "fit_main", "main"]

#: ``kd <name> ...`` runs ``module:main(argv)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "generations": ("kd_lightning.commands.generations", "Multi-generation self-distillation (Borup & Andersen)"),
    "radioml-synth": ("kd_lightning.commands.radioml_synth", "Write synthetic RadioML-like files (offline)"),
    "make-scenes": ("kd_lightning.commands.make_scenes", "Write digit scenes as COCO and Cityscapes sets (offline)"),
    "model-stats": ("kd_lightning.commands.model_stats", "Parameters and MACs of networks"),
    "lm-teacher-logits": ("kd_lightning.commands.lm_teacher_logits", "Store an LM teacher's top-k log-probabilities"),
    "bench": ("kd_lightning.commands.bench", "Grids of methods x seeds x data through kd fit: tables and plots"),
    "search-student": ("kd_lightning.commands.search_student", "DisWOT: training-free student architecture search"),
    "diagnose-opd": ("kd_lightning.commands.diagnose_opd", "On-policy-distillation gradient-alignment diagnostic"),
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


def argparse_problem(message: str, command: str) -> KDConfigError:
    """An argparse error message of ``kd <command>`` as ``<flag>: <problem>. see kd <command> --help``."""
    fix = f"see kd {command} --help"
    patterns = (
        (r"argument ([^\s:/]+)(?:/\S+)?: (.+)", None),
        (r"the following arguments are required: (.+)", "is required"),
        (r"unrecognized arguments: (\S+)", "is not an option of kd " + command),
        (r"(--?[\w-]+):? (.+)", None),
    )
    for pattern, problem in patterns:
        match = re.fullmatch(pattern, message.strip(), flags=re.DOTALL)
        if match:
            return KDConfigError(match.group(1), problem or match.group(2), fix)
    return KDConfigError(f"kd {command}", message, fix)


@contextlib.contextmanager
def one_line_argparse_errors(command: str) -> Iterator[None]:
    """Within the block, ``argparse`` parsers raise :class:`KDConfigError` instead of printing their usage and
    exiting (the extra commands parse with plain argparse; ``kd`` prints the error as one line)."""
    original = argparse.ArgumentParser.error

    def error(parser: argparse.ArgumentParser, message: str) -> None:
        raise argparse_problem(message, command)

    argparse.ArgumentParser.error = error  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config FILE`` exists and is valid YAML (jsonargparse's message names neither file nor line).

    Raises:
        KDConfigError: field ``config``, naming the file (and the line of a YAML error).
    """
    import yaml

    values = [b for a, b in itertools.pairwise(argv) if a == "--config"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for value in values:
        if "\n" in value or value.lstrip().startswith(("{", "[")):  # an inline config, not a file
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise KDConfigError(
                "config", f"no file at {path.resolve()}", "check the path (a relative one starts at the working folder)"
            )
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise KDConfigError(
                "config", f"{path} is not valid YAML ({problem}{at})", "fix the syntax (a bracket or quote left open?)"
            ) from None


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``kd``: ``kd {fit,validate,test,predict} --config ...``, plus :data:`COMMANDS`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        with one_line_argparse_errors(argv[0]):
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
    guarded(lambda: check_config_files(argv))
    # From the command line, LightningCLI reads sys.argv itself (given both, it warns about a possible mix-up).
    try:
        guarded(lambda: KDCLI(args=None if args is None else argv))
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Destroy the process group a DDP run left behind, so gloo/NCCL threads stop before the interpreter exits
    (left running, they can abort the exit with ``terminate called without an active exception``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fit_main() -> None:
    """Entry point of ``kd-fit``: ``kd fit`` unless another subcommand is given first."""
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        sys.argv.insert(1, "fit")
    main()
