"""Decoupling KL and trajectories (Zhao et al., arXiv 2605.16826): prefix source × token KL, length curriculum."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.divergences import entropy, forward_kl, reverse_kl
from kd_lightning.losses.lm import shift_for_next_token
from kd_lightning.losses.terms import weighted_terms
from kd_lightning.methods.tasks.language_model import (
    IGNORE_INDEX,
    LanguageModelDistillation,
    lm_batch,
    prompt_lengths,
    sample_continuations,
    sampled_token_reverse_kl,
)

__all__ = ["DecoupledKLDistill", "EntropyGatedCurriculum"]


class EntropyGatedCurriculum(nn.Module):
    """The entropy-gated length curriculum: a ladder of training lengths ``L_0 < L_1 < … < L_M``.

    After each evaluation, :meth:`observe` gets the student's mean predictive entropy ``H`` on held-out
    prompts. The gate is ``H_min = entropy_min`` or, when that is ``None``, ``entropy_min_ratio·H_ref``
    with ``H_ref`` the first entropy observed (at ``L_0``; the spec's suggestion 0.8). When ``H ≥ H_min``
    at ``patience`` consecutive evaluations of the current stage, the curriculum advances to the next
    length; an evaluation with ``H < H_min`` stops it for good (the paper: "stop increasing; keep training at
    the last stable length"), unless ``stop_on_fail`` is false (then it only resets the count).

    State (persistent buffers, so checkpoints carry it): ``stage``, ``passes``, ``stopped``, ``reference``,
    ``last_entropy``, ``num_observations``.

    Args:
        ladder: training lengths, strictly increasing.
        entropy_min: absolute ``H_min`` (nats); ``None``: relative to the first observation.
        entropy_min_ratio: ``H_min / H_ref`` when ``entropy_min`` is ``None``.
        patience: consecutive passing evaluations needed to advance.
        stop_on_fail: a failing evaluation freezes the length (paper) instead of only resetting ``passes``.
    """

    stage: Tensor
    passes: Tensor
    stopped: Tensor
    reference: Tensor
    last_entropy: Tensor
    num_observations: Tensor

    def __init__(
        self,
        ladder: Sequence[int],
        entropy_min: float | None = None,
        entropy_min_ratio: float = 0.8,
        patience: int = 1,
        stop_on_fail: bool = True,
    ) -> None:
        super().__init__()
        ladder = [int(v) for v in ladder]
        if not ladder or any(v < 1 for v in ladder) or any(b <= a for a, b in itertools.pairwise(ladder)):
            raise KDConfigError(f"length_ladder must be strictly increasing positive lengths, got {ladder}.")
        if entropy_min is not None and entropy_min < 0:
            raise KDConfigError(f"entropy_min must be >= 0 or null, got {entropy_min}.")
        if not entropy_min_ratio > 0:
            raise KDConfigError(f"entropy_min_ratio must be > 0, got {entropy_min_ratio}.")
        if patience < 1:
            raise KDConfigError(f"gate_patience must be >= 1, got {patience}.")
        self.ladder = ladder
        self.entropy_min = entropy_min
        self.entropy_min_ratio = entropy_min_ratio
        self.patience = patience
        self.stop_on_fail = stop_on_fail
        self.register_buffer("stage", torch.tensor(0, dtype=torch.long))
        self.register_buffer("passes", torch.tensor(0, dtype=torch.long))
        self.register_buffer("stopped", torch.tensor(False))
        self.register_buffer("reference", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("last_entropy", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("num_observations", torch.tensor(0, dtype=torch.long))

    @property
    def length(self) -> int:
        """The current training length ``L_m``."""
        return self.ladder[int(self.stage)]

    @property
    def threshold(self) -> float:
        """``H_min`` (NaN before the first observation when it is relative)."""
        if self.entropy_min is not None:
            return float(self.entropy_min)
        return float(self.reference) * self.entropy_min_ratio

    @property
    def finished(self) -> bool:
        """No further advance: stopped by the gate or at the last rung."""
        return bool(self.stopped) or int(self.stage) >= len(self.ladder) - 1

    @torch.no_grad()
    def observe(self, value: float) -> bool:
        """Record an evaluation's mean entropy; return whether the length advanced."""
        value = float(value)
        self.num_observations += 1
        self.last_entropy.fill_(value)
        if math.isnan(float(self.reference)):
            self.reference.fill_(value)
        if self.finished:
            return False
        if value >= self.threshold:
            self.passes += 1
            if int(self.passes) >= self.patience:
                self.stage += 1
                self.passes.zero_()
                return True
            return False
        self.passes.zero_()
        if self.stop_on_fail:
            self.stopped.fill_(True)
        return False


class DecoupledKLDistill(LanguageModelDistillation):
    """Prefix source × token KL direction (the paper's 2×2), KL mixing, and the entropy-gated length curriculum.

    Sequence-level KL decomposes per token (Zhao et al., "Decoupling KL and Trajectories", arXiv 2605.16826)::

        KL(p_T ‖ q)(x) = Σ_t E_{s_t ~ d^T}[KL(p_T(·|s_t) ‖ q(·|s_t))]    teacher prefixes + forward KL
        KL(q ‖ p_T)(x) = Σ_t E_{s_t ~ d^S}[KL(q(·|s_t) ‖ p_T(·|s_t))]    student prefixes + reverse KL

    and the prefix source (who writes the continuation) is independent of the token KL direction:

    =================  ==================================  =================================
    prefix \\ token KL  ``forward``                         ``reverse``
    =================  ==================================  =================================
    ``teacher``        soft-label KD on teacher samples    offline-RL-style distillation
    ``student``        DAgger-style on-policy SFT          on-policy distillation (OPD)
    =================  ==================================  =================================

    ``token_kl="mixed"``: ``λ·KL(q ‖ p_T) + (1 − λ)·KL(p_T ‖ q)`` with λ = ``reverse_weight`` (forward-heavy,
    small λ, is the paper's recommendation for long sequences; 0.25 suggested, UNVERIFIED grid).
    ``reverse_estimator="sampled_token"`` (student prefixes only) uses ``−sg(log p_T(y) − log q(y))·log q(y)``
    on the sampled tokens instead of the exact reverse KL (Proposition 1(ii)).

    Each training sequence is a prompt (the prompt part of prompt/response data, or the first
    ``prompt_length`` tokens of packed text) plus ``L`` continuation tokens, generated (no grad) by the
    student or the teacher; ``teacher_prefix="dataset"`` uses the dataset's continuation as a stand-in for
    teacher samples (standard KD data; no teacher generation). Only the continuation is trained;
    normalisation is over its valid tokens (see :class:`~kd_lightning.methods.LanguageModelDistillation`).

    Length curriculum (``length_ladder`` given): ``L = ladder[m]``; after each validation the student's mean
    predictive entropy on its own length-``L`` continuations of the validation prompts (the held-out prompt
    set; ``gate_batches`` of them) is fed to :class:`EntropyGatedCurriculum`, which advances ``m`` while the
    entropy stays ≥ ``H_min`` and stops at the last stable length when it drops. Logged: ``val/entropy``,
    ``train/length``. The state is in the checkpoint (``curriculum.*`` buffers). Ladder and ``H_min`` are
    UNVERIFIED (the paper gives no values; spec suggestion: 512 → 1024 → 2048 → 4096, ``H_min`` = 0.8 × the
    entropy at ``L_0``). Without a ladder, ``L = max_new_tokens``.

    Args:
        prefix_source: ``"teacher"`` or ``"student"``: who writes the continuation.
        token_kl: ``"forward"`` (KL(p_T ‖ q)), ``"reverse"`` (KL(q ‖ p_T)) or ``"mixed"``.
        reverse_weight: λ of ``"mixed"``.
        reverse_estimator: ``"full"`` (exact over the vocabulary) or ``"sampled_token"`` (student prefixes).
        teacher_prefix: ``"generate"`` (the teacher samples, as in the paper) or ``"dataset"``.
        temperature: τ of both softmaxes in the token KL.
        prompt_length: prompt tokens of packed plain-text sequences.
        max_new_tokens: ``L`` without a curriculum.
        length_ladder: the curriculum's lengths; ``None`` disables it.
        entropy_min: absolute ``H_min`` (nats); ``None`` uses ``entropy_min_ratio``.
        entropy_min_ratio: ``H_min`` as a fraction of the first measured entropy.
        gate_patience: consecutive passing evaluations needed to advance.
        gate_stop_on_fail: a failing evaluation freezes the length (paper).
        gate_batches: validation batches used for the entropy (``None``: all).
        sampling_temperature: temperature of the generation.
        top_k: top-k filter of the generation.
        eos_token_id: generation stops after it (kept); ``None``: never.
        pad_token_id: id at padded positions.
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.LanguageModelDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        prefix_source: Literal["teacher", "student"] = "student",
        token_kl: Literal["forward", "reverse", "mixed"] = "forward",
        reverse_weight: float = 0.25,
        reverse_estimator: Literal["full", "sampled_token"] = "full",
        teacher_prefix: Literal["generate", "dataset"] = "generate",
        temperature: float = 1.0,
        prompt_length: int = 32,
        max_new_tokens: int = 32,
        length_ladder: list[int] | None = None,
        entropy_min: float | None = None,
        entropy_min_ratio: float = 0.8,
        gate_patience: int = 1,
        gate_stop_on_fail: bool = True,
        gate_batches: int | None = None,
        sampling_temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        checks = {
            "prefix_source": (prefix_source in ("teacher", "student"), "'teacher' or 'student'"),
            "token_kl": (token_kl in ("forward", "reverse", "mixed"), "'forward', 'reverse' or 'mixed'"),
            "reverse_weight": (0.0 <= reverse_weight <= 1.0, "in [0, 1]"),
            "reverse_estimator": (reverse_estimator in ("full", "sampled_token"), "'full' or 'sampled_token'"),
            "teacher_prefix": (teacher_prefix in ("generate", "dataset"), "'generate' or 'dataset'"),
            "temperature": (temperature > 0, "> 0"),
            "prompt_length": (prompt_length >= 1, ">= 1"),
            "max_new_tokens": (max_new_tokens >= 1, ">= 1"),
            "gate_batches": (gate_batches is None or gate_batches >= 1, ">= 1 or null"),
            "sampling_temperature": (sampling_temperature > 0, "> 0"),
            "top_k": (top_k is None or top_k >= 1, ">= 1 or null"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise KDConfigError(f"model.init_args.{name} must be {allowed}, got {locals()[name]!r}.")
        if reverse_estimator == "sampled_token" and (prefix_source != "student" or token_kl == "forward"):
            raise KDConfigError(
                "model.init_args.reverse_estimator=sampled_token needs the student's own samples and a reverse term: "
                "set prefix_source: student and token_kl: reverse or mixed (or reverse_estimator: full)."
            )
        generator = student if prefix_source == "student" else teacher
        if not (prefix_source == "teacher" and teacher_prefix == "dataset") and not callable(
            getattr(generator, "generate", None)
        ):
            raise KDConfigError(
                f"model.init_args.{prefix_source} ({type(generator).__name__}) has no generate(): "
                f"prefix_source: {prefix_source} samples the continuations with it."
            )
        self.prefix_source = prefix_source
        self.token_kl = token_kl
        self.reverse_weight = reverse_weight
        self.reverse_estimator = reverse_estimator
        self.teacher_prefix = teacher_prefix
        self.temperature = temperature
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.gate_batches = gate_batches
        self.sampling_temperature = sampling_temperature
        self.top_k = top_k
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.curriculum: EntropyGatedCurriculum | None = None
        if length_ladder is not None:
            try:
                self.curriculum = EntropyGatedCurriculum(
                    length_ladder, entropy_min, entropy_min_ratio, gate_patience, gate_stop_on_fail
                )
            except ValueError as err:
                raise KDConfigError(f"model.init_args.{err}") from None
        from torchmetrics import MeanMetric

        self.gate_entropy = MeanMetric()

    # ------------------------------------------------------------------ sequences
    @property
    def train_length(self) -> int:
        """``L``: the curriculum's current length, or ``max_new_tokens``."""
        return self.curriculum.length if self.curriculum is not None else self.max_new_tokens

    def setup(self, stage: str) -> None:
        super().setup(stage)
        longest = max(self.curriculum.ladder) if self.curriculum is not None else self.max_new_tokens
        for field, module in self.networks_to_check().items():
            limit = getattr(module, "max_seq_len", None)
            if limit is not None and self.prompt_length + longest > int(limit):
                raise KDConfigError(
                    f"model.init_args.prompt_length + the longest training length ({self.prompt_length} + {longest}) "
                    f"exceeds the max_seq_len {limit} of model.init_args.{field} ({type(module).__name__})."
                )

    def continuations(self, batch: Any, length: int, source: nn.Module | None) -> dict[str, Tensor]:
        """Prompt + ``length`` continuation tokens per row; ``source`` samples them (``None``: the dataset's)."""
        input_ids, attention_mask, labels = lm_batch(batch)
        prompt_len, row_len = prompt_lengths(labels, attention_mask, self.prompt_length)
        if source is not None:
            new = torch.full_like(prompt_len, length)
            return sample_continuations(
                source,
                input_ids,
                prompt_len,
                new,
                temperature=self.sampling_temperature,
                top_k=self.top_k,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
            )
        end = torch.minimum(prompt_len + length, row_len)
        width = int(end.max())
        positions = torch.arange(width, device=input_ids.device).unsqueeze(0)
        inside = positions < end.unsqueeze(1)
        cont = inside & (positions >= prompt_len.unsqueeze(1))
        return {
            "input_ids": input_ids[:, :width],
            "attention_mask": inside,
            "labels": torch.where(cont, labels[:, :width], torch.full_like(labels[:, :width], IGNORE_INDEX)),
        }

    def training_sequences(self, batch: Any) -> dict[str, Tensor]:
        if self.prefix_source == "student":
            source: nn.Module | None = self.student
        else:
            source = self.teacher if self.teacher_prefix == "generate" else None
        return self.continuations(batch, self.train_length, source)

    # ------------------------------------------------------------------ loss
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        seqs = self.training_sequences(batch)
        input_ids, attention_mask, labels = seqs["input_ids"], seqs["attention_mask"], seqs["labels"]
        student = self.student(input_ids, attention_mask=attention_mask)
        teacher = self.lm_teacher_logits(input_ids, attention_mask)
        student, teacher = self.align(student, teacher)
        s, y, mask = shift_for_next_token(student, labels)
        t = teacher[:, :-1]
        tau, lam = self.temperature, self.reverse_weight
        terms: dict[str, Tensor] = {}
        if self.token_kl in ("forward", "mixed"):
            terms["forward_kl"] = forward_kl(s, t, tau, mask, reduction="none").sum()
        if self.token_kl in ("reverse", "mixed") and self.reverse_estimator == "sampled_token":
            terms["sampled_token"] = sampled_token_reverse_kl(s, t, y, mask, tau)[0]
        elif self.token_kl in ("reverse", "mixed"):
            terms["reverse_kl"] = reverse_kl(s, t, tau, mask, reduction="none").sum()
        # "mixed": λ·KL(q ‖ p_T) + (1 − λ)·KL(p_T ‖ q)
        weights = {"forward_kl": 1.0 - lam, "sampled_token": lam, "reverse_kl": lam} if self.token_kl == "mixed" else {}
        parts = weighted_terms(terms, weights)
        return {"loss": parts.pop("loss"), **{k: v.detach() for k, v in parts.items()}}, mask.sum()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/length", float(self.train_length), on_step=True, on_epoch=False, batch_size=1)
        return loss

    # ------------------------------------------------------------------ entropy gate
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if not self.gating:
            return
        if self.gate_batches is not None and batch_idx >= self.gate_batches:
            return
        self.gate_entropy.update(self.continuation_entropy(batch))

    @torch.no_grad()
    def continuation_entropy(self, batch: Any) -> Tensor:
        """Per-token entropies (nats) of the student on its own length-``L`` continuations of the batch's prompts."""
        seqs = self.continuations(batch, self.train_length, self.student)
        logits = self.student(seqs["input_ids"], attention_mask=seqs["attention_mask"])
        s, _, mask = shift_for_next_token(logits, seqs["labels"])
        return entropy(s, mask=mask, reduction="none")[mask]

    @property
    def gating(self) -> bool:
        """Whether this validation feeds the curriculum: during ``fit``, not its sanity check."""
        trainer = self.trainer
        return self.curriculum is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_epoch_end(self) -> None:
        if not self.gating or not self.gate_entropy.update_called:
            return
        value = self.gate_entropy.compute()
        self.gate_entropy.reset()
        self.curriculum.observe(float(value))
        self.log("val/entropy", value)
        self.log("val/train_length", float(self.curriculum.length))
