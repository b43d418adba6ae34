"""Retrieval task sibling: :class:`RetrievalDistillation` (teachers → a retriever) and :class:`RetrievalSupervised`.

Both train retrievers (:mod:`kd_lightning.models.sparse_retrieval`: ``encode_queries``, ``encode_documents``,
``score``) on the batches of :class:`~kd_lightning.data.retrieval.RetrievalDataModule`. What the task brings:

- **Setup** (:meth:`~RetrievalDistillation.check_data`): the data must be a retrieval data module; every network
  built without a tokenizer gets the data's; BM25 networks index the corpus; a student with an IDF table
  (``set_idf``) gets the corpus IDF computed with its own tokenizer
  (:func:`~kd_lightning.losses.sparse_retrieval.idf_from_document_frequency`), or a table read from ``idf_path``
  (checked against its tokenizer).
- **In-batch scores** (:meth:`~RetrievalDistillation.in_batch_scores`): local queries against every document of the
  global batch — under DDP the document vectors of all ranks are gathered (the student's with gradients,
  :func:`~kd_lightning.losses.sparse_retrieval.gather_with_grad`), so a loss averaged over local queries trains
  exactly like one process on the whole batch. Query ``i``'s positive is column ``offset + i·G``; its own
  candidates the ``G`` columns from there (``in_batch_negatives=False`` keeps only those).
- **Evaluation once over the whole split against the whole corpus**: at the start of validation/test the evaluated
  network (``eval_network``: the student or a teacher by name) encodes the corpus; each query is scored against
  every document, ranked (ties put relevant documents after non-relevant ones: no credit for ties), and
  torchmetrics' retrieval functions give per-query MRR@10, nDCG@10 and recall@100; at the end the per-query values
  of all ranks are gathered, de-duplicated by query (DDP samplers repeat a few) and averaged:
  ``<stage>/mrr10``, ``<stage>/ndcg10``, ``<stage>/recall100``, plus ``<stage>/doc_nnz`` (mean non-zero terms of
  the corpus' document vectors) and ``<stage>/query_nnz``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.contrastive import all_gather_cat
from kd_lightning.losses.sparse_retrieval import (
    FlopsRegularizer,
    document_frequency,
    gather_with_grad,
    idf_from_document_frequency,
    info_nce,
)
from kd_lightning.losses.terms import active, check_weights, weighted_terms
from kd_lightning.methods.core import AUTOCAST_DTYPES, DistillationModule, SingleNetwork, describe

__all__ = ["RetrievalDistillation", "RetrievalSupervised", "ScoredBatch", "read_idf_table"]

STUDENT = "student"


def read_idf_table(path: str | Path, tokenizer: Any, field: str = "model.init_args.idf_path") -> Tensor:
    """An IDF table for ``tokenizer``: a JSON ``{token: idf}`` (the paper repo's ``idf.json``) or a
    ``.safetensors`` file with an ``idf`` tensor of one entry per token id; tokens absent from a JSON table get 1.0.

    Raises:
        KDConfigError: naming ``field`` when the file is missing or was made with another tokenizer (tokens the
            tokenizer does not know, or a tensor of another length).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise KDConfigError(field, f"no IDF table at {path.resolve()}", "give a JSON {token: idf} file, or null")
    size = len(tokenizer)
    fix = (
        "compute the table with the student's tokenizer (leave idf_path empty: it is computed from the corpus), or "
        "give the student the tokenizer the table was made with (model.init_args.student.init_args.tokenizer)"
    )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        table = load_file(str(path)).get("idf")
        if table is None or table.dim() != 1 or table.shape[0] != size:
            got = "no 'idf' tensor" if table is None else f"{tuple(table.shape)} entries"
            raise KDConfigError(field, f"the IDF table has {got} but the student's tokenizer has {size} tokens", fix)
        return table.float()
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise KDConfigError(field, f"{path} is not a JSON object ({type(err).__name__})", "give {token: idf}") from None
    if not isinstance(mapping, Mapping):
        raise KDConfigError(field, f"{path} is not a JSON object of token -> idf", "give {token: idf}")
    vocab = tokenizer.get_vocab()
    unknown = [t for t in mapping if t not in vocab]
    if unknown:
        raise KDConfigError(
            field,
            f"{len(unknown)} of the {len(mapping)} tokens of the IDF table (e.g. {unknown[:3]}) are not in the "
            f"student's tokenizer ({size} tokens): the table was made with another tokenizer",
            fix,
        )
    idf = torch.ones(size)
    for token, value in mapping.items():
        idf[vocab[token]] = float(value)
    return idf


class ScoredBatch:
    """Scores of a batch's local queries against the documents of the global batch.

    Attributes:
        scores: ``[B, N]`` (``N`` = documents of every rank), or ``[B, G]`` = ``own`` without in-batch negatives.
        own: ``[B, G]`` each query's own candidates (column 0 its positive).
        positive: ``[B]`` column of each query's positive in ``scores``.
        documents: the document vectors of the global batch ``[N, D]`` (the student's carry gradients).
        group_size: ``G``.
    """

    def __init__(self, scores: Tensor, own: Tensor, positive: Tensor, documents: Tensor, group_size: int) -> None:
        self.scores, self.own, self.positive = scores, own, positive
        self.documents, self.group_size = documents, group_size


class RetrievalDistillation(DistillationModule):
    """Retrieval: a retriever (the student) learns from frozen retrievers (teachers); see the module docstring.

    Subclasses implement :meth:`training_loss` from :meth:`in_batch_scores` (student) and :meth:`teacher_scores`.

    Args:
        student: the retriever to train.
        teacher: one retriever to learn from (or ``teachers={name: retriever}``).
        eval_network: the network evaluation measures: ``"student"`` or a teacher's name (a row for the teacher
            alone: ``--trainer.max_steps=1`` and ``test_after_fit``: the student's one step is never measured).
        idf_path: an IDF table for the student (JSON ``{token: idf}`` or ``.safetensors``); ``None``: computed
            from the corpus with the student's tokenizer.
        in_batch_negatives: score every query against all documents of the (global) batch; ``False``: its own
            ``G`` candidates only.
        corpus_batch_size: documents per forward when the corpus is encoded for evaluation.
        ndcg_k: cut-off of MRR and nDCG (10).
        recall_k: cut-off of recall (100).
        **kwargs: the core's arguments (``teachers``, ``teacher_ckpt``, ``optimizer``, ``lr_scheduler``...).
    """

    teacher_training_module: ClassVar[type[DistillationModule] | None] = None  # RetrievalSupervised, set below

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        eval_network: str = STUDENT,
        idf_path: str | None = None,
        in_batch_negatives: bool = True,
        corpus_batch_size: int = 128,
        ndcg_k: int = 10,
        recall_k: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if eval_network != STUDENT and eval_network not in self.teachers:
            raise KDConfigError(
                "eval_network",
                f"names no network: {eval_network!r}",
                f"use 'student' or a teacher's name ({', '.join(self.teachers) or 'none given'})",
            )
        for name, value in (("corpus_batch_size", corpus_batch_size), ("ndcg_k", ndcg_k), ("recall_k", recall_k)):
            if value < 1:
                raise KDConfigError(name, f"must be >= 1, got {value}")
        self.eval_network = eval_network
        self.idf_path = idf_path
        self.in_batch_negatives = in_batch_negatives
        self.corpus_batch_size = corpus_batch_size
        self.ndcg_k, self.recall_k = ndcg_k, recall_k
        self._corpus: list[str] | None = None
        self._idf_key: tuple[Any, ...] | None = None
        self._eval: dict[str, Any] = {}

    # ------------------------------------------------------------------ networks and data
    def networks_to_check(self) -> dict[str, nn.Module]:
        return {STUDENT: self.student, **self.teacher_fields()}

    def network_named(self, name: str) -> nn.Module:
        return self.student if name == STUDENT else self.teachers[name]

    def check_data(self, datamodule: Any) -> None:
        if datamodule is None:
            return
        if getattr(datamodule, "task", None) != "retrieval":
            raise KDConfigError(
                "data",
                f"{type(datamodule).__name__} serves {getattr(datamodule, 'task', 'unknown')} batches but "
                f"{type(self).__name__} trains retrievers",
                "use data.class_path: kd_lightning.data.retrieval.RetrievalDataModule",
            )
        datamodule.setup("fit")
        corpus = datamodule.corpus_texts
        for field, network in self.networks_to_check().items():
            where = f"model.init_args.{field}"
            if not all(hasattr(network, m) for m in ("encode_queries", "encode_documents", "score")):
                raise KDConfigError(
                    where,
                    f"{describe(network)} is not a retriever (encode_queries, encode_documents, score)",
                    "use a network of kd_lightning.models.sparse_retrieval",
                )
            if hasattr(network, "attach_tokenizer"):
                if not network.has_tokenizer():
                    network.attach_tokenizer(datamodule.tokenizer)
                network.vocab_check(where)
            if hasattr(network, "index_corpus"):
                network.index_corpus(corpus)
        self._corpus = corpus
        self.set_student_idf(corpus)

    def set_student_idf(self, corpus: Sequence[str]) -> None:
        """Give a student with ``set_idf`` its IDF table (from ``idf_path`` or the corpus), once per corpus."""
        student = self.student
        if not hasattr(student, "set_idf"):
            return
        key = (id(student.tokenizer), len(corpus), hash(tuple(corpus)), self.idf_path)
        if key == self._idf_key:
            return
        if self.idf_path is not None:
            idf = read_idf_table(self.idf_path, student.tokenizer)
        else:
            encoded = student.tokenizer(list(corpus), add_special_tokens=False)["input_ids"]
            df, n = document_frequency(encoded, len(student.tokenizer))
            idf = idf_from_document_frequency(df, n)
        student.set_idf(idf)
        self._idf_key = key

    # ------------------------------------------------------------------ batches
    def inputs_of(self, batch: Any) -> Any:
        if not isinstance(batch, Mapping) or "query" not in batch:
            raise KDConfigError(
                "data",
                f"retrieval methods need dict batches with 'query' texts, got {type(batch).__name__}",
                "use RetrievalDataModule",
            )
        return batch["query_index"]

    def batch_size_of(self, batch: Any) -> int:
        return len(batch["query"]) if isinstance(batch, Mapping) and "query" in batch else 1

    @contextlib.contextmanager
    def _teacher_mode(self) -> Iterator[None]:
        """No autograd (frozen teachers) and ``teacher_precision``'s autocast."""
        dtype = AUTOCAST_DTYPES[self.teacher_precision]
        with torch.no_grad():
            if dtype is None:
                yield
            else:
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    yield

    def in_batch_scores(self, network: nn.Module, batch: Mapping[str, Any], grad: bool = True) -> ScoredBatch:
        """Scores of the local queries against the global batch's documents (see :class:`ScoredBatch`);
        ``grad=False`` runs a frozen teacher (no autograd, ``teacher_precision``)."""
        group = int(batch["group_size"])
        with contextlib.nullcontext() if grad else self._teacher_mode():
            queries = network.encode_queries(batch["query"])
            docs = network.encode_documents(batch["documents"], batch["doc_index"])
            if grad:
                gathered, offset = gather_with_grad(docs)
            else:
                (gathered,) = all_gather_cat(docs)
                offset = self._offset(docs.shape[0])
            scores = network.score(queries, gathered).float()
        positive = offset + torch.arange(scores.shape[0], device=scores.device) * group
        own = scores.gather(1, positive[:, None] + torch.arange(group, device=scores.device))
        if not self.in_batch_negatives:
            return ScoredBatch(own, own, torch.zeros_like(positive), gathered, group)
        return ScoredBatch(scores, own, positive, gathered, group)

    def _offset(self, local_docs: int) -> int:
        """This rank's first row in a gathered batch (0 on one process)."""
        (sizes,) = all_gather_cat(torch.tensor([[local_docs]], device=self.device))
        if sizes.shape[0] == 1:
            return 0
        return int(sizes[: torch.distributed.get_rank()].sum())

    # ------------------------------------------------------------------ evaluation
    def _eval_start(self, stage: str) -> None:
        if self._corpus is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            self.check_data(datamodule)
        if self._corpus is None:
            raise KDConfigError("data", "retrieval evaluation needs the corpus", "use RetrievalDataModule")
        network = self.network_named(self.eval_network)
        chunks = []
        index = torch.arange(len(self._corpus), device=self.device)
        with torch.no_grad():
            for start in range(0, len(self._corpus), self.corpus_batch_size):
                stop = min(start + self.corpus_batch_size, len(self._corpus))
                chunks.append(network.encode_documents(self._corpus[start:stop], index[start:stop]))
        docs = torch.cat(chunks)
        self._eval = {
            "docs": docs,
            "doc_nnz": float(network.count_nonzero(docs).float().mean()),
            "queries": [],
            "values": [],
        }

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        from torchmetrics.functional.retrieval import (
            retrieval_normalized_dcg,
            retrieval_recall,
            retrieval_reciprocal_rank,
        )

        network = self.network_named(self.eval_network)
        docs = self._eval["docs"]
        with torch.no_grad():
            queries = network.encode_queries(batch["query"])
            scores = network.score(queries, docs).float()
        n_docs = scores.shape[1]
        relevance = torch.zeros_like(scores, dtype=torch.long)
        for row, (rel, grade) in enumerate(zip(batch["relevant"], batch["relevance"], strict=True)):
            relevance[row, rel.to(scores.device)] = grade.to(scores.device)
        # ranking: descending score, ties with relevant documents last (stable sorts): no credit for a tie
        first = torch.argsort((relevance > 0).long(), dim=1, stable=True)
        second = torch.argsort(-scores.gather(1, first), dim=1, stable=True)
        order = first.gather(1, second)
        position = torch.empty_like(order)
        position.scatter_(1, order, torch.arange(n_docs, device=order.device).expand_as(order))
        preds = (n_docs - position).float()  # > 0 everywhere: torchmetrics counts only preds > 0 as retrieved
        values = []
        for row in range(scores.shape[0]):
            p, t = preds[row], relevance[row]
            values.append(
                torch.stack(
                    [
                        retrieval_reciprocal_rank(p, t > 0, top_k=self.ndcg_k),
                        retrieval_normalized_dcg(p, t, top_k=self.ndcg_k),
                        retrieval_recall(p, t > 0, top_k=self.recall_k),
                        network.count_nonzero(queries[row : row + 1]).float()[0]
                        if not hasattr(network, "index_corpus")
                        else torch.tensor(float("nan"), device=p.device),
                    ]
                )
            )
        self._eval["queries"].append(batch["query_index"].to(self.device))
        self._eval["values"].append(torch.stack(values).to(self.device))

    def _eval_end(self, stage: str) -> None:
        if not self._eval.get("values"):
            return
        index = torch.cat(self._eval["queries"])[:, None]
        values = torch.cat(self._eval["values"])
        index, values = all_gather_cat(index, values)
        index = index[:, 0]
        order = torch.argsort(index, stable=True)
        index, values = index[order], values[order]
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]  # DDP samplers repeat a few queries: count each once
        values = values[keep]
        names = (f"mrr{self.ndcg_k}", f"ndcg{self.ndcg_k}", f"recall{self.recall_k}")
        for i, name in enumerate(names):
            self.log(f"{stage}/{name}", values[:, i].mean(), prog_bar=name.startswith("ndcg"), sync_dist=False)
        self.log(f"{stage}/doc_nnz", self._eval["doc_nnz"], sync_dist=False)
        query_nnz = values[:, 3]
        if not torch.isnan(query_nnz).all():
            self.log(f"{stage}/query_nnz", query_nnz.mean(), sync_dist=False)
        self.log(f"{stage}/queries", float(values.shape[0]), sync_dist=False)
        self._eval = {}

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The evaluated network's query vectors of the batch."""
        with torch.no_grad():
            return self.network_named(self.eval_network).encode_queries(batch["query"])


