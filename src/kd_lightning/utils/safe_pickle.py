"""A restricted unpickler for the published dataset pickles (CIFAR python batches, RadioML 2016).

Those releases *are* pickles, so a downloaded file can carry code: ``pickle.load`` calls whatever
``module.name`` the file names (``os.system`` through ``__reduce__``, for instance) while loading.
:func:`restricted_load` resolves only what plain data needs — dicts, lists, tuples, str/bytes, numbers
(built into the pickle opcodes) and numpy arrays, dtypes and scalars — and refuses every other global
before anything is called, with :class:`UnsafePickleError` naming it.
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["ALLOWED_GLOBALS", "UnsafePickleError", "restricted_load"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside :data:`ALLOWED_GLOBALS` (it could run code when loaded)."""


def _numpy_core(submodule: str, name: str) -> Any:
    for module in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"numpy has no {submodule}.{name}")  # pragma: no cover - numpy always has both


def _numpy(name: str) -> Any:
    import numpy

    return getattr(numpy, name)


#: ``(module, name)`` pairs a data pickle may name, with how each is resolved (never by importing the
#: module the file asks for: numpy 1 and numpy 2 spell the array reconstructor differently).
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): lambda: _numpy("ndarray"),
    ("numpy", "dtype"): lambda: _numpy("dtype"),
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_core("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_core("multiarray", "scalar"),
    # Protocol 5 (Python 3.14's default) stores arrays as ``_frombuffer(bytes, dtype, shape, order)``.
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_core("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_core("numeric", "_frombuffer"),
    # Protocol-2 pickles written by Python 3 encode ``bytes`` as ``_codecs.encode(text, "latin1")``.
    ("_codecs", "encode"): lambda: codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        resolve = ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise UnsafePickleError(
                f"{self.source}: refused to load {module}.{name}: a data pickle may hold only arrays, dicts, "
                "lists, strings and numbers, and this one names code that would run while loading. Do not use "
                "this file; download the dataset again from its official source."
            )
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refused a persistent id in a data pickle.")


def restricted_load(file: str | Path | BinaryIO | bytes) -> Any:
    """Unpickle ``file`` (a path, an open binary file or the bytes) admitting only plain data and numpy arrays.

    Python 2 pickles are read with ``encoding="latin1"`` (how the CIFAR and RadioML 2016 releases are written).

    Raises:
        UnsafePickleError: the pickle names any other global (the file may carry code; nothing of it ran).
    """
    if isinstance(file, bytes):
        return _RestrictedUnpickler(io.BytesIO(file), "<bytes>").load()
    if isinstance(file, (str, Path)):
        with Path(file).open("rb") as handle:
            return _RestrictedUnpickler(handle, str(file)).load()
    return _RestrictedUnpickler(file, getattr(file, "name", "<file>")).load()
