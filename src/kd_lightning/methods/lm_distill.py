"""Off-policy token-level distillation of causal LMs, objective chosen in the config."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.data.teacher_logits import TeacherLogitStore
from kd_lightning.errors import KDConfigError
from kd_lightning.losses.lm import shift_for_next_token
from kd_lightning.losses.lm_objectives import build_token_objective
from kd_lightning.losses.sparse import sparse_kl
from kd_lightning.losses.terms import active, check_weights, weighted_terms
from kd_lightning.methods.tasks.language_model import LanguageModelDistillation, lm_batch, masked_token_cross_entropy


class LMDistill(LanguageModelDistillation):
    """Off-policy LM distillation on the dataset's sequences: ``L = w_KD·D(p_T ‖ q_S) + w_CE·CE`` per token.

    ``L = Σ_{valid t} [w_KD·D_t + w_CE·CE(z_t, y_{t+1})] / N_valid`` with ``N_valid`` counted over the
    gradient-accumulation group and the DDP ranks (:class:`~kd_lightning.methods.LanguageModelDistillation`).
    ``D`` is ``objective``, built by :func:`~kd_lightning.losses.lm_objectives.build_token_objective`
    (``self.criterion``):

    - a name of :data:`kd_lightning.losses.lm.TOKEN_OBJECTIVES` (``forward_kl`` = KD/SFT direction,
      ``reverse_kl``, ``jsd`` (GKD's generalised JSD, ``beta``), ``skew_kl``/``skew_reverse_kl``
      (DistiLLM, ``alpha``), ``tv``, ``mixed_kl`` (``reverse_weight``)) with ``objective_args``, at
      ``temperature`` τ (no τ² factor, as TRL's GKD);
    - ``"taid"`` (:class:`~kd_lightning.losses.taid.TAIDLoss`: interpolated teacher, ``t`` stepped once per
      optimizer step from the rank-averaged loss), ``"adakd"`` (:class:`~kd_lightning.losses.adakd.AdaKDLoss`:
      hardest-token selection + per-token temperatures, ratio stepped per optimizer step), ``"bild"`` /
      ``"dbild"`` (:class:`~kd_lightning.losses.bild.BiLDLoss` / ``DBiLDLoss``: top-k logit differences),
      token-level; ``objective_args`` are their constructor's arguments (their own CE weights are replaced
      by ``ce_weight``). AdaKD averages over its *selected* tokens: its token sum is scaled by
      ``N_valid/N_selected`` of the micro-batch, so one micro-batch gives the official mean (RECONSTRUCTION
      under accumulation: a token-weighted mean of the micro-batches' selected means).

    ``chunked=True`` computes the student's LM head and ``D`` chunk by chunk with gradients in the forward
    pass (:func:`~kd_lightning.losses.chunked.chunked_distillation_loss`): the ``[tokens, vocab]`` student
    logits never exist. Needs ``student.hidden_states`` and a bias-free ``student.lm_head``; the teacher is
    run the same way when it has them too. Registry objectives only.

    ``teacher_logits_path`` reads the teacher's stored top-k log-probabilities (``kd lm-teacher-logits``)
    instead of running the teacher in training, with the sparse KL of
    :func:`~kd_lightning.losses.sparse.sparse_kl` (the tail mass as one bucket by default); the teacher
    network still scores validation (``fidelity``). ``objective`` must be ``forward_kl``.

    Args:
        objective: the token objective (see above).
        objective_args: its keyword arguments (e.g. ``{beta: 0.5}`` for ``jsd``, ``{t_start: 0.4}`` for ``taid``).
        temperature: τ of both softmaxes for the registry objectives (1 for the others: their temperatures
            are among their ``objective_args``).
        kd_weight: ``w_KD``.
        ce_weight: ``w_CE`` of the next-token cross-entropy on the labels (0: pure distillation).
        chunked: use the chunked fused loss.
        chunk_size: tokens per chunk of the chunked loss.
        teacher_logits_path: folder of stored teacher top-k log-probabilities; ``None`` runs the teacher.
        sparse_tail: how the sparse KL treats the mass outside the stored top-k (``"bucket"``, ``"zero"``,
            ``"uniform"``).
        student, teacher, **kwargs: ``tokenizer_ids_match``, ``teacher_ckpt``, ``optimizer``, ... of
            :class:`~kd_lightning.methods.LanguageModelDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        objective: str = "forward_kl",
        objective_args: dict[str, Any] | None = None,
        temperature: float = 1.0,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        chunked: bool = False,
        chunk_size: int = 256,
        teacher_logits_path: str | None = None,
        sparse_tail: Literal["bucket", "zero", "uniform"] = "bucket",
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_weights(kd_weight=kd_weight, ce_weight=ce_weight)
        if not (active(kd_weight) or active(ce_weight)):
            raise KDConfigError("kd_weight and ce_weight", "are both 0", "give one of them a positive weight")
        if chunk_size < 1:
            raise KDConfigError(f"model.init_args.chunk_size must be >= 1, got {chunk_size}.")
        self.criterion = build_token_objective(objective, objective_args, temperature)
        self.objective = objective
        self.objective_args = dict(objective_args or {})
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight
        self.chunked = chunked
        self.chunk_size = chunk_size
        self.teacher_logits_path = teacher_logits_path
        self.sparse_tail = sparse_tail
        self._store: Any = None
        if chunked:
            self._check_chunked()
        if teacher_logits_path is not None:
            if objective != "forward_kl":
                raise KDConfigError(
                    "model.init_args.teacher_logits_path gives the teacher's top-k log-probabilities, distilled with "
                    f"a sparse forward KL: set objective: forward_kl (got {objective!r})."
                )
            if chunked:
                raise KDConfigError("model.init_args.chunked and teacher_logits_path cannot be combined.")

    # ------------------------------------------------------------------ construction
    def _check_chunked(self) -> None:
        from kd_lightning.losses.chunked import CHUNK_OBJECTIVES

        if self.objective not in CHUNK_OBJECTIVES:
            raise KDConfigError(
                f"model.init_args.chunked supports the objectives {sorted(CHUNK_OBJECTIVES)}, got {self.objective!r}."
            )
        try:
            CHUNK_OBJECTIVES[self.objective].bind(self.objective_args)
        except ValueError as err:
            raise KDConfigError(f"model.init_args.objective_args with chunked: true: {err}") from None
        head = getattr(self.student, "lm_head", None)
        if not callable(getattr(self.student, "hidden_states", None)) or not isinstance(head, nn.Linear):
            raise KDConfigError(
                f"model.init_args.chunked needs a student with hidden_states(input_ids, attention_mask) and an "
                f"nn.Linear lm_head; {type(self.student).__name__} lacks them: set chunked: false."
            )
        if head.bias is not None:
            raise KDConfigError("model.init_args.chunked needs a student lm_head without bias: set chunked: false.")

    # ------------------------------------------------------------------ loss
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        if self.chunked:
            return self._chunked_sums(batch)
        if self.teacher_logits_path is not None:
            return self._sparse_sums(batch)
        return super().token_loss_sums(batch)

    def distillation_sums(self, student: Tensor, teacher: Tensor, targets: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return self.with_ce(self.criterion.token_sum(student, teacher, mask), student, targets, mask)

    def with_ce(self, kd: Tensor, student: Tensor, targets: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """``w_KD·kd + w_CE·Σ CE`` over the tokens of ``mask``, as named terms (``kd`` is ``Σ D``)."""
        terms = {self.objective: kd}
        if active(self.ce_weight):
            terms["ce"] = masked_token_cross_entropy(student, targets, mask).sum()
        return weighted_terms(terms, self.loss_weights)

    @property
    def loss_weights(self) -> dict[str, float]:
        """``{objective: kd_weight, "ce": ce_weight}``."""
        return {self.objective: self.kd_weight, "ce": self.ce_weight}

    def _chunked_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        from kd_lightning.losses.chunked import chunked_distillation_loss

        input_ids, attention_mask, labels = lm_batch(batch)
        hidden = self.student.hidden_states(input_ids, attention_mask=attention_mask)
        weight = self.student.lm_head.weight
        teacher_head = getattr(self.teacher, "lm_head", None)
        fused_teacher = (
            callable(getattr(self.teacher, "hidden_states", None))
            and isinstance(teacher_head, nn.Linear)
            and teacher_head.bias is None
        )
        with torch.no_grad():
            if fused_teacher:  # the teacher's logits are computed chunk by chunk too
                t_out = self.teacher.hidden_states(input_ids, attention_mask=attention_mask)
                vocab_t = teacher_head.weight.shape[0]
            else:
                t_out = self.teacher(input_ids, attention_mask=attention_mask)
                vocab_t = t_out.shape[-1]
        vocab = min(weight.shape[0], vocab_t)
        if weight.shape[0] != vocab_t:  # same check (and warning) as the logits path, on dummy rows
            self.align(hidden.new_zeros(1, weight.shape[0]), hidden.new_zeros(1, vocab_t))
        if fused_teacher:
            teacher_kwargs = {"teacher_hidden": t_out[:, :-1], "teacher_lm_head_weight": teacher_head.weight[:vocab]}
        else:
            teacher_kwargs = {"teacher_logits": t_out[:, :-1, :vocab]}
        h, y, mask = shift_for_next_token(hidden, labels)
        loss, parts = chunked_distillation_loss(
            h,
            weight[:vocab],
            mask=mask,
            objective=self.objective,
            temperature=self.temperature,
            reduction="sum",
            chunk_size=self.chunk_size,
            kd_weight=self.kd_weight,
            labels=y if self.ce_weight > 0 else None,
            ce_weight=self.ce_weight,
            return_parts=True,
            **teacher_kwargs,
            **self.objective_args,
        )
        named = weighted_terms({self.objective if k == "kd" else k: v for k, v in parts.items()}, self.loss_weights)
        return {**named, "loss": loss}, mask.sum()

    # ------------------------------------------------------------------ offline teacher logits
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.teacher_logits_path is not None and stage == "fit":
            datamodule = getattr(self.trainer, "datamodule", None)
            self._store = self.open_store(getattr(datamodule, "train_set", None))

    def open_store(self, dataset: Any = None) -> Any:
        """The :class:`~kd_lightning.data.teacher_logits.TeacherLogitStore` of ``teacher_logits_path``.

        Checked against the teacher's weights (the validation teacher is the one the logits came from),
        the training split's tokens when given, and the temperature.
        """

        try:
            store = TeacherLogitStore(self.teacher_logits_path, teacher=self.teacher, dataset=dataset)
        except KDConfigError as err:
            raise KDConfigError(f"model.init_args.teacher_logits_path: {err}") from None
        if abs(store.temperature - self.temperature) > 1e-12:
            raise KDConfigError(
                f"model.init_args.teacher_logits_path holds log-probabilities at temperature {store.temperature} but "
                f"model.init_args.temperature is {self.temperature}: use the store's temperature or write it again."
            )
        return store

    def _sparse_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:

        if self._store is None:
            self._store = self.open_store()
        input_ids, attention_mask, labels = lm_batch(batch)
        logits = self.student(input_ids, attention_mask=attention_mask)
        targets = self._store.targets(batch, device=logits.device).shifted()
        s, y, mask = shift_for_next_token(logits, labels)
        vocab_t = self._store.vocab_size
        if s.shape[-1] != vocab_t:  # same checks as the logits path; the sparse targets index the teacher's ids
            self.align(s.new_zeros(1, s.shape[-1]), s.new_zeros(1, vocab_t))
            if s.shape[-1] < vocab_t:
                raise KDConfigError(
                    f"the student predicts {s.shape[-1]} tokens but the stored teacher logits index a vocabulary of "
                    f"{vocab_t}: build the student with vocab_size >= {vocab_t}."
                )
        kd = sparse_kl(
            s[..., :vocab_t], targets, mask, tail=self.sparse_tail, temperature=self.temperature, reduction="sum"
        )
        return self.with_ce(kd, s, y, mask), mask.sum()
