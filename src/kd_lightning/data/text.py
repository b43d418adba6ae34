"""Text for language-model distillation: plain-text files or JSONL prompt/response pairs, tokenised and batched.

:class:`TextDataModule` reads documents (files of a folder or glob, JSONL records, or the Python standard
library's own source code: a real corpus on every machine with Python), splits them into train /
validation / test *by document* with a fixed seed, tokenises them with a Hugging Face tokenizer or the
built-in :class:`ByteTokenizer`, and serves batches as dicts::

    input_ids           LongTensor [B, T]   padded with the tokenizer's pad id
    attention_mask      BoolTensor [B, T]   true at real tokens
    labels              LongTensor [B, T]   input_ids, -100 at padding and (JSONL) prompt tokens
    sample_index        LongTensor [B]      position of the sequence in its split (stable ids)
    prompt_lengths      LongTensor [B]      tokens of BOS + prompt (JSONL; 0 for plain text)
    num_items_in_batch  LongTensor []       training batches only: valid tokens of the accumulation group

Next-token convention: position ``t`` predicts ``labels[t + 1]`` (use
:func:`kd_lightning.losses.lm.shift_for_next_token`).
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import itertools
import json
import math
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.base import KDDataModule
from kd_lightning.errors import DatasetNotFoundError, KDConfigError
from kd_lightning.models.lm import TokenizerIdentity, tokenizer_identity

__all__ = [
    "STDLIB_EXCLUDE",
    "ByteTokenizer",
    "HFTokenizer",
    "TextDataModule",
    "TokenBatchLoader",
    "TokenSequences",
    "collate_token_batch",
    "left_pad_prompts",
    "load_tokenizer",
    "stdlib_files",
]

IGNORE_INDEX = -100

#: Parts of the standard library's folder left out of ``source="stdlib"`` by default (installed packages,
#: the test suites, IDLE and the turtle demos).
STDLIB_EXCLUDE = (
    "site-packages/*",
    "dist-packages/*",
    "test/*",
    "*/test/*",
    "tests/*",
    "*/tests/*",
    "idlelib/*",
    "turtledemo/*",
)

_DEFAULT_SUFFIXES = {"text": (".txt", ".md", ".rst", ".py"), "jsonl": (".jsonl",)}


# -------------------------------------------------------------------------------------------- tokenizers
class Tokenizer(Protocol):
    """What :class:`TextDataModule` needs from a tokenizer."""

    name: str
    pad_token_id: int
    bos_token_id: int | None
    eos_token_id: int | None

    def __len__(self) -> int: ...

    def encode_tensor(self, text: str) -> Tensor: ...

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer that needs nothing: ids 0–255 are the UTF-8 bytes, then pad, BOS and EOS.

    ``len(tokenizer)`` is 259 real ids; ``vocab_size`` rounds it up to a multiple of ``multiple_of``
    (8 by default: **264**, TinyGPT's default ``vocab_size``), the extra ids never occurring. Decoding
    replaces invalid UTF-8 (e.g. a sequence cut inside a character) with U+FFFD.
    """

    name = "byte"

    def __init__(self, multiple_of: int = 8) -> None:
        if multiple_of < 1:
            raise KDConfigError(f"multiple_of must be >= 1, got {multiple_of}.")
        self.pad_token_id = 256
        self.bos_token_id: int | None = 257
        self.eos_token_id: int | None = 258
        self.multiple_of = multiple_of

    def __len__(self) -> int:
        return 259

    @property
    def vocab_size(self) -> int:
        """``len(self)`` rounded up to a multiple of ``multiple_of``."""
        return math.ceil(len(self) / self.multiple_of) * self.multiple_of

    def encode(self, text: str) -> list[int]:
        """Byte ids of ``text`` (no special tokens)."""
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> Tensor:
        """Byte ids of ``text`` as a LongTensor (fast path for whole files)."""
        data = text.encode("utf-8")
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special and unused ids are dropped (``skip_special_tokens``) or shown as ``<id>``."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        out, pending = [], bytearray()
        for i in values:
            if 0 <= i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append({256: "<pad>", 257: "<bos>", 258: "<eos>"}.get(i, f"<{i}>"))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face tokenizer (``AutoTokenizer``) behind the :class:`Tokenizer` interface.

    The pad id falls back to the EOS id (then 0) when the tokenizer has none: padding is masked by
    ``attention_mask``/``labels`` anyway. ``vocab_size`` is ``len(tokenizer)`` (added tokens included).
    """

    def __init__(self, name_or_path: str, local_files_only: bool = False, trust_remote_code: bool = False) -> None:
        field = "data.init_args.tokenizer"
        local = Path(name_or_path).expanduser()
        # Hub names are "name" or "org/name"; "./x", "/x", "~/x", "a/b/c" can only be local folders.
        looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
        if looks_local and not local.exists():
            # A local path that is not there: say so now instead of asking the hub for it (slow, then a raw OSError).
            raise KDConfigError(
                field,
                f"no tokenizer folder at {local.resolve()}",
                "give the folder that holds tokenizer.json / tokenizer_config.json, or a Hugging Face hub name "
                "(e.g. gpt2), or byte",
            )
        try:
            from transformers import AutoTokenizer
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"tokenizer={name_or_path!r} is a Hugging Face tokenizer, which needs transformers: "
                "pip install 'kd-lightning[transformers]' (or use tokenizer: byte)."
            ) from err
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, local_files_only=local_files_only, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as err:
            where = "in the local Hugging Face cache" if local_files_only else "locally or on the Hugging Face hub"
            detail = " ".join(str(err).split())[:160]
            raise KDConfigError(
                field,
                f"cannot load tokenizer {name_or_path!r} {where} ({type(err).__name__}: {detail})",
                "check the name or path; data.init_args.local_files_only=false lets it download once",
            ) from None
        self.tokenizer.model_max_length = sys.maxsize  # whole files are encoded, then packed: no length warning
        self.name = name_or_path
        self.bos_token_id = self.tokenizer.bos_token_id
        self.eos_token_id = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_id or 0))
        self._identity: TokenizerIdentity | None = None

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_tensor(self, text: str) -> Tensor:
        return torch.tensor(self.encode(text), dtype=torch.long)

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode(values, skip_special_tokens=skip_special_tokens)

    @property
    def identity(self) -> TokenizerIdentity:
        """Fingerprint, size and chat template of the tokenizer (:func:`~kd_lightning.models.lm.tokenizer_identity`):
        compared with the models' tokenizers at setup."""
        if self._identity is None:
            self._identity = tokenizer_identity(self.tokenizer, name=self.name)
        return self._identity

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (``None`` when it has none)."""
        return getattr(self.tokenizer, "chat_template", None)


def load_tokenizer(name: str = "byte", local_files_only: bool = False) -> ByteTokenizer | HFTokenizer:
    """``"byte"``: :class:`ByteTokenizer`; anything else: a Hugging Face tokenizer by local path or hub name."""
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name, local_files_only=local_files_only)


# ------------------------------------------------------------------------------------------------ files
def _excluded(relative: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns)


def stdlib_files(exclude: Sequence[str] = STDLIB_EXCLUDE) -> tuple[Path, list[Path]]:
    """The standard library's folder and its ``.py`` files (sorted by relative path, ``exclude`` left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DatasetNotFoundError("Python standard library", root, ["*.py"], "This Python has no stdlib sources.")
    files: list[tuple[str, Path]] = []
    for folder, dirs, names in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirs[:] = sorted(d for d in dirs if not _excluded(f"{prefix}{d}/", exclude))  # prune excluded trees
        for name in names:
            if name.endswith(".py") and not _excluded(prefix + name, exclude):
                files.append((prefix + name, Path(folder) / name))
    return root, [path for _, path in sorted(files)]


