"""Exact teacher-logit storage per (training image, augmentation view): memory-mapped fp16 files.

For a finite augmentation space (CIFAR's 162 crop+flip views, :mod:`kd_lightning.data.views`) a
frozen teacher in eval mode gives the same logits for an ``(index, view)`` pair in every epoch,
so they can be computed once and read back. :class:`ViewLogitStore` is that storage: a folder

    ``<cache_dir>/<key>/logits.npy``  fp16 ``[N, V, C]`` (``np.lib.format.open_memmap``)
    ``<cache_dir>/<key>/filled.npy``  uint8 ``[N, V]``: 1 where the row holds the teacher's logits
    ``<cache_dir>/<key>/meta.json``   what the key was made of (teacher digest, data identity, ...)

keyed by :func:`cache_key` of the teacher's weights, the data set and the transform. Processes on one
machine (DDP ranks, other runs) share the files through the page cache; a folder is created under a
temporary name and renamed into place, so concurrent creators never see a half-made cache.
CIFAR-100's train set takes ``50,000 · 162 · 100 · 2 B = 1.62 GB`` (sparse on disk until filled).

Pure torch/numpy: the Lightning side is :class:`kd_lightning.callbacks.TeacherLogitCache`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.utils.fingerprint import json_digest, module_digest

__all__ = ["CACHE_FORMAT_VERSION", "ViewLogitStore", "cache_key", "teacher_digest"]

#: Version of the file layout; part of the key.
CACHE_FORMAT_VERSION = 1


def teacher_digest(teacher: nn.Module) -> str:
    """A digest of the teacher's class and every parameter and buffer (names, dtypes, shapes, values)."""
    return module_digest(teacher, length=32)


def cache_key(payload: Mapping[str, Any]) -> str:
    """A 20-hex-digit key of a JSON-able mapping (sorted keys; includes :data:`CACHE_FORMAT_VERSION`)."""
    return json_digest({"format": CACHE_FORMAT_VERSION, **payload}, length=20)


class ViewLogitStore:
    """fp16 teacher logits per ``(index, view)`` with a filled bitmap, as memory-mapped ``.npy`` files.

    Use :meth:`create` (one process) and :meth:`open` (the others, after the creator finished), or
    :meth:`open_or_create` in a single process. Rows are read with :meth:`read` and written with
    :meth:`write` (logits first, then the bitmap, so a reader that sees a row filled sees its logits).

    Args:
        folder: the cache folder (``logits.npy``, ``filled.npy``, ``meta.json``).
        writable: open the files for writing (lazy filling, full builds).
    """

    LOGITS = "logits.npy"
    FILLED = "filled.npy"
    META = "meta.json"

    def __init__(self, folder: str | Path, writable: bool = True) -> None:
        self.folder = Path(folder)
        missing = [f for f in (self.LOGITS, self.FILLED, self.META) if not (self.folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"teacher-logit cache {self.folder} lacks {', '.join(missing)}.")
        mode = "r+" if writable else "r"
        self.logits = np.load(self.folder / self.LOGITS, mmap_mode=mode)
        self.filled = np.load(self.folder / self.FILLED, mmap_mode=mode)
        self.meta = json.loads((self.folder / self.META).read_text())
        if self.logits.dtype != np.float16 or self.logits.shape[:2] != self.filled.shape:
            raise KDConfigError(
                f"teacher-logit cache {self.folder} is inconsistent: logits {self.logits.dtype} "
                f"{self.logits.shape}, filled {self.filled.shape}. Delete the folder to rebuild it."
            )

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls, folder: str | Path, num_samples: int, num_views: int, num_classes: int, meta: Mapping[str, Any]
    ) -> ViewLogitStore:
        """Create the files (sparse, zero) unless the folder already exists; then open it.

        Safe against a concurrent creator: files are made in a temporary sibling folder and renamed.
        """
        folder = Path(folder)
        if not (folder / cls.META).is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.mkdir()
            try:
                logits = np.lib.format.open_memmap(
                    tmp / cls.LOGITS, mode="w+", dtype=np.float16, shape=(num_samples, num_views, num_classes)
                )
                filled = np.lib.format.open_memmap(
                    tmp / cls.FILLED, mode="w+", dtype=np.uint8, shape=(num_samples, num_views)
                )
                logits.flush()
                filled.flush()
                del logits, filled
                full_meta = {"shape": [num_samples, num_views, num_classes], "format": CACHE_FORMAT_VERSION, **meta}
                (tmp / cls.META).write_text(json.dumps(full_meta, indent=2, sort_keys=True, default=str))
                try:
                    os.rename(tmp, folder)
                except OSError:  # another process created it first: use theirs
                    if not (folder / cls.META).is_file():
                        raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        store = cls(folder)
        expected = (num_samples, num_views, num_classes)
        if tuple(store.logits.shape) != expected:
            raise KDConfigError(
                f"teacher-logit cache {folder} has shape {tuple(store.logits.shape)}, expected {expected}; "
                "delete the folder to rebuild it."
            )
        return store

    @classmethod
    def open_or_create(
        cls, folder: str | Path, num_samples: int, num_views: int, num_classes: int, meta: Mapping[str, Any]
    ) -> ViewLogitStore:
        """:meth:`create` for a single process (it returns an existing cache as it is)."""
        return cls.create(folder, num_samples, num_views, num_classes, meta)

    # ------------------------------------------------------------------ shape
    @property
    def num_samples(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[2])

    def check_rows(self, index: np.ndarray, view: np.ndarray) -> None:
        """Raise ``IndexError`` naming the bad value when an index or view is out of range."""
        for name, values, bound in (("index", index, self.num_samples), ("view", view, self.num_views)):
            if values.size and (values.min() < 0 or values.max() >= bound):
                bad = values[(values < 0) | (values >= bound)][0]
                raise IndexError(f"teacher-logit cache {self.folder}: {name} {int(bad)} is outside 0..{bound - 1}.")

    # ------------------------------------------------------------------ rows
    def is_filled(self, index: np.ndarray, view: np.ndarray) -> np.ndarray:
        """Bool ``[B]``: whether each ``(index, view)`` row holds logits."""
        return self.filled[index, view].astype(bool)

    def read(self, index: np.ndarray, view: np.ndarray) -> np.ndarray:
        """fp16 ``[B, C]`` logits of the rows (zeros where not filled)."""
        return np.asarray(self.logits[index, view])

    def write(self, index: np.ndarray, view: np.ndarray, logits: Tensor | np.ndarray) -> None:
        """Store ``logits`` ``[B, C]`` (rounded to fp16) for the rows, then mark them filled."""
        values = logits.detach().to("cpu", torch.float16).numpy() if isinstance(logits, Tensor) else logits
        self.logits[index, view] = values.astype(np.float16, copy=False)
        self.filled[index, view] = 1

    def missing(self, views: np.ndarray | None = None) -> int:
        """Rows not yet filled, over all images and ``views`` (all views when ``None``)."""
        filled = self.filled if views is None else self.filled[:, views]
        return int(filled.size - np.count_nonzero(filled))

    def flush(self) -> None:
        """Write dirty pages to the files (``msync``)."""
        for array in (self.logits, self.filled):
            if isinstance(array, np.memmap) and array.mode != "r":
                array.flush()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.folder}, shape={tuple(self.logits.shape)})"
