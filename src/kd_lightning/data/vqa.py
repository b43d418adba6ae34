"""Visual question answering on generated digit images, offline: the data of the vision-language KD demos.

Each image is a row of ``num_cells`` cells of ``cell_size`` pixels (a 16 x 64 image by default); each cell holds a
handwritten digit (scikit-learn's 8 x 8 digits, upscaled bilinearly) or is empty (``empty_prob``; at least
``min_digits`` digits per image). Training images use four fifths of the sklearn digits, validation and test images
the held-out fifth (index % 5 == 4, as :mod:`kd_lightning.data.digit_scenes` does), so evaluation reads unseen
handwriting. Everything is drawn from ``numpy.random.default_rng((split_seed, split))``: the same seed gives the
same data; no (image, question) pair repeats across the splits.

**Question types** (``question_types`` selects them; assigned round-robin, so balanced):

- ``count``: "How many digits?" -> ``"3"``;
- ``exists``: "Is there a 7?" -> ``"yes"`` / ``"no"`` (half each);
- ``left_of``: "Which digit is left of the 7?" -> the nearest digit to the left of the (unique) 7;
- ``caption``: "Read the digits." -> the digits left to right, ``"3 7 1"``.

The verifier is exact match after normalising case, surrounding spaces, inner whitespace and a final period
(:func:`verify_exact`), or any ``module.function``.

**Batches** (dicts)::

    images                              [B, channels, H, W] float, normalised with the training images' mean/std
    input_ids, attention_mask, labels   [B, T] right-padded: prompt + " answer" + EOS, labels on the answer and EOS
    instruction_mask                    [B, T] bool, True at the question's tokens (not the template, not BOS)
    prompt_ids, prompt_mask             [B, P] left-padded prompts (for generate)
    prompt_lengths, sample_index        [B]
    answers, family                     lists of strings (family = question type)
    num_items_in_batch                  [] training batches: valid tokens of the accumulation group
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.digits import load_sklearn_digits
from kd_lightning.data.reasoning import _left_pad, _right_pad, checked_verifier, load_verifier
from kd_lightning.data.text import ByteTokenizer, HFTokenizer, TokenLoaders, load_tokenizer
from kd_lightning.errors import KDConfigError

__all__ = ["QUESTION_TYPES", "DigitVQADataModule", "VQAProblem", "collate_vqa", "generate_vqa", "verify_exact"]

QUESTION_TYPES = ("count", "exists", "left_of", "caption")
DEFAULT_PROMPT = "Q: {question}\nA:"
SPLITS = ("train", "val", "test")
#: Every ``HELD_OUT_EVERY``-th sklearn digit (index % 5 == 4) is kept for the validation/test images.
HELD_OUT_EVERY = 5


@dataclass(frozen=True)
class VQAProblem:
    """One question about one image: ``digits`` per cell (``None`` = empty), ``image_ids`` the sklearn index of each
    cell's digit (-1 = empty), ``family`` the question type."""

    question: str
    answer: str
    family: str
    digits: tuple[int | None, ...]
    image_ids: tuple[int, ...]


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower().rstrip(".").strip())


def verify_exact(response: str, answer: str) -> bool:
    """Exact match after lower-casing and normalising whitespace and a final period."""
    return _normalise(response) == _normalise(answer)


# ---------------------------------------------------------------------------------------------- generation
def _question(kind: str, digits: Sequence[int | None], rng: np.random.Generator) -> tuple[str, str] | None:
    """``(question, answer)`` of type ``kind`` about a row of cells, or ``None`` when the row does not allow it."""
    present = [d for d in digits if d is not None]
    if kind == "count":
        return "How many digits?", str(len(present))
    if kind == "exists":
        if rng.random() < 0.5:
            return f"Is there a {present[int(rng.integers(len(present)))]}?", "yes"
        absent = [d for d in range(10) if d not in present]
        return f"Is there a {absent[int(rng.integers(len(absent)))]}?", "no"
    if kind == "left_of":
        candidates = [i for i, d in enumerate(present) if i > 0 and present.count(d) == 1]
        if not candidates:
            return None
        i = candidates[int(rng.integers(len(candidates)))]
        return f"Which digit is left of the {present[i]}?", str(present[i - 1])
    return "Read the digits.", " ".join(str(d) for d in present)


