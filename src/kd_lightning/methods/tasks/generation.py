"""Generation and verifier evaluation shared by the language-model methods.

- :func:`rollout` samples responses after left-padded prompts; :func:`response_logits` returns the logits
  that predict a response after any prompt (the student's or a longer privileged one: position alignment
  between prompts of different lengths); :func:`sequence_logprob` sums a response's log-probabilities.
- :class:`VerifierEvaluation` (mixed into
  :class:`~kd_lightning.methods.tasks.language_model.LanguageModelDistillation`):
  when the data module has a ``verifier`` (:class:`~kd_lightning.data.reasoning.ReasoningDataModule`), every
  LM method's validation/test also generates answers greedily and logs ``pass@1``, ``avg@k``
  (``eval_samples = k > 0`` samples at ``eval_temperature``), ``response_tokens`` (mean generated length),
  ``tokens_per_solved`` (generated tokens / solved problems: the token-efficiency claims) and
  ``pass@1/<family>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import upcast
from kd_lightning.methods.core import describe

__all__ = [
    "RatioMetric",
    "Rollout",
    "VerifierEvaluation",
    "check_generation_length",
    "response_logits",
    "rollout",
    "sequence_logprob",
]

REASONING_BATCH_KEYS = ("prompt_ids", "prompt_mask", "answers")
#: Evaluation generation length when neither the method nor the data says one.
DEFAULT_EVAL_TOKENS = 64


@dataclass
class Rollout:
    """Sampled responses after left-padded prompts.

    ``response_ids [B, N]`` (``pad_token_id`` after a row's EOS), ``response_mask [B, N]`` (true at the
    generated tokens, the first EOS included), ``lengths [B]`` (tokens per response).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.long().sum(-1)


def check_generation_length(field: str, value: int) -> None:
    """A generation length must be at least one token."""
    if value < 1:
        raise KDConfigError(field, f"must be >= 1 token, got {value}", "give the longest response to sample, e.g. 64")


@torch.no_grad()
def rollout(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    **model_kwargs: Any,
) -> Rollout:
    """Sample up to ``max_new_tokens`` after each left-padded prompt (``temperature=0``: greedy).

    The model runs in eval mode (dropout off) under ``no_grad`` and gets its mode back afterwards. Tokens
    after a row's first EOS are ``pad_token_id`` and masked. ``model_kwargs`` go to ``generate`` as they are
    (e.g. a vision-language model's ``images``).
    """
    check_generation_length("max_new_tokens", max_new_tokens)
    if not callable(getattr(model, "generate", None)):
        raise KDConfigError(
            "model.init_args.student", f"{describe(model)} has no generate()", "use TinyGPT or HFCausalLM"
        )
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **model_kwargs,
        )
    finally:
        model.train(was_training)
    response = out[:, prompt_ids.shape[1] :]
    mask = torch.ones_like(response, dtype=torch.bool)
    if eos_token_id is not None and response.shape[1]:
        is_eos = response == eos_token_id
        before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before each position
        mask = before == 0
    response = response.masked_fill(~mask, pad_token_id)
    return Rollout(prompt_ids, prompt_mask.bool(), response, mask)


def response_logits(
    model: Callable[..., Tensor],
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    **model_kwargs: Any,
) -> Tensor:
    """Logits ``[B, N, V]`` that predict each response token after its (left-padded) prompt.

    Runs ``model(cat(prompt, response), attention_mask=cat(masks))`` and keeps the columns ``P−1 … P+N−2``:
    column ``i`` of the result predicts ``response_ids[:, i]`` whatever the prompt's length, so a teacher
    reading a longer privileged prompt and a student reading the plain one are aligned token by token.
    ``model_kwargs`` go to the forward as they are (e.g. ``images``).
    """
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask.bool(), response_mask.bool()], dim=1)
    logits = model(ids, attention_mask=mask, **model_kwargs)
    width = prompt_ids.shape[1]
    return logits[:, width - 1 : width - 1 + response_ids.shape[1]]


