"""MixSD: mixed contextual self-distillation for knowledge injection (Liu et al., arXiv 2605.16865, 2026)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.mixsd import (
    MIXSD_TARGET_MODES,
    build_mixed_targets,
    check_mixsd_args,
    mixed_target_nll,
    mixture_soft_kl,
)
from kd_lightning.methods.tasks.generation import check_generation_length, response_logits
from kd_lightning.methods.tasks.reasoning import ReasoningDistillation

PRIVILEGED_KEYS = ("prompt_ids", "prompt_mask", "privileged_ids", "privileged_mask", "sample_index")


class MixSD(ReasoningDistillation):
    """MixSD: the student learns new facts from targets mixed out of two conditionals of the frozen base ``p_0``.

    The base sits in the ``teacher`` slot (frozen, eval) and the student starts as a copy of it
    (``student_init: teacher``). For a question ``x`` whose fact ``f`` is in the batch's privileged prompt:

    - expert ``q_E = p_0(· | [f; x], y<t)`` (``privileged_ids``), naive ``q_N = p_0(· | x, y<t)`` (``prompt_ids``);
    - targets built token by token, both conditionals reading the same generated prefix ``y<t``
      (:func:`~kd_lightning.losses.mixsd.build_mixed_targets`): ``mixture`` ``y_t ~ ρ·q_E + (1 − ρ)·q_N`` (its
      argmax when ``greedy``), or ``switch`` ``argmax q_E`` where the argmaxes disagree and ``KL(q_E ‖ q_N) > κ``,
      else ``argmax q_N``; at most ``max_new_tokens``, a row stops at EOS;
    - loss on the student prompt WITHOUT the fact: ``sft`` ``−Σ_t log p_θ(y_t | x, y<t)``, or ``soft_kl``
      ``Σ_t KL(ρ·q_E + (1 − ρ)·q_N ‖ p_θ(· | x, y<t))`` (the conditionals re-read on the target sequence),
      summed over target tokens and normalised by the task over the accumulation group.

    Logged: ``train/nll`` or ``train/soft_kl`` (per target token) and ``train/expert_share`` (share of target
    tokens that are the expert's argmax against a different naive argmax: where the fact changed the target).

    RECONSTRUCTION (the paper's abstract; no code): the token-mixing rule (``target_mode``), ρ, κ (and the KL
    direction of the switch test), NLL vs distribution matching (``loss``), which model builds the targets
    (``target_model``: ``base`` = the frozen ``p_0``; ``current`` = the student's own weights under ``no_grad``
    for both conditionals, the "dynamic" reading) and how often (``regenerate``: ``every_epoch`` caches the
    target tokens per ``sample_index`` and clears the cache at each epoch start; ``every_step`` rebuilds them for
    every batch) are all arguments. With ``greedy`` targets from the fixed base, ``every_epoch`` builds each
    sample's targets once per epoch at no loss of fidelity; with ``target_model: current`` a cached sample keeps
    its tokens for the epoch, and ``soft_kl`` re-reads the conditionals on them with the current weights.

    Args:
        student: causal LM (with ``generate``), same architecture as the base.
        teacher: the base model ``p_0`` (frozen; ``kd fit`` trains a missing one with ``ReasoningSupervised``).
        target_mode: ``"mixture"`` or ``"switch"``.
        rho: ρ ∈ [0, 1], the expert's weight in the mixture (and in ``soft_kl``'s target).
        kappa: κ ≥ 0 (nats), the switch rule's ``KL(q_E ‖ q_N)`` threshold.
        greedy: ``mixture`` takes the argmax of the mixture (``False``: samples it).
        target_temperature: τ of both conditionals (sampling and soft targets; the student at the same τ).
        target_model: ``"base"`` (the frozen teacher) or ``"current"`` (the student, no gradient).
        loss: ``"sft"`` (NLL on the mixed tokens) or ``"soft_kl"``.
        regenerate: ``"every_epoch"`` (cache per sample) or ``"every_step"``.
        max_new_tokens: longest target sequence.
        student_init: ``"teacher"`` by default (the student starts as the base), see the core.
        **kwargs: :class:`~kd_lightning.methods.tasks.reasoning.ReasoningDistillation`'s arguments.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        target_mode: Literal["mixture", "switch"] = "mixture",
        rho: float = 0.5,
        kappa: float = 0.5,
        greedy: bool = True,
        target_temperature: float = 1.0,
        target_model: Literal["base", "current"] = "base",
        loss: Literal["sft", "soft_kl"] = "sft",
        regenerate: Literal["every_epoch", "every_step"] = "every_epoch",
        max_new_tokens: int = 24,
        student_init: str = "teacher",
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, student_init=student_init, **kwargs)
        if target_mode not in MIXSD_TARGET_MODES:
            raise KDConfigError("target_mode", f"must be one of {list(MIXSD_TARGET_MODES)}, got {target_mode!r}")
        check_temperature(target_temperature, "target_temperature")
        check_mixsd_args(rho, kappa, target_mode, target_temperature)
        choices = {
            "target_model": (target_model, ("base", "current")),
            "loss": (loss, ("sft", "soft_kl")),
            "regenerate": (regenerate, ("every_epoch", "every_step")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise KDConfigError(name, f"must be one of {list(allowed)}, got {value!r}")
        check_generation_length("max_new_tokens", max_new_tokens)
        if not callable(getattr(student, "generate", None)):
            raise KDConfigError("student", f"{type(student).__name__} has no generate()", "use TinyGPT or HFCausalLM")
        self.target_mode = target_mode
        self.rho = float(rho)
        self.kappa = float(kappa)
        self.greedy = greedy
        self.target_temperature = float(target_temperature)
        self.target_model = target_model
        self.loss_name = loss
        self.regenerate = regenerate
        self.max_new_tokens = max_new_tokens
        #: ``sample_index -> (target token ids, expert-chosen flags)`` of this epoch (``regenerate: every_epoch``).
        self.target_cache: dict[int, tuple[list[int], list[bool]]] = {}

    # ------------------------------------------------------------------ targets
    def target_network(self) -> Any:
        """The network both conditionals read: the frozen base (through ``run_teacher``) or the student."""
        if self.target_model == "current":
            return self.student

        def base(ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            return self.run_teacher(ids, attention_mask=attention_mask)

        return base

    def build_targets(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``(response_ids [B, N], response_mask [B, N], from_expert [B, N])``: fresh, or from this epoch's cache."""
        missing = [k for k in PRIVILEGED_KEYS if k not in batch]
        if missing:
            raise KDConfigError(
                "data.class_path",
                f"MixSD needs batches with {list(PRIVILEGED_KEYS)}, missing {missing}",
                "use FactInjectionDataModule (or ReasoningDataModule: the privileged prompt holds the fact)",
            )
        indices = [int(i) for i in batch["sample_index"].tolist()]
        todo = list(range(len(indices)))
        if self.regenerate == "every_epoch":
            todo = [row for row, index in enumerate(indices) if index not in self.target_cache]
        fresh: dict[int, tuple[list[int], list[bool]]] = {}
        if todo:
            rows = torch.tensor(todo, device=batch["prompt_ids"].device)
            network = self.target_network()
            was_training = self.student.training
            made = build_mixed_targets(
                network,
                network,
                batch["privileged_ids"][rows],
                batch["privileged_mask"][rows],
                batch["prompt_ids"][rows],
                batch["prompt_mask"][rows],
                self.max_new_tokens,
                mode=self.target_mode,
                rho=self.rho,
                kappa=self.kappa,
                greedy=self.greedy,
                temperature=self.target_temperature,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
            )
            self.student.train(was_training)
            for k, row in enumerate(todo):
                keep = made.response_mask[k]
                fresh[row] = (made.response_ids[k][keep].tolist(), made.from_expert[k][keep].tolist())
                if self.regenerate == "every_epoch":
                    self.target_cache[indices[row]] = fresh[row]
        sequences = [fresh[row] if row in fresh else self.target_cache[index] for row, index in enumerate(indices)]
        width = max(len(tokens) for tokens, _ in sequences)
        device = batch["prompt_ids"].device
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(sequences), width, dtype=torch.bool, device=device)
        expert = torch.zeros(len(sequences), width, dtype=torch.bool, device=device)
        for row, (tokens, flags) in enumerate(sequences):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
            mask[row, : len(tokens)] = True
            expert[row, : len(flags)] = torch.tensor(flags, dtype=torch.bool, device=device)
        return ids, mask, expert

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.target_cache.clear()

    # ------------------------------------------------------------------ loss
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        response_ids, response_mask, from_expert = self.build_targets(batch)
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        student = response_logits(self.student, prompt_ids, prompt_mask, response_ids, response_mask)
        share = (from_expert & response_mask).sum().to(student.dtype).detach()
        if self.loss_name == "sft":
            nll = mixed_target_nll(student, response_ids, response_mask, reduction="sum")
            return {"loss": nll, "nll": nll.detach(), "expert_share": share}, response_mask.sum()
        network = self.target_network()
        with torch.no_grad():
            was_training = self.student.training
            if self.target_model == "current":
                self.student.eval()
            expert = response_logits(
                network, batch["privileged_ids"], batch["privileged_mask"], response_ids, response_mask
            )
            naive = response_logits(network, prompt_ids, prompt_mask, response_ids, response_mask)
            self.student.train(was_training)
        student, expert = self.align(student, expert)
        _, naive = self.align(student, naive)
        kl = mixture_soft_kl(
            student, expert, naive, self.rho, response_mask, temperature=self.target_temperature, reduction="sum"
        )
        return {"loss": kl, "soft_kl": kl.detach(), "expert_share": share}, response_mask.sum()
