"""Canary leakage of distilled students: vanilla KD vs Swing Distillation, on the digits data (CPU, minutes).

The privacy claim of Swing Distillation (Li et al. 2022, arXiv 2212.08349 — our implementation is an
UNVERIFIED reconstruction) in miniature:

1. Canaries: ``--canaries`` training images get a secret wrong label (drawn per seed) and are
   inserted ``--repeats`` times into the training set, so that the teacher memorises them.
   As many test images get a secret wrong label too but are never inserted: the *reference*
   canaries, whose numbers show what a model that never saw a secret predicts.
2. A teacher (the digits recipe's SmallCNN 32-64-128) is trained on this set with cross-entropy.
3. Students (SmallCNN, ``--student-widths``) are distilled from it on the same training inputs with
   weight ``--kd-weight`` on the soft targets (default 1: soft targets only, so a secret can reach
   the student only through the teacher): vanilla KD at T = ``--temperature``, and Swing variants
   with the canaries flagged private (π = 1 for every copy, 0 elsewhere; per-sample scores looked up
   by dataset index) — T_min = ``--temperature``, T_max = ``--t-max``, Laplace noise Δ/ε — and its
   ablations: temperature only (no noise), noise only (T_max = T_min) and "student at T=1"
   (``soften_student=False``: the flattened target against the student's plain softmax).
4. Leakage on the canary images: mean probability of the secret label, mean rank of the secret
   label among the 10 classes, fraction predicted as the secret label, and an exposure in the
   style of Carlini et al. (2019) with the 10 labels as the candidate space:
   ``log2(10) − log2(rank)`` (3.32 = the secret ranks first, 0 = it ranks last), averaged over
   canaries; "excess" exposure subtracts the reference canaries' exposure of the same model.
   Plus clean test accuracy (true labels).

    python benchmarks/swing_canary.py                          # 3 seeds, writes runs/swing_canary/
    python benchmarks/swing_canary.py --seeds 0 --epochs 10    # quicker

Prints a table (mean ± std over seeds) and writes ``<out>/swing_canary.json``. Fit times are wall
clock and depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.data import DigitsDataModule
from kd_lightning.data.base import TensorImageDataset
from kd_lightning.methods import DistillationModule, Supervised
from kd_lightning.methods.swing import SwingKD
from kd_lightning.methods.vanilla_kd import VanillaKD
from kd_lightning.models import SmallCNN

NUM_CLASSES = 10


class CanaryDigits(DigitsDataModule):
    """Digits with canaries: ``n`` training images relabelled with a secret label, each inserted ``repeats`` times.

    After :meth:`setup`: ``canary_images``/``canary_secrets`` (the inserted ones, one row per unique
    canary), ``reference_images``/``reference_secrets`` (test images with a secret label, never
    inserted) and ``privacy`` (1 for every canary copy in the training set, 0 elsewhere).
    """

    def __init__(self, canaries: int, repeats: int, canary_seed: int, **kwargs: Any) -> None:
        super().__init__(return_index=True, **kwargs)
        self.canaries = canaries
        self.repeats = repeats
        self.canary_seed = canary_seed

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "privacy", None) is not None:
            return
        super().setup(stage)
        g = torch.Generator().manual_seed(self.canary_seed)
        train: TensorImageDataset = self.train_set  # type: ignore[assignment]
        test: TensorImageDataset = self.test_set  # type: ignore[assignment]

        def secret_labels(true: torch.Tensor) -> torch.Tensor:  # a wrong label, uniform over the other 9
            return (true + torch.randint(1, NUM_CLASSES, true.shape, generator=g)) % NUM_CLASSES

        picked = torch.randperm(len(train), generator=g)[: self.canaries]
        secrets = secret_labels(train.targets[picked])
        images, targets = train.images.clone(), train.targets.clone()
        targets[picked] = secrets
        extra = picked.repeat(self.repeats - 1)
        images = torch.cat([images, images[extra]])
        targets = torch.cat([targets, targets[extra]])
        privacy = torch.zeros(len(targets))
        privacy[picked] = 1.0
        privacy[len(train) :] = 1.0
        self.train_set = TensorImageDataset(images, targets, train.transform, return_index=True)
        self.privacy = privacy
        self.canary_images, self.canary_secrets, self.canary_true = train.images[picked], secrets, train.targets[picked]
        ref = torch.randperm(len(test), generator=g)[: self.canaries]
        self.reference_images, self.reference_secrets = test.images[ref], secret_labels(test.targets[ref])


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def optimiser(epochs: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The digits recipe: AdamW lr 3e-3, wd 1e-4, cosine over the run."""
    return (
        lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=1e-4),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs),
    )