def _limit_files(files: list[Path], max_files: int | None, max_bytes: int | None, seed: int) -> list[Path]:
    """A deterministic subset within the limits: files in a seeded random order, each kept while it fits."""
    if max_files is None and max_bytes is None:
        return files
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, total = [], 0
    for i in order:
        if max_files is not None and len(chosen) >= max_files:
            break
        size = files[i].stat().st_size
        if max_bytes is not None and total + size > max_bytes:
            continue
        chosen.append(i)
        total += size
    return [files[i] for i in sorted(chosen)]


# ------------------------------------------------------------------------------------------------ dataset
class TokenSequences(Dataset):
    """Token sequences stored in one flat tensor: item ``i`` is ``tokens[starts[i] : starts[i] + lengths[i]]``.

    Items are dicts ``{"input_ids": LongTensor[L], "prompt_length": int, "sample_index": int}``;
    :func:`collate_token_batch` turns a list of them into a batch. ``prompt_lengths[i]`` leading tokens
    are not predicted (labels -100).
    """

    def __init__(self, tokens: Tensor, starts: Tensor, lengths: Tensor, prompt_lengths: Tensor | None = None) -> None:
        if not (len(starts) == len(lengths)) or (prompt_lengths is not None and len(prompt_lengths) != len(starts)):
            raise KDConfigError("starts, lengths and prompt_lengths must have one entry per sequence.")
        self.tokens = tokens
        self.starts = starts.long()
        self.lengths = lengths.long()
        self.prompt_lengths = torch.zeros_like(self.lengths) if prompt_lengths is None else prompt_lengths.long()

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, length = int(self.starts[index]), int(self.lengths[index])
        return {
            "input_ids": self.tokens[start : start + length].long(),
            "prompt_length": int(self.prompt_lengths[index]),
            "sample_index": int(index),
        }

    def num_valid_tokens(self) -> int:
        """Predicted tokens of the whole set (after the next-token shift)."""
        return int((self.lengths - self.prompt_lengths.clamp_min(1)).clamp_min(0).sum())