def generate_vqa(
    split: str,
    count: int,
    labels: np.ndarray,
    question_types: Sequence[str],
    num_cells: int,
    empty_prob: float,
    min_digits: int,
    seed: int,
    seen: set[tuple[Any, ...]] | None = None,
) -> list[VQAProblem]:
    """``count`` problems of ``split`` (round-robin question types), cells filled from the split's pool of sklearn
    digits (``labels`` of all of them; training: index % 5 != 4, else the held-out fifth). ``seen`` (shared across
    splits) keeps (image, question) pairs from repeating."""
    rng = np.random.default_rng((seed, SPLITS.index(split)))
    held = np.arange(len(labels)) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    pool = np.flatnonzero(~held if split == "train" else held)
    seen = set() if seen is None else seen
    problems: list[VQAProblem] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise KDConfigError(
                f"num_{split}",
                f"found only {len(problems)} distinct {split} questions ({count} asked for)",
                "ask for fewer, or use more cells / question types",
            )
        kind = question_types[len(problems) % len(question_types)]
        filled = rng.random(num_cells) >= empty_prob
        if filled.sum() < min_digits:
            filled[rng.choice(num_cells, min_digits, replace=False)] = True
        ids = tuple(int(pool[rng.integers(len(pool))]) if f else -1 for f in filled)
        digits = tuple(int(labels[i]) if i >= 0 else None for i in ids)
        asked = _question(kind, digits, rng)
        if asked is None or (ids, asked[0]) in seen:
            continue
        seen.add((ids, asked[0]))
        problems.append(VQAProblem(asked[0], asked[1], kind, digits, ids))
    return problems


def render_cells(image_ids: Sequence[int], digit_images: Tensor) -> Tensor:
    """The ``[1, cell, cells · cell]`` image (values in [0, 1]) of a row of cells (``-1``: empty) from the upscaled
    digits ``[N, 1, cell, cell]``."""
    cell = digit_images.shape[-1]
    row = torch.zeros(1, cell, cell * len(image_ids))
    for j, index in enumerate(image_ids):
        if index >= 0:
            row[:, :, j * cell : (j + 1) * cell] = digit_images[index]
    return row


