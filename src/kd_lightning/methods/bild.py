"""BiLD: Bi-directional Logits Difference loss (Li, Zhou, Song; COLING 2025; arXiv 2406.13555)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.bild import BiLDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class BiLD(ClassificationDistillation):
    """BiLD: match the distributions of pairwise logit differences among the top-k logits.

    ``L = w_CE·CE(z_S, y) + w_KD·(t-LD + s-LD)``, ``LD = KL(softmax(d^T/τ) ‖ softmax(d^S/τ))`` over
    the ``k(k−1)/2`` differences ``d_ij = z_i − z_j`` (i < j) of the logits at the top-k classes of
    the teacher (t-LD) or of the student (s-LD); no τ² (:class:`~kd_lightning.losses.bild.BiLDLoss`).
    The loss, k = 8 and τ = 3 are verified against the official code (fpcsong/BiLD), which trains
    LLMs with no CE term; the CE term (w_CE = 1 here) is our addition for classification, and
    ``ce_weight=0`` is the paper's objective.

    Args:
        top_k: k, logits kept per leader; at most the class count (k = C compares every pair).
        temperature: τ.
        kd_weight: w_KD, weight of t-LD and s-LD.
        ce_weight: w_CE, weight of the cross-entropy on the labels (0 = the paper's loss).
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        top_k: int = 8,
        temperature: float = 3.0,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if top_k < 2:
            raise KDConfigError(f"model.init_args.top_k must be >= 2 (one pair of logits at least), got {top_k}.")
        if not temperature > 0:
            raise KDConfigError(f"model.init_args.temperature must be > 0, got {temperature}.")
        self.criterion = BiLDLoss(top_k=top_k, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.criterion.top_k > int(self.num_classes):
            raise KDConfigError(
                f"model.init_args.top_k={self.criterion.top_k} exceeds the {self.num_classes} classes: set "
                f"top_k <= {self.num_classes} (top_k={self.num_classes} compares every pair of classes)."
            )