@torch.no_grad()
def leakage(model: nn.Module, images: torch.Tensor, secrets: torch.Tensor) -> dict[str, float]:
    """Probability, rank, hit rate and exposure of the secret labels on ``images``."""
    model.eval()
    probs = F.softmax(model(images).float(), dim=-1)
    secret_p = probs.gather(1, secrets[:, None]).squeeze(1)
    rank = 1 + (probs > secret_p[:, None]).sum(1).float()
    exposure = math.log2(NUM_CLASSES) - torch.log2(rank)
    return {
        "p_secret": float(secret_p.mean()),
        "rank": float(rank.mean()),
        "hit": float((probs.argmax(1) == secrets).float().mean()),
        "exposure": float(exposure.mean()),
    }


@torch.no_grad()
def accuracy(model: nn.Module, dm: CanaryDigits) -> float:
    model.eval()
    test: TensorImageDataset = dm.test_set  # type: ignore[assignment]
    return float((model(test.images).argmax(1) == test.targets).float().mean())


def measure(name: str, model: nn.Module, dm: CanaryDigits, fit_seconds: float) -> dict[str, Any]:
    canary = leakage(model, dm.canary_images, dm.canary_secrets)
    reference = leakage(model, dm.reference_images, dm.reference_secrets)
    with torch.no_grad():
        model.eval()
        canary_true_acc = float((model(dm.canary_images).argmax(1) == dm.canary_true).float().mean())
    return {
        "model": name,
        "test_acc": accuracy(model, dm),
        **{f"canary_{k}": v for k, v in canary.items()},
        **{f"reference_{k}": v for k, v in reference.items()},
        "excess_exposure": canary["exposure"] - reference["exposure"],
        "canary_true_label_acc": canary_true_acc,
        "fit_seconds": fit_seconds,
    }


