"""``kd model-stats``: parameter counts and multiply-accumulates (MACs) of models on a given input shape.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on one input of the given shape
(batch size 1, eval mode) and reported as ``FLOPs / 2``. The counter covers matrix multiplications,
convolutions and attention matmuls; element-wise operations, normalisation, softmax and pooling are not
counted (the usual convention for MACs).

Examples::

    kd model-stats --model ClST --model KDCNN --model KDMobileNet --input-shape 2 128 --num-classes 11
    kd model-stats --model 'ClST {"embed_dims": [16, 32, 64]}' --input-shape 2 1024 --num-classes 24
    kd model-stats --model ResNet8x4 --input-shape 3 32 32 --num-classes 100 --json

A model is a class name of :mod:`kd_lightning.models` (or :mod:`kd_lightning.models.radioml`) or a dotted
path (``package.module.Class``), optionally followed by a JSON object of init arguments. ``num_classes``,
``in_channels`` and ``input_length`` are passed from ``--num-classes`` and ``--input-shape`` when the class
accepts them and the JSON does not set them.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kd_lightning.errors import KDConfigError

__all__ = ["build_model", "format_table", "main", "model_stats", "parse_model_spec", "resolve_class"]

_SEARCH_MODULES = ("kd_lightning.models", "kd_lightning.models.radioml")


def resolve_class(name: str) -> type[nn.Module]:
    """A model class from a short name (searched in :mod:`kd_lightning.models`) or a dotted path.

    Raises:
        ValueError: naming the model when it cannot be found.
    """
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise KDConfigError(f"model {name!r}: cannot import it ({err}).") from None
    else:
        cls = None
        for module_name in _SEARCH_MODULES:
            cls = getattr(importlib.import_module(module_name), name, None)
            if cls is not None:
                break
        if cls is None:
            raise KDConfigError(
                f"model {name!r} is not in {' or '.join(_SEARCH_MODULES)}: give a dotted path (package.module.Class)."
            )
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise KDConfigError(f"model {name!r} is not a torch.nn.Module class.")
    return cls


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"Name"`` or ``'Name {"arg": value}'`` → ``(name, init_args)``."""
    name, brace, rest = spec.partition("{")
    name = name.strip()
    if not name:
        raise KDConfigError(f"model spec {spec!r} has no class name.")
    if not brace:
        return name, {}
    try:
        init_args = json.loads(brace + rest)
    except json.JSONDecodeError as err:
        raise KDConfigError(f"model spec {spec!r}: the init arguments are not a JSON object ({err}).") from None
    if not isinstance(init_args, dict):
        raise KDConfigError(f"model spec {spec!r}: the init arguments must be a JSON object.")
    return name, init_args


def build_model(
    name: str,
    init_args: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """Instantiate ``name`` with ``init_args``, adding ``num_classes`` / ``in_channels`` / ``input_length``
    (from ``input_shape = (C, L)``) when the class accepts them and they are not given."""
    cls = resolve_class(name)
    args = dict(init_args or {})
    params = inspect.signature(cls.__init__).parameters
    derived: dict[str, Any] = {}
    if num_classes is not None:
        derived["num_classes"] = num_classes
    if input_shape:
        derived["in_channels"] = int(input_shape[0])
        if len(input_shape) == 2:
            derived["input_length"] = int(input_shape[1])
    for key, value in derived.items():
        if key in params and key not in args:
            args[key] = value
    return cls(**args)


def model_stats(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Parameters and MACs of ``model`` for one input of ``input_shape`` (no batch dimension).

    Returns:
        ``{"params", "trainable_params", "macs", "flops"}`` with ``flops = 2 · macs`` as counted by
        :class:`~torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions; see the module docstring).
    """
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    return {"params": params, "trainable_params": trainable, "macs": flops // 2, "flops": flops}


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def format_table(rows: Sequence[Mapping[str, Any]], input_shape: Sequence[int]) -> str:
    """A Markdown table of :func:`model_stats` rows (each with a ``"model"`` entry)."""
    shape = "x".join(str(s) for s in input_shape)
    lines = [
        f"| model | params | MACs (input 1x{shape}) | FLOPs (2·MACs) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['params']:,} ({_human(row['params'])}) | {_human(row['macs'])} "
            f"| {_human(row['flops'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``kd model-stats``: print the table (or JSON) and return the rows."""
    parser = argparse.ArgumentParser(
        prog="kd model-stats", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="class name or dotted path, optionally followed by a JSON object of init args; repeatable",
    )
    parser.add_argument("--input-shape", type=int, nargs="+", required=True, help="one input without batch, e.g. 2 128")
    parser.add_argument("--num-classes", type=int, default=None, help="passed as num_classes when the class takes it")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(None if argv is None else list(argv))
    if any(s < 1 for s in args.input_shape):
        parser.error(f"--input-shape must be positive, got {args.input_shape}")
    rows = []
    for spec in args.model:
        try:
            name, init_args = parse_model_spec(spec)
            model = build_model(name, init_args, args.input_shape, args.num_classes)
        except (ValueError, TypeError) as err:
            parser.error(f"--model: {err}")
        stats = model_stats(model, args.input_shape)
        label = name if not init_args else f"{name} {json.dumps(init_args, sort_keys=True)}"
        rows.append({"model": label, "class": type(model).__name__, **stats})
    if args.json:
        print(json.dumps({"input_shape": args.input_shape, "models": rows}, indent=2))
    else:
        print(format_table(rows, args.input_shape))
    return rows


if __name__ == "__main__":  # pragma: no cover
    main()
