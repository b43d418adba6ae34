"""Verifiable reasoning data: generated problems with checkable answers, or GSM8K / MATH / generic JSONL files.

Every problem has a statement, a worked reference solution that ends in ``Answer: <a>`` and the answer
itself, so three kinds of training share one data module: supervised fine-tuning on the reference
solutions, on-policy distillation (the student answers the problem itself), and self-distillation with
privileged information (OPSD's teacher also sees the reference solution). A **verifier** decides whether a
response is right: :func:`verify_final_answer` by default (the last ``Answer:`` / ``####`` / ``\\boxed{}``,
compared as numbers when both parse, else as normalised text), or any ``module.function`` you name.

**Generated families** (offline, deterministic from ``split_seed``; difficulty 1..3):

- ``arith``: multi-step arithmetic, ``((a op b) op c) ...`` with one step per operation
  (difficulty = number of operations; a and the +/− operands in 1..20, × operands in 2..5);
- ``modular``: ``a + b mod m`` (1), ``a * b mod m`` (2), ``a * b + c mod m`` (3), worked step by step;
- ``symbolic``: reverse (odd seeds) or sort (even seeds) a string of letters, of length ``difficulty + 2``.

Train / validation / test problems never repeat a statement (drawn without replacement across the
splits). ``train_difficulties`` and ``eval_difficulties`` give the split by difficulty (train on easy, test
on everything).

**Batches** (dicts; see :func:`collate_reasoning`)::

    input_ids, attention_mask, labels   [B, T] right-padded: prompt + reference solution + EOS; labels only on
                                        the solution and EOS (SFT and token-level KD work unchanged)
    sft_input_ids, sft_attention_mask,  the same with the privileged prompt in a ``privileged_fraction`` of the
    sft_labels                          training rows (only when some row has it; ReasoningSupervised trains on them)
    prompt_lengths                      [B]    prompt tokens inside input_ids
    prompt_ids, prompt_mask             [B, P] left-padded student prompts (for generate)
    privileged_ids, privileged_mask     [B, P'] left-padded teacher prompts: problem + reference solution
    answers, family                     lists of strings
    difficulty, sample_index            [B]
    num_items_in_batch                  [] training batches: valid tokens of the accumulation group
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.text import IGNORE_INDEX, ByteTokenizer, HFTokenizer, TokenLoaders, load_tokenizer
from kd_lightning.errors import DatasetNotFoundError, KDConfigError

__all__ = [
    "FAMILIES",
    "ReasoningDataModule",
    "ReasoningProblem",
    "collate_reasoning",
    "final_answer",
    "generate_problems",
    "load_verifier",
    "read_reasoning_jsonl",
    "verify_final_answer",
]

FAMILIES = ("arith", "modular", "symbolic")
DEFAULT_PROMPT = "Problem: {problem}\nSolution:"
DEFAULT_PRIVILEGED = (
    "Problem: {problem}\nHere is a reference solution to this problem:\n{solution}\n"
    "Now solve it yourself, step by step.\nSolution:"
)


@dataclass(frozen=True)
class ReasoningProblem:
    """One problem: statement, worked solution (ending in ``Answer: <answer>``), answer, family, difficulty."""

    problem: str
    solution: str
    answer: str
    family: str = "generic"
    difficulty: int = 0


# ---------------------------------------------------------------------------------------------- verifier
_ANSWER_PATTERNS = (  # greedy ``.*``: the LAST marker of the text
    re.compile(r".*answer\s*[:=]\s*([^\n]*)", re.IGNORECASE | re.DOTALL),
    re.compile(r".*####\s*([^\n]*)", re.DOTALL),
)


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or ``None``."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def final_answer(text: str) -> str | None:
    """The final answer a response states: after its last ``Answer:``, ``####`` or inside ``\\boxed{}``."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    for pattern in _ANSWER_PATTERNS:
        found = pattern.match(text)
        if found:
            return found.group(1).strip()
    return None


def _normalise(answer: str) -> str:
    text = answer.strip().strip("$").rstrip(".").strip().lower()
    return re.sub(r"\s+", " ", text.replace(",", "") if re.fullmatch(r"[-+\d,.\s]+", text) else text)


def verify_final_answer(response: str, answer: str) -> bool:
    """``True`` when the response's final answer equals ``answer`` (numbers numerically, text normalised)."""
    stated = final_answer(response)
    if stated is None:
        return False
    a, b = _normalise(stated), _normalise(answer)
    try:
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    except ValueError:
        return a == b