def fit(module: DistillationModule, dm: CanaryDigits, epochs: int, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    started = time.perf_counter()
    trainer(epochs).fit(module, datamodule=dm)
    return time.perf_counter() - started


def student(widths: list[int]) -> SmallCNN:
    return SmallCNN(in_channels=1, widths=widths, num_classes=NUM_CLASSES)


def run_seed(seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    dm = CanaryDigits(args.canaries, args.repeats, canary_seed=1000 + seed, batch_size=64)
    dm.setup("fit")
    opt, sched = optimiser(args.teacher_epochs)
    L.seed_everything(seed, verbose=False)
    teacher_net = SmallCNN(in_channels=1, widths=[32, 64, 128], num_classes=NUM_CLASSES, dropout=0.2)
    teacher = Supervised(teacher_net, optimizer=opt, lr_scheduler=sched)
    rows = [measure("teacher", teacher_net, dm, fit(teacher, dm, args.teacher_epochs, seed))]
    opt, sched = optimiser(args.epochs)
    w_kd = args.kd_weight
    swing_common = dict(privacy_scores=dm.privacy, t_min=args.temperature, t_max=args.t_max, alpha=w_kd)
    variants: dict[str, Callable[[], DistillationModule]] = {
        "KD": lambda: VanillaKD(
            student(args.student_widths), teacher_net, temperature=args.temperature,
            ce_weight=1 - w_kd, kd_weight=w_kd, optimizer=opt, lr_scheduler=sched,
        ),
        "Swing": lambda: SwingKD(
            student(args.student_widths), teacher_net, **swing_common, epsilon=args.epsilon,
            optimizer=opt, lr_scheduler=sched,
        ),
        "Swing, temperature only": lambda: SwingKD(
            student(args.student_widths), teacher_net, **swing_common, noise="none", optimizer=opt, lr_scheduler=sched,
        ),
        "Swing, noise only": lambda: SwingKD(
            student(args.student_widths), teacher_net, **{**swing_common, "t_max": args.temperature},
            epsilon=args.epsilon, optimizer=opt, lr_scheduler=sched,
        ),
        "Swing, student at T=1": lambda: SwingKD(
            student(args.student_widths), teacher_net, **swing_common, epsilon=args.epsilon, soften_student=False,
            optimizer=opt, lr_scheduler=sched,
        ),
    }  # fmt: skip
    for name in args.variants or list(variants):
        L.seed_everything(seed, verbose=False)
        module = variants[name]()
        seconds = fit(module, dm, args.epochs, seed)
        rows.append(measure(name, module.student, dm, seconds))
    for row in rows:
        row["seed"] = seed
        print(json.dumps(row), flush=True)
    return rows


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = scale * statistics.fmean(values)
    std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | test acc % | P(secret) on canaries | secret rank (1-10) | predicted = secret % | "
        "exposure (max 3.32) | excess exposure | reference exposure | fit s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == name]

        def col(key: str, scale: float = 1.0, digits: int = 2, runs: list = runs) -> str:
            return mean_std([r[key] for r in runs], scale, digits)

        lines.append(
            f"| {name} | {col('test_acc', 100)} | {col('canary_p_secret', 1, 3)} | {col('canary_rank')} | "
            f"{col('canary_hit', 100, 1)} | {col('canary_exposure')} | {col('excess_exposure')} | "
            f"{col('reference_exposure')} | {statistics.fmean(r['fit_seconds'] for r in runs):.1f} |"
        )
    by_model = {n: statistics.fmean(r["excess_exposure"] for r in rows if r["model"] == n) for n in ("KD",)}
    if "KD" in by_model and by_model["KD"] > 0:
        lines.append("")
        for name in dict.fromkeys(r["model"] for r in rows):
            if name.startswith("Swing"):
                swing = statistics.fmean(r["excess_exposure"] for r in rows if r["model"] == name)
                lines.append(f"{name}: excess exposure {100 * (1 - swing / by_model['KD']):.0f} % lower than KD's.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--canaries", type=int, default=10, help="unique canary images (and reference canaries)")
    parser.add_argument("--repeats", type=int, default=4, help="copies of each canary in the training set")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each student")
    parser.add_argument("--student-widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--kd-weight", type=float, default=1.0, help="weight of the soft targets (1 - CE weight)")
    parser.add_argument("--temperature", type=float, default=4.0, help="KD's T, and Swing's T_min")
    parser.add_argument("--t-max", type=float, default=20.0, help="Swing's T_max (private items)")
    parser.add_argument("--epsilon", type=float, default=5.0, help="Swing's privacy budget (Laplace Δ/ε, Δ = 1)")
    parser.add_argument("--variants", nargs="*", default=None, help="subset of the student variants to run")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: these tiny models run fastest single-threaded)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/swing_canary"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.argv = sys.argv[:1]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = [row for seed in args.seeds for row in run_seed(seed, args)]
    text = table(rows)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"settings": settings, "machine": machine, "total_seconds": time.perf_counter() - started, "runs": rows}
    (args.out / "swing_canary.json").write_text(json.dumps(result, indent=2))
    print(text)
    print(f"\nMachine: {machine}; total {result['total_seconds']:.0f} s. Written to {args.out / 'swing_canary.json'}")
    return result


if __name__ == "__main__":
    main()
