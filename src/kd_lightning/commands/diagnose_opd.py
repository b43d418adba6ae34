"""``kd diagnose-opd``: where on-policy distillation helps — gradient alignment of distillation targets with the
ideal "raise the success probability" gradient ("Unmasking On-Policy Distillation", Armandpour et al., Apple,
arXiv 2605.10889, 2026; training-free).

    kd diagnose-opd --config configs/reasoning_opsd.yaml --ckpt runs/opsd/checkpoints/last.ckpt \\
        --configurations teacher self_privileged --questions 64 --output runs/diagnose_opd/opsd
    kd diagnose-opd --config my.yaml --student_ckpt student.ckpt --teacher_ckpt teacher.ckpt --questions 8 \\
        --candidates 8 --continuations 8 --every 16 --top_entropy 32 --data.init_args.num_test=64

The config is parsed like ``kd fit`` (``KDCLI(run=False)``; dotted overrides pass through). The **student** is the
method's ``student`` with weights from ``--student_ckpt``, else the ``student.*`` weights of ``--ckpt`` (a
``kd fit`` checkpoint), else the method's ``student_init`` (``scratch`` = as constructed: a note is printed). The
**teacher** (configurations ``teacher`` / ``teacher_privileged``) takes ``--teacher_ckpt``, else the ``teacher.*``
weights of ``--ckpt``, else ``model.init_args.teacher_ckpt``, else it is used as constructed when
``teacher_training.enabled`` is false. The data module must be a verifier-bearing one such as
:class:`~kd_lightning.data.reasoning.ReasoningDataModule` (``prompt_ids``/``privileged_ids`` batches, ``verifier``,
``tokenizer``).

For each of the first ``--questions`` problems of ``--split``: one rollout ``y ~ π`` (temperature ``--temperature``:
use the training sampling temperature), verified; nodes = every ``--every``-th response token plus the
``--top_entropy`` highest-entropy positions; at each node the candidates ``K_u`` = the student's top ``--candidates``
tokens + the sampled token, and ``--continuations`` (M) student continuations after each candidate — one
``generate`` call of ``M·|K_u|`` rows per node — give ``P_succ(u, k)`` from the verifier; then the alignment
``cos(g*, g_c)`` of every configuration and divergence (:mod:`kd_lightning.metrics.opd_alignment`).

Configurations (the target ``q`` at each node, next-token distribution after the same response prefix):

- ``teacher``: the teacher model on the student's prompt (on-policy KD);
- ``self_privileged``: the student itself on the privileged prompt (problem + reference solution): OPSD's teacher;
- ``teacher_privileged``: the teacher on the privileged prompt.

Outputs in ``--output``: ``alignment.csv`` (one row per node × configuration × divergence; ``cosine`` empty when the
node is skipped because every candidate succeeded equally often, or ``q = π``), ``summary.json`` (mean alignment with
95 % CIs by rollout correctness and by relative-position bucket, ``incorrect − correct`` per configuration and
divergence; settings; counts; cost) and ``alignment.png`` (skipped with a note without matplotlib).
``--parameter_space PREFIX ...`` adds ``cosine_params``: the cosine of ``J^T g*`` and ``J^T g_c`` over the
student's parameters whose names start with a prefix (for the LM head alone it equals the logit-space cosine).

RECONSTRUCTION: see :mod:`kd_lightning.metrics.opd_alignment`; every choice is a flag here. Seeded and deterministic
on a given device: the rollout of question ``i`` and the continuations at node ``(i, t)`` each reseed the global RNG
from ``--seed``, so results do not depend on the other questions or nodes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.metrics.opd_alignment import (
    DIVERGENCES,
    SPACES,
    alignment_cosine,
    candidate_set,
    node_alignments,
    select_nodes,
    summarise,
    token_entropy,
)

__all__ = [
    "CONFIGURATIONS",
    "CSV_FIELDS",
    "DiagnosticSettings",
    "build_parser",
    "diagnose",
    "estimate_success",
    "main",
    "plot_alignment",
    "write_outputs",
]

#: configuration -> (network role, prompt): which model gives q and on which prompt.
CONFIGURATIONS: dict[str, tuple[str, str]] = {
    "teacher": ("teacher", "prompt"),
    "self_privileged": ("student", "privileged"),
    "teacher_privileged": ("teacher", "privileged"),
}
CSV_FIELDS = (
    "question",
    "sample_index",
    "family",
    "rollout_correct",
    "response_length",
    "position",
    "relative_position",
    "entropy",
    "sampled_token",
    "num_candidates",
    "candidate_mass",
    "p_succ_min",
    "p_succ_max",
    "p_succ_spread",
    "expected_success",
    "configuration",
    "divergence",
    "skipped",
    "cosine",
    "cosine_params",
)


@dataclass
class DiagnosticSettings:
    """Every knob of the diagnostic (defaults: the spec's reconstruction)."""

    configurations: Sequence[str] = ("teacher", "self_privileged")
    divergences: Sequence[str] = DIVERGENCES
    questions: int = 16
    split: str = "test"
    candidates: int = 8
    continuations: int = 8
    every: int = 16
    top_entropy: int = 32
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    space: str = "vocab"
    equal_tol: float = 0.0
    ci_unit: str = "question"
    ci_level: float = 0.95
    position_buckets: int = 3
    parameter_space: Sequence[str] = field(default_factory=tuple)

    def check(self) -> None:
        """Raise :class:`KDConfigError` naming the flag of the first bad value."""
        unknown = [c for c in self.configurations if c not in CONFIGURATIONS]
        if not self.configurations or unknown:
            raise KDConfigError(
                "--configurations",
                f"unknown {unknown}" if unknown else "is empty",
                f"choose from {list(CONFIGURATIONS)}",
            )
        bad = [d for d in self.divergences if d not in DIVERGENCES]
        if not self.divergences or bad:
            raise KDConfigError("--divergences", f"unknown {bad}" if bad else "is empty", f"choose from {DIVERGENCES}")
        checks = {
            "--questions": (self.questions >= 1, ">= 1"),
            "--candidates": (self.candidates >= 1, ">= 1"),
            "--continuations": (self.continuations >= 1, ">= 1"),
            "--every": (self.every >= 0, ">= 0 (0: no regular nodes)"),
            "--top_entropy": (self.top_entropy >= 0, ">= 0 (0: no entropy nodes)"),
            "--max_new_tokens": (self.max_new_tokens >= 1, ">= 1 (a response needs a token)"),
            "--temperature": (self.temperature > 0, "> 0 (the sampling temperature of training)"),
            "--top_k": (self.top_k is None or self.top_k >= 1, ">= 1 or omitted"),
            "--equal_tol": (self.equal_tol >= 0, ">= 0"),
            "--ci_level": (0 < self.ci_level < 1, "in (0, 1)"),
            "--position_buckets": (self.position_buckets >= 1, ">= 1"),
            "--space": (self.space in SPACES, f"one of {SPACES}"),
            "--ci_unit": (self.ci_unit in ("question", "node"), "question or node"),
            "--split": (self.split in ("train", "val", "test"), "train, val or test"),
        }
        for flag, (ok, allowed) in checks.items():
            if not ok:
                raise KDConfigError(flag, f"must be {allowed}, got {getattr(self, flag[2:])!r}", "see --help")
        if self.every == 0 and self.top_entropy == 0:
            raise KDConfigError("--every", "and --top_entropy are both 0: no node is selected", "set one of them > 0")


# ---------------------------------------------------------------------------------------------- model helpers
def _check_length(model: nn.Module, length: int, role: str) -> None:
    limit = getattr(model, "max_seq_len", None)
    if isinstance(limit, int) and length > limit:
        raise KDConfigError(
            "--max_new_tokens",
            f"a {role} sequence of {length} tokens exceeds the model's max_seq_len ({limit})",
            "lower --max_new_tokens or use shorter prompts",
        )


def next_token_logits(model: nn.Module, prompt: Tensor, response: Tensor) -> Tensor:
    """``[N, V]`` logits of ``model`` predicting each of the ``N`` response tokens after the unpadded ``prompt``."""
    ids = torch.cat([prompt, response])[None]
    logits = model(ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))
    return logits[0, prompt.numel() - 1 : prompt.numel() - 1 + response.numel()]


