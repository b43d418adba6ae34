"""SparseEnsembleKD and the retrieval task: frozen teachers, evaluation, the CLI on tiny data, DDP, bad input."""

from __future__ import annotations

import functools
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("bm25s")
pytest.importorskip("transformers")

import lightning as L
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_lightning.data.retrieval import RetrievalDataModule, collate_train, train_wordpiece_tokenizer
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import SparseEnsembleKD
from kd_lightning.models.sparse_retrieval import (
    BM25Scorer,
    DenseBiEncoder,
    SpladeDocumentEncoder,
)
from tests.helpers.cli import CONFIGS_DIR, TINY, fit
from tests.helpers.retrieval_data import write_beir

TINY_NET = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "max_positions": 64}


def _student(**kwargs: Any) -> SpladeDocumentEncoder:
    return SpladeDocumentEncoder(**{"vocab_size": 512, "dropout": 0.0, **TINY_NET, **kwargs})


def _dense(**kwargs: Any) -> DenseBiEncoder:
    return DenseBiEncoder(**{"vocab_size": 512, "dropout": 0.0, **TINY_NET, **kwargs})


def _data(tmp_path: Path, **kwargs: Any) -> RetrievalDataModule:
    folder = write_beir(tmp_path / "beir", unmatched_dev_query=True)
    return RetrievalDataModule(
        source="beir",
        path=str(folder),
        root=str(tmp_path),
        tokenizer_vocab_size=300,
        batch_size=4,
        eval_batch_size=16,
        **kwargs,
    )


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    settings = {
        "max_steps": 3,
        "limit_val_batches": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**settings, **kwargs})