def load_verifier(path: str) -> Callable[[str, str], bool]:
    """The verifier named ``"module.function"`` (``"default"``: :func:`verify_final_answer`)."""
    field = "data.init_args.verifier"
    if path == "default":
        return verify_final_answer
    module_name, _, name = path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError):
        function = None
    if not callable(function):
        raise KDConfigError(
            field, f"cannot import a function {path!r}", "give 'module.function' taking (response, answer) -> bool"
        )
    return function


def checked_verifier(verifier: Callable[[str, str], bool], name: str) -> Callable[[str, str], bool]:
    """``verifier`` that turns an exception or a non-boolean result into a one-line :class:`KDConfigError`."""

    def verify(response: str, answer: str) -> bool:
        try:
            result = verifier(response, answer)
        except Exception as err:  # a user's function: any error must become one line naming it
            raise KDConfigError(
                "data.init_args.verifier",
                f"{name} raised {type(err).__name__} ({' '.join(str(err).split())[:120]}) on the response "
                f"{response[:60]!r} with answer {answer!r}",
                "make it return True or False for any response text, including malformed ones",
            ) from None
        if not isinstance(result, (bool, int)) or isinstance(result, float):
            raise KDConfigError(
                "data.init_args.verifier",
                f"{name} returned {type(result).__name__}, not a bool",
                "return True when the response is right, else False",
            )
        return bool(result)

    return verify


# ---------------------------------------------------------------------------------------------- generated problems
def _arith(rng: random.Random, difficulty: int) -> ReasoningProblem:
    value = rng.randint(1, 20)
    expression, steps = str(value), []
    for _ in range(difficulty):
        op = rng.choice("+-*")
        operand = rng.randint(1, 20) if op != "*" else rng.randint(2, 5)
        result = value + operand if op == "+" else value - operand if op == "-" else value * operand
        steps.append(f"{value}{op}{operand}={result}.")
        expression = f"({expression}){op}{operand}" if len(steps) > 1 else f"{expression}{op}{operand}"
        value = result
    return ReasoningProblem(f"Compute {expression}.", " ".join([*steps, f"Answer: {value}"]), str(value), "arith")


def _modular(rng: random.Random, difficulty: int) -> ReasoningProblem:
    m = rng.randint(5, 13)
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 9)
    if difficulty == 1:
        total, expression, steps = a + b, f"({a}+{b}) mod {m}", [f"{a}+{b}={a + b}."]
    elif difficulty == 2:
        total, expression, steps = a * b, f"({a}*{b}) mod {m}", [f"{a}*{b}={a * b}."]
    else:
        total, expression = a * b + c, f"({a}*{b}+{c}) mod {m}"
        steps = [f"{a}*{b}={a * b}.", f"{a * b}+{c}={a * b + c}."]
    answer = total % m
    steps.append(f"{total} mod {m}={answer}.")
    return ReasoningProblem(f"Compute {expression}.", " ".join([*steps, f"Answer: {answer}"]), str(answer), "modular")


def _symbolic(rng: random.Random, difficulty: int) -> ReasoningProblem:
    letters = "".join(rng.sample("abcdefghijklmnopqrstuvwxyz", difficulty + 2))
    if rng.random() < 0.5:
        answer = letters[::-1]
        steps = f"Letters: {' '.join(letters)}. Reversed: {' '.join(answer)}."
        return ReasoningProblem(f"Reverse the letters {letters}.", f"{steps} Answer: {answer}", answer, "symbolic")
    answer = "".join(sorted(letters))
    steps = f"Letters: {' '.join(letters)}. Sorted: {' '.join(answer)}."
    return ReasoningProblem(f"Sort the letters {letters}.", f"{steps} Answer: {answer}", answer, "symbolic")


_GENERATORS: dict[str, Callable[[random.Random, int], ReasoningProblem]] = {
    "arith": _arith,
    "modular": _modular,
    "symbolic": _symbolic,
}


