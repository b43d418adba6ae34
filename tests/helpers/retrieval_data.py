"""Tiny retrieval data in the real on-disk formats (BEIR folders, MS MARCO triples) for the retrieval tests."""

from __future__ import annotations

import json
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ro", "si", "tu"]
TOPICS = ["river", "castle", "engine", "garden", "planet", "violin"]


def word(i: int) -> str:
    """A made-up word unique to document ``i`` (BM25 finds document ``i`` from it alone)."""
    return SYLLABLES[i % 8] + SYLLABLES[(i // 8) % 8] + SYLLABLES[(i // 64) % 8] + "x"


def write_beir(
    folder: Path,
    n_docs: int = 36,
    dev: range = range(24, 30),
    test: range = range(30, 36),
    extra_dev_lines: list[str] | None = None,
    unmatched_dev_query: bool = False,
) -> Path:
    """A BEIR folder: document ``i`` is titled ``doc i`` and holds ``word(i)`` and its topic's words; query ``i`` asks
    for ``word(i)`` and its topic (relevant: document ``i``, score 1). Queries ``< dev.start`` are ``train``. With
    ``unmatched_dev_query`` the dev split also has query ``qnone``, which shares no word with any document."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    with (folder / "corpus.jsonl").open("w") as f:
        for i in range(n_docs):
            topic = TOPICS[i % len(TOPICS)]
            text = f"{word(i)} is a {topic} thing; the {topic} of {word(i)} matters for every {topic} lover"
            f.write(json.dumps({"_id": f"d{i}", "title": f"doc {i}", "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as f:
        for i in range(n_docs):
            topic = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({"_id": f"q{i}", "text": f"where to find {word(i)} near the {topic}"}) + "\n")
        if unmatched_dev_query:
            f.write(json.dumps({"_id": "qnone", "text": "zzz yyy"}) + "\n")
    splits = {"train": range(0, dev.start), "dev": dev, "test": test}
    for split, ids in splits.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in ids]
        if split == "dev":
            if unmatched_dev_query:
                lines.append("qnone\td0\t1")
            lines += extra_dev_lines or []
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def write_text_triples(path: Path, n: int = 12) -> Path:
    """An MS MARCO text-triples TSV: query ``i`` (``where to find word(i)``), its passage, a passage of another."""
    rows = []
    for i in range(n):
        pos = f"{word(i)} lives by the {TOPICS[i % len(TOPICS)]}"
        neg_i = (i + 1) % n
        neg = f"{word(neg_i)} lives by the {TOPICS[neg_i % len(TOPICS)]}"
        rows.append(f"where to find {word(i)}\t{pos}\t{neg}")
    path.write_text("\n".join(rows) + "\n")
    return path
