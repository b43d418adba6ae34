"""Check LM distillation under Lightning's FSDPStrategy: teacher and student sharded, the teacher stays frozen.

    python benchmarks/gpu_fsdp_check.py                          # every visible GPU (1 works too), ~1 minute
    python benchmarks/gpu_fsdp_check.py --devices 2 --steps 5 --hidden 256 --layers 2 --vocab 32000
    python benchmarks/gpu_fsdp_check.py --accelerator cpu --devices 2   # CPU/gloo, for the tests (see below)

Runs :class:`~kd_lightning.methods.lm_distill.LMDistill` (forward KL) with an
:class:`~kd_lightning.models.lm.HFCausalLM` Llama student and a wider Llama teacher (random weights, random
tokens, nothing downloaded) through
``lightning.Trainer(strategy=FSDPStrategy(use_orig_params=True, auto_wrap_policy={LlamaDecoderLayer}))`` for
``--steps`` optimizer steps, then checks on every rank and prints ``FSDP CHECK OK`` (exit 0) or the failures
(exit 1):

- the model was wrapped by FSDP (``FullyShardedDataParallel`` modules present, decoder layers as units);
- the teacher's parameters still have ``requires_grad=False``, the teacher is in eval mode, and its full
  (all-gathered) weights are bit-identical to those before training;
- the student's weights changed, and the loss is finite;
- the peak GPU memory per rank (CUDA).

``--accelerator cpu``: Lightning refuses FSDP on CPU ("requires a GPU accelerator"), and FSDP itself looks for an
accelerator unless ``device_id`` is a CPU device. :class:`CPUFSDPStrategy` (testing only) lifts both, so the same
Lightning code path (strategy setup, wrapping, optimizer, training loop) runs with gloo on CPU.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader

from kd_lightning.methods.lm_distill import LMDistill
from kd_lightning.models.lm import HFCausalLM


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with ``device_id=cpu`` (gloo): for CPU tests of the FSDP path only."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return model
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def llama(hidden: int, layers: int, vocab: int, seq: int, seed: int) -> HFCausalLM:
    torch.manual_seed(seed)
    heads = max(2, hidden // 64)
    config = {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "max_position_embeddings": max(seq, 64), "tie_word_embeddings": False,
    }  # fmt: skip
    return HFCausalLM(config=config, dtype="float32")


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--devices", type=int, default=None, help="default: every visible GPU (2 on CPU)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        print("FSDP CHECK SKIPPED: no CUDA device (use --accelerator cpu for the CPU/gloo path)")
        return 0
    devices = args.devices or (torch.cuda.device_count() if args.accelerator == "cuda" else 2)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy_cls: Any = FSDPStrategy if args.accelerator == "cuda" else CPUFSDPStrategy
    strategy = strategy_cls(use_orig_params=True, auto_wrap_policy={LlamaDecoderLayer})
    student = llama(args.hidden, args.layers, args.vocab, args.seq, seed=0)
    teacher = llama(2 * args.hidden, args.layers, args.vocab, args.seq, seed=1)
    teacher_before = full_state(teacher)
    student_before = full_state(student)
    module = LMDistill(student=student, teacher=teacher, objective="forward_kl", optimizer=torch.optim.AdamW)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch * args.steps * devices, args.seq), generator=gen)
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(rows, batch_size=args.batch))
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = trainer.strategy.model
    units = [m for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)]
    failures = []
    if not units:
        failures.append("the model is not wrapped by FSDP")
    if any(p.requires_grad for p in teacher.parameters()):
        failures.append("teacher parameters require grad")
    if teacher.training:
        failures.append("teacher left eval mode")
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, rank0_only=False):
        teacher_after, student_after = full_state(teacher), full_state(student)
    changed = [k for k, v in teacher_after.items() if not torch.equal(v, teacher_before[k])]
    if changed:
        failures.append(f"{len(changed)} teacher tensors changed (first {changed[0]})")
    if all(torch.equal(v, student_before[k]) for k, v in student_after.items()):
        failures.append("the student did not change")
    loss = trainer.callback_metrics.get("train/loss")
    if loss is None or not torch.isfinite(loss):
        failures.append(f"train/loss is {loss}")
    rank = trainer.global_rank
    memory = ""
    if args.accelerator == "cuda":
        memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    print(
        f"[rank {rank}] world {trainer.world_size}, {len(units)} FSDP units, loss {float(loss or 0):.4f}{memory}",
        flush=True,
    )
    if failures:
        print(f"[rank {rank}] FSDP CHECK FAILED: " + "; ".join(failures), flush=True)
        return 1
    print(f"[rank {rank}] FSDP CHECK OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
