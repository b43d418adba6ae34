"""OPSD: On-Policy Self-Distillation with a privileged teacher context ("Self-Distilled Reasoner")."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.opsd import OPSDLoss, check_opsd_args, opsd_jsd
from kd_lightning.methods.core import describe
from kd_lightning.methods.tasks.generation import check_generation_length
from kd_lightning.methods.tasks.reasoning import ReasoningDistillation, Rollout, response_logits

TEACHER_MODES = ("fixed", "ema", "current")
FIXED_TEACHER_SOURCES = ("teacher", "adapters_disabled")
OPSD_BATCH_KEYS = ("prompt_ids", "prompt_mask", "privileged_ids", "privileged_mask", "answers")


class OPSD(ReasoningDistillation):
    """On-Policy Self-Distillation (Zhao et al., "Self-Distilled Reasoner", arXiv 2601.18734, ICML 2026;
    official code github.com/siyan-zhao/OPSD, ``opsd_trainer.py``).

    One LM plays both roles: the student ``p_S(· | x)`` reads the problem only (``batch["prompt_ids"]``),
    the teacher ``p_T(· | x, y*)`` reads the problem plus the privileged reference solution and a transition
    prompt (``batch["privileged_ids"]``, formatted by the data module). Every step the student samples a
    fresh rollout ``r`` on its prompt (``max_new_tokens``, ``sampling_temperature`` 1.1, ``top_k`` 20), and the
    loss is a per-token divergence on ``r`` between the teacher's and the student's next-token distributions,
    both at temperature ``τ`` (= the sampling temperature, as in the code)::

        M_t = β·p_T,t + (1 − β)·p_S,t,   JSD_β,t = β·KL(p_T,t ‖ M_t) + (1 − β)·KL(p_S,t ‖ M_t)
        L = Σ_t mask_t·JSD_β,t / Σ_t mask_t        (β = 0: KL(p_T ‖ p_S); β = 1: KL(p_S ‖ p_T))

    (the un-normalised TRL form, :func:`~kd_lightning.losses.opsd.opsd_jsd`). ``top_k_loss`` restricts both
    distributions to the teacher's top-k entries, renormalised. ``loss_type="sampled_token"`` is the code's
    "Thinking Machines" loss ``−mean_t sg(log p_T(r_t) − log p_S(r_t))·log p_S(r_t)``. The response tokens are
    counted over the accumulation group (the LM base's global token normalisation).

    The teacher role (``teacher_mode``):

    - ``"fixed"`` (the paper's recommended setting): the initial policy. ``fixed_teacher_source="teacher"``:
      the frozen ``teacher`` network, which holds the base model (``student_init: teacher`` starts the
      student from it; ``kd fit`` SFT-trains a missing base); ``"adapters_disabled"``: the LoRA student with
      its adapters disabled (``student.adapters_disabled()``, HFCausalLM with LoRA), no teacher network.
    - ``"ema"``: a frozen exponential moving average of the student, ``θ_T ← d·θ_T + (1 − d)·θ_S`` after
      every optimiser step. As in the code it is initialised as a copy of the student at the first
      optimiser step (the current student teaches until then). It is a submodule (``ema_teacher``, in
      checkpoints), not one of ``teachers``; the whole student is copied (with LoRA, base weights too).
    - ``"current"``: the student's current weights under ``no_grad`` (in its training mode, as the code).

    Logged: ``train/jsd`` (per-token JSD on the rollouts; a ``no_grad`` diagnostic with the sampled-token
    loss), ``train/sampled_token``, ``train/response_tokens`` (mean rollout length), ``train/reward`` (the
    verifier's accuracy of the rollouts). Evaluation: the reasoning task's ``pass@1``, ``avg@k``, ...

    Not implemented (documented departures from the code): ``top_p`` (0.95 in the code's sampling; the
    rollout helper has top-k only), ``reason_first`` (the teacher first generates an analysis of the
    solution), the chat-template mismatch between the student and teacher prompts (a data-module concern),
    the off-policy mixture ``lmbda`` (the code's runs use 1: always on-policy). Rollouts are sampled with the
    student in eval mode (dropout off) by the reasoning task's :func:`~kd_lightning.methods.tasks.reasoning.rollout`.

    Args:
        student: causal LM with ``generate`` (TinyGPT, HFCausalLM).
        teacher: the frozen base model (``teacher_mode="fixed"`` with ``fixed_teacher_source="teacher"``:
            required); optional otherwise (then used for ``student_init: teacher`` and the fidelity metrics).
        beta: β ∈ [0, 1] of the JSD (0.5 in the code's scripts).
        loss_type: ``"jsd"`` or ``"sampled_token"``.
        top_k_loss: restrict the JSD to the teacher's top-k vocabulary entries (``None``: full vocabulary).
        loss_temperature: τ of the loss; ``None``: the sampling temperature (the code).
        teacher_mode: ``"fixed"``, ``"ema"`` or ``"current"``.
        fixed_teacher_source: ``"teacher"`` or ``"adapters_disabled"`` (fixed mode only).
        ema_decay: ``d`` of the EMA teacher (0.999 in the code).
        max_new_tokens: rollout length cap (1024-2048 in the paper; short for the CPU demo).
        sampling_temperature: temperature of the rollouts (1.1).
        top_k: top-k filter of the rollouts (20; ``None``: none).
        **kwargs: :class:`~kd_lightning.methods.tasks.reasoning.ReasoningDistillation`'s arguments
            (``eval_max_new_tokens``, ``eval_samples``, ...) and the core's (``student_init``, ``optimizer``, ...).
    """

    requires_teacher: ClassVar[bool] = False  # checked per teacher_mode below

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        beta: float = 0.5,
        loss_type: Literal["jsd", "sampled_token"] = "jsd",
        top_k_loss: int | None = None,
        loss_temperature: float | None = None,
        teacher_mode: Literal["fixed", "ema", "current"] = "fixed",
        fixed_teacher_source: Literal["teacher", "adapters_disabled"] = "teacher",
        ema_decay: float = 0.999,
        max_new_tokens: int = 64,
        sampling_temperature: float = 1.1,
        top_k: int | None = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if not (isinstance(sampling_temperature, (int, float)) and math.isfinite(sampling_temperature)) or (
            sampling_temperature <= 0
        ):
            raise KDConfigError(
                "sampling_temperature", f"must be a finite number > 0, got {sampling_temperature!r}", "1.1 in OPSD"
            )
        tau = float(sampling_temperature if loss_temperature is None else loss_temperature)
        check_opsd_args(beta=beta, temperature=tau, top_k=top_k_loss, loss_type=loss_type)
        check_generation_length("max_new_tokens", max_new_tokens)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise KDConfigError("top_k", f"must be an integer >= 1 or null, got {top_k!r}", "20 in OPSD")
        if teacher_mode not in TEACHER_MODES:
            raise KDConfigError("teacher_mode", f"must be one of {TEACHER_MODES}, got {teacher_mode!r}")
        if fixed_teacher_source not in FIXED_TEACHER_SOURCES:
            raise KDConfigError(
                "fixed_teacher_source", f"must be one of {FIXED_TEACHER_SOURCES}, got {fixed_teacher_source!r}"
            )
        if not (isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay <= 1.0):
            raise KDConfigError("ema_decay", f"must be in [0, 1], got {ema_decay!r}", "0.999 in OPSD")
        if not callable(getattr(student, "generate", None)):
            raise KDConfigError("student", f"{describe(student)} has no generate()", "use TinyGPT or HFCausalLM")
        if teacher_mode == "fixed" and fixed_teacher_source == "teacher" and not len(self.teachers):
            raise KDConfigError(
                "teacher",
                "teacher_mode 'fixed' distils from the frozen base model in the teacher slot, and none was given",
                "set teacher: (with student_init: teacher), or fixed_teacher_source: adapters_disabled for a LoRA "
                "student, or teacher_mode: ema / current",
            )
        if teacher_mode == "fixed" and fixed_teacher_source == "adapters_disabled":
            if not callable(getattr(student, "adapters_disabled", None)) or not getattr(student, "has_adapters", True):
                raise KDConfigError(
                    "fixed_teacher_source",
                    f"'adapters_disabled' needs a LoRA student, {describe(student)} has no adapters",
                    "build the student with lora: {...} (HFCausalLM or TinyGPT), or use fixed_teacher_source: teacher",
                )
            if len(self.teachers):
                raise KDConfigError(
                    "teacher",
                    "is unused with fixed_teacher_source 'adapters_disabled' (the student without adapters teaches)",
                    "remove teacher, or use fixed_teacher_source: teacher",
                )
        self.beta = float(beta)
        self.loss_type = loss_type
        self.top_k_loss = top_k_loss
        self.loss_temperature = tau
        self.teacher_mode = teacher_mode
        self.fixed_teacher_source = fixed_teacher_source
        self.ema_decay = float(ema_decay)
        self.max_new_tokens = int(max_new_tokens)
        self.sampling_temperature = float(sampling_temperature)
        self.top_k = top_k
        self.criterion = OPSDLoss(beta=beta, temperature=tau, top_k=top_k_loss, loss_type=loss_type, reduction="sum")
        self.ema_teacher: nn.Module | None = None
        if teacher_mode == "ema":
            self.ema_teacher = copy.deepcopy(student).requires_grad_(False).eval()
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._ema_seen_step = 0
        #: The last training rollout and its verifier rewards (for logging and tests).
        self.last_rollout: Rollout | None = None
        self.last_rewards: Tensor | None = None

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> OPSD:
        """Training mode for the student; frozen teachers and the EMA teacher stay in eval mode."""
        super().train(mode)
        if self.ema_teacher is not None:
            self.ema_teacher.eval()
        return self

    # ------------------------------------------------------------------ EMA teacher
    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step after an optimiser step: a copy of the student the first time (the code), then
        ``θ_T ← d·θ_T + (1 − d)·θ_S`` on the student's trainable parameters (buffers copied)."""
        if self.ema_teacher is None:
            return
        student = dict(self.student.named_parameters())
        first = int(self.ema_updates) == 0
        for name, ema in self.ema_teacher.named_parameters():
            source = student[name]
            if first:
                ema.copy_(source)
            elif source.requires_grad:
                ema.mul_(self.ema_decay).add_(source.detach().to(ema.dtype), alpha=1.0 - self.ema_decay)
        student_buffers = dict(self.student.named_buffers())
        for name, buffer in self.ema_teacher.named_buffers():
            if name in student_buffers:
                buffer.copy_(student_buffers[name])
        self.ema_updates += 1

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        self._ema_seen_step = int(self.trainer.global_step)
        return super().on_train_batch_start(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.ema_teacher is not None and int(self.trainer.global_step) != self._ema_seen_step:
            self.update_ema()  # an optimiser step happened during this batch (once per accumulation group)

    # ------------------------------------------------------------------ teacher role
    def teacher_response_logits(self, batch: Mapping[str, Any], result: Rollout) -> Tensor:
        """The teacher role's logits ``[B, N, V]`` predicting each rollout token after the privileged prompt."""
        args = (batch["privileged_ids"], batch["privileged_mask"], result.response_ids, result.response_mask)
        if self.teacher_mode == "fixed" and self.fixed_teacher_source == "teacher":

            def frozen(ids: Tensor, attention_mask: Tensor) -> Tensor:
                return self.lm_teacher_logits(ids, attention_mask)

            return response_logits(frozen, *args)
        if self.teacher_mode == "fixed":
            context: Any = self.student.adapters_disabled()
            model = self.student
        elif self.teacher_mode == "ema" and int(self.ema_updates) > 0:
            context, model = nullcontext(), self.ema_teacher
        else:  # current weights (or the EMA before its first update)
            context, model = nullcontext(), self.student
        with torch.no_grad(), context:
            return response_logits(model, *args)

    # ------------------------------------------------------------------ training
    def check_opsd_batch(self, batch: Any) -> None:
        if not isinstance(batch, Mapping) or any(k not in batch for k in OPSD_BATCH_KEYS):
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KDConfigError(
                "data.class_path",
                f"OPSD needs batches with {list(OPSD_BATCH_KEYS)} (student and privileged teacher prompts), got {got}",
                "use ReasoningDataModule",
            )

    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """Fresh rollout from the student, then ``({"loss", "jsd" | "sampled_token", ...} sums, response tokens)``."""
        self.check_opsd_batch(batch)
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"].bool()
        result = self.sample(
            self.student,
            prompt_ids,
            prompt_mask,
            max_new_tokens=self.max_new_tokens,
            temperature=self.sampling_temperature,
            top_k=self.top_k,
        )
        student = response_logits(self.student, prompt_ids, prompt_mask, result.response_ids, result.response_mask)
        teacher = self.teacher_response_logits(batch, result)
        student, teacher = self.align(student, teacher)
        mask = result.response_mask
        sums = self.criterion(student, teacher, result.response_ids, mask)
        if "jsd" not in sums:
            with torch.no_grad():
                sums["jsd"] = opsd_jsd(
                    student.detach(),
                    teacher,
                    mask=mask,
                    beta=self.beta,
                    temperature=self.loss_temperature,
                    reduction="sum",
                )
        self.last_rollout = result
        self.last_rewards = self.rewards(result, list(batch["answers"])) if self.verifier is not None else None
        return sums, mask.sum()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.last_rollout is not None:
            rows = int(self.last_rollout.response_ids.shape[0])
            lengths = self.last_rollout.lengths.float().mean()
            self.log("train/response_tokens", lengths, on_step=True, on_epoch=True, batch_size=rows)
            if self.last_rewards is not None:
                self.log("train/reward", self.last_rewards.mean(), on_step=True, on_epoch=True, batch_size=rows)
        return loss
