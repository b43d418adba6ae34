"""Offline teacher logits for language models: top-k log-probabilities per token, computed once, memory-mapped.

    kd lm-teacher-logits --config configs/lm_stdlib_fkl.yaml --out runs/teacher_logits/stdlib --k 64
    kd lm-teacher-logits --config my.yaml --teacher_ckpt runs/teacher.ckpt --split train --k 32 --batch_size 32
    kd lm-teacher-logits --config my.yaml --out DIR --data.init_args.block_size=256   # dotted overrides pass through

The command parses the config like ``kd fit`` (:class:`kd_lightning.cli.KDCLI`, ``run=False``), takes the
method's ``teacher`` (with ``model.init_args.teacher_ckpt``, or ``--teacher_ckpt``, or as constructed when
``teacher_training.enabled`` is false, e.g. a pretrained ``HFCausalLM``) and the data module's split, runs
the teacher once in eval mode over every sequence and writes, for every real token (``attention_mask``
true) of every sequence, in the order of ``sample_index``:

==========================  =========================  ===============================================
file                        dtype, shape               content
==========================  =========================  ===============================================
``logprobs.npy``            float16 ``[tokens, k]``    the k largest ``log softmax(z_T/τ)``, descending
``indices.npy``             int32 ``[tokens, k]``      their token ids
``tail_logmass.npy``        float32 ``[tokens]``       ``log(1 − Σ_topk p) = logsumexp`` of the others
                                                       (−inf when ``k = V``)
``tokens.npy``              int32 ``[tokens]``         the input token at that position (alignment check)
``offsets.npy``             int64 ``[sequences + 1]``  sequence ``i`` is rows ``offsets[i]:offsets[i+1]``
``header.json``             JSON                       format, k, vocabulary, temperature, split,
                                                       fingerprints, the teacher and data configs
==========================  =========================  ===============================================

(``.npy`` files, read with ``numpy.load(mmap_mode="r")``: ``6k + 8`` bytes per token, 392 B at k = 64).
The folder is written under a temporary name and renamed when complete.

Position ``t`` holds the teacher's distribution *at* token ``t`` (predicting token ``t + 1``), aligned with
the batch like the logits: shift both with :meth:`TopKTargets.shifted` / ``shift_for_next_token``.

:class:`TeacherLogitStore` reads it back for a batch (``TopKTargets`` aligned with ``input_ids``) and
refuses a store whose fingerprints differ from the teacher's weights or the split's tokens it is given.
:func:`sparse_kl` is the forward KL against such targets, the tail mass being one extra bucket
(``tail="bucket"``), dropped (``"zero"``) or spread uniformly (``"uniform"``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kd_lightning.errors import KDConfigError
from kd_lightning.fingerprint import json_digest, module_digest, update_with_tensor
from kd_lightning.losses._common import check_temperature, upcast

__all__ = [
    "FORMAT",
    "TeacherLogitStore",
    "TopKTargets",
    "data_fingerprint",
    "main",
    "sparse_kl",
    "teacher_fingerprint",
    "write_teacher_logits",
]

#: Name and version of the file layout (in the header; a reader refuses other versions).
FORMAT = "kd-lightning-teacher-topk"
FORMAT_VERSION = 1
_FILES = ("logprobs.npy", "indices.npy", "tail_logmass.npy", "tokens.npy", "offsets.npy")
Tail = Literal["bucket", "zero", "uniform"]
Reduction = Literal["mean", "sum", "none"]


# ---------------------------------------------------------------------------------------------- targets
@dataclass
class TopKTargets:
    """Sparse teacher targets of a batch: ``logprobs`` and ``indices`` ``[..., k]``, ``tail_logmass`` ``[...]``.

    ``logprobs`` are float32 (read from fp16), ``indices`` int64, ``tail_logmass`` float32 (``log`` of the
    probability outside the top k; ``-inf`` when there is none). Positions without a stored token
    (padding) hold a uniform top-k with an empty tail; mask them out.
    """

    logprobs: Tensor
    indices: Tensor
    tail_logmass: Tensor

    def __post_init__(self) -> None:
        if self.logprobs.shape != self.indices.shape or self.logprobs.shape[:-1] != self.tail_logmass.shape:
            raise ValueError(
                f"TopKTargets: logprobs {tuple(self.logprobs.shape)} and indices {tuple(self.indices.shape)} must be "
                f"[..., k] with tail_logmass [...], got tail_logmass {tuple(self.tail_logmass.shape)}."
            )

    @property
    def k(self) -> int:
        return int(self.logprobs.shape[-1])

    def shifted(self) -> TopKTargets:
        """``[:, :-1]`` of ``[B, T, ...]`` targets: aligned with ``shift_for_next_token``'s logits."""
        return TopKTargets(self.logprobs[:, :-1], self.indices[:, :-1], self.tail_logmass[:, :-1])

    def to(self, device: torch.device | str) -> TopKTargets:
        return TopKTargets(self.logprobs.to(device), self.indices.to(device), self.tail_logmass.to(device))


