"""Run a network from an intermediate layer on: replace the hidden state at a named layer, keep the rest.

``run_with_substitute(model, layer, x, hidden)`` calls ``model(x)`` with a temporary hook that replaces the
tensor at ``layer`` by ``hidden``: the output of the submodule ``layer`` (forward hook), or, for
``"<path>:input"``, the first positional input of that submodule (forward pre-hook). Everything after the
layer then computes on ``hidden``: this is "the rest of the network after the tap" (``S_{>l}(h)``) for any
``nn.Module`` whose ``forward`` cannot be split. Layer names are those of
:class:`~kd_lightning.models.taps.FeatureTaps`. The hooks are removed in a ``finally``, also on errors.

The layers before the tap still run on ``x`` (their result is thrown away). ``grad_from_tap=True`` runs
them without autograd and switches it on at the tap, so the discarded prefix costs compute but no memory;
``preserve_buffers=True`` runs the pass on copies of the buffers (BatchNorm running statistics of a network in
training mode are then not moved by it, and the original buffers are not written: needed when an earlier forward
of the same network awaits its backward).

Example::

    h = torch.randn(8, 128)  # e.g. a decoded message, shaped like SmallCNN's penultimate feature
    logits = run_with_substitute(model, "fc:input", x, h)  # == model.fc(h)
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.models.taps import UnknownModuleError, module_names

__all__ = ["preserved_buffers", "resolve_layer", "run_with_substitute", "substituted"]


class _StopForward(Exception):
    """Raised by a capture hook to end a forward early once the wanted tensor is read."""


def resolve_layer(model: nn.Module, layer: str) -> tuple[nn.Module, str]:
    """``(submodule, "input" | "output")`` of a tap name ``"path"``, ``"path:output"`` or ``"path:input"``.

    Raises:
        UnknownModuleError: ``model`` has no such submodule (names up to 5 close matches).
        KDConfigError: the part after ``:`` is neither ``input`` nor ``output``.
    """
    path, sep, suffix = layer.rpartition(":")
    if not sep:
        path, suffix = layer, "output"
    if suffix not in ("input", "output"):
        raise KDConfigError(f"Layer {layer!r}: the part after ':' must be 'input' or 'output', not {suffix!r}")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        close = difflib.get_close_matches(path, module_names(model), n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(repr(c) for c in close)}" if close else "no close match"
        raise UnknownModuleError(
            f"{type(model).__name__} has no submodule {path!r} (layer {layer!r}); {hint}. "
            "List the names with kd_lightning.models.module_names(model)."
        ) from None
    return module, suffix


def _check_shape(layer: str, original: Any, hidden: Tensor) -> None:
    if isinstance(original, Tensor) and original.shape != hidden.shape:
        raise KDConfigError(
            f"run_with_substitute: the hidden state for layer {layer!r} has shape {tuple(hidden.shape)} but the "
            f"network computes {tuple(original.shape)} there; give a tensor of that shape"
        )


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes on copies of its buffers, dropped afterwards: its own buffer tensors
    (BatchNorm running statistics) are neither changed nor even written, so autograd graphs of earlier forwards
    that saved them stay valid (an in-place update would fail their backward)."""
    saved = []
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                saved.append((module, name, buf))
                module._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for module, name, buf in saved:
            module._buffers[name] = buf


@contextlib.contextmanager
def substituted(model: nn.Module, layer: str, hidden: Tensor, *, grad_from_tap: bool = False) -> Iterator[dict]:
    """While active, every call of ``model`` computes on ``hidden`` at ``layer`` (see the module docstring).

    Yields a dict whose ``"fired"`` counts the substitutions made. With ``grad_from_tap`` the block runs without
    autograd until the tap, and with the caller's autograd mode from the tap on. A submodule that runs several
    times in one forward is replaced every time.
    """
    module, kind = resolve_layer(model, layer)
    grad_wanted = torch.is_grad_enabled()
    state = {"fired": 0}

    def enter_suffix() -> None:
        state["fired"] += 1
        if grad_from_tap:
            torch.set_grad_enabled(grad_wanted)

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        enter_suffix()
        if args:
            _check_shape(layer, args[0], hidden)
            return (hidden, *args[1:]), kwargs
        if not kwargs:
            raise KDConfigError(f"run_with_substitute: {layer!r} is called without an input to replace")
        key = next(iter(kwargs))
        _check_shape(layer, kwargs[key], hidden)
        return args, {**kwargs, key: hidden}

    def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
        _check_shape(layer, output, hidden)
        enter_suffix()
        return hidden

    if kind == "input":
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = module.register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(grad_wanted and not grad_from_tap):
            yield state
    finally:
        handle.remove()


def run_with_substitute(
    model: nn.Module,
    layer: str,
    x: Any,
    hidden: Tensor,
    *,
    until: str | None = None,
    grad_from_tap: bool = False,
    preserve_buffers: bool = False,
    constant_params: bool = False,
) -> Any:
    """``model(x)`` with the tensor at ``layer`` replaced by ``hidden``: the network after the tap on ``hidden``.

    Args:
        model: any module; only temporary hooks are added (none is left behind).
        layer: tap name (``"blocks.1"`` = that submodule's output, ``"fc:input"`` = its first input).
        x: the network input (the layers before the tap run on it; their result is discarded).
        hidden: the substitute, of exactly the shape the network computes at ``layer``.
        until: a later tap name: return the tensor there instead of the output, and stop the forward there.
        grad_from_tap: run the layers before the tap without autograd (they do not feed the result).
        preserve_buffers: run on copies of the model's buffers (no BatchNorm statistics of the pass, and no
            in-place write that would break the backward of an earlier forward of ``model``).
        constant_params: use the model's parameters as constants (``torch.func.functional_call`` with detached
            copies): the gradient reaches ``hidden`` but none of the model's parameters.

    Returns:
        the model's output (or the tensor at ``until``), a function of ``hidden``.

    Raises:
        UnknownModuleError: ``layer`` or ``until`` names no submodule.
        KDConfigError: ``hidden`` has the wrong shape; ``until`` runs before ``layer``.
        RuntimeError: ``layer`` (or ``until``) is not called in ``model``'s forward.
    """
    handles = []
    captured: dict[str, Any] = {}
    buffers = preserved_buffers(model) if preserve_buffers else contextlib.nullcontext()
    with buffers, substituted(model, layer, hidden, grad_from_tap=grad_from_tap) as state:
        if until is not None:
            target, kind = resolve_layer(model, until)

            def capture(value: Any) -> None:
                if not state["fired"]:
                    raise KDConfigError(
                        f"run_with_substitute: layer {until!r} runs before {layer!r} in "
                        f"{type(model).__name__}'s forward, so it does not depend on the substitute; "
                        "pick a later layer"
                    )
                captured["value"] = value
                raise _StopForward

            if kind == "input":
                handles.append(target.register_forward_pre_hook(lambda m, args: capture(args[0]), prepend=True))
            else:
                handles.append(target.register_forward_hook(lambda m, args, out: capture(out)))
        try:
            if constant_params:
                constants = {name: p.detach() for name, p in model.named_parameters()}
                output = torch.func.functional_call(model, constants, (x,))
            else:
                output = model(x)
        except _StopForward:
            return captured["value"]
        finally:
            for handle in handles:
                handle.remove()
        if not state["fired"]:
            raise RuntimeError(f"{type(model).__name__}: layer {layer!r} was not called in the forward")
        if until is not None:
            raise RuntimeError(f"{type(model).__name__}: layer {until!r} was not called in the forward")
        return output
