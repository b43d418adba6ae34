"""Retrieval data: BEIR folders, MS MARCO triples and an offline corpus built from the Python standard library.

:class:`RetrievalDataModule` serves what a bi-encoder / sparse retriever trains and is evaluated on: a corpus, queries
with relevance judgements (qrels) per split, and training examples ``(query, positive, hard negatives)``.

**Sources** (``source``):

- ``"beir"``: a BEIR folder ``path`` with ``corpus.jsonl`` (``{"_id", "title", "text"}`` per line),
  ``queries.jsonl`` (``{"_id", "text"}``) and ``qrels/<split>.tsv`` (header ``query-id corpus-id score``; splits
  ``train``, ``dev``, ``test``; ``score > 0`` is relevant, larger is more relevant for nDCG). Optional ``triples``:
  a TSV of ``query-id pos-id neg-id`` (MS MARCO ``qidpidtriples`` layout) whose negatives are the hard negatives.
- ``"triples"``: an MS MARCO text-triples TSV ``path`` (``query<TAB>positive passage<TAB>negative passage`` per line,
  ``triples.train.small.tsv``): the corpus is the distinct passages, the queries the distinct queries, each query's
  positives its qrels; ``val_fraction`` / ``test_fraction`` of the queries (by a hash of their text) are held out
  for evaluation.
- ``"stdlib"`` (default, offline, deterministic): the Python standard library's public functions, classes and
  methods that have a docstring (``ast`` parse of the sorted ``.py`` files, nothing imported). A **query** is the
  first sentence of a docstring; its one relevant **document** is titled ``module.qualname`` and holds the rest of
  the docstring followed by the source of the definition without its docstring (whitespace collapsed, cut at
  ``max_document_chars``). Queries that occur twice (``"Return self==value."``) and queries of fewer than
  ``min_query_words`` words are dropped; ``max_documents`` definitions are kept in the order of a hash of their
  names; a hash of the name puts each query in ``train`` / ``dev`` / ``test`` (``val_fraction``,
  ``test_fraction``). BM25 does not solve it (MRR@10 about 0.37 on the 3.11 corpus of 3000 documents). The result is
  written as a BEIR folder ``<root>/stdlib_retrieval/py<X.Y.Z>-<settings hash>/`` with ``meta.json`` (Python version,
  files read, counts, the SHA-256 of ``corpus.jsonl``): the corpus depends on the Python version (its standard
  library), not on anything else; the version and hash enter the teacher-cache key (:meth:`data_identity`).

**Hard negatives** (``negatives``): ``"bm25"`` mines the ``negative_depth`` best BM25 documents (bm25s) of each
training query that are not relevant to it; ``"triples"`` uses the triples file's negatives; ``"random"`` draws
non-relevant documents. Each training example draws ``num_negatives`` of its query's negatives (the global torch
RNG: seeded runs repeat).

**Tokenizer**: ``tokenizer=None`` trains a WordPiece tokenizer (``tokenizers``; lower-cased BERT normalisation and
pre-tokenisation, special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]``, ``tokenizer_vocab_size`` ids) on the corpus and
the training queries — deterministic — and saves it (``tokenizer.json``) under
``<root>/retrieval_tokenizers/wordpiece-<size>-<hash>/``; a local tokenizer folder can be given instead. The
retrieval task hands it to every network built without its own tokenizer: **each network tokenises the raw texts
itself**, so student and teachers may use different tokenizers (batches carry texts and corpus positions, never
token ids).

**Batches** (dicts; lists of strings are not moved to the device):

- training: ``query`` [B] texts, ``query_index`` LongTensor [B], ``documents`` [B·G] texts ordered query by query
  (``[q0 positive, q0 negative 1, …, q1 positive, …]``, ``G = 1 + num_negatives``), ``doc_index`` LongTensor [B·G]
  (corpus positions), ``group_size`` G;
- validation/test: ``query`` [B], ``query_index`` [B], ``relevant`` (a LongTensor of corpus positions per query) and
  ``relevance`` (their graded scores), queries with at least one relevant document only.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import itertools
import json
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.text import STDLIB_EXCLUDE, stdlib_files
from kd_lightning.errors import DatasetNotFoundError, KDConfigError

__all__ = [
    "RetrievalData",
    "RetrievalDataModule",
    "build_stdlib_corpus",
    "collate_eval",
    "collate_train",
    "learn_wordpiece_vocab",
    "read_beir",
    "read_id_triples",
    "read_text_triples",
    "train_wordpiece_tokenizer",
]

SPLITS = ("train", "dev", "test")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Version of the stdlib corpus layout (part of its folder's hash).
STDLIB_BUILDER_VERSION = 1
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ---------------------------------------------------------------------------------------------- in memory
@dataclass
class RetrievalData:
    """A corpus, queries and qrels, by position.

    Attributes:
        doc_ids, titles, texts: the corpus (position = document index).
        query_ids, queries: the queries (position = query index).
        qrels: ``{split: {query index: {doc index: relevance}}}``.
        negatives: ``{query index: [doc index, ...]}`` hard negatives from a triples file (may be empty).
    """

    doc_ids: list[str]
    titles: list[str]
    texts: list[str]
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[int, dict[int, int]]]
    negatives: dict[int, list[int]] = field(default_factory=dict)

    def document(self, i: int) -> str:
        """The text a network reads: ``title. text`` (the text alone without a title)."""
        title, text = self.titles[i], self.texts[i]
        return f"{title}. {text}" if title else text


def _read_jsonl(path: Path, keys: Sequence[str]) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise KDConfigError(
                    "data.init_args.path", f"{path}:{line_no} is not valid JSON ({err.msg})", "fix the file"
                ) from None
            missing = [k for k in keys if k not in record]
            if missing:
                raise KDConfigError(
                    "data.init_args.path",
                    f"{path}:{line_no} has no field {missing[0]!r} (fields: {sorted(record)})",
                    "BEIR records need _id and text (corpus: title optional)",
                )
            records.append(record)
    return records


def read_beir(
    folder: str | Path, splits: Sequence[str] = SPLITS, unknown_ids: Literal["error", "skip"] = "error"
) -> RetrievalData:
    """Read a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv`` for the splits present).

    Raises:
        DatasetNotFoundError: without ``corpus.jsonl``, ``queries.jsonl`` or any ``qrels/<split>.tsv``.
        KDConfigError: a malformed line, duplicate ids, or qrels naming ids absent from the corpus/queries (with
            ``unknown_ids="error"``; ``"skip"`` drops those lines).
    """
    folder = Path(folder).expanduser()
    expected = ["corpus.jsonl", "queries.jsonl", *(f"qrels/{s}.tsv" for s in splits)]
    qrel_files = {s: folder / "qrels" / f"{s}.tsv" for s in splits if (folder / "qrels" / f"{s}.tsv").is_file()}
    if not (folder / "corpus.jsonl").is_file() or not (folder / "queries.jsonl").is_file() or not qrel_files:
        raise DatasetNotFoundError(
            "a BEIR retrieval folder",
            folder,
            expected,
            "Give data.init_args.path a BEIR folder (e.g. an unzipped BEIR dataset), or source: stdlib for the "
            "offline corpus.",
        )
    corpus = _read_jsonl(folder / "corpus.jsonl", ("_id", "text"))
    queries = _read_jsonl(folder / "queries.jsonl", ("_id", "text"))
    doc_ids = [str(r["_id"]) for r in corpus]
    query_ids = [str(r["_id"]) for r in queries]
    doc_pos = _positions(doc_ids, folder / "corpus.jsonl")
    query_pos = _positions(query_ids, folder / "queries.jsonl")
    qrels: dict[str, dict[int, dict[int, int]]] = {}
    for split, path in qrel_files.items():
        qrels[split] = _read_qrels(path, doc_pos, query_pos, unknown_ids)
    return RetrievalData(
        doc_ids=doc_ids,
        titles=[str(r.get("title") or "") for r in corpus],
        texts=[str(r["text"]) for r in corpus],
        query_ids=query_ids,
        queries=[str(r["text"]) for r in queries],
        qrels=qrels,
    )


def _positions(ids: list[str], path: Path) -> dict[str, int]:
    positions: dict[str, int] = {}
    for i, key in enumerate(ids):
        if key in positions:
            raise KDConfigError(
                "data.init_args.path", f"{path} holds the _id {key!r} twice", "every _id must be unique"
            )
        positions[key] = i
    return positions


def _read_qrels(
    path: Path, doc_pos: dict[str, int], query_pos: dict[str, int], unknown_ids: str
) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for line_no, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or (line_no == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid")):
                continue
            if len(row) < 3:
                raise KDConfigError(
                    "data.init_args.path",
                    f"{path}:{line_no} has {len(row)} columns",
                    "qrels lines are query-id<TAB>corpus-id<TAB>score",
                )
            qid, did = row[0].strip(), row[1].strip()
            try:
                score = int(float(row[2]))
            except ValueError:
                raise KDConfigError(
                    "data.init_args.path", f"{path}:{line_no} has the score {row[2]!r}", "scores are integers"
                ) from None
            unknown = (
                ("corpus-id", did, "corpus.jsonl", len(doc_pos))
                if did not in doc_pos
                else ("query-id", qid, "queries.jsonl", len(query_pos))
                if qid not in query_pos
                else None
            )
            if unknown is not None:
                if unknown_ids == "skip":
                    continue
                kind, key, where, count = unknown
                raise KDConfigError(
                    "data.init_args.path",
                    f"{path.name} line {line_no} names {kind} {key!r}, which is not in {where} ({count} ids)",
                    "fix the qrels or the corpus, or set data.init_args.unknown_ids=skip to drop such lines",
                )
            if score > 0:
                out.setdefault(query_pos[qid], {})[doc_pos[did]] = score
    return out


def read_id_triples(
    path: str | Path, doc_ids: list[str], query_ids: list[str], unknown_ids: str = "error"
) -> dict[int, list[int]]:
    """``{query index: [negative doc index, ...]}`` from a ``query-id<TAB>pos-id<TAB>neg-id`` TSV."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KDConfigError("data.init_args.triples", f"no file at {path.resolve()}", "give the triples TSV or null")
    doc_pos = {k: i for i, k in enumerate(doc_ids)}
    query_pos = {k: i for i, k in enumerate(query_ids)}
    negatives: dict[int, list[int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for line_no, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row:
                continue
            if len(row) < 3:
                raise KDConfigError(
                    "data.init_args.triples", f"{path}:{line_no} has {len(row)} columns", "query-id, pos-id, neg-id"
                )
            qid, neg = row[0].strip(), row[2].strip()
            if qid not in query_pos or neg not in doc_pos:
                if unknown_ids == "skip":
                    continue
                kind, key = ("query-id", qid) if qid not in query_pos else ("corpus-id", neg)
                raise KDConfigError(
                    "data.init_args.triples",
                    f"{path.name} line {line_no} names {kind} {key!r}, which is not in the corpus/queries",
                    "fix the triples, or set data.init_args.unknown_ids=skip to drop such lines",
                )
            bucket = negatives.setdefault(query_pos[qid], [])
            if doc_pos[neg] not in bucket:
                bucket.append(doc_pos[neg])
    return negatives


def _hash_fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 16**8


def _split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    h = _hash_fraction("split:" + key)
    return "test" if h < test_fraction else "dev" if h < test_fraction + val_fraction else "train"


def read_text_triples(path: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.1) -> RetrievalData:
    """An MS MARCO text-triples TSV as :class:`RetrievalData`: distinct passages → corpus, distinct queries →
    queries, positives → qrels, negatives → hard negatives; queries split by a hash of their text."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            "MS MARCO triples", path.parent, [path.name], "Give data.init_args.path a query/pos/neg TSV."
        )
    doc_pos: dict[str, int] = {}
    query_pos: dict[str, int] = {}
    positives: dict[int, set[int]] = {}
    negatives: dict[int, list[int]] = {}

    def doc(text: str) -> int:
        return doc_pos.setdefault(text, len(doc_pos))

    with path.open(encoding="utf-8", newline="") as handle:
        for line_no, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row:
                continue
            if len(row) < 3:
                raise KDConfigError(
                    "data.init_args.path",
                    f"{path}:{line_no} has {len(row)} columns",
                    "text triples are query<TAB>positive passage<TAB>negative passage",
                )
            q = query_pos.setdefault(row[0].strip(), len(query_pos))
            pos, neg = doc(row[1].strip()), doc(row[2].strip())
            positives.setdefault(q, set()).add(pos)
            bucket = negatives.setdefault(q, [])
            if neg not in bucket:
                bucket.append(neg)
    queries = list(query_pos)
    qrels: dict[str, dict[int, dict[int, int]]] = {s: {} for s in SPLITS}
    for q, docs in positives.items():
        qrels[_split_of(queries[q], val_fraction, test_fraction)][q] = {d: 1 for d in sorted(docs)}
    return RetrievalData(
        doc_ids=[f"p{i}" for i in range(len(doc_pos))],
        titles=[""] * len(doc_pos),
        texts=list(doc_pos),
        query_ids=[f"q{i}" for i in range(len(queries))],
        queries=queries,
        qrels=qrels,
        negatives={q: [d for d in n if d not in positives.get(q, ())] for q, n in negatives.items()},
    )


# ---------------------------------------------------------------------------------------------- stdlib corpus
def _definitions(path: Path, module: str) -> list[tuple[str, str, str]]:
    """``(qualified name, docstring, source without the docstring)`` of the public top-level functions and classes
    of one file and of the public methods of its top-level classes."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    found: list[tuple[str, str, str]] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc and node.end_lineno is not None:
                first = node.body[0]
                head = lines[node.lineno - 1 : first.lineno - 1]
                rest = lines[(first.end_lineno or first.lineno) : node.end_lineno]
                found.append((f"{module}.{prefix}{node.name}", doc, "\n".join(head + rest)))
            if isinstance(node, ast.ClassDef) and not prefix:
                visit(node.body, node.name + ".")

    visit(tree.body, "")
    return found


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def build_stdlib_corpus(
    out: str | Path,
    max_documents: int | None = 3000,
    max_files: int | None = None,
    exclude: Sequence[str] = STDLIB_EXCLUDE,
    min_query_words: int = 4,
    max_query_words: int = 40,
    max_document_chars: int = 1500,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, Any]:
    """Write the standard-library retrieval corpus as a BEIR folder ``out`` (see the module docstring) and return
    its ``meta.json``. Deterministic for one Python version: the same files give the same bytes."""
    root, files = stdlib_files(exclude)
    if max_files is not None:
        files = files[:max_files]
    candidates: dict[str, tuple[str, str]] = {}  # name -> (query, document text)
    query_count: dict[str, int] = {}
    for path in files:
        module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        for name, doc, code in _definitions(path, module):
            if name in candidates:
                continue
            paragraph = doc.strip().split("\n\n")[0]
            parts = _SENTENCE_END.split(_collapse(paragraph), maxsplit=1)
            query = parts[0]
            rest = _collapse(doc.strip()[len(paragraph) :])
            rest = _collapse((parts[1] if len(parts) > 1 else "") + " " + rest)
            words = len(query.split())
            text = _cut(_collapse(rest + " " + code), max_document_chars)
            if not (min_query_words <= words <= max_query_words) or len(text.split()) < 3:
                continue
            candidates[name] = (query, text)
            key = query.lower()
            query_count[key] = query_count.get(key, 0) + 1
    names = [n for n, (q, _) in candidates.items() if query_count[q.lower()] == 1]
    names.sort(key=lambda n: hashlib.sha1(n.encode("utf-8")).hexdigest())
    if max_documents is not None:
        names = names[:max_documents]
    names.sort()
    if not names:
        raise KDConfigError(
            "data.init_args.max_files", "the standard library gave no document", "read more files (max_files: null)"
        )
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    (tmp / "qrels").mkdir(parents=True, exist_ok=True)
    with (tmp / "corpus.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
        for name in names:
            handle.write(json.dumps({"_id": name, "title": name, "text": candidates[name][1]}) + "\n")
    with (tmp / "queries.jsonl").open("w", encoding="utf-8", newline="\n") as handle:
        for name in names:
            handle.write(json.dumps({"_id": "q:" + name, "text": candidates[name][0]}) + "\n")
    counts = {}
    for split in SPLITS:
        chosen = [n for n in names if _split_of(n, val_fraction, test_fraction) == split]
        counts[split] = len(chosen)
        with (tmp / "qrels" / f"{split}.tsv").open("w", encoding="utf-8", newline="\n") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for name in chosen:
                handle.write(f"q:{name}\t{name}\t1\n")
    digest = hashlib.sha256((tmp / "corpus.jsonl").read_bytes()).hexdigest()
    meta = {
        "builder_version": STDLIB_BUILDER_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "stdlib": str(root),
        "files": len(files),
        "documents": len(names),
        "queries": counts,
        "corpus_sha256": digest,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():  # a concurrent builder finished first: keep its identical folder
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return json.loads((out / "meta.json").read_text())
    tmp.replace(out)
    return meta


# ---------------------------------------------------------------------------------------------- tokenizer
def learn_wordpiece_vocab(
    word_counts: dict[str, int], vocab_size: int, min_frequency: int = 2, prefix: str = "##"
) -> list[str]:
    """A WordPiece vocabulary by BPE merges (what ``tokenizers``' ``WordPieceTrainer`` does), deterministic: the
    most frequent pair of adjacent symbols is merged first, ties broken by the pair's text (the Rust trainer breaks
    ties in hash-map order, which changes between runs). Returns the special tokens, the alphabet (first characters
    and ``##``-continuations, sorted), then the merged pieces in merge order, ``vocab_size`` entries at most."""
    import heapq
    from collections import defaultdict

    words = sorted(word_counts)
    freq = [word_counts[w] for w in words]
    symbols = [[w[0]] + [prefix + c for c in w[1:]] for w in words]
    vocab = list(SPECIAL_TOKENS) + sorted({s for syms in symbols for s in syms} - set(SPECIAL_TOKENS))
    known = set(vocab)
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(symbols):
        for pair in itertools.pairwise(syms):
            pair_count[pair] += freq[i]
            where[pair].add(i)
    heap = [(-count, a, b) for (a, b), count in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, a, b = heapq.heappop(heap)
        count = pair_count.get((a, b), 0)
        if count != -negative:  # stale entry: the pair's current count has its own entry
            continue
        if count < min_frequency:
            break
        merged_symbol = a + (b[len(prefix) :] if b.startswith(prefix) else b)
        if merged_symbol not in known:
            vocab.append(merged_symbol)
            known.add(merged_symbol)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop((a, b), ())):
            syms, f = symbols[i], freq[i]
            for pair in itertools.pairwise(syms):
                pair_count[pair] -= f
                touched.add(pair)
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(merged_symbol)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            for pair in itertools.pairwise(syms):
                where[pair].discard(i)
            for pair in itertools.pairwise(out):
                pair_count[pair] += f
                where[pair].add(i)
                touched.add(pair)
            symbols[i] = out
        pair_count.pop((a, b), None)
        touched.discard((a, b))
        for pair in sorted(touched):
            if pair_count.get(pair, 0) > 0:
                heapq.heappush(heap, (-pair_count[pair], *pair))
    return vocab


def train_wordpiece_tokenizer(
    texts: Sequence[str], vocab_size: int = 4096, lowercase: bool = True, min_frequency: int = 2
) -> Any:
    """A WordPiece tokenizer for ``texts`` (BERT normalisation and pre-tokenisation from ``tokenizers``, the
    vocabulary from :func:`learn_wordpiece_vocab`), wrapped as a transformers ``PreTrainedTokenizerFast`` with BERT's
    special tokens and ``[CLS] … [SEP]`` templates. Deterministic: the same texts give the same ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for text in texts:
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[piece] = counts.get(piece, 0) + 1
    vocab = learn_wordpiece_vocab(counts, vocab_size, min_frequency)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=1_000_000_000,
    )


# ---------------------------------------------------------------------------------------------- datasets
class TrainExamples(Dataset):
    """``(query, positive)`` pairs; each item draws ``num_negatives`` of the query's negatives."""

    def __init__(
        self,
        data: RetrievalData,
        pairs: list[tuple[int, int]],
        negatives: dict[int, list[int]],
        relevant: dict[int, set[int]],
        num_negatives: int,
    ) -> None:
        self.data, self.pairs, self.negatives = data, pairs, negatives
        self.relevant, self.num_negatives = relevant, num_negatives

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        q, pos = self.pairs[i]
        pool = self.negatives.get(q) or []
        picked: list[int] = []
        if self.num_negatives:
            if len(pool) >= self.num_negatives:
                order = torch.randperm(len(pool))[: self.num_negatives].tolist()
                picked = [pool[j] for j in order]
            else:  # too few mined negatives: fill with random non-relevant documents
                picked = list(pool)
                n_docs = len(self.data.texts)
                while len(picked) < self.num_negatives:
                    d = int(torch.randint(n_docs, ()).item())
                    if d not in self.relevant.get(q, ()) or n_docs <= len(self.relevant.get(q, ())):
                        picked.append(d)
        docs = [pos, *picked]
        return {
            "query": self.data.queries[q],
            "query_index": q,
            "documents": [self.data.document(d) for d in docs],
            "doc_index": docs,
        }


class EvalQueries(Dataset):
    """The queries of one split with their relevant documents."""

    def __init__(self, data: RetrievalData, qrels: dict[int, dict[int, int]]) -> None:
        self.data = data
        self.items = sorted((q, rel) for q, rel in qrels.items() if rel)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        q, rel = self.items[i]
        docs = sorted(rel)
        return {
            "query": self.data.queries[q],
            "query_index": q,
            "relevant": torch.tensor(docs, dtype=torch.long),
            "relevance": torch.tensor([rel[d] for d in docs], dtype=torch.long),
        }


def collate_train(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Training batch (see the module docstring)."""
    return {
        "query": [it["query"] for it in items],
        "query_index": torch.tensor([it["query_index"] for it in items], dtype=torch.long),
        "documents": [d for it in items for d in it["documents"]],
        "doc_index": torch.tensor([d for it in items for d in it["doc_index"]], dtype=torch.long),
        "group_size": len(items[0]["doc_index"]) if items else 1,
    }


def collate_eval(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluation batch (see the module docstring)."""
    return {
        "query": [it["query"] for it in items],
        "query_index": torch.tensor([it["query_index"] for it in items], dtype=torch.long),
        "relevant": [it["relevant"] for it in items],
        "relevance": [it["relevance"] for it in items],
    }


# ---------------------------------------------------------------------------------------------- data module
class RetrievalDataModule(KDDataModule):
    """Corpus, queries, qrels and training triples for retrieval distillation (see the module docstring).

    Args:
        source: ``"stdlib"``, ``"beir"`` or ``"triples"``.
        path: the BEIR folder (``beir``) or the text-triples TSV (``triples``), relative to ``root`` unless
            absolute; unused for ``stdlib``.
        triples: ``beir`` only: a ``query-id<TAB>pos-id<TAB>neg-id`` TSV of hard negatives.
        train_split: qrels split the training examples come from.
        val_split: qrels split of validation (``dev``).
        test_split: qrels split of testing; ``None`` or a missing file: the validation split.
        unknown_ids: qrels/triples lines naming ids absent from the corpus/queries: ``"error"`` or ``"skip"``.
        negatives: ``"bm25"`` (mined), ``"triples"`` (the triples' negatives) or ``"random"``; ``None``:
            ``"triples"`` when there are triples, else ``"bm25"``.
        num_negatives: hard negatives per training query (``G = 1 + num_negatives`` documents per query).
        negative_depth: BM25 mining keeps the best ``negative_depth`` non-relevant documents of each query.
        max_documents: ``stdlib``: documents kept.
        max_files: ``stdlib``: read only the first ``max_files`` standard-library files (sorted; tests).
        min_query_words: ``stdlib``: shortest query kept.
        max_document_chars: ``stdlib``: documents are cut at this many characters.
        val_fraction: ``stdlib``/``triples``: share of queries for ``dev``.
        test_fraction: ``stdlib``/``triples``: share of queries for ``test``.
        tokenizer: a local tokenizer folder; ``None`` trains a WordPiece tokenizer on the corpus (cached).
        tokenizer_vocab_size: size of the trained WordPiece vocabulary.
        **kwargs: :class:`~kd_lightning.data.base.KDDataModule`'s ``root``, ``batch_size`` (queries per training
            batch), ``eval_batch_size``, ``num_workers``, ``split_seed``...
    """

    task = "retrieval"

    def __init__(
        self,
        source: Literal["stdlib", "beir", "triples"] = "stdlib",
        path: str | None = None,
        triples: str | None = None,
        train_split: str = "train",
        val_split: str = "dev",
        test_split: str | None = "test",
        unknown_ids: Literal["error", "skip"] = "error",
        negatives: Literal["bm25", "triples", "random"] | None = None,
        num_negatives: int = 1,
        negative_depth: int = 30,
        max_documents: int | None = 3000,
        max_files: int | None = None,
        min_query_words: int = 4,
        max_document_chars: int = 1500,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 4096,
        batch_size: int = 16,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        if source not in ("stdlib", "beir", "triples"):
            raise KDConfigError("source", f"must be 'stdlib', 'beir' or 'triples', got {source!r}")
        if source != "stdlib" and not path:
            raise KDConfigError(
                "path", f"source {source} reads files and path is empty", "give the BEIR folder or triples TSV"
            )
        if triples is not None and source != "beir":
            raise KDConfigError("triples", "is for source: beir", "source: triples reads its path as text triples")
        if unknown_ids not in ("error", "skip"):
            raise KDConfigError("unknown_ids", f"must be 'error' or 'skip', got {unknown_ids!r}")
        if negatives not in (None, "bm25", "triples", "random"):
            raise KDConfigError("negatives", f"must be 'bm25', 'triples', 'random' or null, got {negatives!r}")
        if negatives == "triples" and source == "stdlib":
            raise KDConfigError("negatives", "the stdlib corpus has no triples", "use bm25 or random")
        if negatives == "triples" and source == "beir" and triples is None:
            raise KDConfigError("negatives", "is 'triples' but no triples file is given", "set data.init_args.triples")
        if num_negatives < 0:
            raise KDConfigError("num_negatives", f"must be >= 0, got {num_negatives}")
        if negative_depth < 1:
            raise KDConfigError("negative_depth", f"must be >= 1, got {negative_depth}")
        for name, value in (("max_documents", max_documents), ("max_files", max_files)):
            if value is not None and value < 1:
                raise KDConfigError(name, f"must be >= 1 or null, got {value}")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise KDConfigError(
                "val_fraction", f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave training"
            )
        if tokenizer_vocab_size < len(SPECIAL_TOKENS) + 1:
            raise KDConfigError("tokenizer_vocab_size", f"must be > {len(SPECIAL_TOKENS)}, got {tokenizer_vocab_size}")
        self.source = source
        self.path = path
        self.triples = triples
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.unknown_ids = unknown_ids
        self.negatives = negatives or ("triples" if (triples is not None or source == "triples") else "bm25")
        self.num_negatives = num_negatives
        self.negative_depth = negative_depth
        self.max_documents = max_documents
        self.max_files = max_files
        self.min_query_words = min_query_words
        self.max_document_chars = max_document_chars
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.tokenizer_name = tokenizer
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.input_shape = ()
        self.data: RetrievalData | None = None
        self._tokenizer: Any = None
        self.tokenizer_path: Path | None = None
        self.train_set: TrainExamples | None = None  # type: ignore[assignment]
        self.val_set: EvalQueries | None = None  # type: ignore[assignment]
        self.test_set: EvalQueries | None = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ locations
    def _root(self) -> Path:
        return Path(self.root).expanduser()

    def _resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self._root() / p

    def stdlib_settings(self) -> dict[str, Any]:
        return {
            "builder_version": STDLIB_BUILDER_VERSION,
            "max_documents": self.max_documents,
            "max_files": self.max_files,
            "min_query_words": self.min_query_words,
            "max_document_chars": self.max_document_chars,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
        }

    def stdlib_folder(self) -> Path:
        """Where the stdlib corpus of these settings and this Python lives (built on first use)."""
        version = ".".join(map(str, sys.version_info[:3]))
        key = hashlib.sha256(json.dumps(self.stdlib_settings(), sort_keys=True).encode()).hexdigest()[:12]
        return self._root() / "stdlib_retrieval" / f"py{version}-{key}"

    def ensure_stdlib(self) -> Path:
        """Build the stdlib corpus unless it exists (once across processes: a file lock)."""
        folder = self.stdlib_folder()
        if (folder / "meta.json").is_file():
            return folder
        from filelock import FileLock

        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not (folder / "meta.json").is_file():
                build_stdlib_corpus(
                    folder,
                    max_documents=self.max_documents,
                    max_files=self.max_files,
                    min_query_words=self.min_query_words,
                    max_document_chars=self.max_document_chars,
                    val_fraction=self.val_fraction,
                    test_fraction=self.test_fraction,
                )
        return folder

    def data_identity(self) -> dict[str, Any]:
        """The Python version and corpus hash (stdlib), or the data files' names and sizes."""
        if self.source == "stdlib":
            meta = json.loads((self.ensure_stdlib() / "meta.json").read_text())
            return {"python": meta["python"], "corpus_sha256": meta["corpus_sha256"]}
        files = [self._resolve(self.path)] if self.path else []  # type: ignore[arg-type]
        if self.triples:
            files.append(self._resolve(self.triples))
        found = []
        for f in files:
            for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
                if p.is_file():
                    found.append((p.name, p.stat().st_size))
        return {"files": found}

    # ------------------------------------------------------------------ loading
    def load(self) -> RetrievalData:
        """Read the source (building the stdlib corpus first when needed)."""
        if self.source == "triples":
            return read_text_triples(self._resolve(self.path), self.val_fraction, self.test_fraction)  # type: ignore[arg-type]
        folder = self.ensure_stdlib() if self.source == "stdlib" else self._resolve(self.path)  # type: ignore[arg-type]
        splits = [s for s in (self.train_split, self.val_split, self.test_split) if s]
        data = read_beir(folder, splits, self.unknown_ids)
        if self.triples is not None:
            data.negatives = read_id_triples(
                self._resolve(self.triples), data.doc_ids, data.query_ids, self.unknown_ids
            )
        return data

    @property
    def corpus_texts(self) -> list[str]:
        """Every corpus document as the networks read it (``title. text``), by corpus position."""
        data = self._loaded()
        return [data.document(i) for i in range(len(data.texts))]

    def _loaded(self) -> RetrievalData:
        if self.data is None:
            self.setup("fit")
        assert self.data is not None
        return self.data

    @property
    def tokenizer(self) -> Any:
        """The tokenizer handed to networks without their own (trained and cached, or loaded)."""
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _load_tokenizer(self) -> Any:
        from kd_lightning.models.sparse_retrieval import load_local_tokenizer

        if self.tokenizer_name is not None:
            self.tokenizer_path = self._resolve(self.tokenizer_name)
            return load_local_tokenizer(self.tokenizer_path, "data.init_args.tokenizer")
        data = self._loaded()
        texts = self.corpus_texts + [data.queries[q] for q in sorted(data.qrels.get(self.train_split, {}))]
        digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:16]
        folder = self._root() / "retrieval_tokenizers" / f"wordpiece-{self.tokenizer_vocab_size}-{digest}"
        self.tokenizer_path = folder
        if not (folder / "tokenizer.json").is_file():
            from filelock import FileLock

            folder.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder) + ".lock"):
                if not (folder / "tokenizer.json").is_file():
                    tokenizer = train_wordpiece_tokenizer(texts, self.tokenizer_vocab_size)
                    tmp = folder.with_name(folder.name + ".tmp")
                    tokenizer.save_pretrained(str(tmp))
                    tmp.replace(folder)
        return load_local_tokenizer(folder, "data.init_args.tokenizer")

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """The tokenizer's size (known before any teacher trains: ``kd fit`` then checks tokenizers, vocabularies
        and the IDF table first, instead of after a missing teacher's training)."""
        return len(self.tokenizer)

    def check_before_teacher(self) -> None:
        """Read (or build) the data before a missing teacher trains."""
        self.setup("fit")

    def setup(self, stage: str | None = None) -> None:
        """Read the data, mine the hard negatives and build the splits (once)."""
        if self.data is not None:
            return
        data = self.load()
        train_qrels = data.qrels.get(self.train_split) or {}
        val_qrels = data.qrels.get(self.val_split) or {}
        if not train_qrels or not val_qrels:
            missing = self.train_split if not train_qrels else self.val_split
            raise KDConfigError(
                "data.init_args.train_split" if not train_qrels else "data.init_args.val_split",
                f"the qrels split {missing!r} holds no relevant (score > 0) pair",
                "name a split that exists (qrels/<split>.tsv) and has relevant pairs",
            )
        test_qrels = (data.qrels.get(self.test_split) if self.test_split else None) or val_qrels
        relevant = {q: set(docs) for q, docs in train_qrels.items()}
        pairs = sorted((q, d) for q, docs in train_qrels.items() for d in docs)
        negatives = self._negatives(data, relevant)
        self.data = data
        self.train_set = TrainExamples(data, pairs, negatives, relevant, self.num_negatives)
        self.val_set = EvalQueries(data, val_qrels)
        self.test_set = EvalQueries(data, test_qrels)

    def _negatives(self, data: RetrievalData, relevant: dict[int, set[int]]) -> dict[int, list[int]]:
        if self.num_negatives == 0 or self.negatives == "random":
            return {}
        if self.negatives == "triples":
            return {q: [d for d in docs if d not in relevant.get(q, ())] for q, docs in data.negatives.items()}
        import bm25s
        import numpy as np

        texts = [data.document(i) for i in range(len(data.texts))]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, show_progress=False), show_progress=False)
        queries = sorted(relevant)
        depth = min(len(texts), self.negative_depth + max((len(r) for r in relevant.values()), default=0))
        tokens = bm25s.tokenize([data.queries[q] for q in queries], return_ids=False, show_progress=False)
        out: dict[int, list[int]] = {}
        for q, toks in zip(queries, tokens, strict=True):
            ids = retriever.get_tokens_ids(toks)
            if not ids:
                continue
            scores = retriever.get_scores_from_ids(ids)
            order = np.argsort(-scores, kind="stable")[:depth]
            out[q] = [int(d) for d in order if int(d) not in relevant[q] and scores[d] > 0][: self.negative_depth]
        return out

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("RetrievalDataModule.setup() did not run.")
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            collate_fn=collate_train,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, dataset: EvalQueries | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("RetrievalDataModule.setup() did not run.")
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_eval,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def hold_out(self, fraction: float, seed: int | None = None) -> Dataset:
        raise NotImplementedError("RetrievalDataModule has no hold_out(): the qrels splits are the held-out data.")
