"""CWD for semantic segmentation: Channel-wise Knowledge Distillation for Dense Prediction.

Shu, Liu, Gao, Yan, Shen; ICCV 2021, pp. 5311-5320; arXiv 2011.13256. Official code: irfanICMLL/TorchDistiller
``SemSeg-distill`` (``CriterionCWD``, ``exp_cwd.sh``); CIRKD's CWD baseline (winycg/CIRKD ``train_cwd.sh``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.dense import channel_wise_divergence
from kd_lightning.losses.terms import check_weights
from kd_lightning.methods.tasks.segmentation import SegmentationDistillation

__all__ = ["SegCWD"]


class SegCWD(SegmentationDistillation):
    """CWD on the native-stride logits (and optionally the head feature) of a segmenter.

    For each map pair ``S, T`` ``[N, C, h, w]`` (student after the adapter), every channel is a distribution over
    the ``h·w`` positions: ``p_T[n,c,:] = softmax(T[n,c,:]/τ)``,
    ``L_CWD = τ²/(N·C) · Σ_{n,c,hw} p_T (log p_T − log_softmax(S[n,c,:]/τ))``
    (:func:`~kd_lightning.losses.dense.channel_wise_divergence`). Total:

    ``L = CE(out) + aux_weight·CE(aux) + weight·L_CWD(logits) + feature_weight·L_CWD(A(head feature))``.

    Defaults: ``tau = 4``, ``weight = 3`` on the logits — the official Cityscapes setting (PSPNet R101 -> R18,
    512x512 crops; TorchDistiller ``exp_cwd.sh channel kl 3 4``) and CIRKD's CWD baseline (DeepLabV3 R101 -> R18);
    dense-baselines spec, section 1. mmrazor/mmseg's 512x1024 configs use ``tau = 1``, ``weight = 5``. The feature
    term is off by default; CIRKD's baseline adds it on the head feature (DeepLabV3: ASPP -> conv -> BN -> ReLU)
    with ``feature_weight = 50``. The maps are taken before upsampling, at the output stride (1/8): CWD's sum over
    positions ties its weights to that resolution.

    Args:
        student, teacher: segmenters with the same number of classes and output stride.
        tau: temperature τ > 0 of the per-channel spatial softmax.
        weight: weight of the logits term (``0``: no logits term).
        feature_weight: weight of the feature term (``0``: no feature term, no adapter).
        feature_role: the map role of the feature term (``"head_feature"``; ``"backbone"``: the last stage).
        **kwargs: :class:`~kd_lightning.methods.tasks.segmentation.SegmentationDistillation`'s arguments
            (``aux_weight``, ``student_maps``, ``teacher_maps``, evaluation options) and the core's.

    Adapter: when the student's feature has ``C_S ≠ C_T`` channels, a trainable 1x1 conv with bias maps it to
    ``C_T`` (the CWD code's ``align`` for mmdet/mmseg), built from the probed shapes at ``setup``; the loss is then
    averaged over the teacher's ``C_T`` channels. CIRKD's own CWD divides by the student's pre-adapter channel
    count instead (spec section 5, pitfalls), and the official feature variant uses conv + BN + ReLU: scales differ.
    Logged terms: ``train/ce``, ``train/aux``, ``train/cwd``, ``train/cwd_feature`` (weighted).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        tau: float = 4.0,
        weight: float = 3.0,
        feature_weight: float = 0.0,
        feature_role: str = "head_feature",
        **kwargs: Any,
    ) -> None:
        if not tau > 0:
            raise KDConfigError("tau", f"must be > 0, got {tau}", "CWD softmaxes each channel at temperature tau")
        check_weights(weight=weight, feature_weight=feature_weight)
        if weight == 0 and feature_weight == 0:
            raise KDConfigError("weight", "and feature_weight are both 0", "use SegmentationSupervised to train alone")
        # Read by map_roles and build_parts, which run inside super().__init__.
        self.tau = tau
        self.weight = weight
        self.feature_weight = feature_weight
        self.feature_role = feature_role
        super().__init__(student=student, teacher=teacher, **kwargs)

    def map_roles(self) -> tuple[str, ...]:
        roles = ("logits",) if self.weight else ()
        return roles + ((self.feature_role,) if self.feature_weight else ())

    def build_parts(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        if not self.feature_weight:
            return
        s_channels, t_channels = student_shapes[self.feature_role][0], teacher_shapes[self.feature_role][0]
        self.adapter = nn.Conv2d(s_channels, t_channels, 1) if s_channels != t_channels else nn.Identity()

    def distill_terms(
        self, student_maps: dict[str, Tensor], teacher_maps: dict[str, Tensor], masks: Tensor, batch: Any
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.weight:
            terms["cwd"] = self.weight * channel_wise_divergence(
                student_maps["logits"], teacher_maps["logits"], self.tau
            )
        if self.feature_weight:
            adapter = getattr(self, "adapter", None)
            if adapter is None:
                raise KDConfigError(
                    "model.init_args.input_shape",
                    "SegCWD's feature adapter is built from the map shapes at setup and none were probed",
                    "train through a Trainer with a data module that has input_shape, or set input_shape",
                )
            student = adapter(student_maps[self.feature_role])
            terms["cwd_feature"] = self.feature_weight * channel_wise_divergence(
                student, teacher_maps[self.feature_role], self.tau
            )
        return terms
