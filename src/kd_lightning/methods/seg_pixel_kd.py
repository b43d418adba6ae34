"""Pixel-wise KD for semantic segmentation: per-pixel softened KL at the native output stride.

Hinton et al.'s KD applied to every pixel, as the segmentation KD baseline of SKD (Liu et al., CVPR 2019) and as
CIRKD's ``losses/kd.py`` (winycg/CIRKD @ 2d8ad0f; dense-baselines spec, section 5).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.dense import pixel_kd
from kd_lightning.losses.terms import check_weights
from kd_lightning.methods.tasks.segmentation import SegmentationDistillation

__all__ = ["SegPixelKD"]


class SegPixelKD(SegmentationDistillation):
    """``L = CE(out) + aux_weight·CE(aux) + weight · τ²/(N·h·w) · Σ_pixels KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``.

    The logits ``z`` are the native-stride maps (``[N, K, h, w]``, 1/8 of the input for dilated ResNets) before
    upsampling (:func:`~kd_lightning.losses.dense.pixel_kd`); ignore-label pixels are distilled too, as in CIRKD.
    Defaults ``tau = 1``, ``weight = 1``: CIRKD's Cityscapes setting (``train_cirkd.py``). The older
    TorchDistiller ``CriterionKD`` averages over ``N·K·h·w`` without ``τ²`` and uses weight 10: another scale.

    Args:
        student, teacher: segmenters with the same classes and output stride.
        tau: temperature ``τ > 0``.
        weight: weight of the pixel KD term.
        **kwargs: :class:`~kd_lightning.methods.tasks.segmentation.SegmentationDistillation`'s arguments.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, tau: float = 1.0, weight: float = 1.0, **kwargs: Any):
        check_temperature(tau, "tau")
        check_weights(weight=weight)
        if weight == 0:
            raise KDConfigError("weight", "is 0: nothing is distilled", "use SegmentationSupervised to train alone")
        self.tau = tau
        self.weight = weight
        super().__init__(student=student, teacher=teacher, **kwargs)

    def map_roles(self) -> tuple[str, ...]:
        return ("logits",)

    def distill_terms(
        self, student_maps: dict[str, Tensor], teacher_maps: dict[str, Tensor], masks: Tensor, batch: Any
    ) -> dict[str, Tensor]:
        return {"pixel_kd": self.weight * pixel_kd(student_maps["logits"], teacher_maps["logits"], self.tau)}