def generate_problems(
    counts: Sequence[int], families: Sequence[str], difficulties: Sequence[Sequence[int]], seed: int
) -> list[list[ReasoningProblem]]:
    """Disjoint lists of ``counts[i]`` problems with difficulties in ``difficulties[i]``, families round-robin.

    Statements never repeat within or across the lists (the small spaces of the easiest levels run out
    first: asking for more problems than exist is an error naming the count).
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[list[ReasoningProblem]] = []
    for count, levels in zip(counts, difficulties):
        problems: list[ReasoningProblem] = []
        attempts = 0
        while len(problems) < count:
            attempts += 1
            if attempts > 50 * count + 1000:
                raise KDConfigError(
                    "data.init_args.num_train",
                    f"found only {len(problems)} distinct problems of difficulties {list(levels)} in families "
                    f"{list(families)} ({count} asked for, statements never repeat across splits)",
                    "ask for fewer problems, or add families / harder levels",
                )
            family = families[len(problems) % len(families)]
            difficulty = levels[rng.randrange(len(levels))]
            problem = _GENERATORS[family](rng, difficulty)
            if problem.problem in seen:
                continue
            seen.add(problem.problem)
            problems.append(
                ReasoningProblem(problem.problem, problem.solution, problem.answer, problem.family, difficulty)
            )
        out.append(problems)
    return out


# ---------------------------------------------------------------------------------------------- JSONL readers
_FORMATS: dict[str, dict[str, str]] = {
    "gsm8k": {"problem": "question", "solution": "answer", "answer": ""},
    "math": {"problem": "problem", "solution": "solution", "answer": ""},
    "generic": {"problem": "prompt", "solution": "solution", "answer": "answer"},
}


def _level(value: Any) -> int:
    match = re.search(r"\d+", str(value)) if value is not None else None
    return int(match.group()) if match else 0


def read_reasoning_jsonl(
    path: str | Path,
    format: Literal["gsm8k", "math", "generic"] = "generic",
    problem_field: str | None = None,
    solution_field: str | None = None,
    answer_field: str | None = None,
    level_field: str = "level",
) -> list[ReasoningProblem]:
    """Problems of a JSONL file: GSM8K (``question``, ``answer`` ending in ``#### a``), MATH (``problem``,
    ``solution`` with ``\\boxed{a}``) or generic (``prompt``, ``solution``, ``answer``); field names can be
    overridden. The solution's final-answer marker becomes ``Answer: a`` so one verifier serves all formats.
    """
    if format not in _FORMATS:
        raise KDConfigError("data.init_args.format", f"must be one of {sorted(_FORMATS)}, got {format!r}")
    fields = dict(_FORMATS[format])
    for key, value in (("problem", problem_field), ("solution", solution_field), ("answer", answer_field)):
        if value is not None:
            fields[key] = value
    path = Path(path).expanduser()
    problems: list[ReasoningProblem] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise KDConfigError("data.init_args.paths", f"{path}:{number} is not JSON ({err.msg})") from None
        where = f"{path}:{number}"
        for key in ("problem", "solution"):
            if fields[key] not in record:
                raise KDConfigError(
                    f"data.init_args.{key}_field",
                    f"{where} has no field {fields[key]!r} (fields: {sorted(record)})",
                    f"set {key}_field to the record's {key} field",
                )
        solution = str(record[fields["solution"]])
        if fields["answer"]:
            if fields["answer"] not in record:
                raise KDConfigError(
                    "data.init_args.answer_field",
                    f"{where} has no answer field {fields['answer']!r} (fields: {sorted(record)})",
                    "set answer_field to the record's answer field, or use format: gsm8k / math",
                )
            answer = str(record[fields["answer"]])
        else:
            stated = final_answer(solution)
            if stated is None:
                raise KDConfigError(
                    "data.init_args.answer_field",
                    f"{where}: the {format} solution states no final answer (no '####' or \\boxed{{}})",
                    "fix the record, or give answer_field naming a field that holds the answer",
                )
            answer = stated
        solution = re.sub(r"####\s*([^\n]*)$", r"Answer: \1", solution.strip())
        if final_answer(solution) is None or format == "math":
            solution = f"{solution}\nAnswer: {answer}"
        family = str(record.get("type", record.get("family", format)))
        problems.append(
            ReasoningProblem(str(record[fields["problem"]]), solution, answer, family, _level(record.get(level_field)))
        )
    return problems


# ---------------------------------------------------------------------------------------------- batches
def _left_pad(rows: Sequence[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = True
    return ids, mask


def _right_pad(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad: int) -> tuple[Tensor, ...]:
    """``(input_ids, attention_mask, labels)``: prompt + response rows, labels on the responses only."""
    full = [p + r for p, r in zip(prompts, responses)]
    width = max(len(r) for r in full)
    input_ids = torch.full((len(full), width), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(full), width, dtype=torch.bool)
    labels = torch.full((len(full), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, row) in enumerate(zip(prompts, full)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = True
        labels[i, len(prompt) : len(row)] = input_ids[i, len(prompt) : len(row)]
    return input_ids, attention_mask, labels


def collate_reasoning(items: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Batch of encoded problems (see the module docstring)."""
    prompts, responses = [item["prompt"] for item in items], [item["response"] for item in items]
    input_ids, attention_mask, labels = _right_pad(prompts, responses, pad_token_id)
    prompt_ids, prompt_mask = _left_pad(prompts, pad_token_id)
    privileged_ids, privileged_mask = _left_pad([item["privileged"] for item in items], pad_token_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "privileged_ids": privileged_ids,
        "privileged_mask": privileged_mask,
        "answers": [item["answer"] for item in items],
        "family": [item["family"] for item in items],
        "difficulty": torch.tensor([item["difficulty"] for item in items], dtype=torch.long),
        "sample_index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }
    if any(item.get("sft_privileged") for item in items):
        sft_prompts = [item["privileged"] if item.get("sft_privileged") else item["prompt"] for item in items]
        sft = _right_pad(sft_prompts, responses, pad_token_id)
        batch.update(sft_input_ids=sft[0], sft_attention_mask=sft[1], sft_labels=sft[2])
    return batch


class EncodedProblems(Dataset):
    """Problems with their token ids: ``{"prompt", "response", "privileged", "answer", "family", ...}`` items."""

    def __init__(self, problems: Sequence[ReasoningProblem], items: Sequence[dict[str, Any]]) -> None:
        self.problems = list(problems)
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


# ---------------------------------------------------------------------------------------------- data module
class ReasoningDataModule(TokenLoaders, KDDataModule):
    """Problems with verifiable answers and worked reference solutions (see the module docstring).

    Args:
        source: ``"generated"`` (offline problems) or ``"jsonl"`` (files ``train_path``, ``val_path``,
            ``test_path``, relative to ``root`` unless absolute).
        families: generated families (subset of ``arith``, ``modular``, ``symbolic``).
        num_train, num_val, num_test: generated problems per split.
        train_difficulties, eval_difficulties: difficulty levels (1..3) of the generated training and
            evaluation problems (the split by difficulty); JSONL records are filtered by their ``level`` when
            these are given for them.
        train_path, val_path, test_path: JSONL files (``source="jsonl"``); ``val_path`` / ``test_path``
            ``None`` hold out ``val_fraction`` / reuse the validation set.
        format, problem_field, solution_field, answer_field: the JSONL layout (:func:`read_reasoning_jsonl`).
        val_fraction: share of a JSONL training file held out for validation when ``val_path`` is ``None``.
        verifier: ``"default"`` (:func:`verify_final_answer`) or ``"module.function"``.
        tokenizer: ``"byte"`` or a Hugging Face tokenizer folder / name.
        local_files_only: never download a tokenizer.
        chat_template: wrap prompts in the tokenizer's chat template: ``"auto"`` when it has one, ``"never"``,
            or ``"required"`` (an error when the tokenizer has none).
        prompt_template: the student prompt, with ``{problem}``.
        privileged_template: the teacher's privileged prompt, with ``{problem}`` and ``{solution}``.
        max_length: longest prompt + solution in tokens; longer JSONL records are dropped with a warning.
        privileged_fraction: share of the training rows whose *supervised fine-tuning* sequence
            (``sft_input_ids``, used by ``ReasoningSupervised`` only: teachers, bases, the SFT baseline) starts
            from the privileged prompt instead of the plain one; every other key stays plain. Large LLMs
            already use a reference solution in context; a tiny model trained from scratch has to learn it, or a
            self-teacher reading the privileged prompt (OPSD, MixSD) knows nothing more than the student. A
            choice of the CPU demos, 0 by default.
        **kwargs: :class:`~kd_lightning.data.base.KDDataModule` (``batch_size``, ``split_seed``, ...).
    """

    task = "language_modeling"

    def __init__(
        self,
        source: Literal["generated", "jsonl"] = "generated",
        families: Sequence[str] = FAMILIES,
        num_train: int = 2000,
        num_val: int = 120,
        num_test: int = 300,
        train_difficulties: Sequence[int] = (1, 2, 3),
        eval_difficulties: Sequence[int] = (1, 2, 3),
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        format: Literal["gsm8k", "math", "generic"] = "generic",
        problem_field: str | None = None,
        solution_field: str | None = None,
        answer_field: str | None = None,
        val_fraction: float = 0.1,
        verifier: str = "default",
        tokenizer: str = "byte",
        local_files_only: bool = True,
        chat_template: Literal["auto", "never", "required"] = "auto",
        prompt_template: str = DEFAULT_PROMPT,
        privileged_template: str = DEFAULT_PRIVILEGED,
        max_length: int = 256,
        privileged_fraction: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("num_workers", 0)
        super().__init__(**kwargs)
        checks = {
            "source": (source in ("generated", "jsonl"), "'generated' or 'jsonl'"),
            "families": (bool(families) and all(f in FAMILIES for f in families), f"a non-empty subset of {FAMILIES}"),
            "num_train": (num_train >= 1, ">= 1"),
            "num_val": (num_val >= 1, ">= 1"),
            "num_test": (num_test >= 0, ">= 0"),
            "train_difficulties": (bool(train_difficulties) and set(train_difficulties) <= {1, 2, 3}, "levels 1..3"),
            "eval_difficulties": (bool(eval_difficulties) and set(eval_difficulties) <= {1, 2, 3}, "levels 1..3"),
            "chat_template": (chat_template in ("auto", "never", "required"), "'auto', 'never' or 'required'"),
            "max_length": (max_length >= 8, ">= 8"),
            "val_fraction": (0.0 < val_fraction < 1.0, "in (0, 1)"),
            "privileged_fraction": (0.0 <= privileged_fraction <= 1.0, "in [0, 1]"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise KDConfigError(name, f"must be {allowed}, got {locals()[name]!r}")
        for name, template, keys in (
            ("prompt_template", prompt_template, ("{problem}",)),
            ("privileged_template", privileged_template, ("{problem}", "{solution}")),
        ):
            missing = [k for k in keys if k not in template]
            if missing:
                raise KDConfigError(name, f"has no {' or '.join(missing)} placeholder", f"include {', '.join(keys)}")
        if source == "jsonl" and train_path is None:
            raise KDConfigError("train_path", "is required with source: jsonl", "give the training JSONL file")
        self.source = source
        self.families = tuple(families)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.train_difficulties = tuple(train_difficulties)
        self.eval_difficulties = tuple(eval_difficulties)
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.format = format
        self.fields = {"problem_field": problem_field, "solution_field": solution_field, "answer_field": answer_field}
        self.val_fraction = val_fraction
        self.verifier_name = verifier
        self.verifier = checked_verifier(load_verifier(verifier), verifier)
        self.tokenizer_name = tokenizer
        self.local_files_only = local_files_only
        self.chat_template = chat_template
        self.prompt_template = prompt_template
        self.privileged_template = privileged_template
        self.max_length = max_length
        self.privileged_fraction = privileged_fraction
        #: Micro-batches per optimizer step, for ``num_items_in_batch`` (set by the LM methods).
        self.accumulate_grad_batches: int | None = None
        self.input_shape = (max_length,)

    # ------------------------------------------------------------------ tokenizer
    @cached_property
    def tokenizer(self) -> ByteTokenizer | HFTokenizer:
        tokenizer = load_tokenizer(self.tokenizer_name, self.local_files_only)
        if self.chat_template == "required" and not self._has_chat_template(tokenizer):
            raise KDConfigError(
                "data.init_args.chat_template",
                f"is 'required' but the tokenizer {self.tokenizer_name!r} has no chat template",
                "use a tokenizer with a chat_template, or chat_template: auto / never",
            )
        return tokenizer

    @staticmethod
    def _has_chat_template(tokenizer: Any) -> bool:
        inner = getattr(tokenizer, "tokenizer", None)
        return bool(getattr(inner, "chat_template", None))

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

    def _wrap(self, text: str) -> str:
        if self.chat_template == "never" or not self._has_chat_template(self.tokenizer):
            return text
        inner = self.tokenizer.tokenizer  # type: ignore[union-attr]
        return inner.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def format_prompt(self, problem: str) -> str:
        """The student's prompt for ``problem`` (chat template applied when used)."""
        return self._wrap(self.prompt_template.format(problem=problem))

    def format_privileged(self, problem: str, solution: str) -> str:
        """The teacher's privileged prompt: the problem and its reference solution."""
        return self._wrap(self.privileged_template.format(problem=problem, solution=solution))

    def encode(self, problem: ReasoningProblem, index: int) -> dict[str, Any]:
        """Token ids of one problem's prompt, response (`` solution`` + EOS) and privileged prompt."""
        tok = self.tokenizer
        bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return {
            "prompt": bos + tok.encode(self.format_prompt(problem.problem)),
            "response": tok.encode(" " + problem.solution) + eos,
            "privileged": bos + tok.encode(self.format_privileged(problem.problem, problem.solution)),
            "sft_privileged": False,
            "answer": problem.answer,
            "family": problem.family,
            "difficulty": problem.difficulty,
            "index": index,
        }

    # ------------------------------------------------------------------ problems
    def _path(self, name: str) -> Path:
        path = Path(getattr(self, name)).expanduser()
        path = path if path.is_absolute() else Path(self.root).expanduser() / path
        if not path.is_file():
            raise DatasetNotFoundError(
                f"reasoning JSONL ({name})",
                path.parent,
                [path.name],
                f"give data.init_args.{name} a file of one JSON record per line ({self.format} format), "
                "or use source: generated (offline problems)",
            )
        return path

    def _read(self, name: str) -> list[ReasoningProblem]:
        return read_reasoning_jsonl(self._path(name), self.format, **self.fields)

    @cached_property
    def problems(self) -> dict[str, list[ReasoningProblem]]:
        """Problems of ``train``, ``val`` and ``test``."""
        if self.source == "generated":
            train, val, test = generate_problems(
                (self.num_train, self.num_val, self.num_test),
                self.families,
                (self.train_difficulties, self.eval_difficulties, self.eval_difficulties),
                self.split_seed,
            )
            return {"train": train, "val": val, "test": test}
        train = self._read("train_path")
        if self.val_path is None:
            order = random.Random(self.split_seed).sample(range(len(train)), len(train))
            cut = max(1, round(self.val_fraction * len(train)))
            val = [train[i] for i in sorted(order[:cut])]
            train = [train[i] for i in sorted(order[cut:])]
        else:
            val = self._read("val_path")
        test = self._read("test_path") if self.test_path is not None else val
        return {"train": train, "val": val, "test": test}

    def data_identity(self) -> dict[str, Any]:
        """Digest of every problem and the tokenizer: what the teacher cache must tell apart."""
        digest = hashlib.sha256()
        for split, problems in self.problems.items():
            for p in problems:
                digest.update(f"{split}\t{p.problem}\t{p.solution}\t{p.answer}\n".encode())
        return {"problems": digest.hexdigest(), "tokenizer": self.tokenizer_name, "vocab_size": self.vocab_size}

    def _encoded(self, split: str) -> EncodedProblems:
        problems, items, dropped = [], [], 0
        chooser = random.Random(self.split_seed + 1)
        for problem in self.problems[split]:
            item = self.encode(problem, len(items))
            item["sft_privileged"] = split == "train" and chooser.random() < self.privileged_fraction
            if len(item["prompt"]) + len(item["response"]) > self.max_length:
                dropped += 1
                continue
            problems.append(problem)
            items.append(item)
        if not items:
            raise KDConfigError(
                "data.init_args.max_length",
                f"every {split} problem is longer than {self.max_length} tokens",
                "raise max_length",
            )
        if dropped:
            import warnings

            warnings.warn(
                f"{dropped} {split} problems longer than max_length={self.max_length} tokens were dropped.",
                stacklevel=2,
            )
        return EncodedProblems(problems, items)

    def longest_response_tokens(self) -> int:
        """Tokens of the longest reference response (solution + EOS) of any split (sets the data up)."""
        self.setup()
        return max(
            len(item["response"]) for split in (self.train_set, self.val_set, self.test_set) for item in split.items
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._encoded("train")
            self.val_set = self._encoded("val")
            self.test_set = self._encoded("test") if self.problems["test"] else self.val_set

    # ------------------------------------------------------------------ loaders
    def _collate(self) -> partial:
        return partial(collate_reasoning, pad_token_id=self.pad_token_id)
