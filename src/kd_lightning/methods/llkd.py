"""LLKD (Li et al., "Learning with Less: Knowledge Distillation from Large Language Models via Unlabeled Data",
NAACL 2025 Findings, arXiv 2411.08028): train on the unlabeled samples whose teacher pseudo-label is confident and
which the student is still uncertain about, with class-wise adaptive thresholds and a weighted loss."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.llkd import (
    EmptyMode,
    LLKDLoss,
    PoolUsage,
    ThresholdInit,
    ThresholdMode,
    ThresholdOrder,
    Weighting,
)
from kd_lightning.losses.terms import active, check_weights, weighted_terms
from kd_lightning.methods.tasks.classification import ClassificationDistillation, regime_parts


class LLKD(ClassificationDistillation):
    """LLKD: weighted pseudo-label training on the adaptively selected unlabeled samples, plus CE on labels.

    ``L = w_lab·CE(z_S(x_l), y_l) + w_unl·L_w`` with, on the unlabeled part (pseudo-labels ``ŷ`` and confidences
    ``c = max softmax(z_T/τ)`` of the frozen teacher, uncertainty ``u`` of the student's detached logits)::

        τ^T(y) ← m·τ^T(y) + (1−m)·mean_{ŷ_i=y} c_i,   τ^S(y) ← m·τ^S(y) + (1−m)·mean_{ŷ_i=y} u_i
        S = {i : c_i ≥ τ^T(ŷ_i) and u_i ≥ τ^S(ŷ_i)},   w_i = |S|·c_i·u_i / Σ_{j∈S} c_j·u_j
        L_w = (1/|S|) Σ_{i∈S} w_i·CE(z_S_i, ŷ_i)

    (:mod:`kd_lightning.losses.llkd`). The thresholds are updated once per training step (micro-batch) and are
    buffers (checkpointed); the selection runs without autograd. The paper's teacher is a prompted LLM whose
    pseudo-labels are precomputed; here the frozen teacher runs on each unlabeled batch (the same labels for a
    deterministic teacher).

    RECONSTRUCTION: no official code and no full paper text were available (spec: abstract and third-party
    summaries). Unverified and therefore arguments: the threshold update (``threshold_mode``, ``momentum``,
    ``threshold_init``, initial values), the order of update and selection (``threshold_order``), the
    uncertainty measure (``uncertainty``), the weighting (``weighting``), what an empty selection does
    (``empty``, ``fallback_k``), the teacher temperature of ``c`` and the labeled CE term (``labeled_weight``).

    Logged: ``train/selected_fraction`` (per step and epoch), ``train/pool_fraction_used`` (share of the unlabeled
    pool ever selected, stored in checkpoints; pool size from the data module's ``unlabeled_set`` or
    ``transfer_set``), and per epoch ``train/selected_fraction_class{k}`` (share of the epoch's samples
    pseudo-labelled ``k`` that were selected), ``train/threshold_teacher_class{k}``,
    ``train/threshold_student_class{k}`` (``log_per_class``).

    Args:
        temperature: τ of the teacher's confidence.
        uncertainty: ``"entropy"`` (normalised by log C), ``"1-max_prob"`` or ``"margin"``.
        threshold_mode: ``"ema"`` or ``"batch_mean"``.
        momentum: m of the EMA (0.999 in the spec, for long text runs).
        threshold_init: ``"constant"`` or ``"first_batch"`` (a class starts at the means of its first batch).
        teacher_threshold_init: τ^T_0.
        student_threshold_init: τ^S_0.
        threshold_order: ``"update_first"`` (spec) or ``"select_first"``.
        empty: an empty selection gives a zero loss (``"skip"``) or falls back to the ``fallback_k`` samples of
            largest ``c·u`` (``"top_k"``).
        fallback_k: k of that fallback.
        weighting: ``"confidence_uncertainty"`` (``w ∝ c·u``) or ``"uniform"``.
        labeled_weight: w_lab of the labeled part's cross-entropy (no term without labels).
        unlabeled_weight: w_unl of ``L_w``.
        log_per_class: log the per-class selected fractions and thresholds at each epoch's end.
        sync_thresholds: add the class statistics of every process before updating the thresholds (DDP).
        student, teacher, **kwargs: the arguments of :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    data_regimes: ClassVar[frozenset[str]] = frozenset({"semi_supervised", "unlabeled"})

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 1.0,
        uncertainty: str = "entropy",
        threshold_mode: ThresholdMode = "ema",
        momentum: float = 0.999,
        threshold_init: ThresholdInit = "constant",
        teacher_threshold_init: float = 0.5,
        student_threshold_init: float = 0.5,
        threshold_order: ThresholdOrder = "update_first",
        empty: EmptyMode = "skip",
        fallback_k: int = 1,
        weighting: Weighting = "confidence_uncertainty",
        labeled_weight: float = 1.0,
        unlabeled_weight: float = 1.0,
        log_per_class: bool = True,
        sync_thresholds: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_temperature(temperature)
        check_weights(labeled_weight=labeled_weight, unlabeled_weight=unlabeled_weight)
        if not (active(labeled_weight) or active(unlabeled_weight)):
            raise KDConfigError(
                "unlabeled_weight", "and labeled_weight are both 0: nothing to train on", "give one a positive weight"
            )
        self.criterion = LLKDLoss(
            num_classes=self.num_classes,
            temperature=temperature,
            uncertainty=uncertainty,
            threshold_mode=threshold_mode,
            momentum=momentum,
            threshold_init=threshold_init,
            teacher_threshold_init=teacher_threshold_init,
            student_threshold_init=student_threshold_init,
            threshold_order=threshold_order,
            empty=empty,
            fallback_k=fallback_k,
            weighting=weighting,
            sync=sync_thresholds,
        )
        self.labeled_weight = labeled_weight
        self.unlabeled_weight = unlabeled_weight
        self.log_per_class = log_per_class
        self.pool_usage = PoolUsage()
        # Per-class counts of the current epoch: pseudo-labelled, selected (not checkpointed).
        self.register_buffer("epoch_counts", torch.zeros(2, 0), persistent=False)

    # ------------------------------------------------------------------ setup
    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        if getattr(datamodule, "regime", None) == "unlabeled" and not active(self.unlabeled_weight):
            raise KDConfigError(
                "model.init_args.unlabeled_weight",
                f"is 0 but {type(datamodule).__name__} serves no labels: nothing to train on",
                "give it a positive weight",
            )
        self.criterion.thresholds.build(int(self.num_classes))
        if self.epoch_counts.shape[1] != self.num_classes:
            self.epoch_counts = torch.zeros(2, int(self.num_classes), device=self.epoch_counts.device)
        pool = getattr(datamodule, "unlabeled_set", None)
        if pool is None:
            pool = getattr(datamodule, "transfer_set", None)
        if pool is not None:
            self.pool_usage.build(len(pool))

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        labeled, unlabeled = regime_parts(batch)
        parts = [p[0] for p in (labeled, unlabeled) if p is not None]
        n_labeled = 0 if labeled is None else labeled[0].shape[0]
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        logits = self.student(x)
        terms: dict[str, Tensor] = {}
        if labeled is not None:
            self.check_targets(labeled[1])
            if active(self.labeled_weight):
                terms["ce"] = F.cross_entropy(logits[:n_labeled].float(), labeled[1])
        if unlabeled is not None and active(self.unlabeled_weight):
            x_u, pool_index = unlabeled
            terms["llkd"] = self.unlabeled_loss(logits[n_labeled:], self.teacher_forward(x_u), pool_index)
        weights = {"ce": self.labeled_weight, "llkd": self.unlabeled_weight}
        # No active term (labeled_weight 0 on a batch without its unlabeled part): a zero loss, still attached.
        out = weighted_terms(terms, weights) if terms else {"loss": logits.sum() * 0.0}
        if labeled is None:
            return (out,)
        return out, logits[:n_labeled], labeled[1]

    def unlabeled_loss(self, student_logits: Tensor, teacher_logits: Tensor, pool_index: Tensor) -> Tensor:
        """``L_w`` of the unlabeled part; records the selection (pool usage, per-class counts) and logs it."""
        loss, labels, selection = self.criterion(student_logits, teacher_logits)
        mask = selection.mask
        n = int(mask.shape[0])
        self.log("train/selected_fraction", mask.float().mean(), on_step=True, on_epoch=True, batch_size=max(n, 1))
        with torch.no_grad():
            counts = torch.stack([torch.ones_like(mask, dtype=torch.float32), mask.float()])
            self.epoch_counts.index_add_(1, labels.to(self.epoch_counts.device), counts.to(self.epoch_counts))
            if self._trainer is not None and self.trainer.world_size > 1:
                # every rank records the pool items that any rank selected (DistributedSampler: equal batch sizes)
                pool_index = self.all_gather(pool_index).reshape(-1)
                mask = self.all_gather(mask.to(torch.uint8)).reshape(-1).bool()
            self.pool_usage.mark(pool_index, mask)
        if self.pool_usage.size:  # cumulative, so its epoch value is the largest (the epoch's last)
            fraction = self.pool_usage.fraction()
            self.log("train/pool_fraction_used", fraction, on_step=True, on_epoch=True, reduce_fx="max", batch_size=1)
        return loss

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.epoch_counts.zero_()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if not self.log_per_class or not self.epoch_counts.numel():
            return
        counts = self.trainer.strategy.reduce(self.epoch_counts.clone(), reduce_op="sum")
        seen, selected = counts[0].tolist(), counts[1].tolist()
        thresholds = self.criterion.thresholds
        for k, (n_k, s_k) in enumerate(zip(seen, selected, strict=True)):
            if n_k > 0:
                self.log(f"train/selected_fraction_class{k}", s_k / n_k, on_step=False, on_epoch=True)
            self.log(f"train/threshold_teacher_class{k}", thresholds.teacher[k], on_step=False, on_epoch=True)
            self.log(f"train/threshold_student_class{k}", thresholds.student[k], on_step=False, on_epoch=True)
