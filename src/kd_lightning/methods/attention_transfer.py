"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017; arXiv 1612.03928)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import label_cross_entropy
from kd_lightning.losses.feature import attention_transfer_loss
from kd_lightning.losses.terms import check_weights, weighted_terms
from kd_lightning.methods.feature_base import FeatureDistillationModule
from kd_lightning.methods.fitnet import check_pairs, stage_layers

__all__ = ["AT"]


class AT(FeatureDistillationModule):
    """Activation-based attention transfer: ``w_CE·CE(z_S, y) + w_AT·Σ_j mean((Q_S,j − Q_T,j)²)``.

    ``Q = normalize(mean_c |f_c|^p)`` is a per-sample spatial attention map
    (:func:`kd_lightning.losses.attention_map`); maps of different sizes are average-pooled to the
    smaller one. No trainable parts: student and teacher channel counts may differ. Verified against
    RepDistiller ``distiller_zoo/AT.py`` / ``helper/loops.py`` and mdistiller ``AT.py``: the layers are
    ``feat[1:-1]`` of ``forward(is_feat=True, preact=False)`` (the post-activation outputs of the three
    stages, ``layer1..3`` of the CIFAR ResNets), p = 2, weight 1000 on the plain sum over layers of the
    mean squared difference. The paper writes ``β/2·Σ_j ‖·‖_p`` with β = 10³ divided by the map size;
    the official ``cifar.py`` read (szagoruyko/attention-transfer) applies ``beta`` to the sum of means
    without the ½, as RepDistiller does. ``at_weight`` is the factor applied (UNVERIFIED: whether the
    paper's own runs used the ½, i.e. an effective 500).

    Args:
        student, teacher: the networks.
        student_layers: student module paths (``[C, H, W]`` maps); ``None`` takes the zoo's
            ``feature_stages[1:-1]`` (``preact_stages[1:-1]`` with ``preact``).
        teacher_layers: teacher module paths, paired in order with ``student_layers``; same default.
        p: exponent of the attention map.
        ce_weight: w_CE.
        at_weight: w_AT (1000 in RepDistiller's and mdistiller's CIFAR-100 recipe).
        preact: default layers from ``preact_stages`` instead of ``feature_stages``.
        **kwargs: see :class:`~kd_lightning.methods.feature_base.FeatureDistillationModule`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
        p: float = 2.0,
        ce_weight: float = 1.0,
        at_weight: float = 1000.0,
        preact: bool = False,
        **kwargs: Any,
    ) -> None:
        stages = slice(1, -1)
        s_layers = stage_layers(student, "student_layers", student_layers, stages, preact)
        t_layers = stage_layers(teacher, "teacher_layers", teacher_layers, stages, preact)
        check_pairs(s_layers, t_layers)
        if not p > 0:
            raise KDConfigError(f"model.init_args.p must be > 0, got {p}.")
        check_weights(ce_weight=ce_weight, at_weight=at_weight)
        self.p = p
        self.ce_weight = ce_weight
        self.at_weight = at_weight
        super().__init__(student, teacher, student_layers=s_layers, teacher_layers=t_layers, **kwargs)

    def build_parts(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """No parts; checks that every tapped pair is a pair of ``[C, H, W]`` maps that can be pooled together."""
        for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes, strict=True)):
            where = (
                f"model.init_args.student_layers[{i}] ({self.student_layers[i]!r}, shape {tuple(s)}) and "
                f"model.init_args.teacher_layers[{i}] ({self.teacher_layers[i]!r}, shape {tuple(t)})"
            )
            if len(s) != 3 or len(t) != 3:
                raise KDConfigError(f"{where}: attention transfer needs [C, H, W] feature maps; tap conv stages.")
            if (s[1] - t[1]) * (s[2] - t[2]) < 0:
                raise KDConfigError(f"{where}: one map must be at least as large as the other in both dimensions.")

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
        at = attention_transfer_loss(student_feats, teacher_feats, self.p)
        return weighted_terms({"ce": ce, "at": at}, {"ce": self.ce_weight, "at": self.at_weight})
