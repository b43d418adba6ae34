"""Naive vs chunked LM distillation loss: peak tensor memory, wall time and agreement.

    OMP_NUM_THREADS=1 python benchmarks/chunked_loss.py                       # 4,096 tokens, H 256, V 32,000, fp32
    OMP_NUM_THREADS=1 python benchmarks/chunked_loss.py --chunk_sizes 128 256 512 --repeats 5
    python benchmarks/chunked_loss.py --objectives forward_kl jsd --teacher logits --tokens 1024

Both paths compute ``mean over valid tokens of objective(student logits, teacher logits)`` and its
gradients with respect to the student's hidden states ``x [N, H]`` and LM-head weight ``W [V, H]``,
on random data with about 10 % of the tokens masked:

- **naive**: ``x Wᵀ`` (``[N, V]``), the teacher's logits under ``no_grad``, the token objective of
  :mod:`kd_lightning.losses.lm` (log-softmax on both sides, KL, masked mean), ``backward()``;
- **chunked**: :func:`kd_lightning.losses.chunked.chunked_distillation_loss`, ``backward()``.

The teacher is given as hidden states + LM-head weight (its logits are then part of the step) or, with
``--teacher logits``, as ready ``[N, V]`` logits (an input that exists before the step).

**Memory** is measured at the tensor level, not from the process RSS (which depends on the C allocator's
caching): a ``TorchDispatchMode`` sees every ATen operation of the step, forward and backward, and
registers the storage of each tensor it returns the first time it sees it, adding its ``nbytes`` to a
live counter (a result whose storage is one of the operation's inputs' — a view, an in-place or ``out=``
result — adds nothing); a
``weakref.finalize`` on the storage subtracts them when the storage is freed. The peak of that counter
minus its value at the start of the step is the reported peak: everything the step allocates, the
gradients it leaves in ``.grad`` included, the inputs excluded. One untimed run per variant.

**Time** is the wall time of forward + backward (inputs built beforehand), the median over
``--repeats`` runs in which the variants alternate (naive, chunked 1, chunked 2, ..., naive, ...), after
one warm-up each. **Agreement**: relative error of the loss, ``|L_c − L_n| / |L_n|``, and of each
gradient, ``‖g_c − g_n‖₂ / ‖g_n‖₂``, chunked vs naive (both fp32); and both against a float64
reference (the chunked path in float64, which the tests check against autograd through the naive path).

Writes ``<out>/chunked_loss.json`` and prints a Markdown table. Run it with ``OMP_NUM_THREADS=1`` on
a shared machine; timings on a shared VM vary by ±20 %.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kd_lightning.losses.chunked import chunked_distillation_loss
from kd_lightning.utils.memory import TensorMemoryTracker

MiB = 2**20


def naive_objective(name: str, kwargs: dict[str, float]) -> Callable[..., torch.Tensor]:
    """The library's token objective (the naive path): ``f(student_logits, teacher_logits, mask=...)``."""
    try:
        from kd_lightning.losses.lm import token_objective
    except ImportError:  # before kd_lightning.losses.lm exists: the two KL directions of divergences
        from kd_lightning.losses import divergences

        if name not in ("forward_kl", "reverse_kl"):
            raise
        fn = getattr(divergences, name)
        return lambda s, t, mask, temperature: fn(s, t, temperature=temperature, mask=mask)
    objective = token_objective(name, **kwargs)
    return lambda s, t, mask, temperature: objective(s, t, mask=mask, temperature=temperature)


