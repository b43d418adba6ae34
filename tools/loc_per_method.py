"""Lines of code per method module, before/after a git revision: ``python tools/loc_per_method.py 382c00f``.

Counts logical source lines (no blank lines, comments or docstrings) of every ``methods/<name>.py`` that is a
method (not ``__init__``/the core/shared bases) in the given revision and in the working tree; prints a markdown
table and the medians.
"""

from __future__ import annotations

import ast
import io
import statistics
import subprocess
import sys
import tokenize
from pathlib import Path

METHODS = Path("src/kd_lightning/methods")
NOT_METHODS = {"__init__", "base", "core", "feature_base", "lm_base", "supervised"}


def code_lines(source: str) -> int:
    """Lines holding code: no blank lines, comments or docstrings."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            continue
        if tok.type == tokenize.ENDMARKER:
            continue
        lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def at_revision(rev: str) -> dict[str, int]:
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, f"{METHODS}/"], check=True, capture_output=True, text=True
    ).stdout.split()
    out = {}
    for name in names:
        stem = Path(name).stem
        if name.endswith(".py") and stem not in NOT_METHODS:
            text = subprocess.run(["git", "show", f"{rev}:{name}"], check=True, capture_output=True, text=True).stdout
            out[stem] = code_lines(text)
    return out


def working_tree() -> dict[str, int]:
    return {p.stem: code_lines(p.read_text()) for p in sorted(METHODS.glob("*.py")) if p.stem not in NOT_METHODS}


def main(rev: str) -> None:
    before, after = at_revision(rev), working_tree()
    print(f"| method module | code lines at {rev} | now | change |\n|---|---:|---:|---:|")
    for name in sorted(set(before) | set(after)):
        b, a = before.get(name), after.get(name)
        change = "" if b is None or a is None else f"{a - b:+d}"
        print(f"| `{name}.py` | {'–' if b is None else b} | {'–' if a is None else a} | {change} |")
    common = sorted(set(before) & set(after))
    print(
        f"\nmedian over the {len(common)} modules in both: {statistics.median(before[n] for n in common)} -> "
        f"{statistics.median(after[n] for n in common)} code lines"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "HEAD")