def topk_targets(logits: Tensor, k: int, temperature: float = 1.0) -> TopKTargets:
    """Exact :class:`TopKTargets` of ``[..., V]`` logits (float32 or float64; what the writer stores before fp16)."""
    check_temperature(temperature)
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary), got {k}.")
    logp = F.log_softmax(upcast(logits) / temperature, dim=-1)
    values, indices = logp.topk(k, dim=-1)
    if k == vocab:
        tail = torch.full(logp.shape[:-1], -math.inf, dtype=logp.dtype, device=logp.device)
    else:
        tail = torch.logsumexp(logp.scatter(-1, indices, -math.inf), dim=-1)
    return TopKTargets(values, indices, tail)


# ------------------------------------------------------------------------------------------- sparse KL
def sparse_kl(
    student_logits: Tensor,
    targets: TopKTargets,
    mask: Tensor | None = None,
    tail: Tail = "bucket",
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Forward KL ``KL(p_T ‖ q)`` per token from sparse teacher targets (top-k + tail mass).

    With ``K`` the teacher's top-k tokens, ``p_i = exp(logprobs_i)`` and ``P = exp(tail_logmass)``:

    - ``"bucket"`` (default): the tokens outside ``K`` form one bucket on both sides,
      ``Σ_{i∈K} p_i log(p_i/q_i) + P log(P / Q)``, ``Q = Σ_{j∉K} q_j``. Equals the full KL when ``k = V``.
    - ``"zero"``: the teacher is renormalised over ``K`` (no mass outside), ``Σ_{i∈K} p̃_i log(p̃_i/q_i)``.
    - ``"uniform"``: ``P`` is spread evenly over the ``V − k`` other tokens.

    The teacher side (top-k and tail) is renormalised to sum to 1 first (fp16 storage leaves it off by
    about 1e-3), so every variant is ≥ 0 and 0 when the student matches the (sparse) teacher.
    ``temperature`` divides the student logits only: the teacher's targets are used as stored (write
    them at the temperature you train with).

    Args:
        student_logits: ``[..., V]``, aligned with the targets (shift both the same way).
        targets: :class:`TopKTargets` ``[..., k]``.
        mask: ``[...]`` bool, tokens that count.
        tail: ``"bucket"``, ``"zero"`` or ``"uniform"``.
        temperature: of the student's softmax.
        reduction: ``"mean"`` over the masked tokens, ``"sum"`` or ``"none"`` (zero where masked).
    """
    from kd_lightning.losses.divergences import reduce_items

    check_temperature(temperature)
    if tail not in ("bucket", "zero", "uniform"):
        raise ValueError(f"tail must be 'bucket', 'zero' or 'uniform', got {tail!r}.")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    if targets.logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.logprobs.shape)} do not match student_logits {tuple(student_logits.shape)} in "
            "their token dimensions (shift both: targets.shifted() with shift_for_next_token's logits)."
        )
    vocab, k = student_logits.shape[-1], targets.k
    if k > vocab:
        raise ValueError(f"targets have k = {k} entries per token but the student's vocabulary is {vocab}.")
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    dtype = log_q.dtype
    index = targets.indices.to(device=log_q.device, dtype=torch.long)
    lp = targets.logprobs.to(device=log_q.device, dtype=dtype)
    tail_lm = targets.tail_logmass.to(device=log_q.device, dtype=dtype)
    has_tail = torch.isfinite(tail_lm) & (k < vocab) if tail != "zero" else torch.zeros_like(tail_lm, dtype=torch.bool)
    tail_safe = torch.where(has_tail, tail_lm, torch.zeros_like(tail_lm))
    # Renormalise the teacher side: log Z = logsumexp(top-k ∪ tail).
    pieces = torch.cat([lp, torch.where(has_tail, tail_lm, torch.full_like(tail_lm, -math.inf)).unsqueeze(-1)], -1)
    log_z = torch.logsumexp(pieces, dim=-1)
    lp = lp - log_z.unsqueeze(-1)
    tail_safe = tail_safe - log_z
    lq_k = log_q.gather(-1, index)
    per_token = (lp.exp() * (lp - lq_k)).sum(-1)
    if tail != "zero" and k < vocab:
        p_tail = torch.where(has_tail, tail_safe.exp(), torch.zeros_like(tail_safe))
        if tail == "bucket":
            lq_tail = torch.logsumexp(log_q.scatter(-1, index, -math.inf), dim=-1)
            per_token = per_token + p_tail * (tail_safe - lq_tail)
        else:
            others = vocab - k
            sum_lq_tail = log_q.sum(-1) - lq_k.sum(-1)
            per_token = per_token + p_tail * (tail_safe - math.log(others)) - p_tail / others * sum_lq_tail
    if mask is not None:
        mask = mask.to(per_token.device)
    if reduction == "sum":
        return reduce_items(per_token, mask, "none").sum()
    return reduce_items(per_token, mask, reduction)


# -------------------------------------------------------------------------------------------- fingerprints
def teacher_fingerprint(teacher: nn.Module) -> str:
    """16 hex digits of the teacher's class and every parameter and buffer (names, dtypes, shapes, values)."""
    return module_digest(teacher)


