"""On-policy distillation of causal LMs: the student learns on its own samples (GKD / MiniLLM / OPD)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.divergences import reverse_kl
from kd_lightning.losses.lm import shift_for_next_token
from kd_lightning.methods.tasks.language_model import (
    LanguageModelDistillation,
    lm_batch,
    pad_batches,
    prompt_lengths,
    sample_continuations,
    sampled_token_reverse_kl,
)


class OnPolicyDistill(LanguageModelDistillation):
    """On-policy distillation: reverse KL to the teacher on sequences the student samples itself.

    Per batch, a fraction λ (``on_policy_fraction``) of the sequences is replaced by the student's own
    continuation of their prompt (sampled with ``student.generate`` under ``no_grad``, dropout off);
    the rest stay dataset sequences (GKD's mixture, Agarwal et al., ICLR 2024, arXiv 2306.13649). The
    loss is the token-level reverse KL ``KL(q_S ‖ p_T)`` on every predicted token, normalised over the
    valid tokens of the accumulation group:

    - ``estimator="full"``: the exact full-vocabulary ``Σ_v q(v)·(log q(v) − log p_T(v))`` per token;
    - ``estimator="sampled_token"`` (MiniLLM's single step / Thinking Machines' on-policy distillation):
      on the sampled tokens, ``−sg(r_t)·log q(y_t)`` with the teacher's dense per-token reward
      ``r_t = log p_T(y_t) − log q(y_t)``: in expectation over ``y_t ~ q`` the gradient of the reverse KL
      (Decoupling-KL, Proposition 1(ii)). Dataset sequences, which the student did not sample, keep the
      full reverse KL.

    The prompt of a sequence is its prompt part (the leading ``-100`` labels of prompt/response data) or,
    for packed plain text, its first ``prompt_length`` tokens. The student samples as many tokens as the
    dataset sequence continues (``max_new_tokens: null``) or ``max_new_tokens``; only the continuation is
    trained in an on-policy row. Logged: ``train/reverse_kl`` (full reverse KL per token),
    ``train/reward`` (mean r_t on sampled tokens), ``train/on_policy_fraction``.

    Normalisation: the data's token count of the accumulation group, scaled by the micro-batch's ratio of
    trained to loaded tokens — exact when every micro-batch changes in the same proportion (``mixing:
    rows`` with ``λ·B`` an integer, equal prompts, no EOS stop), approximate otherwise.

    RECONSTRUCTION / choices (arguments): ``mixing="rows"`` replaces ``⌊λB⌋`` (+1 with probability
    ``λB − ⌊λB⌋``) rows of every batch; ``"batch"`` is GKD's coin per batch (all rows or none).
    ``sampling_temperature`` ≠ 1 or ``top_k`` make the samples not ``q``'s own: the sampled-token estimator
    is then biased (TRL's GKD samples at 0.9 anyway).

    Args:
        on_policy_fraction: λ ∈ [0, 1], the expected fraction of on-policy sequences per batch.
        mixing: ``"rows"`` or ``"batch"`` (see above).
        estimator: ``"full"`` or ``"sampled_token"``.
        temperature: τ of both softmaxes in the loss.
        prompt_length: prompt tokens of packed plain-text sequences.
        max_new_tokens: tokens sampled per prompt; ``None``: as many as the dataset sequence continues.
        sampling_temperature: temperature of the student's sampling.
        top_k: top-k filter of the sampling (``None``: the full distribution).
        eos_token_id: a sample stops after this token (kept); ``None``: never.
        pad_token_id: id written at padded positions (masked anyway).
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.LanguageModelDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        on_policy_fraction: float = 0.5,
        mixing: Literal["rows", "batch"] = "rows",
        estimator: Literal["full", "sampled_token"] = "full",
        temperature: float = 1.0,
        prompt_length: int = 32,
        max_new_tokens: int | None = None,
        sampling_temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        checks = {
            "on_policy_fraction": (0.0 <= on_policy_fraction <= 1.0, "in [0, 1]"),
            "mixing": (mixing in ("rows", "batch"), "'rows' or 'batch'"),
            "estimator": (estimator in ("full", "sampled_token"), "'full' or 'sampled_token'"),
            "temperature": (temperature > 0, "> 0"),
            "prompt_length": (prompt_length >= 1, ">= 1"),
            "max_new_tokens": (max_new_tokens is None or max_new_tokens >= 1, ">= 1 or null"),
            "sampling_temperature": (sampling_temperature > 0, "> 0"),
            "top_k": (top_k is None or top_k >= 1, ">= 1 or null"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise KDConfigError(f"model.init_args.{name} must be {allowed}, got {locals()[name]!r}.")
        if not callable(getattr(student, "generate", None)):
            raise KDConfigError(
                f"model.init_args.student ({type(student).__name__}) has no generate(): "
                "OnPolicyDistill samples with it."
            )
        self.on_policy_fraction = on_policy_fraction
        self.mixing = mixing
        self.estimator = estimator
        self.temperature = temperature
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.sampling_temperature = sampling_temperature
        self.top_k = top_k
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self._reward: tuple[Tensor, Tensor] = (torch.zeros(()), torch.zeros((), dtype=torch.long))
        #: Rows of the last training batch that were sampled by the student (for logging and tests).
        self.last_on_policy_rows: Tensor | None = None

    # ------------------------------------------------------------------ mixing
    def choose_on_policy_rows(self, batch_size: int, device: torch.device) -> Tensor:
        """Boolean ``[batch_size]``: which rows the student re-samples this step."""
        lam = self.on_policy_fraction
        if self.mixing == "batch":
            on = bool(torch.rand(()).item() < lam)
            return torch.full((batch_size,), on, dtype=torch.bool, device=device)
        exact = lam * batch_size
        count = math.floor(exact)
        if torch.rand(()).item() < exact - count:
            count += 1
        rows = torch.zeros(batch_size, dtype=torch.bool, device=device)
        rows[torch.randperm(batch_size)[:count].to(device)] = True
        return rows

    def build_batch(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """The mixed batch (dataset rows first, then on-policy rows) and the on-policy flag of each row."""
        input_ids, attention_mask, labels = lm_batch(batch)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        on_rows = self.choose_on_policy_rows(input_ids.shape[0], input_ids.device)
        self.last_on_policy_rows = on_rows
        parts = [
            {
                "input_ids": input_ids[~on_rows],
                "attention_mask": attention_mask[~on_rows].bool(),
                "labels": labels[~on_rows],
            }
        ]
        if bool(on_rows.any()):
            prompt_len, row_len = prompt_lengths(labels[on_rows], attention_mask[on_rows], self.prompt_length)
            new = row_len - prompt_len if self.max_new_tokens is None else torch.full_like(row_len, self.max_new_tokens)
            parts.append(
                sample_continuations(
                    self.student,
                    input_ids[on_rows],
                    prompt_len,
                    new,
                    temperature=self.sampling_temperature,
                    top_k=self.top_k,
                    eos_token_id=self.eos_token_id,
                    pad_token_id=self.pad_token_id,
                )
            )
        mixed = pad_batches(parts, self.pad_token_id)
        flags = torch.cat(
            [torch.zeros(int((~on_rows).sum()), dtype=torch.bool), torch.ones(int(on_rows.sum()), dtype=torch.bool)]
        )
        return mixed, flags.to(input_ids.device)

    # ------------------------------------------------------------------ loss
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        mixed, on_policy = self.build_batch(batch)
        input_ids, attention_mask, labels = mixed["input_ids"], mixed["attention_mask"], mixed["labels"]
        student = self.student(input_ids, attention_mask=attention_mask)
        teacher = self.lm_teacher_logits(input_ids, attention_mask)
        student, teacher = self.align(student, teacher)
        s, y, mask = shift_for_next_token(student, labels)
        t = teacher[:, :-1]
        per_token = reverse_kl(s, t, self.temperature, mask, reduction="none")
        sampled = mask & on_policy.unsqueeze(-1)
        estimate, reward = sampled_token_reverse_kl(s, t, y, sampled, self.temperature)
        self._reward = (reward.detach(), sampled.sum())
        if self.estimator == "sampled_token":
            dataset_part = (per_token * (mask & ~sampled)).sum()
            total = dataset_part + estimate
            parts = {"loss": total, "reverse_kl": per_token.sum().detach(), "sampled_token": estimate.detach()}
        else:
            total = per_token.sum()
            parts = {"loss": total, "reverse_kl": total.detach()}
        return parts, mask.sum()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.last_on_policy_rows is not None:
            fraction = self.last_on_policy_rows.float().mean()
            self.log("train/on_policy_fraction", fraction, on_step=True, on_epoch=True, batch_size=1)
        reward, count = self._reward
        if int(count) > 0:
            self.log("train/reward", reward / count, on_step=True, on_epoch=True, batch_size=int(count))
        return loss
