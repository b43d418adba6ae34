"""Cost of ACAM-KD's STCA-FF + masks vs plain feature imitation on one FPN level: peak tensor memory and time.

    OMP_NUM_THREADS=1 python benchmarks/dense_kd_cost.py                 # P3 of an 800x1333 image, C 256, batch 1
    python benchmarks/dense_kd_cost.py --batch 2 --height 100 --width 168 --no-unpooled

One training step's distillation part (forward + backward) on random maps ``F_S, F_T`` ``[B, C, H, W]`` (the
student map requires grad; the networks are left out, they are the same for every variant):

- **imitation**: 1x1 adapter + mean squared error (``DetFPNImitation``'s loss);
- **acam**: :class:`kd_lightning.losses.acam.ACAMLoss` with its defaults (keys/values pooled to at most
  ``max_tokens = 1024`` positions, queries at full resolution, 6 selection units);
- **acam, unpooled**: the same with ``max_tokens = H·W`` (the full ``HW x HW`` attention the pooling avoids).

The defaults are P3 of RetinaNet on a COCO image resized to 800x1333 (padded to 800x1344: 100x168 positions) with
256 FPN channels. Memory: peak of the storages the step allocates
(:class:`kd_lightning.utils.memory.TensorMemoryTracker`, gradients included, inputs excluded), one untimed run;
time: median of ``--repeats`` runs after a warm-up. Writes ``<out>/dense_kd_cost.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.commands.bench import machine_line
from kd_lightning.losses.acam import ACAMLoss
from kd_lightning.utils.memory import TensorMemoryTracker

MiB = 2**20


def variants(channels: int, tokens: int, unpooled: bool) -> dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    adapter = nn.Conv2d(channels, channels, 1)
    acam = ACAMLoss(channels, channels)
    out: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
        "imitation (1x1 adapter + MSE)": lambda s, t: F.mse_loss(adapter(s), t),
        f"acam (keys/values pooled to <= {acam.fusion.max_tokens})": lambda s, t: sum(acam(s, t).values()),
    }
    if unpooled:
        full = ACAMLoss(channels, channels, max_tokens=tokens)
        out[f"acam, unpooled ({tokens} keys)"] = lambda s, t: sum(full(s, t).values())
    return out


def step(loss: Callable[[torch.Tensor, torch.Tensor], Any], student: torch.Tensor, teacher: torch.Tensor) -> None:
    student.grad = None
    loss(student, teacher).backward()


def peak_bytes(loss: Callable, student: torch.Tensor, teacher: torch.Tensor) -> int:
    gc.collect()
    with TensorMemoryTracker() as tracker:
        start = tracker.live
        step(loss, student, teacher)
        peak = tracker.peak - start
    gc.collect()
    return peak


def seconds(loss: Callable, student: torch.Tensor, teacher: torch.Tensor, repeats: int) -> float:
    step(loss, student, teacher)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step(loss, student, teacher)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--height", type=int, default=100)
    parser.add_argument("--width", type=int, default=168)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-unpooled", dest="unpooled", action="store_false", help="skip the full HW x HW variant")
    parser.add_argument("--out", default="benchmarks/results/dense_kd_cost")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shape = (args.batch, args.channels, args.height, args.width)
    student = torch.randn(shape, requires_grad=True)
    teacher = torch.randn(shape)
    rows = []
    for name, loss in variants(args.channels, args.height * args.width, args.unpooled).items():
        peak = peak_bytes(loss, student, teacher)
        elapsed = seconds(loss, student, teacher, args.repeats)
        rows.append({"variant": name, "peak_mib": peak / MiB, "seconds": elapsed})
    machine = machine_line()
    print(f"Map [B, C, H, W] = {list(shape)}; {machine}\n")
    print("| variant | peak tensor memory (MiB) | forward + backward (s, median) |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['peak_mib']:.1f} | {row['seconds']:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dense_kd_cost.json").write_text(
        json.dumps({"shape": list(shape), "machine": machine, "repeats": args.repeats, "rows": rows}, indent=2)
    )
    return rows


if __name__ == "__main__":
    main()
