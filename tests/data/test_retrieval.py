"""RetrievalDataModule: BEIR / MS MARCO readers on tiny files, the stdlib corpus, the tokenizer, batches, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bm25s")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from kd_lightning.data.retrieval import (
    RetrievalDataModule,
    build_stdlib_corpus,
    read_beir,
    read_text_triples,
    train_wordpiece_tokenizer,
)
from kd_lightning.errors import DatasetNotFoundError, KDConfigError
from tests.helpers.retrieval_data import word, write_beir, write_text_triples


def test_beir_reader_positions_titles_and_graded_qrels(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", n_docs=8, dev=range(4, 6), test=range(6, 8))
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq4\td4\t2\nq4\td5\t0\nq5\td5\t1\n")
    data = read_beir(folder)
    assert data.doc_ids[3] == "d3" and data.titles[3] == "doc 3" and word(3) in data.texts[3]
    assert data.document(3).startswith("doc 3. ")
    assert data.qrels["train"] == {i: {i: 1} for i in range(4)}
    assert data.qrels["dev"] == {4: {4: 2}, 5: {5: 1}}  # score 0 is not relevant; grades kept


def test_qrels_naming_an_unknown_document_is_a_one_line_error(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", n_docs=8, dev=range(4, 6), test=range(6, 8), extra_dev_lines=["q4\td99\t1"])
    module = RetrievalDataModule(source="beir", path=str(folder), root=str(tmp_path))
    with pytest.raises(KDConfigError) as err:
        module.setup("fit")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data.init_args.path: dev.tsv line 4 names corpus-id 'd99'")
    assert "unknown_ids=skip" in message
    skipping = RetrievalDataModule(source="beir", path=str(folder), root=str(tmp_path), unknown_ids="skip")
    skipping.setup("fit")
    assert len(skipping.val_set) == 2


def test_missing_beir_files_name_what_is_expected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"corpus\.jsonl, queries\.jsonl, qrels/train\.tsv"):
        RetrievalDataModule(source="beir", path=str(tmp_path / "empty")).setup("fit")
    with pytest.raises(KDConfigError, match=r"data.init_args.path"):
        RetrievalDataModule(source="beir")


def test_text_triples_reader_builds_corpus_qrels_and_negatives(tmp_path: Path) -> None:
    path = write_text_triples(tmp_path / "triples.tsv", n=12)
    data = read_text_triples(path, val_fraction=0.25, test_fraction=0.25)
    assert len(data.queries) == 12 and len(data.texts) == 12  # every passage is someone's positive
    all_qrels = {q: rel for split in data.qrels.values() for q, rel in split.items()}
    assert sorted(all_qrels) == list(range(12))
    for q, rel in all_qrels.items():
        (d,) = rel
        assert word(q) in data.texts[d] and data.queries[q].endswith(word(q))
        assert d not in data.negatives[q]
    module = RetrievalDataModule(
        source="triples", path=str(path), val_fraction=0.25, test_fraction=0.25, root=str(tmp_path)
    )
    module.setup("fit")
    assert module.negatives == "triples"
    assert len(module.train_set) + len(module.val_set) + len(module.test_set) == 12


def test_id_triples_give_the_hard_negatives_and_batches_are_grouped(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", n_docs=12, dev=range(8, 10), test=range(10, 12))
    triples = tmp_path / "triples.tsv"
    triples.write_text("".join(f"q{i}\td{i}\td{(i + 3) % 12}\n" for i in range(8)))
    module = RetrievalDataModule(
        source="beir", path=str(folder), triples=str(triples), batch_size=4, root=str(tmp_path)
    )
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["group_size"] == 2 and len(batch["documents"]) == 8 and batch["doc_index"].shape == (8,)
    for i, q in enumerate(batch["query_index"].tolist()):
        pos, neg = batch["doc_index"][2 * i].item(), batch["doc_index"][2 * i + 1].item()
        assert pos == q and neg == (q + 3) % 12  # query by query: positive, then its negative
        assert batch["documents"][2 * i] == module.data.document(pos)
        assert batch["query"][i] == module.data.queries[q]


def test_bm25_mined_negatives_are_ranked_and_never_relevant(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", n_docs=18, dev=range(12, 15), test=range(15, 18))
    module = RetrievalDataModule(source="beir", path=str(folder), negative_depth=3, root=str(tmp_path))
    module.setup("fit")
    negatives = module.train_set.negatives
    assert sorted(negatives) == list(range(12))
    for q, docs in negatives.items():
        assert q not in docs and 1 <= len(docs) <= 3
    eval_batch = next(iter(module.val_dataloader()))
    assert eval_batch["query_index"].tolist() == [12, 13, 14]
    assert [r.tolist() for r in eval_batch["relevant"]] == [[12], [13], [14]]


def test_stdlib_corpus_is_deterministic_and_records_python_and_hash(tmp_path: Path) -> None:
    metas = [build_stdlib_corpus(tmp_path / name, max_documents=60, max_files=25) for name in ("a", "b")]
    assert metas[0] == metas[1]
    meta = metas[0]
    assert meta["python"] == ".".join(map(str, sys.version_info[:3])) and meta["documents"] > 10
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/dev.tsv", "qrels/test.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    import hashlib

    assert meta["corpus_sha256"] == hashlib.sha256((tmp_path / "a" / "corpus.jsonl").read_bytes()).hexdigest()
    data = read_beir(tmp_path / "a")
    queries = [q.lower() for q in data.queries]
    assert len(set(queries)) == len(queries)  # ambiguous (repeated) queries were dropped
    pairs = [(q, d) for split in data.qrels.values() for q, rel in split.items() for d in rel]
    assert len(pairs) == len(data.queries)  # one relevant document per query
    first = json.loads((tmp_path / "a" / "corpus.jsonl").read_text().splitlines()[0])
    assert first["_id"] == first["title"] and "." in first["_id"]


def test_stdlib_module_caches_its_corpus_and_identity(tmp_path: Path) -> None:
    module = RetrievalDataModule(root=str(tmp_path), max_documents=80, max_files=40)
    identity = module.data_identity()
    folder = module.stdlib_folder()
    assert (folder / "meta.json").is_file()
    assert identity == {
        "python": json.loads((folder / "meta.json").read_text())["python"],
        "corpus_sha256": identity["corpus_sha256"],
    }
    module.setup("fit")
    assert len(module.train_set) > 0 and len(module.val_set) > 0


def test_wordpiece_tokenizer_is_deterministic_and_cached(tmp_path: Path) -> None:
    texts = [f"the {word(i)} and the river of {word(i + 1)}" for i in range(30)]
    a, b = train_wordpiece_tokenizer(texts, 200), train_wordpiece_tokenizer(texts, 200)
    assert a.get_vocab() == b.get_vocab()
    assert a.pad_token_id == 0 and a.cls_token == "[CLS]"
    ids = a("the river")["input_ids"]
    assert ids[0] == a.cls_token_id and ids[-1] == a.sep_token_id
    folder = write_beir(tmp_path / "beir", n_docs=12, dev=range(8, 10), test=range(10, 12))
    module = RetrievalDataModule(source="beir", path=str(folder), root=str(tmp_path / "root"), tokenizer_vocab_size=300)
    tokenizer = module.tokenizer
    assert module.tokenizer_path.parent == tmp_path / "root" / "retrieval_tokenizers"
    assert (module.tokenizer_path / "tokenizer.json").is_file()
    again = RetrievalDataModule(source="beir", path=str(folder), root=str(tmp_path / "root"), tokenizer_vocab_size=300)
    assert again.tokenizer.get_vocab() == tokenizer.get_vocab() and again.tokenizer_path == module.tokenizer_path


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"data.init_args.num_negatives"):
        RetrievalDataModule(num_negatives=-1)
    with pytest.raises(KDConfigError, match=r"data.init_args.negatives"):
        RetrievalDataModule(negatives="triples")
    with pytest.raises(KDConfigError, match=r"data.init_args.triples"):
        RetrievalDataModule(triples="x.tsv")


def test_random_negatives_fill_the_group(tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", n_docs=12, dev=range(8, 10), test=range(10, 12))
    module = RetrievalDataModule(
        source="beir", path=str(folder), negatives="random", num_negatives=3, batch_size=8, root=str(tmp_path)
    )
    module.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(module.train_dataloader()))
    groups = batch["doc_index"].reshape(-1, 4)
    assert torch.equal(groups[:, 0], batch["query_index"])
    assert all(q not in g[1:].tolist() for q, g in zip(batch["query_index"].tolist(), groups, strict=True))
