"""``kd generations``: multi-generation self-distillation (Borup & Andersen, NeurIPS 2021; arXiv 2102.13088).

    kd generations --config configs/digits_self_distill.yaml --generations 5 --alpha 0.6
    kd generations --config configs/digits_self_distill.yaml --generations 5 --alpha auto --out runs/gens
    kd generations --config ... --generations 3 --alpha 0.6 --trainer.max_epochs=10   # dotted overrides pass through

Generation 0 is trained on the ground truth alone (α = 1; the teacher is neither trained nor run).
Generation k ≥ 1 is a fresh student whose teacher is generation k − 1 (its best checkpoint,
exported to ``<out>/gen<k-1>/student.pt`` and passed as ``--model.init_args.teacher_ckpt``), trained
with ground-truth weight α. Every run goes through :func:`kd_lightning.cli.run` with the config's
seed, in sequence, logging with a CSVLogger to ``<out>/<run>/``; each is tested after fitting.

``--alpha auto`` chooses α per generation on the data module's validation split (which must be a
real held-out split, not the test set): a probe run at α = 0 (teacher only) and the α = 1 run (the
ground truth only — the same training as generation 0, whose predictions are reused unless
``--probe_alpha1 train``) give held-out probabilities ``P₀`` and ``P₁``; assuming predictions
interpolate linearly in α, :func:`~kd_lightning.losses.self_distill.optimal_alpha` gives the α that
minimises the held-out MSE of ``(1 − α)P₀ + αP₁`` against the one-hot labels, clipped to [0, 1]; then
the generation is trained with it (or the probe is reused when α is 0 or 1). This estimation
procedure follows the spec's reconstruction, not a verified description of the paper's.

Writes ``<out>/generations.json`` (one entry per generation: α, validation accuracy and MSE of the
selected weights, test accuracy, checkpoints) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning.cli import run
from kd_lightning.losses.self_distill import optimal_alpha
from kd_lightning.methods.self_distill import GTSelfDistill
from kd_lightning.models.checkpoints import load_weights

__all__ = ["held_out_predictions", "main", "parse_alpha"]


def parse_alpha(text: str) -> float | str:
    """``"auto"`` or a float in [0, 1]."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alpha must be a number in [0, 1] or 'auto', got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--alpha must be in [0, 1] (the ground-truth weight), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd generations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", required=True, help="a GTSelfDistill config (e.g. configs/digits_self_distill.yaml)"
    )
    parser.add_argument(
        "--generations", type=int, required=True, help="number of generations, generation 0 included (>= 1)"
    )
    parser.add_argument(
        "--alpha", type=parse_alpha, required=True, help="ground-truth weight of generations >= 1, or 'auto'"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/generations/<config>)")
    parser.add_argument(
        "--probe_alpha1",
        choices=("reuse", "train"),
        default="reuse",
        help="--alpha auto: reuse generation 0 as the alpha=1 probe (same training) or train it again per generation",
    )
    return parser