def collate_token_batch(
    items: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """Right-pad :class:`TokenSequences` items into a batch dict (see the module docstring)."""
    lengths = [len(item["input_ids"]) for item in items]
    width = max(lengths)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    batch = len(items)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.bool)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for row, (item, n) in enumerate(zip(items, lengths)):
        ids = item["input_ids"]
        input_ids[row, :n] = ids
        attention_mask[row, :n] = True
        p = min(int(item["prompt_length"]), n)
        labels[row, p:n] = ids[p:]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "sample_index": torch.tensor([int(item["sample_index"]) for item in items], dtype=torch.long),
        "prompt_lengths": torch.tensor([int(item["prompt_length"]) for item in items], dtype=torch.long),
    }


def left_pad_prompts(
    batch: dict[str, Tensor], pad_token_id: int, prompt_length: int | None = None
) -> tuple[Tensor, Tensor]:
    """The prompts of a batch, left-padded for ``generate``: ``(prompt_ids [B, P], prompt_mask [B, P])``.

    Each row's prompt is its first ``batch["prompt_lengths"]`` tokens (BOS + prompt for JSONL data), or
    its first ``prompt_length`` tokens when given (plain text: a prefix to continue).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    real = mask.sum(-1)
    if prompt_length is not None:
        lengths = torch.minimum(real, torch.full_like(real, int(prompt_length)))
    else:
        lengths = torch.minimum(batch["prompt_lengths"].to(real.device), real)
    if bool((lengths < 1).any()):
        raise KDConfigError(
            "some rows have no prompt token (plain-text batches have prompt_lengths 0): pass prompt_length."
        )
    width = int(lengths.max())
    out = torch.full((ids.shape[0], width), pad_token_id, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros(ids.shape[0], width, dtype=torch.bool, device=ids.device)
    for row, n in enumerate(lengths.tolist()):
        out[row, width - n :] = ids[row, :n]
        out_mask[row, width - n :] = True
    return out, out_mask


def _count_valid(labels: Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _limited_length(length: int, limit: int | float) -> int:
    """Batches Lightning runs per epoch with ``limit_train_batches=limit`` (same rule as Lightning)."""
    if isinstance(limit, bool):  # bool is an int: never a sensible limit
        return length
    if isinstance(limit, int):
        return min(length, limit)
    if isinstance(limit, float) and limit != 1.0:
        return int(length * limit)
    return length


class TokenBatchLoader(DataLoader):
    """A ``DataLoader`` that adds ``num_items_in_batch`` to each batch: the valid tokens of its accumulation group.

    Consecutive batches form groups of ``accumulate_grad_batches`` (Lightning's: batch ``i`` of an epoch
    belongs to group ``i // k``); every batch of a group gets the group's total of predicted tokens
    (``labels[:, 1:] != -100``), counted on this process only (each DDP rank iterates its own shard; the
    ranks' counts are all-reduced by :func:`~kd_lightning.losses.lm.normalize_token_sum`). The epoch's
    last group may be shorter — also when ``limit_batches`` (``trainer.limit_train_batches``) cuts the
    epoch: the count then stops where Lightning stops. Reads ``k`` batches ahead.

    Lightning re-creates this loader with a ``DistributedSampler`` under DDP; both extra arguments are
    attributes, so they survive.
    """

    def __init__(
        self, dataset: Dataset, *args: Any, accumulate_grad_batches: int = 1, limit_batches: int | float = 1.0, **kwargs
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        if accumulate_grad_batches < 1:
            raise KDConfigError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}.")
        self.accumulate_grad_batches = accumulate_grad_batches
        self.limit_batches = limit_batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:  # type: ignore[override]
        return self._grouped(super().__iter__())

    @staticmethod
    def count_tokens(labels: Tensor) -> int:
        """Predicted tokens of a batch: next-token labels (``labels[:, 1:] != -100``)."""
        return _count_valid(labels)

    def _grouped(self, iterator: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        k = int(self.accumulate_grad_batches)
        used = _limited_length(len(self), self.limit_batches)
        seen = 0
        while True:
            size = min(k, used - seen) if seen < used else k
            group = list(itertools.islice(iterator, size))
            if not group:
                return
            total = torch.tensor(sum(self.count_tokens(batch["labels"]) for batch in group), dtype=torch.long)
            for batch in group:
                batch["num_items_in_batch"] = total.clone()
                yield batch
            seen += len(group)


class TokenLoaders:
    """``train/val/test_dataloader`` of in-memory token data modules (reasoning, VQA, translation).

    The host has ``train_set``, ``val_set``, ``test_set``, ``batch_size``, ``eval_batch_size``, ``num_workers``,
    ``drop_last``, ``accumulate_grad_batches`` and ``_collate()``; training batches come from ``batch_loader``
    (a :class:`TokenBatchLoader`: ``num_items_in_batch`` per accumulation group), evaluation batches in order.
    """

    batch_loader: type[TokenBatchLoader] = TokenBatchLoader
    train_set: Dataset | None
    val_set: Dataset | None
    test_set: Dataset | None
    batch_size: int
    eval_batch_size: int
    num_workers: int
    drop_last: bool
    accumulate_grad_batches: int | None

    def _collate(self) -> Any:
        raise NotImplementedError

    def train_dataloader(self) -> TokenBatchLoader:
        trainer = getattr(self, "trainer", None)
        group = self.accumulate_grad_batches or (int(getattr(trainer, "accumulate_grad_batches", 1)) if trainer else 1)
        return self.batch_loader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            collate_fn=self._collate(),
            accumulate_grad_batches=group,
            limit_batches=getattr(trainer, "limit_train_batches", 1.0) if trainer is not None else 1.0,
        )

    def _eval_loader(self, dataset: Dataset | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self._collate(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


def _split_documents(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[list[int], ...]:
    """Document indices of train / validation / test (each sorted); fixed by ``seed``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * n))
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise KDConfigError(
            f"{n} documents are too few for data.init_args.val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: at least one must be left for training (add documents)."
        )
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return sorted(train), sorted(val), sorted(test)


