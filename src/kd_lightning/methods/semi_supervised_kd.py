"""KD with unlabeled data: the plain baseline of the data-regime methods (Hinton et al. 2015 on more inputs)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.logit import kd_kl_div
from kd_lightning.losses.terms import active, check_weights, weighted_terms
from kd_lightning.methods.tasks.classification import ClassificationDistillation, regime_parts


class SemiSupervisedKD(ClassificationDistillation):
    """Vanilla KD over labeled and unlabeled inputs: ``w_CE·CE(z_S(x_l), y_l) + w_KD·τ²·KL(p_T^τ ‖ p_S^τ)`` with
    the KL averaged over every input of the step (labeled and unlabeled parts together).

    Trains on :class:`~kd_lightning.data.SemiSupervisedDataModule` batches (the CE on the labeled part) and on
    a transfer set (:class:`~kd_lightning.data.TransferSetDataModule`: inputs only, so KD alone), and on plain
    labeled batches (then it is :class:`~kd_lightning.methods.VanillaKD`). The single-head baseline of DHO,
    LLKD and KD³ in the data-regime benchmarks.

    Args:
        temperature: τ.
        ce_weight: w_CE (the labeled part's cross-entropy; no term without labels).
        kd_weight: w_KD.
        kd_on: ``"all"`` (labeled and unlabeled inputs) or ``"unlabeled"`` (only the unlabeled part).
        student, teacher, **kwargs: the arguments of :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    data_regimes: ClassVar[frozenset[str]] = frozenset({"supervised", "semi_supervised", "unlabeled"})

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        kd_on: str = "all",
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        if kd_on not in ("all", "unlabeled"):
            raise KDConfigError("model.init_args.kd_on", f"must be 'all' or 'unlabeled', got {kd_on!r}")
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.kd_on = kd_on

    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        labeled, unlabeled = regime_parts(batch)
        parts = [p[0] for p in (labeled, unlabeled) if p is not None]
        n_labeled = 0 if labeled is None else labeled[0].shape[0]
        x = torch.cat(parts) if len(parts) > 1 else parts[0]
        logits = self.student(x)
        terms: dict[str, Tensor] = {}
        if labeled is not None and active(self.ce_weight):
            self.check_targets(labeled[1])
            terms["ce"] = nn.functional.cross_entropy(logits[:n_labeled].float(), labeled[1])
        if active(self.kd_weight):
            start = n_labeled if self.kd_on == "unlabeled" and unlabeled is not None else 0
            teacher_logits = self.teacher_forward(x[start:])
            terms["kd"] = kd_kl_div(logits[start:], teacher_logits, self.temperature)
        if labeled is None:
            return (weighted_terms(terms, {"ce": self.ce_weight, "kd": self.kd_weight}),)
        return weighted_terms(terms, {"ce": self.ce_weight, "kd": self.kd_weight}), logits[:n_labeled], labeled[1]