def make_inputs(args: argparse.Namespace, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random fp32 inputs (the same values, converted, for ``dtype=torch.float64``)."""
    gen = torch.Generator().manual_seed(args.seed)
    n, h, v = args.tokens, args.hidden, args.vocab
    inputs = {
        "x": torch.randn(n, h, generator=gen).to(dtype),
        "w": (torch.randn(v, h, generator=gen) * h**-0.5).to(dtype),
        "xt": torch.randn(n, h, generator=gen).to(dtype),
        "wt": (torch.randn(v, h, generator=gen) * h**-0.5).to(dtype),
        "mask": torch.rand(n, generator=gen) >= args.masked_fraction,
    }
    if args.teacher == "logits":
        inputs["t_logits"] = inputs["xt"] @ inputs["wt"].t()
    return inputs


def step(variant: dict[str, Any], inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """One forward + backward from fresh leaves; returns the loss and gradients."""
    x = inputs["x"].detach().requires_grad_(True)
    w = inputs["w"].detach().requires_grad_(True)
    mask = inputs["mask"]
    if variant["kind"] == "naive":
        logits = x @ w.t()
        if args.teacher == "logits":
            t_logits = inputs["t_logits"]
        else:
            with torch.no_grad():
                t_logits = inputs["xt"] @ inputs["wt"].t()
        loss = variant["fn"](logits, t_logits, mask, args.temperature)
        del logits, t_logits
    else:
        teacher = (
            {"teacher_logits": inputs["t_logits"]}
            if args.teacher == "logits"
            else {"teacher_hidden": inputs["xt"], "teacher_lm_head_weight": inputs["wt"]}
        )
        loss = chunked_distillation_loss(
            x,
            w,
            mask=mask,
            objective=variant["objective"],
            temperature=args.temperature,
            chunk_size=variant["chunk_size"],
            **teacher,
            **variant["kwargs"],
        )
    loss.backward()
    return {"loss": loss.detach(), "grad_x": x.grad, "grad_w": w.grad}


def peak_memory(variant: dict[str, Any], inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> int:
    gc.collect()
    with TensorMemoryTracker() as tracker:
        start = tracker.live
        result = step(variant, inputs, args)
        peak = tracker.peak - start
        del result
    gc.collect()
    return peak


def timed(variant: dict[str, Any], inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> float:
    gc.collect()
    started = time.perf_counter()
    result = step(variant, inputs, args)
    elapsed = time.perf_counter() - started
    del result
    return elapsed


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def errors(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    return {
        "loss": float(abs(result["loss"].double() - reference["loss"].double()) / abs(reference["loss"].double())),
        "grad_x": rel(result["grad_x"], reference["grad_x"]),
        "grad_w": rel(result["grad_w"], reference["grad_w"]),
    }


def run_objective(objective: str, kwargs: dict[str, float], args: argparse.Namespace) -> list[dict[str, Any]]:
    inputs = make_inputs(args)
    variants = [{"name": "naive", "kind": "naive", "fn": naive_objective(objective, kwargs)}]
    variants += [
        {"name": f"chunked C={c}", "kind": "chunked", "objective": objective, "chunk_size": c, "kwargs": kwargs}
        for c in args.chunk_sizes
    ]
    rows = []
    # Agreement: fp32 variants against each other and against a float64 reference (chunked path in float64).
    reference64 = step({**variants[1], "chunk_size": args.chunk_sizes[0]}, make_inputs(args, torch.float64), args)
    naive_result = step(variants[0], inputs, args)
    for variant in variants:
        result = naive_result if variant["kind"] == "naive" else step(variant, inputs, args)
        rows.append(
            {
                "objective": objective,
                "variant": variant["name"],
                "chunk_size": variant.get("chunk_size"),
                "loss": float(result["loss"]),
                "error_vs_naive": None if variant["kind"] == "naive" else errors(result, naive_result),
                "error_vs_float64": errors(result, reference64),
            }
        )
        del result
    del reference64, naive_result
    for row, variant in zip(rows, variants, strict=True):
        row["peak_mib"] = peak_memory(variant, inputs, args) / MiB
    times: dict[str, list[float]] = {v["name"]: [] for v in variants}
    for variant in variants:  # warm-up
        timed(variant, inputs, args)
    for _ in range(args.repeats):
        for variant in variants:
            times[variant["name"]].append(timed(variant, inputs, args))
    naive_peak, naive_time = rows[0]["peak_mib"], statistics.median(times["naive"])
    for row in rows:
        row["seconds"] = times[row["variant"]]
        row["median_seconds"] = statistics.median(row["seconds"])
        row["memory_ratio"] = naive_peak / row["peak_mib"]
        row["speedup"] = naive_time / row["median_seconds"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| objective | variant | peak tensor MiB | naive/this | time s (median) | speed-up | "
        "rel. err. loss / ∇x / ∇W vs naive | vs float64 |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        vs_naive = r["error_vs_naive"]
        e64 = r["error_vs_float64"]
        vs_naive_text = (
            "—" if vs_naive is None else " / ".join(f"{vs_naive[k]:.1e}" for k in ("loss", "grad_x", "grad_w"))
        )
        lines.append(
            f"| {r['objective']} | {r['variant']} | {r['peak_mib']:,.0f} | {r['memory_ratio']:.1f}× | "
            f"{r['median_seconds']:.2f} | {r['speedup']:.2f}× | {vs_naive_text} | "
            + " / ".join(f"{e64[k]:.1e}" for k in ("loss", "grad_x", "grad_w"))
            + " |"
        )
    return "\n".join(lines)


def parse_objective(text: str) -> tuple[str, dict[str, float]]:
    """``name`` or ``name:arg=value,arg=value`` (e.g. ``jsd:beta=0.5``)."""
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = float(value)
    return name, kwargs


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--masked_fraction", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--teacher", choices=("hidden", "logits"), default="hidden")
    parser.add_argument("--objectives", nargs="+", default=["forward_kl"], help="name or name:arg=value,...")
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    args = parser.parse_args(argv)
    rows = []
    for text in args.objectives:
        name, kwargs = parse_objective(text)
        rows += run_objective(name, kwargs, args)
        print(format_table(rows[-1 - len(args.chunk_sizes) :]), flush=True)
    table = format_table(rows)
    header = (
        f"N={args.tokens} tokens ({args.masked_fraction:.0%} masked), H={args.hidden}, V={args.vocab}, fp32, "
        f"teacher={args.teacher}, τ={args.temperature}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"
    )
    print("\n" + header + "\n\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "machine": platform.platform(),
        "memory_method": "TorchDispatchMode storage tracking (see the module docstring)",
        "rows": rows,
    }
    (args.out / "chunked_loss.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out / 'chunked_loss.json'}")
    return rows


if __name__ == "__main__":
    main()
