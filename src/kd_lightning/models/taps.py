"""Feature taps: read named intermediate tensors of any ``nn.Module`` without changing its ``forward``.

A tap name is a submodule path as listed by ``named_modules()`` (``"layer2"``, ``"layer1.0.bn2"``), which
means that module's output, or ``"<path>:input"``, which means the first positional input of that module
(for instance the pre-activation that a ``nn.ReLU`` receives). ``"<path>:output"`` is the same as
``"<path>"``. The tapped tensors keep their autograd history unless ``detach=True``.

Example::

    taps = FeatureTaps(model, ["layer1", "layer3.4.relu2:input"])
    logits, feats = taps(x)  # feats: {"layer1": ..., "layer3.4.relu2:input": ...}

    with taps:  # or as a context manager around any code that calls the model
        model(x)
    feats = taps.features

    taps.remove()  # detach the hooks from the model
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kd_lightning.errors import KDConfigError

__all__ = ["FeatureTaps", "UnknownModuleError", "module_names"]

_SUFFIXES = ("output", "input")


class UnknownModuleError(KeyError, ValueError):
    """A tap names a submodule that the model does not have (both a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def module_names(model: nn.Module) -> list[str]:
    """All submodule paths of ``model`` that can be tapped, in ``named_modules()`` order (root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def _parse(name: str) -> tuple[str, str]:
    path, sep, suffix = name.rpartition(":")
    if not sep:
        return name, "output"
    if suffix not in _SUFFIXES:
        raise KDConfigError(f"Tap {name!r}: the part after ':' must be 'input' or 'output', not {suffix!r}")
    return path, suffix


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, kind = _parse(name)
    try:
        module = model.get_submodule(path)
    except AttributeError:
        candidates = module_names(model)
        close = difflib.get_close_matches(path, candidates, n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(repr(c) for c in close)}" if close else "no close match"
        raise UnknownModuleError(
            f"{type(model).__name__} has no submodule {path!r} (tap {name!r}); {hint}. "
            f"List all {len(candidates)} names with kd_lightning.models.module_names(model)."
        ) from None
    return module, kind


def _version(value: Any) -> int | None:
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class FeatureTaps:
    """Forward hooks that collect named intermediate tensors of ``model``.

    Args:
        model: any module; it is not modified apart from the hooks.
        names: tap names (``"path"`` = output of that submodule, ``"path:input"`` = its first positional
            input). Unknown paths raise :class:`UnknownModuleError` (a ``KeyError`` and ``ValueError``)
            naming the model class and up to 5 close matches.
        detach: store detached tensors (e.g. for a frozen teacher).
        clone: store copies, for models that later overwrite a tapped tensor in place (``nn.ReLU(inplace=True)``,
            ``out += identity`` as in timm/torchvision ResNets). Without it such a tensor is detected when
            read and raises ``RuntimeError`` rather than returning the overwritten values.

    The hooks are registered once, in ``__init__``, and only record while the taps are active: during
    ``taps(x)`` or inside ``with taps:``; other forwards of the model are untouched and nothing is kept
    from them. With ``transient=True`` the hooks exist only while the taps are active, so the model
    (and anything holding the taps) stays picklable between uses, e.g. for ``ddp_spawn``. If a module
    runs several times in one forward, the last call wins. ``remove()`` takes the hooks off the model;
    using the taps again puts them back.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        detach: bool = False,
        clone: bool = False,
        transient: bool = False,
    ) -> None:
        if isinstance(names, str):
            names = [names]
        self.model = model
        self.names: tuple[str, ...] = tuple(dict.fromkeys(names))
        self.detach = detach
        self.clone = clone
        self._targets = {name: _resolve(model, name) for name in self.names}
        self._store: dict[str, tuple[Any, int | None]] = {}
        self._handles: list[RemovableHandle] = []
        self._active = 0
        self.transient = transient
        if not transient:
            self._register()

    # -- hooks -----------------------------------------------------------------------------------------
    def _register(self) -> None:
        if self._handles:
            return
        for name, (module, kind) in self._targets.items():
            if kind == "input":
                hook = self._make_input_hook(name)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._make_output_hook(name)))

    def _record(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if self.detach:
                value = value.detach()
            if self.clone:
                value = value.clone()
        self._store[name] = (value, _version(value))

    def _make_input_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._active:
                if args:
                    self._record(name, args[0])
                elif kwargs:
                    self._record(name, next(iter(kwargs.values())))

        return hook

    def _make_output_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._active:
                self._record(name, output)

        return hook

    def remove(self) -> None:
        """Remove the hooks from the model and drop stored features."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._store.clear()

    @property
    def registered(self) -> bool:
        """Whether the hooks are currently attached to the model."""
        return bool(self._handles)

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def features(self) -> dict[str, Any]:
        """The recorded features, in the order of ``names`` (taps that did not fire are left out)."""
        out: dict[str, Any] = {}
        for name in self.names:
            if name not in self._store:
                continue
            value, version = self._store[name]
            if version is not None and _version(value) != version:
                raise RuntimeError(
                    f"Tap {name!r} of {type(self.model).__name__}: the tensor was modified in place after it "
                    "was recorded (an inplace op such as ReLU(inplace=True) or +=), so it no longer holds "
                    "that module's value; create the taps with FeatureTaps(..., clone=True)"
                )
            out[name] = value
        return out

    def clear(self) -> None:
        """Drop the stored features (and the tensors they keep alive)."""
        self._store.clear()

    # -- use -------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """Run ``model(*args, **kwargs)``; return its output and ``{name: feature}`` in ``names`` order.

        The features are handed over, not kept. Raises ``RuntimeError`` if a tap did not fire.
        """
        with self:
            output = self.model(*args, **kwargs)
        feats = self.features
        self._store.clear()
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise RuntimeError(
                f"Taps {missing} of {type(self.model).__name__} did not fire: those modules were not called "
                "in this forward"
            )
        return output, feats

    def __enter__(self) -> FeatureTaps:
        self._register()
        if not self._active:
            self._store.clear()
        self._active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._active -= 1
        if self.transient and not self._active:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable between uses (``ddp_spawn``, deepcopy): hooks and stored tensors are not carried."""
        if self._handles and not self.transient:
            raise TypeError(
                "FeatureTaps with registered hooks cannot be pickled; create them with transient=True "
                "(hooks only during use) or call remove() first"
            )
        state = self.__dict__.copy()
        state["_handles"] = []
        state["_store"] = {}
        state["_active"] = 0
        return state

    def __repr__(self) -> str:
        state = "registered" if self._handles else "removed"
        return f"FeatureTaps({type(self.model).__name__}, {list(self.names)}, {state})"