def test_teachers_stay_frozen_in_eval_mode_and_only_the_student_learns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SparseEnsembleKD(
        student=_student(),
        teachers={"bm25": BM25Scorer(), "dense": _dense()},
        flops_weight=0.01,
        flops_warmup_steps=2,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
    )
    teacher_before = {k: v.clone() for k, v in model.teachers["dense"].state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer = _trainer(tmp_path, check_val_every_n_epoch=None, val_check_interval=3)
    trainer.fit(model, datamodule=_data(tmp_path))
    for key, value in model.teachers["dense"].state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert not model.teachers["dense"].training and not any(p.requires_grad for p in model.teachers.parameters())
    changed = [k for k, v in model.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.startswith("backbone.") for k in changed)
    assert "idf" in changed  # the corpus IDF replaced the initial ones
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/ndcg10"]) <= 1.0 and float(metrics["val/doc_nnz"]) > 0
    assert {"train/kl", "train/flops", "train/flops_lambda"} <= set(metrics)


def test_bm25_row_scores_every_matchable_query_perfectly_and_gives_no_credit_for_ties(tmp_path: Path) -> None:
    """Each dev query names a word only its document has (BM25 ranks it first); the extra query matches no document
    at all: its relevant document ties with every other at score 0 and is ranked last (36th of 36)."""
    model = SparseEnsembleKD(
        student=_student(), teachers={"bm25": BM25Scorer()}, eval_network="bm25", optimizer=torch.optim.AdamW
    )
    (values,) = _trainer(tmp_path).validate(model, datamodule=_data(tmp_path), verbose=False)
    assert values["val/queries"] == 7
    assert values["val/mrr10"] == pytest.approx(6 / 7) and values["val/ndcg10"] == pytest.approx(6 / 7)
    assert values["val/recall100"] == pytest.approx(1.0)  # 36 documents: every one is within the top 100
    assert values["val/doc_nnz"] > 0


def test_cli_fit_trains_missing_teachers_then_a_teacher_alone_row(in_tmp: Path) -> None:
    folder = write_beir(in_tmp / "beir")
    common = [
        "--config",
        str(CONFIGS_DIR / "stdlib_retrieval_ensemble_kd.yaml"),
        *TINY,
        "--teacher_training.max_epochs=1",
        f"--teacher_training.cache_dir={in_tmp / 'teachers'}",
        "--data.init_args.source=beir",
        f"--data.init_args.path={folder}",
        "--data.init_args.tokenizer_vocab_size=300",
    ]
    cli = fit(common)
    model = cli.model
    assert set(model.teacher_ckpt) == {"dense", "sparse"}  # trained and cached; BM25 is not trained
    assert all(Path(p).is_file() for p in model.teacher_ckpt.values())
    assert 0.0 <= cli.results["val/ndcg10"] <= 1.0 and cli.results["val/doc_nnz"] > 0
    assert not torch.all(model.student.idf == 1.0)
    assert all(not t.training for t in model.teachers.values())
    # the teacher-alone row: evaluate BM25, train nothing (the cached teachers are reused)
    row = fit([*common, "--model.init_args.eval_network=bm25", "--trainer.max_steps=1", "--test_after_fit=true"])
    assert row.results["test/ndcg10"] == pytest.approx(1.0)
    assert row.results["test/mrr10"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_model(tokenizer_dir: str, corpus: list[str]) -> SparseEnsembleKD:
    torch.manual_seed(0)
    model = SparseEnsembleKD(
        student=_student(tokenizer=tokenizer_dir),
        teachers={"bm25": BM25Scorer(), "dense": _dense(tokenizer=tokenizer_dir)},
        flops_weight=0.05,
        optimizer=torch.optim.SGD,
    )
    model.teachers["bm25"].index_corpus(corpus)
    model.set_student_idf(corpus)
    return model


def _ddp_batches(module: RetrievalDataModule) -> list[dict[str, Any]]:
    items = [module.train_set[i] for i in range(8)]
    return [collate_train(items), collate_train(items[:4]), collate_train(items[4:])]


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        setup = torch.load(Path(folder) / "setup.pt", weights_only=False)
        model = _ddp_model(str(Path(folder) / "tokenizer"), setup["corpus"])
        out = model.training_loss(setup["batches"][1 + rank])
        out["loss"].backward()
        grads = [p.grad.clone() for p in model.student.parameters()]
        for g in grads:  # what DDP does: average the ranks' gradients
            dist.all_reduce(g)
            g /= 2
        torch.save({k: v.detach() for k, v in out.items()} | {"grads": grads}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
def test_ddp_two_processes_equal_one_process_on_the_in_batch_loss(tmp_path: Path) -> None:
    module = _data(tmp_path, negatives="triples" if False else "bm25")
    module.setup("fit")
    torch.manual_seed(0)
    corpus = module.corpus_texts
    train_wordpiece_tokenizer(corpus, 300).save_pretrained(str(tmp_path / "tokenizer"))
    batches = _ddp_batches(module)
    torch.save({"corpus": corpus, "batches": batches}, tmp_path / "setup.pt")
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    single = _ddp_model(str(tmp_path / "tokenizer"), corpus)
    out = single.training_loss(batches[0])
    out["loss"].backward()
    # the KL is a mean over queries (halves on each rank); FLOPS is computed on the gathered documents
    assert (ranks[0]["kl"] + ranks[1]["kl"]).item() / 2 == pytest.approx(out["kl"].item(), rel=1e-5)
    assert ranks[0]["flops"].item() == pytest.approx(out["flops"].item(), rel=1e-5)
    assert ranks[1]["flops"].item() == pytest.approx(out["flops"].item(), rel=1e-5)
    assert (ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 == pytest.approx(out["loss"].item(), rel=1e-5)
    for g0, g1, g in zip(ranks[0]["grads"], ranks[1]["grads"], [p.grad for p in single.student.parameters()]):
        torch.testing.assert_close(g0, g1)
        torch.testing.assert_close(g0, g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def test_idf_table_of_another_tokenizer_is_a_one_line_error(tmp_path: Path) -> None:
    table = tmp_path / "idf.json"
    table.write_text(json.dumps({"[CLS]": 0.0, "zebrafish": 7.1, "##ology": 3.2, "the": 0.4}))
    model = SparseEnsembleKD(
        student=_student(), teachers={"bm25": BM25Scorer()}, idf_path=str(table), optimizer=torch.optim.AdamW
    )
    with pytest.raises(KDConfigError) as err:
        model.check_data(_data(tmp_path))
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.init_args.idf_path: ")
    assert "not in the student's tokenizer" in message and "leave idf_path empty" in message


def test_student_vocabulary_smaller_than_the_tokenizer_names_the_field(tmp_path: Path) -> None:
    model = SparseEnsembleKD(
        student=_student(vocab_size=64), teachers={"bm25": BM25Scorer()}, optimizer=torch.optim.AdamW
    )
    with pytest.raises(KDConfigError, match=r"^model\.init_args\.student\.init_args\.vocab_size: .* set vocab_size"):
        model.check_data(_data(tmp_path))


def test_bad_arguments_name_the_field() -> None:
    teachers = {"bm25": BM25Scorer()}
    with pytest.raises(KDConfigError, match=r"model.init_args.teacher_weights"):
        SparseEnsembleKD(student=_student(), teachers=teachers, teacher_weights={"dense": 1.0})
    with pytest.raises(KDConfigError, match=r"model.init_args.teacher_weights"):
        SparseEnsembleKD(student=_student(), teachers=teachers, teacher_weights={"bm25": 0.0})
    with pytest.raises(KDConfigError, match=r"model.init_args.eval_network"):
        SparseEnsembleKD(student=_student(), teachers=teachers, eval_network="dense")
    with pytest.raises(KDConfigError, match=r"model.init_args.kl_weight"):
        SparseEnsembleKD(student=_student(), teachers=teachers, kl_weight=0.0)
    with pytest.raises(KDConfigError, match=r"model.init_args.flops_weight"):
        SparseEnsembleKD(student=_student(), teachers=teachers, flops_weight=-1.0)


def test_non_retrieval_data_is_refused() -> None:
    from kd_lightning.data import DigitsDataModule

    model = SparseEnsembleKD(student=_student(), teachers={"bm25": BM25Scorer()}, optimizer=torch.optim.AdamW)
    with pytest.raises(KDConfigError, match=r"^data: DigitsDataModule serves classification batches"):
        model.check_data(DigitsDataModule())


def test_student_loads_a_local_checkpoint_folder_with_safetensors(tmp_path: Path) -> None:
    trained = _student()
    trained.backbone.save_pretrained(str(tmp_path / "mlm"))  # writes model.safetensors, read without unpickling
    assert any((tmp_path / "mlm").glob("*.safetensors"))
    loaded = _student(pretrained=str(tmp_path / "mlm"))
    for (name, a), b in zip(trained.backbone.state_dict().items(), loaded.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
