"""Relational knowledge distillation (Park, Kim, Lu, Cho; CVPR 2019; arXiv 1904.05068)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.losses._common import label_cross_entropy
from kd_lightning.losses.relation import RKDLoss
from kd_lightning.losses.terms import check_weights, weighted_terms
from kd_lightning.methods.feature_base import FeatureDistillationModule
from kd_lightning.methods.fitnet import check_pairs, stage_layers

__all__ = ["RKD"]


class RKD(FeatureDistillationModule):
    """RKD: ``w_CE·CE(z_S, y) + w_RKD·Σ_j (w_D·RKD-D(e_S,j, e_T,j) + w_A·RKD-A(e_S,j, e_T,j))``.

    RKD-D matches the batch's pairwise distances (each normalised by its mean), RKD-A the cosines of
    the angles of every triplet, both with a smooth-L1 (Huber, δ = 1) penalty
    (:mod:`kd_lightning.losses.relation`). No trainable parts: embedding widths may differ. Verified
    against RepDistiller ``distiller_zoo/RKD.py`` / ``helper/loops.py`` and mdistiller ``RKD.py``: the
    embedding is the pooled penultimate feature (``feat[-1]``, the input of ``fc``), w_D = 25,
    w_A = 50, non-squared distances clamped at eps = 1e-12, weight 1 on CIFAR-100. Losses are
    per-batch, so under DDP each rank relates its own samples only (as the single-GPU reference).

    Args:
        student, teacher: the networks.
        student_layers: student module paths of the embeddings (flattened); ``None`` takes the zoo's
            last ``feature_stages`` entry (the pooled vector, ``flatten``).
        teacher_layers: teacher module paths, paired in order with ``student_layers``; same default.
        ce_weight: w_CE.
        rkd_weight: w_RKD, the factor on the whole RKD term (RepDistiller ``-b 1``).
        distance_weight: w_D.
        angle_weight: w_A.
        squared: compare squared distances.
        eps: clamp of the squared distances.
        **kwargs: see :class:`~kd_lightning.methods.feature_base.FeatureDistillationModule`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
        ce_weight: float = 1.0,
        rkd_weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        squared: bool = False,
        eps: float = 1e-12,
        **kwargs: Any,
    ) -> None:
        last = slice(-1, None)
        s_layers = stage_layers(student, "student_layers", student_layers, last)
        t_layers = stage_layers(teacher, "teacher_layers", teacher_layers, last)
        check_pairs(s_layers, t_layers)
        check_weights(ce_weight=ce_weight, rkd_weight=rkd_weight)
        self.ce_weight = ce_weight
        self.rkd_weight = rkd_weight
        super().__init__(student, teacher, student_layers=s_layers, teacher_layers=t_layers, **kwargs)
        self.criterion = RKDLoss(distance_weight, angle_weight, squared, eps)

    def build_parts(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """No parts: any embedding shapes work (they are flattened per sample)."""

    def feature_loss(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        batch: Any,
    ) -> dict[str, Tensor]:
        ce = label_cross_entropy(student_logits, target)
        pairs = [self.criterion(s, t) for s, t in zip(student_feats, teacher_feats)]
        terms = {f"rkd_{k}": torch.stack([p[k] for p in pairs]).sum() for k in pairs[0] if k != "loss"}
        weights = {"ce": self.ce_weight, "rkd_distance": self.rkd_weight, "rkd_angle": self.rkd_weight}
        return weighted_terms({"ce": ce, **terms}, weights)
