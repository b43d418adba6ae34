"""The package's imports flow one way, and nothing imports in a cycle (function-level imports included).

Layers, bottom to top (a module may import its own package and any lower layer, nothing else):

    errors < utils, optim < models, losses, metrics < data < methods < teachers < callbacks < cli < commands

``models``, ``losses`` and ``metrics`` are one layer but independent (none imports another).
"""

from __future__ import annotations

import ast
from pathlib import Path

import kd_lightning

PACKAGE = Path(kd_lightning.__file__).parent
RANKS = {
    "errors": 0,
    "utils": 1,
    "optim": 1,
    "models": 2,
    "losses": 2,
    "metrics": 2,
    "data": 3,
    "methods": 4,
    "teachers": 5,
    "callbacks": 6,
    "cli": 7,
    "commands": 8,
    "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, name: str) -> set[str]:
    """kd_lightning modules imported anywhere in ``path`` (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kd_lightning"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("kd_lightning"):
                found.add(target)
                known = modules()
                found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known)
    return found


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imported(path, name) if m in known and m != name} for name, path in known.items()}


def test_every_subpackage_has_a_layer() -> None:
    top = {layer(name) for name in modules()} - {None}
    assert top <= set(RANKS), f"give these a layer in RANKS: {sorted(top - set(RANKS))}"


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Edges from a module to a module of the same or a higher layer in another package."""
    found = []
    for name, targets in edges.items():
        source = layer(name)
        for target in targets:
            destination = layer(target)
            if source is None or destination is None or destination == source:
                continue
            if RANKS[destination] >= RANKS[source]:
                found.append(f"{name} -> {target}")
    return sorted(found)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets (one per back edge)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_imports_point_down_only() -> None:
    upward = upward_imports(graph())
    assert not upward, "imports that do not point to a lower layer:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    edges = {
        "kd_lightning.losses.logit": {"kd_lightning.methods.core"},  # upward
        "kd_lightning.methods.core": {"kd_lightning.losses.logit"},  # downward, closes a cycle
        "kd_lightning.models.small": {"kd_lightning.losses.logit"},  # same layer, other package
        "kd_lightning.data.base": {"kd_lightning.errors"},  # fine
    }
    assert upward_imports(edges) == [
        "kd_lightning.losses.logit -> kd_lightning.methods.core",
        "kd_lightning.models.small -> kd_lightning.losses.logit",
    ]
    assert find_cycles(edges) == [
        ["kd_lightning.losses.logit", "kd_lightning.methods.core", "kd_lightning.losses.logit"]
    ]


def test_function_level_imports_count(tmp_path: Path) -> None:
    module = PACKAGE / "losses" / "logit.py"
    assert "kd_lightning.losses.divergences" in imported(module, "kd_lightning.losses.logit")
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from kd_lightning.cli import run\n    return run\n")
    assert "kd_lightning.cli" in imported(source, "kd_lightning.losses.x")
