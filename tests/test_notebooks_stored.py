"""The notebooks are stored executed (a reader sees tables and plots without running them), with clean outputs.

nbmake runs them in the suite (``pytest notebooks``); this checks what is stored: every code cell ran, in
order, without errors; nothing on stderr and no warning; no path of the machine that ran them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:tmp|work|root|home|Users|var/folders)/")


def _outputs(path: Path) -> list[tuple[int, dict]]:
    cells = json.loads(path.read_text())["cells"]
    return [(i, out) for i, cell in enumerate(cells) if cell["cell_type"] == "code" for out in cell.get("outputs", [])]


def _text(output: dict) -> str:
    if output["output_type"] == "stream":
        return "".join(output["text"])
    data = output.get("data", {})
    return "".join(data.get("text/plain", "")) + "".join(output.get("traceback", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_with_outputs_in_order(path: Path) -> None:
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in cells]
    assert all(isinstance(n, int) for n in counts), f"{path.name}: not executed (execution counts {counts})"
    assert counts == sorted(counts), f"{path.name}: cells executed out of order {counts}"
    kinds = {out["output_type"] for _, out in _outputs(path)}
    assert "error" not in kinds
    assert any("image/png" in out.get("data", {}) for _, out in _outputs(path)), f"{path.name}: no stored plot"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_clean(path: Path) -> None:
    for index, output in _outputs(path):
        text = _text(output)
        assert output.get("name") != "stderr", f"{path.name}, cell {index}: stderr output {text[:200]!r}"
        assert "Warning" not in text and "warn(" not in text, f"{path.name}, cell {index}: {text[:200]!r}"
        assert not MACHINE_PATH.search(text), f"{path.name}, cell {index}: machine path in {text[:200]!r}"
