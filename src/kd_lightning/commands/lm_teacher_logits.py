"""``kd lm-teacher-logits``: run an LM teacher once over a split and store its top-k log-probabilities.

    kd lm-teacher-logits --config configs/lm_stdlib_fkl.yaml --out runs/teacher_logits/stdlib --k 64
    kd lm-teacher-logits --config my.yaml --teacher_ckpt runs/teacher.ckpt --split train --k 32 --batch_size 32
    kd lm-teacher-logits --config my.yaml --out DIR --data.init_args.block_size=256   # dotted overrides pass through

The command parses the config like ``kd fit`` (:class:`kd_lightning.cli.KDCLI`, ``run=False``), takes the
method's ``teacher`` (with ``model.init_args.teacher_ckpt``, or ``--teacher_ckpt``, or as constructed when
``teacher_training.enabled`` is false, e.g. a pretrained ``HFCausalLM``) and the data module's split, and writes
the store described in :mod:`kd_lightning.data.teacher_logits`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import namespace_to_dict
from torch import nn

from kd_lightning.cli import KDCLI
from kd_lightning.data.teacher_logits import STORE_FILES, write_teacher_logits
from kd_lightning.errors import KDConfigError
from kd_lightning.models.checkpoints import load_weights

__all__ = ["build_parser", "main"]


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
    size = sum((args.out / name).stat().st_size for name in STORE_FILES)
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