# ------------------------------------------------------------------------------------------- data module
class TextDataModule(KDDataModule):
    """Language-model data: plain text packed into blocks, or JSONL prompt/response pairs with prompt masking.

    **Documents.** ``source="files"``: ``paths`` are files, folders (every file under them with one of
    ``suffixes``) or glob patterns (``**`` recursive), relative to ``root`` unless absolute; each file is a
    document (``data_format="text"``) or holds one JSON record per line (``"jsonl"``: each record is a
    document). ``source="stdlib"``: the ``.py`` files of this Python's standard library
    (``sysconfig.get_paths()["stdlib"]``), sorted by relative path, without :data:`STDLIB_EXCLUDE`.
    ``max_files`` / ``max_bytes`` keep a deterministic subset: files in a random order fixed by
    ``split_seed``, each kept while it fits.

    **Splits.** Documents (never tokens of one document) are split into train / validation / test with
    ``split_seed``: ``val_fraction`` and ``test_fraction`` of the documents, at least one each
    (``test_fraction=0``: the test set is the validation set).

    **Tokens.** ``tokenizer="byte"`` is :class:`ByteTokenizer` (vocabulary 264, nothing to install);
    anything else is a Hugging Face tokenizer by local path or hub name (``transformers`` extra).
    ``num_classes`` (linked into the model) is ``vocab_size`` when given, else the tokenizer's size.

    - ``"text"``: each document becomes ``[BOS] tokens [EOS]`` (``add_bos``/``add_eos``), the documents of a
      split are concatenated and cut into blocks of ``block_size`` tokens (the last one shorter, padded);
      every token is predicted.
    - ``"jsonl"``: a record ``{prompt_key: ..., response_key: ...}`` becomes ``[BOS] prompt response [EOS]``
      (prompt and response tokenised separately), cut at ``block_size`` tokens; with ``mask_prompt`` the
      labels of BOS and prompt are -100. ``prompt_key: null`` reads the ``response_key`` field as plain text
      (all predicted). Records left without a token to predict are dropped (one warning).

    Batches are dicts (see the module docstring) padded on the right to the longest sequence (or a multiple
    of ``pad_to_multiple_of``); ``sample_index`` is a sequence's position in its split, stable as long as the
    data settings are (the offline teacher logits use it).

    **Gradient accumulation.** Training batches carry ``num_items_in_batch``, the predicted tokens of their
    accumulation group on this rank (:class:`TokenBatchLoader`). The group size is
    ``accumulate_grad_batches`` (an attribute the LM method sets from the trainer), else the attached
    trainer's, else 1.

    Args:
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``root``,
            ``download``, ``batch_size``, ``num_workers``, ``split_seed``, ``meta_split``, ...).
        batch_size: training sequences per batch.
        num_workers: DataLoader workers (0: the tokens are in memory already).
        source: ``"files"`` (``paths``) or ``"stdlib"`` (the standard library's own source).
        paths: files, folders or glob patterns (one string or a list).
        data_format: ``"text"`` or ``"jsonl"``.
        suffixes: file endings read from folders; ``None``: ``.txt .md .rst .py`` (text), ``.jsonl`` (jsonl).
        exclude: glob patterns of relative paths to leave out; ``None``: :data:`STDLIB_EXCLUDE` for the
            stdlib, nothing otherwise.
        max_files: keep at most this many files.
        max_bytes: keep files totalling at most this many bytes.
        tokenizer: ``"byte"`` or a Hugging Face tokenizer path/name.
        local_files_only: never download a Hugging Face tokenizer.
        vocab_size: ``num_classes`` to report (>= the tokenizer's size); ``None``: the tokenizer's.
        block_size: tokens per sequence (packing length for text, truncation length for JSONL).
        add_bos: start every document/record with the BOS token (when the tokenizer has one).
        add_eos: end every document/record with the EOS token (when the tokenizer has one).
        prompt_key: JSONL field of the prompt; ``None`` for records without a prompt.
        response_key: JSONL field of the response (or of the text when ``prompt_key`` is ``None``).
        mask_prompt: JSONL: do not predict BOS and prompt tokens.
        pad_to_multiple_of: pad batch widths to a multiple of this.
        val_fraction: share of documents for validation, in (0, 1).
        test_fraction: share of documents for testing, in [0, 1).
    """

    task = "language_modeling"

    def __init__(
        self,
        batch_size: int = 16,
        num_workers: int = 0,
        source: Literal["files", "stdlib"] = "files",
        paths: str | list[str] | None = None,
        data_format: Literal["text", "jsonl"] = "text",
        suffixes: list[str] | None = None,
        exclude: list[str] | None = None,
        max_files: int | None = None,
        max_bytes: int | None = None,
        tokenizer: str = "byte",
        local_files_only: bool = False,
        vocab_size: int | None = None,
        block_size: int = 128,
        add_bos: bool = True,
        add_eos: bool = True,
        prompt_key: str | None = "prompt",
        response_key: str = "response",
        mask_prompt: bool = True,
        pad_to_multiple_of: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        if source not in ("files", "stdlib"):
            raise KDConfigError(f"data.init_args.source must be 'files' or 'stdlib', got {source!r}.")
        if data_format not in ("text", "jsonl"):
            raise KDConfigError(f"data.init_args.data_format must be 'text' or 'jsonl', got {data_format!r}.")
        if source == "files" and not paths:
            raise KDConfigError(
                "data.init_args.paths is empty: give files, folders or glob patterns (or source: stdlib)."
            )
        if source == "stdlib" and data_format != "text":
            raise KDConfigError("data.init_args.source=stdlib reads Python files: data_format must be 'text'.")
        if block_size < 2:
            raise KDConfigError(f"data.init_args.block_size must be >= 2 (one token to predict), got {block_size}.")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise KDConfigError(
                "data.init_args.val_fraction must be in (0, 1) and test_fraction in [0, 1), summing to less "
                f"than 1; got {val_fraction} and {test_fraction}."
            )
        for name, value in (
            ("max_files", max_files),
            ("max_bytes", max_bytes),
            ("pad_to_multiple_of", pad_to_multiple_of),
        ):
            if value is not None and value < 1:
                raise KDConfigError(f"data.init_args.{name} must be >= 1 or null, got {value}.")
        self.source = source
        self.paths = [paths] if isinstance(paths, str) else list(paths or [])
        self.data_format = data_format
        self.suffixes = tuple(suffixes) if suffixes is not None else _DEFAULT_SUFFIXES[data_format]
        self.exclude = tuple(exclude) if exclude is not None else (STDLIB_EXCLUDE if source == "stdlib" else ())
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.tokenizer_name = tokenizer
        self.local_files_only = local_files_only
        self._vocab_size = vocab_size
        self.block_size = block_size
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.prompt_key = prompt_key
        self.response_key = response_key
        self.mask_prompt = mask_prompt
        self.pad_to_multiple_of = pad_to_multiple_of
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.input_shape = (block_size,)
        #: Micro-batches per optimizer step, for ``num_items_in_batch`` (set by the LM method; ``None``:
        #: the attached trainer's ``accumulate_grad_batches``, else 1).
        self.accumulate_grad_batches: int | None = None
        self.train_set: TokenSequences | None = None  # type: ignore[assignment]
        self.val_set: TokenSequences | None = None  # type: ignore[assignment]
        self.test_set: TokenSequences | None = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ tokenizer and sizes
    @cached_property
    def tokenizer(self) -> ByteTokenizer | HFTokenizer:
        """The tokenizer (loaded on first use)."""
        return load_tokenizer(self.tokenizer_name, self.local_files_only)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size reported to the models (``vocab_size`` argument or the tokenizer's)."""
        size = self.tokenizer.vocab_size
        if self._vocab_size is None:
            return size
        if self._vocab_size < len(self.tokenizer):
            raise KDConfigError(
                f"data.init_args.vocab_size={self._vocab_size} is smaller than the tokenizer "
                f"{self.tokenizer.name!r} ({len(self.tokenizer)} tokens)."
            )
        return self._vocab_size

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """The vocabulary size: what a model's output layer must cover."""
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    # ------------------------------------------------------------------ files
    def _root(self) -> Path:
        return Path(self.root).expanduser()

    def files(self) -> tuple[Path, list[Path]]:
        """``(base folder, document files)`` in their deterministic order, limits applied."""
        if self.source == "stdlib":
            base, files = stdlib_files(self.exclude)
        else:
            base = self._root()
            files, seen = [], set()
            for entry in self.paths:
                for path in self._expand(entry, base):
                    key = path.resolve()
                    if key not in seen:
                        seen.add(key)
                        files.append(path)
            files = [p for p in files if not _excluded(self._relative(p, base), self.exclude)]
        if not files:
            where = "the standard library" if self.source == "stdlib" else ", ".join(self.paths)
            raise DatasetNotFoundError(
                "text documents",
                base,
                self.paths or ["*.py"],
                f"No file found for {where} (suffixes {list(self.suffixes)}): check data.init_args.paths.",
            )
        return base, _limit_files(files, self.max_files, self.max_bytes, self.split_seed)

    def _expand(self, entry: str, base: Path) -> list[Path]:
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = base / path
        if any(ch in entry for ch in "*?["):
            return sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and p.name.endswith(self.suffixes)]
            return sorted(found, key=lambda p: p.relative_to(path).as_posix())
        if path.is_file():
            return [path]
        raise DatasetNotFoundError(
            "text documents", base, [entry], "The path does not exist: check data.init_args.paths and root."
        )

    @staticmethod
    def _relative(path: Path, base: Path) -> str:
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            return path.as_posix()

    def data_identity(self) -> dict[str, Any]:
        """File names and sizes (digest), tokenizer and Python version: what the config alone does not fix."""
        base, files = self.files()
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{self._relative(path, base)}:{path.stat().st_size}\n".encode())
        identity = {
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
            "digest": digest.hexdigest(),
            "tokenizer": self.tokenizer.name,
            "vocab_size": self.vocab_size,
        }
        if self.source == "stdlib":
            identity["python"] = ".".join(map(str, sys.version_info[:3]))
        return identity

    # ------------------------------------------------------------------ documents
    def documents(self) -> list[tuple[str | None, str]]:
        """Every document as ``(prompt or None, text)``, in the deterministic order of :meth:`files`."""
        _, files = self.files()
        docs: list[tuple[str | None, str]] = []
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            if self.data_format == "text":
                docs.append((None, text))
                continue
            for line_no, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise KDConfigError(f"{path}:{line_no} is not valid JSON ({err.msg}).") from err
                keys = [k for k in (self.prompt_key, self.response_key) if k is not None]
                missing = [k for k in keys if k not in record]
                if missing:
                    raise KDConfigError(
                        f"{path}:{line_no} has no field {missing[0]!r} (fields: {sorted(record)}): set "
                        "data.init_args.prompt_key / response_key."
                    )
                prompt = None if self.prompt_key is None else str(record[self.prompt_key])
                docs.append((prompt, str(record[self.response_key])))
        return docs

    def _encode(self, prompt: str | None, text: str) -> tuple[Tensor, int]:
        """``(ids, prompt_length)`` of one document, special tokens included."""
        tok = self.tokenizer
        head = [tok.bos_token_id] if self.add_bos and tok.bos_token_id is not None else []
        tail = [tok.eos_token_id] if self.add_eos and tok.eos_token_id is not None else []
        prompt_ids = tok.encode_tensor(prompt) if prompt is not None else torch.empty(0, dtype=torch.long)
        ids = torch.cat(
            [
                torch.tensor(head, dtype=torch.long),
                prompt_ids,
                tok.encode_tensor(text),
                torch.tensor(tail, dtype=torch.long),
            ]
        )
        prompt_length = len(head) + len(prompt_ids) if (prompt is not None and self.mask_prompt) else 0
        return ids.long(), prompt_length

    def _build(self, docs: list[tuple[str | None, str]], split: str) -> TokenSequences:
        encoded = [self._encode(prompt, text) for prompt, text in docs]
        if self.data_format == "text":
            flat = torch.cat([ids for ids, _ in encoded]) if encoded else torch.empty(0, dtype=torch.long)
            starts = torch.arange(0, len(flat), self.block_size)
            lengths = (len(flat) - starts).clamp(max=self.block_size)
            keep = lengths >= 2
            dataset = TokenSequences(flat.to(torch.int32), starts[keep], lengths[keep])
        else:
            kept = [(ids[: self.block_size], min(p, self.block_size)) for ids, p in encoded]
            kept = [(ids, p) for ids, p in kept if len(ids) - max(p, 1) > 0]
            dropped = len(encoded) - len(kept)
            if dropped:
                warnings.warn(
                    f"TextDataModule: {dropped} of {len(encoded)} {split} records have no token to predict within "
                    f"block_size={self.block_size} (prompt too long or empty) and were dropped.",
                    stacklevel=2,
                )
            lengths = torch.tensor([len(ids) for ids, _ in kept], dtype=torch.long)
            starts = torch.cumsum(lengths, 0) - lengths
            flat = torch.cat([ids for ids, _ in kept]) if kept else torch.empty(0, dtype=torch.long)
            prompts = torch.tensor([p for _, p in kept], dtype=torch.long)
            dataset = TokenSequences(flat.to(torch.int32), starts, lengths, prompts)
        if len(dataset) == 0:
            raise KDConfigError(
                f"the {split} split of TextDataModule has no sequence: add documents or change val_fraction / "
                "test_fraction / block_size."
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Read, split and tokenise the documents (once)."""
        if self.train_set is not None:
            return
        docs = self.documents()
        train, val, test = _split_documents(len(docs), self.val_fraction, self.test_fraction, self.split_seed)
        self.train_set = self._build([docs[i] for i in train], "train")
        self.val_set = self._build([docs[i] for i in val], "validation")
        self.test_set = self._build([docs[i] for i in test], "test") if test else self.val_set

    # ------------------------------------------------------------------ loaders
    def _collate(self) -> partial:
        return partial(collate_token_batch, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)

    def _group_size(self) -> int:
        if self.accumulate_grad_batches is not None:
            return int(self.accumulate_grad_batches)
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1

    def train_dataloader(self) -> TokenBatchLoader:
        if self.train_set is None:
            raise RuntimeError("TextDataModule.setup() did not create the train set.")
        trainer = getattr(self, "trainer", None)
        kwargs: dict[str, Any] = {"persistent_workers": True} if self.num_workers > 0 else {}
        return TokenBatchLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=self._collate(),
            accumulate_grad_batches=self._group_size(),
            limit_batches=getattr(trainer, "limit_train_batches", 1.0) if trainer is not None else 1.0,
            **kwargs,
        )

    def _eval_loader(self, dataset: Dataset | None, split: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"TextDataModule.setup() did not create the {split} set.")
        kwargs: dict[str, Any] = {"persistent_workers": True} if self.num_workers > 0 else {}
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            collate_fn=self._collate(),
            **kwargs,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set, "test")

    def hold_out(self, fraction: float, seed: int | None = None) -> Dataset:
        raise NotImplementedError("TextDataModule does not support hold_out(): set val_fraction / test_fraction.")