def sequence_logprob(logits: Tensor, response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """``Σ_t log p(y_t)`` over the masked response tokens, per row ``[B]`` (float32 or wider)."""
    log_probs = F.log_softmax(upcast(logits), dim=-1)
    picked = log_probs.gather(-1, response_ids.masked_fill(~response_mask, 0).unsqueeze(-1)).squeeze(-1)
    return (picked * response_mask.to(picked.dtype)).sum(-1)


class RatioMetric(Metric):
    """``Σ numerator / Σ denominator`` over the epoch, synced across ranks (``nan`` when nothing was solved)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("numerator", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, numerator: Tensor, denominator: Tensor) -> None:
        self.numerator += numerator.double().sum()
        self.denominator += denominator.double().sum()

    def compute(self) -> Tensor:
        if float(self.denominator) == 0:
            return torch.tensor(float("nan"))
        return (self.numerator / self.denominator).float()


class VerifierEvaluation:
    """Verifier-judged generation metrics for LM methods (see the module docstring).

    The host sets ``eval_max_new_tokens``, ``eval_samples``, ``eval_temperature`` (:meth:`set_generation_eval`),
    calls :meth:`attach_reasoning_data` at setup, :meth:`build_verifier_metrics` with its metrics and
    :meth:`evaluate_with_verifier` per evaluation batch. It provides ``tokenizer``, ``verifier``,
    ``eos_token_id``, ``pad_token_id`` and the helpers :meth:`sample`, :meth:`decode_responses`, :meth:`rewards`.
    """

    metrics: nn.ModuleDict
    _update: Callable[..., None]
    log: Callable[..., Any]

    def set_generation_eval(self, eval_max_new_tokens: int | None, eval_samples: int, eval_temperature: float) -> None:
        if eval_max_new_tokens is not None:
            check_generation_length("eval_max_new_tokens", eval_max_new_tokens)
        if eval_samples < 0:
            raise KDConfigError("eval_samples", f"must be >= 0, got {eval_samples}", "0 disables avg@k")
        if eval_temperature <= 0:
            raise KDConfigError("eval_temperature", f"must be > 0, got {eval_temperature}")
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_samples = eval_samples
        self.eval_temperature = eval_temperature
        self.tokenizer: Any = None
        self.verifier: Callable[[str, str], bool] | None = None
        self.eos_token_id: int | None = None
        self.pad_token_id: int = 0
        self.families: list[str] = []

    def attach_reasoning_data(self, datamodule: Any) -> None:
        """Take the data's tokenizer, verifier, EOS/pad ids and evaluation families (when it has them)."""
        if datamodule is None:
            return
        self.tokenizer = getattr(datamodule, "tokenizer", None)
        self.verifier = getattr(datamodule, "verifier", None)
        self.eos_token_id = getattr(datamodule, "eos_token_id", None)
        self.pad_token_id = int(getattr(datamodule, "pad_token_id", 0) or 0)
        if self.eval_max_new_tokens is None and self.verifier is not None:
            longest = getattr(datamodule, "longest_response_tokens", None)
            self.eval_max_new_tokens = int(longest() * 1.25) + 4 if callable(longest) else DEFAULT_EVAL_TOKENS
        problems = getattr(datamodule, "problems", None)
        if isinstance(problems, Mapping):
            self.families = sorted({p.family for split in ("val", "test") for p in problems.get(split, [])})

    def build_verifier_metrics(self) -> None:
        if self.verifier is None:
            return
        for stage in ("val", "test"):
            self.metrics[f"{stage}_pass@1"] = MeanMetric()
            self.metrics[f"{stage}_response_tokens"] = MeanMetric()
            self.metrics[f"{stage}_tokens_per_solved"] = RatioMetric()
            if self.eval_samples:
                self.metrics[f"{stage}_avg@{self.eval_samples}"] = MeanMetric()
            for family in self.families:
                self.metrics[f"{stage}_pass@1/{family}"] = MeanMetric()

    # ------------------------------------------------------------------ helpers for methods
    def sample(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, **kwargs: Any) -> Rollout:
        """:func:`rollout` with the data's EOS and pad ids (other ``kwargs``, e.g. ``images``, reach ``generate``)."""
        kwargs.setdefault("eos_token_id", self.eos_token_id)
        kwargs.setdefault("pad_token_id", self.pad_token_id)
        return rollout(model, prompt_ids, prompt_mask, **kwargs)

    def decode_responses(self, result: Rollout) -> list[str]:
        """The responses as text (special tokens dropped)."""
        if self.tokenizer is None:
            raise KDConfigError("data.class_path", "the data module has no tokenizer", "use ReasoningDataModule")
        return [
            self.tokenizer.decode(ids[mask].tolist()) for ids, mask in zip(result.response_ids, result.response_mask)
        ]

    def rewards(self, result: Rollout, answers: list[str]) -> Tensor:
        """``1.0`` where the verifier accepts the response, else ``0.0`` (``[B]``, on the rollout's device)."""
        if self.verifier is None:
            raise KDConfigError("data.class_path", "the data module has no verifier", "use ReasoningDataModule")
        texts = self.decode_responses(result)
        values = [float(self.verifier(text, answer)) for text, answer in zip(texts, answers)]
        return torch.tensor(values, device=result.response_ids.device)

    # ------------------------------------------------------------------ evaluation
    def generation_inputs(self, batch: Any) -> dict[str, Any]:
        """Extra inputs of ``generate`` taken from an evaluation batch (none; a vision-language task gives the
        ``images``). Tensors are repeated row by row for ``avg@k``."""
        return {}

    def evaluate_with_verifier(self, model: nn.Module, batch: Any, stage: str) -> None:
        """Greedy answers (and ``eval_samples`` sampled ones) to the batch's prompts, judged by the verifier."""
        if self.verifier is None or not isinstance(batch, Mapping) or not all(k in batch for k in REASONING_BATCH_KEYS):
            return
        prompt_ids, prompt_mask, answers = batch["prompt_ids"], batch["prompt_mask"], batch["answers"]
        extra = self.generation_inputs(batch)
        greedy = self.sample(
            model, prompt_ids, prompt_mask, max_new_tokens=self.eval_max_new_tokens, temperature=0, **extra
        )
        solved = self.rewards(greedy, answers)
        lengths = greedy.lengths.float()
        n = len(answers)
        self._update(stage, "pass@1", solved, n, prog_bar=True)
        self._update(stage, "response_tokens", lengths, n)
        ratio = self.metrics[f"{stage}_tokens_per_solved"]
        ratio.update(lengths.sum(), solved.sum())
        self.log(f"{stage}/tokens_per_solved", ratio, batch_size=n)
        for family in self.families:
            rows = [i for i, f in enumerate(batch.get("family", [])) if f == family]
            if rows:
                self._update(stage, f"pass@1/{family}", solved[rows], len(rows))
        if self.eval_samples:
            k = self.eval_samples
            repeated = self.sample(
                model,
                prompt_ids.repeat_interleave(k, 0),
                prompt_mask.repeat_interleave(k, 0),
                max_new_tokens=self.eval_max_new_tokens,
                temperature=self.eval_temperature,
                **{key: v.repeat_interleave(k, 0) if isinstance(v, Tensor) else v for key, v in extra.items()},
            )
            correct = self.rewards(repeated, [a for a in answers for _ in range(k)])
            self._update(stage, f"avg@{k}", correct.view(n, k).mean(-1), n)
