"""Small stand-ins shared by the language-model method tests: fixed dict batches and a tiny GPT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from kd_lightning.losses.lm import IGNORE_INDEX, count_valid_tokens
from kd_lightning.models.lm import TinyGPT

VOCAB = 24


def tiny_gpt(seed: int = 0, d_model: int = 16, n_layers: int = 1, vocab_size: int = VOCAB, **kwargs: Any) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=2, max_seq_len=64, **kwargs)


def make_batch(lengths: list[int], width: int, seed: int, vocab_size: int = VOCAB, prompt: int = 0) -> dict:
    """Right-padded random tokens; ``lengths`` real tokens per row; the first ``prompt`` labels masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (len(lengths), width), generator=g)
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    labels = ids.masked_fill(~mask, IGNORE_INDEX)
    labels[:, :prompt] = IGNORE_INDEX
    return {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask, "labels": labels}


def concat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "attention_mask", "labels")}


class TokenBatches(L.LightningDataModule):
    """Fixed dict batches in order (no shuffling), like TextDataModule's: ``num_items_in_batch`` counts the
    valid tokens of each gradient-accumulation group (``accumulate_grad_batches`` is set by the method)."""

    def __init__(self, train: list[dict], val: list[dict] | None = None, count: bool = True, vocab_size: int = VOCAB):
        super().__init__()
        self.train, self.val, self.count = train, val if val is not None else train, count
        self.num_classes = vocab_size
        self.accumulate_grad_batches = 1

    def train_dataloader(self) -> DataLoader:
        k, out = self.accumulate_grad_batches, []
        for i, batch in enumerate(self.train):
            group = self.train[(i // k) * k : (i // k + 1) * k]
            extra = {"num_items_in_batch": sum(count_valid_tokens(b["labels"]) for b in group)} if self.count else {}
            out.append({**batch, **extra})
        return DataLoader(out, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=None)


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    return L.Trainer(**{**defaults, **kwargs})


def sgd(lr: float = 0.5):
    return lambda params: torch.optim.SGD(params, lr=lr)


def one_step_params(module: L.LightningModule, data: TokenBatches, tmp_path: Path, accumulate: int) -> dict:
    """Student/model parameters after one optimizer step over ``data`` (no validation)."""
    run = trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0)
    run.fit(module, datamodule=data)
    assert run.global_step == 1
    return {k: v.detach().clone() for k, v in module.network.state_dict().items()}


# ---------------------------------------------------------------------------------------------- CLI fits
#: A few small "documents" of Python-like text (the byte tokenizer needs nothing else).
DOC = "def f{i}(x):\n    return x * {i} + {j}  # line {j}\n\nclass C{i}:\n    value = '{i}{j}'\n"


def write_documents(folder: Path, count: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"doc{i}.py").write_text("".join(DOC.format(i=i, j=j) for j in range(3)))
    return folder


#: Overrides that turn an lm_stdlib_* config into a seconds-long fit on tiny text with tiny GPTs.
def tiny_lm_overrides(tmp_path: Path, distill: bool = True) -> list[str]:
    docs = write_documents(tmp_path / "docs")
    gpt = {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 64}
    args = [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--trainer.accelerator=cpu",
        "--trainer.enable_model_summary=false",
        "--test_after_fit=false",
        "--data.init_args.source=files",
        f"--data.init_args.paths={docs}",
        "--data.init_args.block_size=32",
        "--data.init_args.batch_size=4",
        "--data.init_args.max_bytes=null",
    ]
    field = "student" if distill else "model"
    args += [f"--model.init_args.{field}.init_args.{k}={v}" for k, v in gpt.items()]
    if distill:
        teacher = {**gpt, "d_model": 32}
        args += [f"--model.init_args.teacher.init_args.{k}={v}" for k, v in teacher.items()]
        torch.manual_seed(0)
        path = tmp_path / "teacher.pt"
        torch.save(TinyGPT(vocab_size=264, **teacher).state_dict(), path)
        args.append(f"--model.init_args.teacher_ckpt={path}")
    return args


def fit_lm_config(name: str, tmp_path: Path, *extra: str, distill: bool = True):
    """A tiny ``kd fit`` of ``configs/<name>`` on text written under ``tmp_path`` (random teacher checkpoint)."""
    from tests.helpers.cli import CONFIGS_DIR, fit

    return fit(["--config", str(CONFIGS_DIR / name), *tiny_lm_overrides(tmp_path, distill), *extra])