def data_fingerprint(dataset: Dataset) -> str:
    """16 hex digits of the token ids of every sequence of ``dataset``, in ``sample_index`` order.

    Only the content counts (not paths, batch sizes or workers): a store written for these sequences fits
    any configuration that yields the same sequences. Fast for :class:`~kd_lightning.data.text.TokenSequences`
    (its flat arrays); other datasets are read item by item (``item["input_ids"]``).
    """
    digest = hashlib.sha256(b"sequences\n")
    if all(hasattr(dataset, a) for a in ("tokens", "starts", "lengths")):
        starts, lengths = dataset.starts.long(), dataset.lengths.long()
        tokens = dataset.tokens
        end = int((starts + lengths).max()) if len(starts) else 0
        # A sequence is tokens[start:start+length]: hash the layout and the tokens it covers.
        update_with_tensor(digest, "starts", starts)
        update_with_tensor(digest, "lengths", lengths)
        update_with_tensor(digest, "tokens", tokens[:end].to(torch.int64))
        if hasattr(dataset, "prompt_lengths"):
            update_with_tensor(digest, "prompt_lengths", dataset.prompt_lengths.long())
    else:
        for i in range(len(dataset)):  # type: ignore[arg-type]
            update_with_tensor(digest, str(i), torch.as_tensor(dataset[i]["input_ids"]).to(torch.int64))
    return digest.hexdigest()[:16]


