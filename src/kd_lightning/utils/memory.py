"""Tensor-level memory accounting for benchmarks (pure torch).

:class:`TensorMemoryTracker` is a ``TorchDispatchMode`` that sees every ATen operation run while it is active,
forward and backward, and registers the storage of each tensor an operation returns the first time it sees it,
adding its ``nbytes`` to a live counter (a result whose storage is one of the operation's inputs' — a view, an
in-place or ``out=`` result — adds nothing); a ``weakref.finalize`` on the storage subtracts them when the storage
is freed. ``peak`` is the largest value the counter reached. Unlike the process RSS, this does not depend on the
C allocator's caching. Used by ``benchmarks/chunked_loss.py`` and ``benchmarks/dense_kd_cost.py``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["TensorMemoryTracker"]


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created by ATen operations while active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def _track(self, tensor: torch.Tensor, input_pointers: set[int]) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        if storage.data_ptr() in input_pointers:  # a view or an in-place result of a tensor made before: not new
            self._seen[storage] = 0
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        weakref.finalize(storage, self._free, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        inputs.discard(0)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._track(leaf, inputs)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live