def held_out_predictions(module: torch.nn.Module, dataloader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities ``[N, C]`` of ``module`` (eval mode, no grad) and the targets ``[N]`` of ``dataloader``."""
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    probs, targets = [], []
    try:
        with torch.no_grad():
            for batch in dataloader:
                x, y = (batch["input"], batch["target"]) if isinstance(batch, dict) else (batch[0], batch[1])
                logits = module(x.to(device))
                probs.append(F.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1).cpu())
                targets.append(torch.as_tensor(y).reshape(-1).cpu())
    finally:
        module.train(was_training)
    return torch.cat(probs), torch.cat(targets)


def _held_out_mse(probs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.mse_loss(probs, F.one_hot(targets, probs.shape[-1]).float()))


def _run(
    config: str,
    overrides: list[str],
    out: Path,
    tag: str,
    alpha: float,
    teacher_ckpt: str | None,
) -> dict[str, Any]:
    """One ``kd fit`` of the config at ground-truth weight ``alpha``; returns its record and held-out predictions."""

    run_dir = out / tag
    ground_truth_only = teacher_ckpt is None
    args = [
        "fit",
        "--config",
        config,
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={tag}",
        *overrides,
        "--test_after_fit=true",  # the table reports test accuracy
        f"--model.init_args.alpha={alpha}",
        f"--model.init_args.teacher_ckpt={teacher_ckpt if teacher_ckpt else 'null'}",
    ]
    if ground_truth_only:  # α = 1: nothing to learn from; neither train nor run the teacher
        args += ["--teacher_training.enabled=false", "--model.init_args.fidelity=false"]
    print(f"\nkd generations: {tag} (alpha={alpha:.4g}, teacher={teacher_ckpt or 'none'})", flush=True)
    cli = run(args)
    model = cli.model
    if not isinstance(model, GTSelfDistill):
        raise SystemExit(
            f"kd generations: error: {config} builds {type(model).__name__}; it needs "
            "model.class_path: kd_lightning.methods.self_distill.GTSelfDistill."
        )
    callback = cli.trainer.checkpoint_callback
    best = callback.best_model_path if isinstance(callback, ModelCheckpoint) else ""
    if best:
        load_weights(model.student, best, field=f"{tag} best checkpoint", key="student")
    student_path = model.export_student(run_dir / "student.pt")
    datamodule = cli.datamodule
    probs, targets = held_out_predictions(model.student, datamodule.val_dataloader())
    test_acc = cli.results.get("test/acc")
    return {
        "run": tag,
        "alpha": alpha,
        "val_acc": float((probs.argmax(-1) == targets).float().mean()),
        "val_mse": _held_out_mse(probs, targets),
        "test_acc": float(test_acc) if test_acc is not None else None,
        "teacher_ckpt": teacher_ckpt,
        "student_ckpt": str(student_path),
        "best_checkpoint": best or None,
        "val_is_test": getattr(datamodule, "val_set", None) is getattr(datamodule, "test_set", 0),
        "_probs": probs,
        "_targets": targets,
    }


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| generation | alpha | alpha from | val acc % | val MSE | test acc % |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['generation']} | {row['alpha']:.4f} | {row['alpha_from']} | {_pct(row['val_acc'])} | "
            f"{row['val_mse']:.5f} | {_pct(row['test_acc'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run ``kd generations``; returns the per-generation records (also written to ``generations.json``)."""
    parser = build_parser()
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.generations < 1:
        parser.error(f"--generations must be >= 1, got {args.generations}")
    for flag in ("--model.init_args.alpha", "--model.init_args.teacher_ckpt"):
        if any(o == flag or o.startswith(flag + "=") for o in overrides):
            parser.error(f"{flag} is set by kd generations (use --alpha; teachers are the previous generations)")
    config = str(Path(args.config))
    out = (args.out or Path("runs") / "generations" / Path(config).stem).resolve()
    out.mkdir(parents=True, exist_ok=True)
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]  # LightningCLI must not see this command's arguments
    rows: list[dict[str, Any]] = []
    try:
        gen0 = _run(config, overrides, out, "gen0", 1.0, None)
        rows.append({**gen0, "generation": 0, "alpha_from": "ground truth only"})
        for k in range(1, args.generations):
            teacher = rows[-1]["student_ckpt"]
            if args.alpha != "auto":
                record = _run(config, overrides, out, f"gen{k}", float(args.alpha), teacher)
                rows.append({**record, "generation": k, "alpha_from": "fixed"})
                continue
            if gen0["val_is_test"]:
                raise SystemExit(
                    "kd generations: error: --alpha auto tunes alpha on the validation split, but this data module "
                    "validates on its test split: hold out a validation split (e.g. --data.init_args.val_split=0.1)."
                )
            probe0 = _run(config, overrides, out, f"gen{k}_probe_alpha0", 0.0, teacher)
            probe1 = (
                gen0
                if args.probe_alpha1 == "reuse"
                else _run(config, overrides, out, f"gen{k}_probe_alpha1", 1.0, None)
            )
            unclipped = optimal_alpha(probe0["_probs"], probe1["_probs"], probe0["_targets"], clip=False)
            alpha = min(max(unclipped, 0.0), 1.0)
            mixed = (1 - alpha) * probe0["_probs"] + alpha * probe1["_probs"]
            estimate = {
                "alpha_unclipped": unclipped,
                "probe_val_mse": {"0": probe0["val_mse"], "1": probe1["val_mse"]},
                "probe_val_acc": {"0": probe0["val_acc"], "1": probe1["val_acc"]},
                "predicted_val_mse": _held_out_mse(mixed, probe0["_targets"]),
                "probes": [probe0["run"], probe1["run"]],
            }
            print(f"kd generations: gen{k}: estimated alpha {alpha:.4f} (unclipped {unclipped:.4f})", flush=True)
            if alpha == 0.0:
                record = {**probe0, "run": probe0["run"]}
            elif alpha == 1.0:  # the ground truth only; the teacher is not used
                record = {**probe1, "teacher_ckpt": None}
            else:
                record = _run(config, overrides, out, f"gen{k}", alpha, teacher)
            rows.append({**record, "generation": k, "alpha": alpha, "alpha_from": "auto", "estimate": estimate})
    finally:
        sys.argv = saved_argv
    public = [_public(r) for r in rows]
    summary = {"config": config, "alpha": args.alpha, "overrides": overrides, "generations": public}
    (out / "generations.json").write_text(json.dumps(summary, indent=2))
    print(f"\nkd generations: {config}, alpha {args.alpha}")
    print(format_table(public))
    if public and public[0].get("val_is_test"):
        print("note: the data module validates on its test split; val acc is test acc here.")
    print(f"Written to {out / 'generations.json'}", flush=True)
    return public
