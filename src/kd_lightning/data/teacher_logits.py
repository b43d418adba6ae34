"""Offline teacher logits for language models: top-k log-probabilities per token, computed once, memory-mapped.

The store format (written by :func:`write_teacher_logits`, read by :class:`TeacherLogitStore`; the command is
``kd lm-teacher-logits``, :mod:`kd_lightning.commands.lm_teacher_logits`). The teacher runs once in eval mode
over every sequence of a split; for every real token (``attention_mask`` true) of every sequence, in the
order of ``sample_index``:

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

import hashlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.sparse import TopKTargets, topk_targets
from kd_lightning.utils.fingerprint import json_digest, module_digest, update_with_tensor

__all__ = [
    "FORMAT",
    "TeacherLogitStore",
    "data_fingerprint",
    "teacher_fingerprint",
    "write_teacher_logits",
]

#: Name and version of the file layout (in the header; a reader refuses other versions).
FORMAT = "kd-lightning-teacher-topk"
FORMAT_VERSION = 1
STORE_FILES = ("logprobs.npy", "indices.npy", "tail_logmass.npy", "tokens.npy", "offsets.npy")


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
        missing = [name for name in STORE_FILES if not (self.path / name).is_file()]
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
            self._arrays = {name[:-4]: np.load(self.path / name, mmap_mode="r") for name in STORE_FILES}
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
