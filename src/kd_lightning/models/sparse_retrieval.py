"""Retrievers for sparse-retrieval distillation: a SPLADE document encoder with an inference-free query side, a
dense bi-encoder, a siamese sparse encoder and BM25 — one interface, pure torch (+ transformers/bm25s, imported
when a network is built or indexes).

Every retriever maps texts to vectors and scores by a dot product:

- ``encode_queries(texts) -> Q [B, D]`` and ``encode_documents(texts, doc_index) -> W [N, D]`` (``doc_index``: the
  documents' positions in the corpus; only BM25 reads them);
- ``score(Q, W) -> [B, N]`` (``Q @ Wᵀ``; BM25's "query vectors" are its score rows over the corpus and its
  "document vectors" their corpus positions, so ``score`` selects columns);
- ``count_nonzero(W) -> [N]``: non-zero terms of each document vector (the sparsity that is reported).

Tokenisation happens inside each network (``tokenizer``: a local tokenizer folder; ``None``: the one the data module
provides, handed over by :meth:`RetrievalEncoder.attach_tokenizer`), so student and teachers may use different
tokenizers on the same raw texts. Nothing is downloaded: transformer networks are built from a small BERT config, or
from a local checkpoint folder (``pretrained``, ``local_files_only``).

Representations (Geng et al., arXiv 2411.04403, and opensearch-sparse-model-tuning-sample):

- SPLADE document vector ``w_d[v] = max_t log(1 + ReLU(h[t, v])) · mask[t]`` over the MLM logits ``h``
  (:func:`splade_max_pool`);
- inference-free query vector ``q[v] = ReLU(idf[v])`` if token ``v`` occurs in the query, else 0 (binary: the
  multiplicity is ignored), special tokens zeroed (:func:`inference_free_query`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.models.checkpoints import pretrained_folder_kwargs

__all__ = [
    "BM25Scorer",
    "DenseBiEncoder",
    "RetrievalEncoder",
    "SiameseSparseEncoder",
    "SpladeDocumentEncoder",
    "build_bert",
    "inference_free_query",
    "load_local_tokenizer",
    "splade_max_pool",
]


# ---------------------------------------------------------------------------------------------- functions
def splade_max_pool(logits: Tensor, attention_mask: Tensor, log_twice: bool = False) -> Tensor:
    """``w[b, v] = max_t log(1 + ReLU(h[b, t, v])) · mask[b, t]`` (``log_twice``: ``log1p`` applied twice, the later
    code's option). ``[B, T, V] -> [B, V]``, every entry ``>= 0``."""
    w = torch.log1p(torch.relu(logits))
    if log_twice:
        w = torch.log1p(w)
    w = w * attention_mask.unsqueeze(-1).to(w.dtype)
    return w.amax(dim=1)


def inference_free_query(
    input_ids: Tensor, attention_mask: Tensor | None, idf: Tensor, special_ids: Sequence[int] | Tensor = ()
) -> Tensor:
    """``q[b, v] = ReLU(idf[v]) · 1[token v occurs in query b]``, 0 at ``special_ids``: ``[B, T] -> [B, V]``."""
    present = torch.zeros(input_ids.shape[0], idf.shape[0], dtype=idf.dtype, device=input_ids.device)
    mask = torch.ones_like(input_ids, dtype=idf.dtype) if attention_mask is None else attention_mask.to(idf.dtype)
    present.scatter_reduce_(1, input_ids, mask, reduce="amax")
    special = torch.as_tensor(special_ids, dtype=torch.long, device=input_ids.device)
    if special.numel():
        present[:, special] = 0
    return present * torch.relu(idf).to(present.device)


def load_local_tokenizer(path: str | Path, field: str = "tokenizer") -> Any:
    """A Hugging Face fast tokenizer from a local folder (``tokenizer.json``/``tokenizer_config.json``), never
    downloaded.

    Raises:
        KDConfigError: naming ``field`` when the folder is missing or holds no tokenizer.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise KDConfigError(
            field, f"no tokenizer folder at {folder.resolve()}", "give a local folder with tokenizer.json, or null"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise KDConfigError(
            field, f"cannot load a tokenizer from {folder} ({' '.join(str(err).split())[:160]})", "check the folder"
        ) from None


def build_bert(
    masked_lm: bool,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    dropout: float,
    pretrained: str | None = None,
) -> nn.Module:
    """A small BERT built from its config (``BertForMaskedLM`` or ``BertModel`` without pooler), or a local
    checkpoint folder (``AutoModelForMaskedLM`` / ``AutoModel``, ``local_files_only``) when ``pretrained``."""
    import transformers

    if pretrained is not None:
        folder = Path(pretrained).expanduser()
        if not folder.is_dir():
            raise KDConfigError(
                "pretrained", f"no checkpoint folder at {folder.resolve()}", "give a local folder or null"
            )
        auto = transformers.AutoModelForMaskedLM if masked_lm else transformers.AutoModel
        return auto.from_pretrained(str(folder), **pretrained_folder_kwargs(folder))
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if value < 1:
            raise KDConfigError(name, f"must be >= 1, got {value}")
    if hidden_size % num_heads:
        raise KDConfigError("num_heads", f"must divide hidden_size {hidden_size}, got {num_heads}")
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    if masked_lm:
        return transformers.BertForMaskedLM(config)
    return transformers.BertModel(config, add_pooling_layer=False)


# ---------------------------------------------------------------------------------------------- base
class RetrievalEncoder(nn.Module):
    """Base of the tokenising retrievers: the tokenizer, tokenisation to the network's device, the dot-product score.

    Args:
        tokenizer: local tokenizer folder; ``None``: the data module's, attached at setup.
        max_query_tokens: queries are cut to this many tokens (special tokens included).
        max_document_tokens: documents are cut to this many tokens.
    """

    #: Carries its own weights (BM25): ``kd fit`` does not train it as a teacher.
    is_pretrained: bool = False

    def __init__(self, tokenizer: str | None = None, max_query_tokens: int = 32, max_document_tokens: int = 64) -> None:
        super().__init__()
        if max_query_tokens < 2 or max_document_tokens < 2:
            raise KDConfigError(
                "max_query_tokens" if max_query_tokens < 2 else "max_document_tokens",
                f"must be >= 2, got {min(max_query_tokens, max_document_tokens)}",
            )
        self.tokenizer_path = tokenizer
        self.max_query_tokens = max_query_tokens
        self.max_document_tokens = max_document_tokens
        self._tokenizer: Any = load_local_tokenizer(tokenizer) if tokenizer is not None else None

    # -------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self) -> Any:
        """The tokenizer (the network's own, or the attached one)."""
        if self._tokenizer is None:
            raise KDConfigError(
                "tokenizer",
                f"{type(self).__name__} has no tokenizer",
                "give its tokenizer folder, or train it inside a retrieval task that attaches the data's",
            )
        return self._tokenizer

    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def attach_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` unless the network was built with its own (``tokenizer`` argument)."""
        if self.tokenizer_path is None:
            self._tokenizer = tokenizer
            self.on_tokenizer()

    def on_tokenizer(self) -> None:
        """Called when a tokenizer is attached (subclasses record special-token ids)."""

    def special_token_ids(self) -> list[int]:
        return sorted(set(int(i) for i in self.tokenizer.all_special_ids))

    def tokenizer_size(self) -> int:
        return len(self.tokenizer)

    def __deepcopy__(self, memo: dict[int, Any]) -> RetrievalEncoder:
        # the tokenizer is shared, not copied (an immutable resource; Rust tokenizers copy slowly)
        cls = type(self)
        clone = cls.__new__(cls)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            setattr(clone, key, value if key == "_tokenizer" else copy.deepcopy(value, memo))
        return clone

    @property
    def device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def tokenize(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` ``[B, T]`` on the network's device (right padding, truncation)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        device = self.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    # -------------------------------------------------------------- interface
    def encode_queries(self, texts: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str], doc_index: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def score(self, queries: Tensor, documents: Tensor) -> Tensor:
        """``Q @ Wᵀ``: ``[B, D] × [N, D] -> [B, N]``."""
        return queries @ documents.transpose(0, 1).to(queries.dtype)

    def count_nonzero(self, documents: Tensor) -> Tensor:
        """Non-zero entries of each document vector."""
        return (documents != 0).sum(-1)

    def vocab_check(self, field: str) -> None:
        """Raise when the tokenizer produces ids the network cannot embed."""
        size = getattr(self, "vocab_size", None)
        if size is not None and self.has_tokenizer() and self.tokenizer_size() > int(size):
            raise KDConfigError(
                f"{field}.init_args.vocab_size",
                f"{type(self).__name__} embeds {size} token ids but its tokenizer has {self.tokenizer_size()}",
                f"set vocab_size to {self.tokenizer_size()} (or give the tokenizer the network was built for)",
            )


class _BertRetriever(RetrievalEncoder):
    """Shared construction of the BERT-based retrievers."""

    def __init__(
        self,
        masked_lm: bool,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        max_positions: int,
        dropout: float,
        pretrained: str | None,
        tokenizer: str | None,
        max_query_tokens: int,
        max_document_tokens: int,
    ) -> None:
        super().__init__(tokenizer, max_query_tokens, max_document_tokens)
        longest = max(max_query_tokens, max_document_tokens)
        if pretrained is None and longest > max_positions:
            raise KDConfigError(
                "max_positions", f"is {max_positions} but texts may have {longest} tokens", f"set it >= {longest}"
            )
        self.backbone = build_bert(
            masked_lm,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size,
            max_positions,
            dropout,
            pretrained,
        )
        self.pretrained = pretrained
        self.vocab_size = int(self.backbone.config.vocab_size)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def mlm_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits


# ---------------------------------------------------------------------------------------------- student
class SpladeDocumentEncoder(_BertRetriever):
    """Inference-free sparse retriever (the student): SPLADE document vectors over an MLM head, IDF query vectors.

    ``w_d = splade_max_pool(MLM logits)`` (special-token entries zeroed, they never match a query);
    ``q = inference_free_query(tokens, idf)`` — no network on the query side. ``idf`` is a buffer (stored with the
    weights) that the retrieval task computes from the corpus at setup
    (:func:`~kd_lightning.losses.sparse_retrieval.idf_from_document_frequency`) or loads from a table.

    Args:
        vocab_size: token ids of the MLM head (>= the tokenizer's size).
        hidden_size: BERT width.
        num_layers: BERT layers.
        num_heads: attention heads.
        intermediate_size: feed-forward width.
        max_positions: position embeddings.
        dropout: BERT dropout.
        pretrained: a local MLM checkpoint folder (any ``AutoModelForMaskedLM``); replaces the size arguments.
        tokenizer: local tokenizer folder; ``None``: the data module's.
        max_query_tokens: query truncation.
        max_document_tokens: document truncation.
        query_weighting: ``"idf"`` (the paper) or ``"binary"`` (``idf ≡ 1``: the ablation without IDF).
        log_twice: ``log1p`` twice in the pooling (later code versions).
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        intermediate_size: int = 256,
        max_positions: int = 128,
        dropout: float = 0.1,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        max_query_tokens: int = 32,
        max_document_tokens: int = 64,
        query_weighting: Literal["idf", "binary"] = "idf",
        log_twice: bool = False,
    ) -> None:
        if query_weighting not in ("idf", "binary"):
            raise KDConfigError("query_weighting", f"must be 'idf' or 'binary', got {query_weighting!r}")
        super().__init__(
            True,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size,
            max_positions,
            dropout,
            pretrained,
            tokenizer,
            max_query_tokens,
            max_document_tokens,
        )
        self.query_weighting = query_weighting
        self.log_twice = log_twice
        self.register_buffer("idf", torch.ones(self.vocab_size))
        self.register_buffer("special", torch.zeros(self.vocab_size, dtype=torch.bool))
        if self.has_tokenizer():
            self.on_tokenizer()

    def on_tokenizer(self) -> None:
        special = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.special.device)
        ids = [i for i in self.special_token_ids() if i < self.vocab_size]
        special[ids] = True
        self.special.copy_(special)

    def set_idf(self, idf: Tensor) -> None:
        """Store the IDF table ``[V']`` (``V' <= vocab_size``; missing rows keep 1.0)."""
        if idf.dim() != 1 or idf.shape[0] > self.vocab_size:
            raise KDConfigError(
                "idf",
                f"has {idf.shape[0] if idf.dim() == 1 else tuple(idf.shape)} entries but the student embeds "
                f"{self.vocab_size} token ids",
                "compute the IDF table with the student's tokenizer",
            )
        with torch.no_grad():
            self.idf.fill_(1.0)
            self.idf[: idf.shape[0]] = idf.to(self.idf)

    def query_weights(self) -> Tensor:
        """The weights of the query terms: ``idf`` (or ones for ``query_weighting="binary"``)."""
        return self.idf if self.query_weighting == "idf" else torch.ones_like(self.idf)

    def encode_queries(self, texts: Sequence[str]) -> Tensor:
        ids, mask = self.tokenize(texts, self.max_query_tokens)
        return inference_free_query(ids, mask, self.query_weights(), self.special.nonzero().squeeze(-1))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Document vectors ``[B, V]`` of tokenised documents."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = self.mlm_logits(input_ids, mask)[..., : self.vocab_size]
        return splade_max_pool(logits, mask, self.log_twice).masked_fill(self.special, 0.0)

    def encode_documents(self, texts: Sequence[str], doc_index: Tensor | None = None) -> Tensor:
        return self(*self.tokenize(texts, self.max_document_tokens))


# ---------------------------------------------------------------------------------------------- teachers
class SiameseSparseEncoder(SpladeDocumentEncoder):
    """Siamese sparse retriever (a teacher): the SPLADE encoder on both sides, special tokens zeroed on both.

    Same arguments as :class:`SpladeDocumentEncoder` (``query_weighting`` unused).
    """

    def encode_queries(self, texts: Sequence[str]) -> Tensor:
        return self(*self.tokenize(texts, self.max_query_tokens))


class DenseBiEncoder(_BertRetriever):
    """Dense bi-encoder (a teacher): the [CLS] hidden state, L2-normalised, scored by ``scale · cos``.

    Args:
        vocab_size: token ids (>= the tokenizer's size).
        hidden_size: BERT width (the embedding size).
        num_layers: BERT layers.
        num_heads: attention heads.
        intermediate_size: feed-forward width.
        max_positions: position embeddings.
        dropout: BERT dropout.
        pretrained: a local checkpoint folder (``AutoModel``); replaces the size arguments.
        tokenizer: local tokenizer folder; ``None``: the data module's.
        max_query_tokens: query truncation.
        max_document_tokens: document truncation.
        similarity_scale: the score is ``similarity_scale · cos(q, d)`` (1/temperature of its InfoNCE training).
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 2,
        intermediate_size: int = 512,
        max_positions: int = 128,
        dropout: float = 0.1,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        max_query_tokens: int = 32,
        max_document_tokens: int = 64,
        similarity_scale: float = 20.0,
    ) -> None:
        if not similarity_scale > 0:
            raise KDConfigError("similarity_scale", f"must be > 0, got {similarity_scale}")
        super().__init__(
            False,
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size,
            max_positions,
            dropout,
            pretrained,
            tokenizer,
            max_query_tokens,
            max_document_tokens,
        )
        self.similarity_scale = float(similarity_scale)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """L2-normalised [CLS] embeddings ``[B, H]``."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return F.normalize(self.hidden(input_ids, mask)[:, 0].float(), dim=-1)

    def encode_queries(self, texts: Sequence[str]) -> Tensor:
        return self(*self.tokenize(texts, self.max_query_tokens))

    def encode_documents(self, texts: Sequence[str], doc_index: Tensor | None = None) -> Tensor:
        return self(*self.tokenize(texts, self.max_document_tokens))

    def score(self, queries: Tensor, documents: Tensor) -> Tensor:
        return self.similarity_scale * super().score(queries, documents)


class BM25Scorer(nn.Module):
    """BM25 over the corpus (bm25s), as a retriever: no parameters, indexed once at setup (``is_pretrained``: ``kd
    fit`` does not train it).

    Query "vectors" are the queries' BM25 score rows over the whole corpus ``[B, N_corpus]``; document "vectors" are
    the documents' corpus positions ``[N, 1]``; :meth:`score` picks the columns. Uses bm25s' own tokenizer
    (lower-cased words of 2+ characters, English stop words removed, optional stemming: none).

    Args:
        k1: BM25 term-frequency saturation.
        b: BM25 length normalisation.
        method: bm25s variant (``"lucene"``, ``"robertson"``, ``"atire"``, ``"bm25l"``, ``"bm25+"``).
        stopwords: bm25s stop-word list (``"english"``) or ``None``.
    """

    is_pretrained: bool = True

    def __init__(
        self, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords: str | None = "english"
    ) -> None:
        super().__init__()
        if not k1 >= 0 or not 0 <= b <= 1:
            raise KDConfigError("k1" if not k1 >= 0 else "b", f"out of range (k1 >= 0, 0 <= b <= 1): {k1}, {b}")
        self.k1, self.b, self.method, self.stopwords = float(k1), float(b), method, stopwords
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        self._retriever: Any = None
        self._fingerprint: int | None = None
        self.register_buffer("_terms", torch.zeros(0, dtype=torch.long), persistent=False)

    def _tokens(self, texts: Sequence[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(list(texts), return_ids=False, show_progress=False, stopwords=self.stopwords)

    def index_corpus(self, texts: Sequence[str]) -> None:
        """Index ``texts`` (once per corpus: a second call with the same texts does nothing)."""
        import bm25s

        key = hash(tuple(texts))
        if self._retriever is not None and key == self._fingerprint:
            return
        tokens = self._tokens(texts)
        retriever = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        retriever.index(tokens, show_progress=False)
        self._retriever, self._fingerprint = retriever, key
        self._terms = torch.tensor([len(set(t)) for t in tokens], dtype=torch.long, device=self._anchor.device)

    @property
    def num_documents(self) -> int:
        return int(self._terms.shape[0])

    def _check_indexed(self) -> None:
        if self._retriever is None:
            raise KDConfigError(
                "BM25Scorer",
                "has not indexed a corpus",
                "use it inside a retrieval task (it indexes the data's corpus)",
            )

    def encode_queries(self, texts: Sequence[str]) -> Tensor:
        """BM25 scores of each query against every corpus document ``[B, N_corpus]``."""
        import numpy as np

        self._check_indexed()
        rows = []
        for tokens in self._tokens(texts):
            ids = self._retriever.get_tokens_ids(tokens)
            rows.append(
                self._retriever.get_scores_from_ids(ids) if ids else np.zeros(self.num_documents, dtype=np.float32)
            )
        return torch.from_numpy(np.stack(rows).astype(np.float32)).to(self._anchor.device)

    def encode_documents(self, texts: Sequence[str], doc_index: Tensor | None = None) -> Tensor:
        """The documents' corpus positions ``[N, 1]`` (BM25 scores need the indexed corpus)."""
        if doc_index is None:
            raise KDConfigError("doc_index", "BM25Scorer scores corpus documents only", "pass their corpus positions")
        return doc_index.reshape(-1, 1).long().to(self._anchor.device)

    def score(self, queries: Tensor, documents: Tensor) -> Tensor:
        return queries[:, documents[:, 0].to(queries.device)]

    def count_nonzero(self, documents: Tensor) -> Tensor:
        """Distinct BM25 terms of each document."""
        return self._terms.to(documents.device)[documents[:, 0]]

    def forward(self, texts: Sequence[str]) -> Tensor:
        """BM25 score rows of queries over the corpus."""
        return self.encode_queries(texts)
