"""Peak memory and tokens/s of ONE LM-distillation step of a real Hugging Face model, naive vs chunked loss.

    OMP_NUM_THREADS=1 python benchmarks/lm_distill_step.py                      # CPU: llama 2 x 256, V 32,000
    python benchmarks/lm_distill_step.py --device cuda --dtype bfloat16 --repeats 10   # a GPU, when there is one
    python benchmarks/lm_distill_step.py --layers 2 --hidden 256 --vocab 32000 --seq 256 --batch 4 --chunk_sizes 512

The step is what :class:`~kd_lightning.methods.lm_distill.LMDistill` does for a batch (``objective:
forward_kl``), on :class:`~kd_lightning.models.lm.HFCausalLM` student and teacher built from a Llama config
(randomly initialised, nothing downloaded; teacher twice the student's width by default, frozen, run under
``no_grad``), random token ids, every token predicted (``labels = input_ids``):

- **naive** (``chunked: false``): the student's logits ``[B, T, V]``, the teacher's logits, the forward KL
  KL(p_T ‖ p_S) summed over the valid tokens and divided by their number, ``backward()``;
- **chunked C** (``chunked: true, chunk_size: C``): the student's and the teacher's final hidden states,
  :func:`kd_lightning.losses.chunked.chunked_distillation_loss` (LM heads applied chunk by chunk, analytic
  gradients), ``backward()``.

Both give the same loss and gradients (checked here: relative difference of the loss and of the gradient of
the student's LM head). **Memory**: on CPU the peak of the tensor storages the step allocates
(:class:`kd_lightning.utils.memory.TensorMemoryTracker`: forward and backward, gradients included, weights and
inputs excluded), one untimed run per variant; on CUDA ``torch.cuda.max_memory_allocated`` above the memory
allocated before the step (the same quantity, by the caching allocator's count). **Speed**: the median wall time
of ``--repeats`` forward+backward steps (variants alternating, one warm-up each; CUDA synchronised), reported as
tokens/s = ``B·T / time``. Writes ``<out>/lm_distill_step.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kd_lightning.losses.chunked import chunked_distillation_loss
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.models.lm import HFCausalLM
from kd_lightning.utils.memory import TensorMemoryTracker

MiB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama(hidden: int, layers: int, vocab: int, seq: int, dtype: str, seed: int) -> HFCausalLM:
    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": max(seq, 64),
        "tie_word_embeddings": False,
    }
    return HFCausalLM(config=config, dtype=dtype, attn_implementation="sdpa")


def step(variant: dict[str, Any], student: HFCausalLM, teacher: HFCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """One forward + backward; returns the loss (gradients left in the student's ``.grad``)."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    valid = mask[:, 1:]
    if variant["chunk_size"] is None:
        logits = student(ids, mask)[:, :-1]
        with torch.no_grad():
            t_logits = teacher(ids, mask)[:, :-1]
        loss = forward_kl(logits, t_logits, mask=valid, reduction="sum") / valid.sum()
        del logits, t_logits
    else:
        hidden = student.hidden_states(ids, mask)[:, :-1]
        with torch.no_grad():
            t_hidden = teacher.hidden_states(ids, mask)[:, :-1]
        loss = chunked_distillation_loss(
            hidden,
            student.lm_head.weight,
            teacher_hidden=t_hidden,
            teacher_lm_head_weight=teacher.lm_head.weight,
            mask=valid,
            objective="forward_kl",
            chunk_size=variant["chunk_size"],
        )
    loss.backward()
    return loss.detach()


def zero_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def peak_bytes(variant: dict[str, Any], student: HFCausalLM, teacher: HFCausalLM, ids: torch.Tensor) -> int:
    zero_grads(student)
    gc.collect()
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(variant, student, teacher, ids)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        with TensorMemoryTracker() as tracker:
            start = tracker.live
            step(variant, student, teacher, ids)
            peak = tracker.peak - start
    zero_grads(student)
    return peak


def seconds(variant: dict[str, Any], student: HFCausalLM, teacher: HFCausalLM, ids: torch.Tensor) -> float:
    zero_grads(student)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step(variant, student, teacher, ids)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256, help="student width")
    parser.add_argument("--teacher_hidden", type=int, default=512)
    parser.add_argument("--teacher_layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    student = llama(args.hidden, args.layers, args.vocab, args.seq, args.dtype, args.seed).to(device).train()
    teacher = llama(args.teacher_hidden, args.teacher_layers, args.vocab, args.seq, args.dtype, args.seed + 1)
    teacher = teacher.to(device).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    variants = [{"name": "naive", "chunk_size": None}] + [
        {"name": f"chunked C={c}", "chunk_size": c} for c in args.chunk_sizes
    ]
    # Agreement with the naive path (same weights, same batch).
    reference: dict[str, torch.Tensor] = {}
    rows = []
    for variant in variants:
        zero_grads(student)
        loss = step(variant, student, teacher, ids)
        grad = student.lm_head.weight.grad.detach().float().clone()
        if not reference:
            reference = {"loss": loss.float(), "grad": grad}
        rel_loss = float((loss.float() - reference["loss"]).abs() / reference["loss"].abs())
        rel_grad = float(
            torch.linalg.vector_norm(grad - reference["grad"]) / torch.linalg.vector_norm(reference["grad"])
        )
        rows.append({"variant": variant["name"], "chunk_size": variant["chunk_size"], "loss": float(loss),
                     "rel_err_loss": rel_loss, "rel_err_grad_lm_head": rel_grad})  # fmt: skip
    del reference
    for row, variant in zip(rows, variants, strict=True):
        row["peak_mib"] = peak_bytes(variant, student, teacher, ids) / MiB
    times: dict[str, list[float]] = {v["name"]: [] for v in variants}
    for variant in variants:
        seconds(variant, student, teacher, ids)  # warm-up
    for _ in range(args.repeats):
        for variant in variants:
            times[variant["name"]].append(seconds(variant, student, teacher, ids))
    tokens = args.batch * args.seq
    for row in rows:
        row["seconds"] = times[row["variant"]]
        row["median_seconds"] = statistics.median(row["seconds"])
        row["tokens_per_second"] = tokens / row["median_seconds"]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    header = (
        f"student llama {args.layers}x{args.hidden}, teacher {args.teacher_layers}x{args.teacher_hidden}, "
        f"V={args.vocab}, batch {args.batch} x seq {args.seq} ({tokens} tokens), {args.dtype}, forward KL; "
        f"{device.type} ({hardware}), torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    lines = [
        "| variant | peak MiB | naive/this | step s (median) | tokens/s | rel. err. loss / ∇W_head vs naive |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['peak_mib']:,.0f} | {rows[0]['peak_mib'] / r['peak_mib']:.1f}× | "
            f"{r['median_seconds']:.3f} | {r['tokens_per_second']:,.0f} | "
            f"{r['rel_err_loss']:.1e} / {r['rel_err_grad_lm_head']:.1e} |"
        )
    print(header + "\n\n" + "\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "header": header,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.platform(),
        "memory_method": "CPU: TensorMemoryTracker storage peak; CUDA: max_memory_allocated above the start",
        "rows": rows,
    }
    (args.out / "lm_distill_step.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out / 'lm_distill_step.json'}")
    return rows


if __name__ == "__main__":
    main()