# ---------------------------------------------------------------------------------------------- batches
def collate_vqa(
    items: Sequence[dict[str, Any]], pad_token_id: int, mean: float, std: float, channels: int
) -> dict[str, Any]:
    """Batch of encoded VQA items (see the module docstring)."""
    prompts, responses = [item["prompt"] for item in items], [item["response"] for item in items]
    input_ids, attention_mask, labels = _right_pad(prompts, responses, pad_token_id)
    prompt_ids, prompt_mask = _left_pad(prompts, pad_token_id)
    instruction_mask = torch.zeros_like(attention_mask)
    for i, item in enumerate(items):
        start, stop = item["question_span"]
        instruction_mask[i, start:stop] = True
    images = (torch.stack([item["image"] for item in items]) - mean) / std
    return {
        "images": images.repeat(1, channels, 1, 1) if channels > 1 else images,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "instruction_mask": instruction_mask,
        "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "answers": [item["answer"] for item in items],
        "family": [item["family"] for item in items],
        "sample_index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


class EncodedVQA(Dataset):
    """Problems with their images and token ids (``{"image", "prompt", "response", "question_span", ...}`` items)."""

    def __init__(self, problems: Sequence[VQAProblem], items: Sequence[dict[str, Any]]) -> None:
        self.problems = list(problems)
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


# ---------------------------------------------------------------------------------------------- data module
class DigitVQADataModule(TokenLoaders, KDDataModule):
    """Questions about rows of handwritten digits with exact answers (see the module docstring).

    Args:
        num_train, num_val, num_test: questions (each with its own image) per split.
        question_types: subset of ``count``, ``exists``, ``left_of``, ``caption``.
        num_cells: cells per image (the image is ``cell_size x num_cells·cell_size``).
        cell_size: pixels of a cell (the 8 x 8 digits are upscaled to it).
        empty_prob: probability that a cell is empty.
        min_digits: fewest digits per image (>= 2 when only ``left_of`` is asked).
        channels: image channels (the grey image repeated; 3 for RGB encoders).
        tokenizer: ``"byte"`` or a Hugging Face tokenizer folder.
        local_files_only: never download a tokenizer.
        prompt_template: the prompt, with ``{question}``.
        verifier: ``"exact"`` (:func:`verify_exact`) or ``"module.function"``.
        **kwargs: :class:`~kd_lightning.data.base.KDDataModule` (``batch_size``, ``eval_batch_size``,
            ``split_seed``, ...).
    """

    task = "vision_language"

    def __init__(
        self,
        num_train: int = 4000,
        num_val: int = 200,
        num_test: int = 400,
        question_types: Sequence[str] = QUESTION_TYPES,
        num_cells: int = 4,
        cell_size: int = 16,
        empty_prob: float = 0.25,
        min_digits: int = 1,
        channels: int = 3,
        tokenizer: str = "byte",
        local_files_only: bool = True,
        prompt_template: str = DEFAULT_PROMPT,
        verifier: str = "exact",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("num_workers", 0)
        super().__init__(**kwargs)
        types = tuple(question_types)
        checks = {
            "num_train": (num_train >= 1, ">= 1"),
            "num_val": (num_val >= 1, ">= 1"),
            "num_test": (num_test >= 0, ">= 0"),
            "question_types": (bool(types) and set(types) <= set(QUESTION_TYPES), f"a subset of {QUESTION_TYPES}"),
            "num_cells": (num_cells >= 2, ">= 2"),
            "cell_size": (cell_size >= 8, ">= 8"),
            "empty_prob": (0.0 <= empty_prob < 1.0, "in [0, 1)"),
            "min_digits": (1 <= min_digits <= num_cells, f"in [1, num_cells={num_cells}]"),
            "channels": (channels >= 1, ">= 1"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise KDConfigError(name, f"must be {allowed}, got {locals().get(name, types)!r}")
        if types == ("left_of",) and min_digits < 2:
            raise KDConfigError("min_digits", "must be >= 2 when only left_of is asked", "set min_digits: 2")
        if "{question}" not in prompt_template:
            raise KDConfigError("prompt_template", "has no {question} placeholder", "include {question}")
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.question_types = types
        self.num_cells = num_cells
        self.cell_size = cell_size
        self.empty_prob = empty_prob
        self.min_digits = min_digits
        self.channels = channels
        self.tokenizer_name = tokenizer
        self.local_files_only = local_files_only
        self.prompt_template = prompt_template
        self.verifier_name = verifier
        self.verifier: Callable[[str, str], bool] = checked_verifier(
            verify_exact if verifier == "exact" else load_verifier(verifier), verifier
        )
        #: Micro-batches per optimizer step, for ``num_items_in_batch`` (set by the LM methods).
        self.accumulate_grad_batches: int | None = None
        self.image_shape = (channels, cell_size, num_cells * cell_size)
        self.input_shape = self.image_shape
        self.mean, self.std = 0.0, 1.0

    # ------------------------------------------------------------------ tokenizer
    @cached_property
    def tokenizer(self) -> ByteTokenizer | HFTokenizer:
        return load_tokenizer(self.tokenizer_name, self.local_files_only)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ problems
    @cached_property
    def _digits(self) -> tuple[Tensor, np.ndarray]:
        images, targets = load_sklearn_digits()
        upscaled = F.interpolate(images, size=(self.cell_size, self.cell_size), mode="bilinear", align_corners=False)
        return upscaled.clamp(0.0, 1.0), targets.numpy()

    @cached_property
    def problems(self) -> dict[str, list[VQAProblem]]:
        """The questions of ``train``, ``val`` and ``test`` (``family`` = question type)."""
        labels = self._digits[1]
        seen: set[tuple[Any, ...]] = set()
        counts = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        return {
            split: generate_vqa(
                split,
                counts[split],
                labels,
                self.question_types,
                self.num_cells,
                self.empty_prob,
                self.min_digits,
                self.split_seed,
                seen,
            )
            for split in SPLITS
        }

    def data_identity(self) -> dict[str, Any]:
        """Digest of every question, answer and image layout, and the tokenizer (the teacher cache's key)."""
        digest = hashlib.sha256()
        for split, problems in self.problems.items():
            for p in problems:
                digest.update(f"{split}\t{p.question}\t{p.answer}\t{p.image_ids}\n".encode())
        return {"problems": digest.hexdigest(), "tokenizer": self.tokenizer_name, "vocab_size": self.vocab_size}

    def encode(self, problem: VQAProblem, index: int) -> dict[str, Any]:
        """Image and token ids of one problem: prompt (BOS + template with the question), response (`` answer`` +
        EOS) and the question's span inside the prompt."""
        tok = self.tokenizer
        bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        before, _, after = self.prompt_template.partition("{question}")
        head = bos + (tok.encode(before) if before else [])
        question = tok.encode(problem.question)
        prompt = head + question + (tok.encode(after) if after else [])
        return {
            "image": render_cells(problem.image_ids, self._digits[0]),
            "prompt": prompt,
            "response": tok.encode(" " + problem.answer) + eos,
            "question_span": (len(head), len(head) + len(question)),
            "answer": problem.answer,
            "family": problem.family,
            "index": index,
        }

    def _encoded(self, split: str) -> EncodedVQA:
        problems = self.problems[split]
        return EncodedVQA(problems, [self.encode(p, i) for i, p in enumerate(problems)])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._encoded("train")
            images = torch.stack([item["image"] for item in self.train_set.items])
            self.mean, self.std = float(images.mean()), float(images.std().clamp_min(1e-6))
            self.val_set = self._encoded("val")
            self.test_set = self._encoded("test") if self.problems["test"] else self.val_set

    def longest_response_tokens(self) -> int:
        """Tokens of the longest answer (+ EOS) of any split (sets the data up)."""
        self.setup()
        return max(
            len(item["response"]) for split in (self.train_set, self.val_set, self.test_set) for item in split.items
        )

    # ------------------------------------------------------------------ loaders
    def _collate(self) -> partial:
        return partial(
            collate_vqa, pad_token_id=self.pad_token_id, mean=self.mean, std=self.std, channels=self.channels
        )