def _sequence_lengths(dataset: Dataset) -> np.ndarray:
    if hasattr(dataset, "lengths"):
        return np.asarray(dataset.lengths, dtype=np.int64)
    return np.asarray([len(dataset[i]["input_ids"]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


def _combined(header: Mapping[str, Any]) -> str:
    payload = {key: header[key] for key in ("format", "version", "k", "vocab_size", "temperature")}
    payload["teacher"] = header["fingerprint"]["teacher"]
    payload["data"] = header["fingerprint"]["data"]
    return json_digest(payload)


# ---------------------------------------------------------------------------------------------- writer
@torch.no_grad()
def write_teacher_logits(
    teacher: nn.Module,
    dataset: Dataset,
    out: str | Path,
    k: int = 64,
    batch_size: int = 16,
    temperature: float = 1.0,
    pad_token_id: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    split: str = "train",
    description: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``teacher`` once over ``dataset`` and write the store (see the module docstring); return its header.

    Args:
        teacher: a causal LM: ``teacher(input_ids, attention_mask) -> [B, T, V]`` logits.
        dataset: items ``{"input_ids", "prompt_length", "sample_index"}`` (a ``TextDataModule`` split);
            ``sample_index`` must be the item's position.
        out: the store's folder (must not exist unless ``overwrite``).
        k: tokens kept per position, in ``[1, V]``.
        batch_size: sequences per teacher forward.
        temperature: ``τ`` of the stored ``log softmax(z_T/τ)``.
        pad_token_id: padding id of the batches.
        device: where the teacher runs.
        autocast_dtype: run the teacher under ``torch.autocast`` with this dtype (``None``: as is).
        split: name of the split, recorded in the header.
        description: JSON-able extra header entries (the teacher and data configs).
        overwrite: replace an existing store.
        progress: print a line every few batches.
    """
    from kd_lightning.data.text import collate_token_batch

    check_temperature(temperature)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another --out or pass --overwrite.")
    lengths = _sequence_lengths(dataset)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        was_training = teacher.training
        teacher.eval().to(device)
        loader = DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=False,
            collate_fn=partial(collate_token_batch, pad_token_id=pad_token_id),
        )
        arrays: dict[str, np.ndarray] = {}
        vocab = None
        started = time.perf_counter()
        for step, batch in enumerate(loader):
            ids = batch["input_ids"].to(device)
            am = batch["attention_mask"].to(device)
            with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = teacher(ids, attention_mask=am)
            if vocab is None:
                vocab = int(logits.shape[-1])
                if not 1 <= k <= vocab:
                    raise KDConfigError(f"--k must be in [1, {vocab}] (the teacher's vocabulary), got {k}.")
                arrays = {
                    "logprobs": np.lib.format.open_memmap(tmp / "logprobs.npy", "w+", np.float16, (total, k)),
                    "indices": np.lib.format.open_memmap(tmp / "indices.npy", "w+", np.int32, (total, k)),
                    "tail_logmass": np.lib.format.open_memmap(tmp / "tail_logmass.npy", "w+", np.float32, (total,)),
                    "tokens": np.lib.format.open_memmap(tmp / "tokens.npy", "w+", np.int32, (total,)),
                }
            targets = topk_targets(logits.float(), k, temperature)
            real = batch["attention_mask"].bool()
            rows = _rows(offsets, batch["sample_index"].numpy(), real.sum(1).numpy(), "dataset")
            arrays["logprobs"][rows] = targets.logprobs[real.to(device)].cpu().numpy().astype(np.float16)
            arrays["indices"][rows] = targets.indices[real.to(device)].cpu().numpy().astype(np.int32)
            arrays["tail_logmass"][rows] = targets.tail_logmass[real.to(device)].cpu().numpy().astype(np.float32)
            arrays["tokens"][rows] = batch["input_ids"][real].numpy().astype(np.int32)
            if progress and (step % 50 == 0 or step == len(loader) - 1):
                print(f"kd lm-teacher-logits: batch {step + 1}/{len(loader)}", flush=True)
        teacher.train(was_training)
        if vocab is None:
            raise KDConfigError(f"the {split} split has no sequence: nothing to write.")
        for array in arrays.values():
            array.flush()
        del arrays
        np.save(tmp / "offsets.npy", offsets)
        header: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "k": k,
            "vocab_size": vocab,
            "temperature": float(temperature),
            "split": split,
            "num_sequences": len(lengths),
            "num_tokens": total,
            "bytes_per_token": 6 * k + 8,
            "fingerprint": {"teacher": teacher_fingerprint(teacher), "data": data_fingerprint(dataset)},
            "teacher_class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
            "seconds": round(time.perf_counter() - started, 3),
            **(dict(description) if description else {}),
        }
        header["fingerprint"]["combined"] = _combined(header)
        (tmp / "header.json").write_text(json.dumps(header, indent=2, sort_keys=True, default=str))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return header


def _rows(offsets: np.ndarray, sample_index: np.ndarray, counts: np.ndarray, where: str) -> np.ndarray:
    """Flat token rows of the given sequences (their real tokens, in order), checking the counts."""
    sample_index = np.asarray(sample_index, dtype=np.int64)
    n = len(offsets) - 1
    bad = (sample_index < 0) | (sample_index >= n)
    if bad.any():
        raise KDConfigError(
            f"sample_index {int(sample_index[bad][0])} is outside the {where}'s {n} sequences: the store was "
            "written for another split or data set."
        )
    starts = offsets[sample_index]
    stored = offsets[sample_index + 1] - starts
    counts = np.asarray(counts, dtype=np.int64)
    wrong = stored != counts
    if wrong.any():
        i = int(np.argmax(wrong))
        raise KDConfigError(
            f"sequence {int(sample_index[i])} has {int(counts[i])} real tokens in the batch but {int(stored[i])} in "
            f"the {where}: the data changed since the teacher logits were written."
        )
    # rows = concat(arange(start_b, start_b + count_b))
    total = int(counts.sum())
    first = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return first + np.arange(total, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- reader
class TeacherLogitStore:
    """Read a store written by :func:`write_teacher_logits` / ``kd lm-teacher-logits``.

    Args:
        path: the store's folder.
        teacher: when given, its :func:`teacher_fingerprint` must be the store's.
        dataset: when given (the split the batches come from), its :func:`data_fingerprint` must be the store's.
        fingerprint: when given, the store's combined fingerprint (``header["fingerprint"]["combined"]``).
        k: when given, the store's ``k``.
        vocab_size: when given, the store's vocabulary.
        verify_tokens: compare each batch's tokens with the stored ones in :meth:`targets`.

    Raises:
        KDConfigError: a missing or incomplete store, another format version, or a fingerprint (or ``k``,
            vocabulary) that does not match, naming both values.
    """

    def __init__(
        self,
        path: str | Path,
        teacher: nn.Module | None = None,
        dataset: Dataset | None = None,
        fingerprint: str | None = None,
        k: int | None = None,
        vocab_size: int | None = None,
        verify_tokens: bool = True,
    ) -> None:
        self.path = Path(path)
        header_file = self.path / "header.json"
        if not header_file.is_file():
            raise KDConfigError(
                f"no teacher-logit store at {self.path} (header.json missing): write one with `kd lm-teacher-logits`."
            )
        self.header: dict[str, Any] = json.loads(header_file.read_text())
        if self.header.get("format") != FORMAT or self.header.get("version") != FORMAT_VERSION:
            raise KDConfigError(
                f"{self.path} is not a {FORMAT} store of version {FORMAT_VERSION} "
                f"(format {self.header.get('format')!r}, version {self.header.get('version')!r}): write it again."
            )
        missing = [name for name in _FILES if not (self.path / name).is_file()]
        if missing:
            raise KDConfigError(f"the teacher-logit store {self.path} is incomplete: {missing} missing.")
        self.verify_tokens = verify_tokens
        self.check(teacher=teacher, dataset=dataset, fingerprint=fingerprint, k=k, vocab_size=vocab_size)
        self._arrays: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ header
    @property
    def k(self) -> int:
        return int(self.header["k"])

    @property
    def vocab_size(self) -> int:
        return int(self.header["vocab_size"])

    @property
    def temperature(self) -> float:
        return float(self.header["temperature"])

    @property
    def fingerprint(self) -> dict[str, str]:
        return dict(self.header["fingerprint"])

    def __len__(self) -> int:
        return int(self.header["num_sequences"])

    def check(
        self,
        teacher: nn.Module | None = None,
        dataset: Dataset | None = None,
        fingerprint: str | None = None,
        k: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """Raise :class:`KDConfigError` unless every given item matches the store."""
        stored = self.header["fingerprint"]
        problems = []
        if teacher is not None and (got := teacher_fingerprint(teacher)) != stored["teacher"]:
            problems.append(
                f"teacher fingerprint {got} ({type(teacher).__name__}) differs from the store's {stored['teacher']} "
                "(other teacher weights)"
            )
        if dataset is not None and (got := data_fingerprint(dataset)) != stored["data"]:
            problems.append(
                f"data fingerprint {got} differs from the store's {stored['data']} (other sequences: data, "
                f"tokenizer, block size or split; the store holds split {self.header.get('split')!r})"
            )
        if fingerprint is not None and fingerprint != stored["combined"]:
            problems.append(f"fingerprint {fingerprint} differs from the store's {stored['combined']}")
        if k is not None and k != self.k:
            problems.append(f"k={k} but the store keeps k={self.k}")
        if vocab_size is not None and vocab_size != self.vocab_size:
            problems.append(f"vocabulary {vocab_size} but the store's teacher has {self.vocab_size}")
        if problems:
            raise KDConfigError(
                f"the teacher-logit store {self.path} does not match: " + "; ".join(problems) + ". Write it again "
                "with `kd lm-teacher-logits` for this teacher and data."
            )

    # ------------------------------------------------------------------ reading
    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The memory-mapped arrays (opened on first use, in each process)."""
        if self._arrays is None:
            self._arrays = {name[:-4]: np.load(self.path / name, mmap_mode="r") for name in _FILES}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers / DDP spawn re-open the memory maps
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def targets(self, batch: Mapping[str, Tensor], device: torch.device | str | None = None) -> TopKTargets:
        """:class:`TopKTargets` ``[B, T, k]`` aligned with ``batch["input_ids"]`` (rows by ``sample_index``).

        The real tokens of each row (``attention_mask`` true, right or left padded) receive the stored
        positions of its sequence in order. Raises :class:`KDConfigError` when a sequence is not in the
        store, has another length, or (``verify_tokens``) other tokens.
        """
        if "sample_index" not in batch:
            raise KDConfigError(
                "the batch has no 'sample_index': offline teacher logits need a data module that numbers its "
                "sequences (TextDataModule does)."
            )
        ids = batch["input_ids"]
        device = ids.device if device is None else device
        real = batch.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.bool()
        real_cpu = real.cpu()
        arrays = self.arrays
        rows = _rows(arrays["offsets"], batch["sample_index"].cpu().numpy(), real_cpu.sum(1).numpy(), "store")
        if self.verify_tokens:
            stored_tokens = torch.from_numpy(np.asarray(arrays["tokens"][rows], dtype=np.int64))
            given = ids.cpu()[real_cpu]
            if not torch.equal(stored_tokens, given):
                raise KDConfigError(
                    f"the batch's tokens differ from those the teacher logits of {self.path} were computed on "
                    "(same sample_index, other text): the data or tokenizer changed; write the store again."
                )
        k = self.k
        shape = (*ids.shape, k)
        logprobs = torch.full(shape, -math.log(k), dtype=torch.float32)
        indices = torch.arange(k, dtype=torch.long).expand(shape).clone()
        tail = torch.full(ids.shape, -math.inf, dtype=torch.float32)
        logprobs[real_cpu] = torch.from_numpy(np.asarray(arrays["logprobs"][rows], dtype=np.float32))
        indices[real_cpu] = torch.from_numpy(np.asarray(arrays["indices"][rows], dtype=np.int64))
        tail[real_cpu] = torch.from_numpy(np.asarray(arrays["tail_logmass"][rows], dtype=np.float32))
        return TopKTargets(logprobs, indices, tail).to(device)

    def __repr__(self) -> str:
        return (
            f"TeacherLogitStore({str(self.path)!r}, split={self.header.get('split')!r}, sequences={len(self)}, "
            f"tokens={self.header.get('num_tokens')}, k={self.k}, vocab={self.vocab_size})"
        )


# --------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd lm-teacher-logits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", action="append", required=True, help="a kd fit config (repeatable, like kd fit)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the store (must not exist)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="train")
    parser.add_argument("--k", type=int, default=64, help="top-k tokens stored per position (default 64)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the data module's eval_batch_size")
    parser.add_argument("--temperature", type=float, default=1.0, help="τ of the stored log-softmax (default 1)")
    parser.add_argument("--teacher_ckpt", default=None, help="teacher weights (overrides model.init_args.teacher_ckpt)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--precision", choices=("32", "bf16", "16"), default="32", help="autocast of the teacher")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    return parser


def _teacher_and_data(args: argparse.Namespace, overrides: Sequence[str]) -> tuple[nn.Module, Any, dict[str, Any]]:
    from jsonargparse import namespace_to_dict

    from kd_lightning.cli import KDCLI
    from kd_lightning.teachers import load_weights

    cli_args: list[str] = []
    for config in args.config:
        cli_args += ["--config", config]
    cli_args += [*overrides, "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    cli = KDCLI(run=False, args=cli_args)
    teacher = getattr(cli.model, "teacher", None)
    if not isinstance(teacher, nn.Module):
        raise KDConfigError(
            f"{type(cli.model).__name__} has no teacher: give a distillation config (model.init_args.teacher)."
        )
    config = cli.config
    init_args = config["model"]["init_args"]
    ckpt = args.teacher_ckpt or init_args.get("teacher_ckpt")
    if args.teacher_ckpt:
        load_weights(teacher, args.teacher_ckpt, "--teacher_ckpt")
    elif not ckpt:
        training = config.get("teacher_training")
        if training is None or training.get("enabled", True):
            raise KDConfigError(
                "no teacher weights: set model.init_args.teacher_ckpt or pass --teacher_ckpt (a teacher that `kd fit` "
                "trained is cached under teacher_training.cache_dir; its path is printed by the fit), or set "
                "teacher_training.enabled=false to use the teacher as constructed (e.g. a pretrained HFCausalLM)."
            )
    data_config = namespace_to_dict(config["data"]) if hasattr(config["data"], "items") else config["data"]
    teacher_config = init_args.get("teacher")
    description = {
        "teacher_ckpt": str(ckpt) if ckpt else None,
        "teacher_config": namespace_to_dict(teacher_config) if hasattr(teacher_config, "items") else teacher_config,
        "data_config": data_config,
        "configs": [str(c) for c in args.config],
    }
    return teacher, cli.datamodule, description


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``kd lm-teacher-logits``: write the store, print a summary and return its header."""
    import sys

    parser = build_parser()
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    teacher, datamodule, description = _teacher_and_data(args, overrides)
    datamodule.setup("fit")
    dataset = {"train": "train_set", "val": "val_set", "test": "test_set"}[args.split]
    data = getattr(datamodule, dataset, None)
    if data is None:
        raise KDConfigError(f"{type(datamodule).__name__} has no {args.split} split ({dataset} is empty after setup).")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[args.precision]
    header = write_teacher_logits(
        teacher,
        data,
        args.out,
        k=args.k,
        batch_size=args.batch_size or getattr(datamodule, "eval_batch_size", None) or 16,
        temperature=args.temperature,
        pad_token_id=int(getattr(datamodule, "pad_token_id", 0)),
        device=device,
        autocast_dtype=autocast,
        split=args.split,
        description={**description, "data_identity": _identity(datamodule)},
        overwrite=args.overwrite,
        progress=True,
    )
    size = sum((args.out / name).stat().st_size for name in _FILES)
    print(
        f"kd lm-teacher-logits: wrote {args.out} — split {args.split}, {header['num_sequences']} sequences, "
        f"{header['num_tokens']} tokens, k={args.k} of {header['vocab_size']}, {size / 2**20:.1f} MiB "
        f"({size / max(header['num_tokens'], 1):.0f} B/token), fingerprint {header['fingerprint']['combined']} "
        f"in {header['seconds']:.1f} s",
        flush=True,
    )
    return header


def _identity(datamodule: Any) -> Any:
    try:
        return datamodule.data_identity() if hasattr(datamodule, "data_identity") else None
    except Exception as err:  # informative only
        return f"unavailable: {err}"