class RetrievalSupervised(SingleNetwork, RetrievalDistillation):
    """InfoNCE training of one retriever with in-batch and hard negatives: the dense and siamese sparse teachers,
    and the student-alone baseline. ``kd fit`` trains missing retrieval teachers with it.

    ``L = −(1/B) Σ_i log softmax(S_i / τ)[positive_i] + λ(step) · FLOPS(w_d)`` with ``S`` the scores of the local
    queries against every document of the global batch (hard negatives included), label smoothing ``ε``.

    Args:
        model: the retriever.
        label_smoothing: ε of the cross-entropy, in [0, 1).
        temperature: τ (the networks' scores are already scaled: 1).
        flops_weight: ``λ_d`` of a FLOPS term on the document vectors (0: none; a sparse student alone).
        flops_warmup_steps: ``T_d`` of its quadratic warm-up.
        **kwargs: ``optimizer``, ``lr_scheduler`` and the other arguments of :class:`RetrievalDistillation`.
    """

    def __init__(
        self,
        model: nn.Module,
        label_smoothing: float = 0.0,
        temperature: float = 1.0,
        flops_weight: float = 0.0,
        flops_warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=model, **kwargs)
        self.set_label_smoothing(label_smoothing)
        check_weights(flops_weight=flops_weight)
        if not temperature > 0:
            raise KDConfigError("temperature", f"must be > 0, got {temperature}")
        self.temperature = temperature
        self.flops = FlopsRegularizer(flops_weight, flops_warmup_steps)

    def training_loss(self, batch: Any) -> dict[str, Tensor]:
        scored = self.in_batch_scores(self.student, batch)
        terms = {"infonce": info_nce(scored.scores, scored.positive, self.temperature, self.label_smoothing)}
        weights = {}
        if active(self.flops.lambda_max):
            terms["flops"] = self.flops(scored.documents, scored.group_size)
            weights["flops"] = self.flops.weight()
        return weighted_terms(terms, weights)


RetrievalDistillation.teacher_training_module = RetrievalSupervised