def _cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    """Tokens up to and including the first ``eos``."""
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


def estimate_success(
    model: nn.Module,
    prefix: Tensor,
    response_prefix: list[int],
    candidates: Tensor,
    continuations: int,
    remaining: int,
    verify: Callable[[list[int]], bool],
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> tuple[Tensor, int]:
    """``P_succ(u, k)`` for each candidate: the fraction of ``continuations`` student continuations of
    ``prefix + [k]`` (at most ``remaining`` new tokens) whose response ``response_prefix + [k] + continuation`` the
    verifier accepts. A candidate that ends the response (``k`` = EOS, or no token budget left) is verified once
    (its continuations would all be the same). All other candidates are continued in ONE ``generate`` call of
    ``continuations · |K|`` rows. Returns ``(P_succ [K], rows generated)``."""
    values = torch.zeros(candidates.numel(), dtype=torch.float64)
    open_ = [j for j, k in enumerate(candidates.tolist()) if k != eos_token_id and remaining > 0]
    for j, k in enumerate(candidates.tolist()):
        if j not in open_:
            values[j] = float(verify([*response_prefix, k]))
    if not open_:
        return values, 0
    chosen = candidates[open_].to(prefix.device)
    rows = torch.cat([prefix.expand(len(open_), -1), chosen[:, None]], dim=1).repeat_interleave(continuations, dim=0)
    generated = model.generate(
        rows,
        attention_mask=torch.ones_like(rows, dtype=torch.bool),
        max_new_tokens=remaining,
        temperature=temperature,
        top_k=top_k,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    tails = generated[:, rows.shape[1] :].tolist()
    for r, tail in enumerate(tails):
        j = open_[r // continuations]
        k = int(candidates[j])
        values[j] += float(verify(_cut_at_eos([*response_prefix, k, *tail], eos_token_id))) / continuations
    return values, len(tails)


def _parameters(model: nn.Module, prefixes: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    chosen = [(n, p) for n, p in model.named_parameters() if any(n.startswith(prefix) for prefix in prefixes)]
    if not chosen:
        names = [n for n, _ in model.named_parameters()][:6]
        raise KDConfigError(
            "--parameter_space", f"no student parameter name starts with {list(prefixes)}", f"names look like {names}"
        )
    return chosen


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return value


# ---------------------------------------------------------------------------------------------- the diagnostic
def _questions(datamodule: Any, split: str, count: int) -> Iterator[dict[str, Any]]:
    loader = {
        "train": datamodule.train_dataloader,
        "val": datamodule.val_dataloader,
        "test": datamodule.test_dataloader,
    }
    if split == "train":  # the training loader shuffles: read the encoded set in order instead
        dataset = datamodule.train_set
        collate = datamodule._collate()
        batches: Any = (collate([dataset[i]]) for i in range(len(dataset)))
    else:
        batches = loader[split]()
    seen = 0
    for batch in batches:
        for i in range(batch["prompt_ids"].shape[0]):
            if seen >= count:
                return
            yield {
                "prompt": batch["prompt_ids"][i][batch["prompt_mask"][i].bool()],
                "privileged": batch["privileged_ids"][i][batch["privileged_mask"][i].bool()],
                "answer": batch["answers"][i],
                "family": batch["family"][i] if "family" in batch else "",
                "sample_index": int(batch["sample_index"][i]) if "sample_index" in batch else seen,
            }
            seen += 1


def _check_datamodule(datamodule: Any) -> None:
    missing = [name for name in ("verifier", "tokenizer") if not hasattr(datamodule, name)]
    if missing:
        raise KDConfigError(
            "data",
            f"{type(datamodule).__name__} has no {' or '.join(missing)}",
            "kd diagnose-opd needs a verifiable-reasoning data module (data.class_path: ReasoningDataModule)",
        )


def diagnose(
    student: nn.Module,
    teacher: nn.Module | None,
    datamodule: Any,
    settings: DiagnosticSettings,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the diagnostic; returns the CSV rows and the counts (see the module docstring)."""
    settings.check()
    _check_datamodule(datamodule)
    if teacher is None and any(CONFIGURATIONS[c][0] == "teacher" for c in settings.configurations):
        raise KDConfigError(
            "--configurations", "a teacher configuration needs a teacher", "give a distillation config or drop it"
        )
    tokenizer, verifier = datamodule.tokenizer, datamodule.verifier
    eos = getattr(datamodule, "eos_token_id", getattr(tokenizer, "eos_token_id", None))
    pad = int(getattr(datamodule, "pad_token_id", getattr(tokenizer, "pad_token_id", 0)) or 0)
    models = {"student": student, "teacher": teacher}
    for model in models.values():
        if model is not None:
            model.to(device).eval()
    params = _parameters(student, settings.parameter_space) if settings.parameter_space else []
    for _, p in params:
        p.requires_grad_(True)
    T = settings.temperature
    rows: list[dict[str, Any]] = []
    counts = {"questions": 0, "correct": 0, "nodes": 0, "skipped_equal_success": 0, "undefined_cosine": 0}
    counts |= {"continuation_rows": 0, "generate_calls": 0}
    started = time.perf_counter()
    datamodule.setup("fit" if settings.split != "test" else "test")
    for index, item in enumerate(_questions(datamodule, settings.split, settings.questions)):
        prompt, privileged, answer = item["prompt"].to(device), item["privileged"].to(device), item["answer"]

        def verify(response: list[int], answer: str = answer) -> bool:
            body = response[:-1] if (eos is not None and response and response[-1] == eos) else response
            return bool(verifier(tokenizer.decode(body), answer))

        _check_length(student, prompt.numel() + settings.max_new_tokens, "student prompt + response")
        torch.manual_seed(_seed(settings.seed, index))
        with torch.no_grad():
            generated = student.generate(
                prompt[None],
                attention_mask=torch.ones_like(prompt[None], dtype=torch.bool),
                max_new_tokens=settings.max_new_tokens,
                temperature=T,
                top_k=settings.top_k,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        response_list = _cut_at_eos(generated[0, prompt.numel() :].tolist(), eos)
        response = torch.tensor(response_list, dtype=torch.long, device=device)
        n = len(response_list)
        correct = verify(response_list)
        counts["questions"] += 1
        counts["correct"] += int(correct)
        contexts = {"prompt": prompt, "privileged": privileged}
        with torch.no_grad():
            student_logits = next_token_logits(student, prompt, response).float()
            targets: dict[str, Tensor] = {}
            for name in settings.configurations:
                role, context = CONFIGURATIONS[name]
                model = models[role]
                assert model is not None
                _check_length(model, contexts[context].numel() + n, f"{name} context + response")
                targets[name] = next_token_logits(model, contexts[context], response).float()
            student_logits, targets = _common_vocab(student_logits, targets)
        entropy = token_entropy(student_logits, T)
        nodes = select_nodes(entropy, settings.every, settings.top_entropy).tolist()
        graph_logits = None
        if params:
            with torch.enable_grad():
                graph_logits = next_token_logits(student, prompt, response).float() / T
        for t in nodes:
            candidates = candidate_set(student_logits[t] / T, response_list[t], settings.candidates)
            torch.manual_seed(_seed(settings.seed, index, t + 1))
            with torch.no_grad():
                p_succ, generated_rows = estimate_success(
                    student,
                    torch.cat([prompt, response[:t]]),
                    response_list[:t],
                    candidates.to(device),
                    settings.continuations,
                    settings.max_new_tokens - t - 1,
                    verify,
                    temperature=T,
                    top_k=settings.top_k,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
            counts["continuation_rows"] += generated_rows
            counts["generate_calls"] += int(generated_rows > 0)
            counts["nodes"] += 1
            result = node_alignments(
                student_logits[t].cpu(),
                {name: logits[t].cpu() for name, logits in targets.items()},
                candidates.cpu(),
                p_succ,
                settings.divergences,
                temperature=T,
                space=settings.space,
                equal_tol=settings.equal_tol,
            )
            counts["skipped_equal_success"] += int(result["skipped"] is not None)
            param_cosines = _parameter_cosines(graph_logits, t, result, candidates, params) if params else {}
            probs = torch.softmax(student_logits[t].cpu() / T, dim=-1)
            base = {
                "question": index,
                "sample_index": item["sample_index"],
                "family": item["family"],
                "rollout_correct": int(correct),
                "response_length": n,
                "position": t,
                "relative_position": t / max(n - 1, 1),
                "entropy": float(entropy[t]),
                "sampled_token": response_list[t],
                "num_candidates": candidates.numel(),
                "candidate_mass": float(probs[candidates.cpu()].sum()),
                "p_succ_min": float(p_succ.min()),
                "p_succ_max": float(p_succ.max()),
                "p_succ_spread": result["spread"],
                "expected_success": result["expected_success"],
            }
            for (name, divergence), cosine in result["cosine"].items():
                undefined = result["skipped"] is None and math.isnan(cosine)
                counts["undefined_cosine"] += int(undefined)
                rows.append(
                    {
                        **base,
                        "configuration": name,
                        "divergence": divergence,
                        "skipped": result["skipped"] or ("zero_distillation_direction" if undefined else ""),
                        "cosine": "" if math.isnan(cosine) else cosine,
                        "cosine_params": _fmt(param_cosines.get((name, divergence))),
                    }
                )
        log(
            f"kd diagnose-opd: question {index}: rollout {'correct' if correct else 'incorrect'} "
            f"({n} tokens), {len(nodes)} nodes"
        )
    counts["seconds"] = time.perf_counter() - started
    if not counts["questions"]:
        raise KDConfigError("--split", f"the {settings.split} split has no problems", "choose another split")
    return rows, counts


def _common_vocab(student_logits: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Slice student and target logits to one vocabulary (padding rows of one tokenizer family; different
    tokenizers are an error, :func:`~kd_lightning.losses.lm.align_vocab`)."""
    from kd_lightning.losses.lm import align_vocab

    size = student_logits.shape[-1]
    for logits in targets.values():
        if logits.shape[-1] != student_logits.shape[-1]:
            size = min(size, align_vocab(student_logits, logits)[0].shape[-1])
    return student_logits[..., :size], {name: logits[..., :size] for name, logits in targets.items()}


def _fmt(value: float | None) -> Any:
    return "" if value is None or math.isnan(value) else value


def _parameter_cosines(
    graph_logits: Tensor | None,
    t: int,
    result: Mapping[str, Any],
    candidates: Tensor,
    params: Sequence[tuple[str, nn.Parameter]],
) -> dict[tuple[str, str], float]:
    """Cosines of ``J^T g*`` and ``J^T g_c`` over ``params`` (``J``: Jacobian of the node's logits)."""
    assert graph_logits is not None
    if result["skipped"]:
        return {}
    vocab = graph_logits.shape[-1]
    keys = list(result["directions"])
    vectors = []
    for vector in [result["ideal"], *(result["directions"][k] for k in keys)]:
        if vector.numel() != vocab:  # candidates space: the vector lives on K_u
            vector = torch.zeros(vocab, dtype=vector.dtype).index_put((candidates.cpu(),), vector.cpu())
        vectors.append(vector)
    stacked = torch.stack(vectors).to(graph_logits)
    tensors = [p for _, p in params]
    try:  # every vector-Jacobian product in one backward pass
        grads = torch.autograd.grad(
            graph_logits[t], tensors, grad_outputs=stacked, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        flat = [
            (g if g is not None else torch.zeros(len(vectors), *p.shape, device=p.device)).flatten(1)
            for g, p in zip(grads, tensors)
        ]
        pulled = torch.cat(flat, dim=1)
    except RuntimeError:  # an operation without a batching rule: one backward per vector
        rows = []
        for vector in stacked:
            grads = torch.autograd.grad(
                graph_logits[t], tensors, grad_outputs=vector, retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, tensors)])
            )
        pulled = torch.stack(rows)
    return {key: alignment_cosine(pulled[0], pulled[i + 1]) for i, key in enumerate(keys)}


# ---------------------------------------------------------------------------------------------- outputs
def write_outputs(out: Path, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    """``alignment.csv`` and ``summary.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "alignment.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def plot_alignment(summary: Mapping[str, Any], path: Path) -> str | None:
    """Bar chart (alignment by rollout correctness, 95 % CI) and line chart (by position bucket); returns a note
    instead of writing when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: alignment.png skipped (pip install matplotlib)"
    by_correctness = summary["by_correctness"]
    names = list(by_correctness)
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(names) + 4), 4))
    width = 0.38
    for offset, group, colour in ((-width / 2, "incorrect", "tab:red"), (width / 2, "correct", "tab:green")):
        means, errors = [], [[], []]
        for name in names:
            stats = by_correctness[name][group]
            mean = stats["mean"] if stats["mean"] is not None else math.nan
            means.append(mean)
            errors[0].append(mean - stats["ci_low"] if stats["ci_low"] is not None else 0.0)
            errors[1].append(stats["ci_high"] - mean if stats["ci_high"] is not None else 0.0)
        positions = [i + offset for i in range(len(names))]
        left.bar(positions, means, width, yerr=errors, capsize=3, color=colour, label=f"{group} rollouts")
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("cos(g*, g_c) (95% CI)")
    left.set_title("Alignment by rollout correctness")
    left.legend(fontsize=8)
    for name in names:
        buckets = summary["by_position"][name]
        labels = list(buckets)
        values = [buckets[b]["mean"] if buckets[b]["mean"] is not None else math.nan for b in labels]
        right.plot(labels, values, marker="o", label=name)
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xlabel("relative position in the rollout")
    right.set_title("Alignment by position")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd diagnose-opd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    defaults = DiagnosticSettings()
    add = parser.add_argument
    add("--config", action="append", required=True, help="a kd fit config (repeatable, like kd fit)")
    add("--ckpt", default=None, help="a kd fit checkpoint: its student.* (and teacher.*) weights")
    add("--student_ckpt", default=None, help="student weights (override --ckpt)")
    add("--teacher_ckpt", default=None, help="teacher weights (override --ckpt and model.init_args.teacher_ckpt)")
    add("--trust_checkpoint", action="store_true", help="unpickle checkpoints fully (your own files only)")
    add("--output", type=Path, default=None, help="output folder (default runs/diagnose_opd/<config stem>)")
    add("--configurations", nargs="+", default=list(defaults.configurations), help=f"of {list(CONFIGURATIONS)}")
    add("--divergences", nargs="+", default=list(defaults.divergences), help=f"of {list(DIVERGENCES)}")
    add("--questions", type=int, default=defaults.questions, help="problems diagnosed (one rollout each)")
    add("--split", default=defaults.split, help="train, val or test (default test)")
    add("--candidates", type=int, default=defaults.candidates, help="K: top-K student tokens per node (+ sampled)")
    add("--continuations", type=int, default=defaults.continuations, help="M: continuations per candidate")
    add("--every", type=int, default=defaults.every, help="a node every n-th response token (0: none)")
    add("--top_entropy", type=int, default=defaults.top_entropy, help="plus the m highest-entropy positions")
    add("--max_new_tokens", type=int, default=None, help="response budget (default: the method's eval_max_new_tokens)")
    add("--temperature", type=float, default=None, help="sampling temperature (default: the method's, else 1)")
    add("--top_k", type=int, default=None, help="top-k sampling (default: the method's, else none; 0: none)")
    add("--seed", type=int, default=defaults.seed)
    add("--space", choices=SPACES, default=defaults.space, help="distillation direction on the vocab or on K_u")
    add("--equal_tol", type=float, default=defaults.equal_tol, help="skip a node when max-min P_succ <= this")
    add("--ci_unit", choices=("question", "node"), default=defaults.ci_unit, help="the CI's sample unit")
    add("--ci_level", type=float, default=defaults.ci_level)
    add("--position_buckets", type=int, default=defaults.position_buckets)
    add("--parameter_space", nargs="*", default=[], help="student parameter-name prefixes for the parameter cosine")
    add("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', ...")
    add("--no_plot", action="store_true", help="do not write alignment.png")
    return parser


def load_networks(args: argparse.Namespace, overrides: Sequence[str], needs_teacher: bool) -> tuple[Any, ...]:
    """``(method module, student, teacher or None, data module, description)`` from the config and checkpoints."""
    from kd_lightning.cli import KDCLI
    from kd_lightning.models.checkpoints import load_weights, trusted_checkpoints

    cli_args: list[str] = []
    for config in args.config:
        cli_args += ["--config", config]
    cli_args += [*overrides, "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]  # LightningCLI must not see this command's own arguments
    try:
        with trusted_checkpoints(args.trust_checkpoint):
            cli = KDCLI(run=False, args=cli_args)
    finally:
        sys.argv = saved_argv
    with trusted_checkpoints(args.trust_checkpoint):
        module = cli.model
        student = getattr(module, "student", None)
        if not isinstance(student, nn.Module) or not hasattr(student, "generate"):
            raise KDConfigError(
                "model.init_args.student", "is not a language model with generate()", "use TinyGPT or HFCausalLM"
            )
        teacher = getattr(module, "teacher", None) if len(getattr(module, "teachers", {}) or {}) == 1 else None
        init_args = cli.config["model"]["init_args"]
        notes: list[str] = []
        if needs_teacher:
            if teacher is None:
                raise KDConfigError(
                    "--configurations",
                    f"{type(module).__name__} has no single teacher",
                    "give a distillation config with model.init_args.teacher, or use self_privileged only",
                )
            if args.teacher_ckpt:  # a distillation checkpoint (student.* and teacher.*): its teacher
                key = "teacher" if _has_both(args.teacher_ckpt) else "auto"
                load_weights(teacher, args.teacher_ckpt, "--teacher_ckpt", key=key)
                notes.append(f"teacher: {args.teacher_ckpt}")
            elif args.ckpt and _has_role(args.ckpt, "teacher"):
                load_weights(teacher, args.ckpt, "--ckpt", key="teacher")
                notes.append(f"teacher: teacher.* of {args.ckpt}")
            elif init_args.get("teacher_ckpt"):
                notes.append(f"teacher: {init_args.get('teacher_ckpt')}")
            else:
                training = cli.config.get("teacher_training")
                if training is None or training.get("enabled", True):
                    raise KDConfigError(
                        "--teacher_ckpt",
                        "the teacher has no weights (no --teacher_ckpt, no teacher.* in --ckpt, no teacher_ckpt)",
                        "pass the teacher kd fit trained (its cached path is printed by the fit), or set "
                        "teacher_training.enabled=false to use it as constructed",
                    )
                notes.append("teacher: as constructed (teacher_training.enabled is false)")
        if args.student_ckpt:
            load_weights(
                student,
                args.student_ckpt,
                "--student_ckpt",
                key="auto" if not _has_both(args.student_ckpt) else "student",
            )
            notes.append(f"student: {args.student_ckpt}")
        elif args.ckpt:
            load_weights(student, args.ckpt, "--ckpt", key="student" if _has_role(args.ckpt, "student") else "auto")
            notes.append(f"student: student.* of {args.ckpt}")
        elif getattr(module, "student_init", "scratch") != "scratch" and hasattr(module, "initialise_student"):
            module.initialise_student()
            notes.append(f"student: student_init={module.student_init}")
        else:
            notes.append("student: AS CONSTRUCTED (untrained: no --student_ckpt / --ckpt)")
    description = {"configs": [str(c) for c in args.config], "overrides": list(overrides), "weights": notes}
    return module, student, teacher, cli.datamodule, description


def _roles(path: str) -> set[str]:
    from kd_lightning.models.checkpoints import read_checkpoint, state_dict_of

    keys = state_dict_of(read_checkpoint(path, "--ckpt")).keys()
    return {role for role in ("student", "teacher") if any(k.startswith(role + ".") for k in keys)}


def _has_role(path: str, role: str) -> bool:
    return role in _roles(path)


def _has_both(path: str) -> bool:
    return _roles(path) == {"student", "teacher"}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``kd diagnose-opd``: writes the three outputs and returns the summary."""
    parser = build_parser()
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    settings = DiagnosticSettings(
        configurations=tuple(args.configurations),
        divergences=tuple(args.divergences),
        questions=args.questions,
        split=args.split,
        candidates=args.candidates,
        continuations=args.continuations,
        every=args.every,
        top_entropy=args.top_entropy,
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else 48,
        temperature=1.0,
        top_k=None,
        seed=args.seed,
        space=args.space,
        equal_tol=args.equal_tol,
        ci_unit=args.ci_unit,
        ci_level=args.ci_level,
        position_buckets=args.position_buckets,
        parameter_space=tuple(args.parameter_space),
    )
    settings.check()
    needs_teacher = any(CONFIGURATIONS[c][0] == "teacher" for c in settings.configurations)
    module, student, teacher, datamodule, description = load_networks(args, overrides, needs_teacher)
    # the rollouts use the training sampling settings: the method's sampling_temperature / top_k unless given
    method_temperature = getattr(module, "sampling_temperature", None)
    settings.temperature = args.temperature if args.temperature is not None else float(method_temperature or 1.0)
    method_top_k = getattr(module, "top_k", None) if method_temperature is not None else None
    top_k = args.top_k if args.top_k is not None else method_top_k
    settings.top_k = int(top_k) if isinstance(top_k, int) and top_k > 0 else None
    settings.check()
    if args.max_new_tokens is None:
        budget = getattr(module, "eval_max_new_tokens", None)
        if isinstance(budget, int) and budget >= 1:
            settings.max_new_tokens = budget
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = (args.output or Path("runs") / "diagnose_opd" / Path(args.config[-1]).stem).resolve()
    for note in description["weights"]:
        print(f"kd diagnose-opd: {note}", flush=True)
    rows, counts = diagnose(student, teacher if needs_teacher else None, datamodule, settings, device)
    summary: dict[str, Any] = {
        "settings": asdict(settings) | {"device": str(device)},
        "source": description,
        "questions": counts["questions"],
        "rollout_accuracy": counts["correct"] / counts["questions"],
        "counts": counts,
        **summarise(rows, settings.ci_unit, settings.ci_level, settings.position_buckets),
    }
    if settings.parameter_space:
        summary["parameter_space"] = summarise(
            rows, settings.ci_unit, settings.ci_level, settings.position_buckets, value="cosine_params"
        )
    else:
        summary["parameter_space"] = "skipped (pass --parameter_space PREFIX ... to compute it)"
    write_outputs(out, rows, summary)
    note = None if args.no_plot else plot_alignment(summary, out / "alignment.png")
    summary["plot"] = note or ("skipped (--no_plot)" if args.no_plot else str(out / "alignment.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary), flush=True)
    plotted = "" if args.no_plot else (f"; {note}" if note else ", alignment.png")
    print(f"kd diagnose-opd: wrote {out}/alignment.csv, summary.json{plotted}", flush=True)
    return summary


def format_table(summary: Mapping[str, Any]) -> str:
    """Markdown table: mean alignment (95 % CI) on incorrect and correct rollouts per configuration/divergence."""

    def cell(stats: Mapping[str, Any]) -> str:
        if stats["mean"] is None:
            return "n/a"
        ci = f" [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]" if stats["ci_low"] is not None else ""
        return f"{stats['mean']:.3f}{ci} (n={stats['n_nodes']})"

    lines = [
        f"rollout accuracy {summary['rollout_accuracy']:.3f} over {summary['questions']} questions; "
        f"{summary['counts']['nodes']} nodes, {summary['counts']['skipped_equal_success']} skipped (equal P_succ)",
        "| configuration/divergence | incorrect rollouts | correct rollouts | incorrect - correct |",
        "|---|---|---|---|",
    ]
    for name, groups in summary["by_correctness"].items():
        gap = summary["incorrect_minus_correct"][name]
        diff = "n/a" if gap["difference"] is None else f"{gap['difference']:+.3f}"
        if gap["ci_low"] is not None:
            diff += f" [{gap['ci_low']:+.3f}, {gap['ci_high']:+.3f}]"
        lines.append(f"| {name} | {cell(groups['incorrect'])} | {cell(groups['correct'])} | {diff} |")
    return "\n".join(lines)
