"""ACAM-KD for semantic segmentation: Adaptive and Cooperative Attention Masking on the last backbone feature
(Lan & Tian, ICCV 2025; arXiv 2503.06307). Paper's headline: DeepLabV3-MobileNetV2 student on Cityscapes,
+3.09 mIoU over the non-distilled baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.acam import ACAMLoss, acam_options
from kd_lightning.losses.terms import check_weights
from kd_lightning.methods.tasks.segmentation import SegmentationDistillation

__all__ = ["SegACAMKD"]


class SegACAMKD(SegmentationDistillation):
    """``L = CE + aux_weight·CE_aux + λ_kd · (L_ch + L_sp) + λ_div · L_div`` on one feature map (default: the last
    backbone stage, the ASPP input of DeepLabV3 — 2048 channels for ResNet-101, 320 for our MobileNetV2): the
    student map goes through a 1x1 adapter to the teacher's width, STCA-FF fuses teacher queries with student
    keys/values, ``M`` selection units turn the fusion into channel and spatial masks that weight
    ``(F_T − A(F_S))²`` (:class:`~kd_lightning.losses.acam.ACAMLoss` in ``self.acam``, built from the probed
    shapes at setup and rebuilt by ``load_from_checkpoint``).

    VERIFIED (abstract + summaries): the roles of Q (teacher) and K/V (student), masks from the fused features,
    the mask-sum normalisation, a diversity loss between masks. UNVERIFIED (RECONSTRUCTION, spec
    ``04_acam_kd.md``): which map is distilled (the spec's "last backbone/decoder feature"; ``feature_role``),
    ``d = C/4``, ``max_tokens``, ``M = 6``, the unit architecture, ``mask_objective``,
    ``student_grad_through_masks``, ``λ_kd = 1``, ``λ_div = 0.5`` and the schedule.

    Args:
        student, teacher: segmenters with the same number of classes and output stride.
        lambda_kd: weight of ``L_ch + L_sp`` (mean squared errors, O(feature variance): rescale so the initial
            KD term is ~1-5x the CE).
        lambda_div: weight of the Dice diversity loss.
        feature_role: the distilled map's role (``"backbone"``; ``"head_feature"``: the head's last ReLU map);
            ``student_maps``/``teacher_maps`` may point it at another module. It must be ``[N, C, H, W]``.
        num_masks, key_channels, max_tokens, reduction, spatial_kernel, mask_objective, mask_source,
            student_grad_through_masks, adapter: as :class:`~kd_lightning.methods.det_acam_kd.DetACAMKD`.
        **kwargs: :class:`~kd_lightning.methods.tasks.segmentation.SegmentationDistillation`'s arguments
            (``aux_weight``, ``student_maps``, ``teacher_maps``, ``input_shape``, evaluation options) and the core's.

    Logged terms (weighted): ``acam_channel``, ``acam_spatial``, ``acam_div`` (with ``ce``, ``aux``).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        lambda_kd: float = 1.0,
        lambda_div: float = 0.5,
        feature_role: str = "backbone",
        num_masks: int = 6,
        key_channels: int | None = None,
        max_tokens: int = 1024,
        reduction: int = 16,
        spatial_kernel: int = 3,
        mask_objective: Literal["min", "adversarial", "detach"] = "min",
        mask_source: Literal["cooperative", "teacher"] = "cooperative",
        student_grad_through_masks: bool = False,
        adapter: Literal["always", "auto"] = "always",
        **kwargs: Any,
    ) -> None:
        check_weights(lambda_kd=lambda_kd, lambda_div=lambda_div)
        self.acam_options = acam_options(
            lambda_div,
            num_masks=num_masks,
            key_channels=key_channels,
            max_tokens=max_tokens,
            reduction=reduction,
            spatial_kernel=spatial_kernel,
            mask_objective=mask_objective,
            mask_source=mask_source,
            student_grad_through_masks=student_grad_through_masks,
            adapter=adapter,
        )
        if not isinstance(feature_role, str) or not feature_role or feature_role == "logits":
            raise KDConfigError(
                "feature_role", f"must name a feature map role, got {feature_role!r}", "'backbone' or 'head_feature'"
            )
        # Read by map_roles and build_parts, which run inside super().__init__.
        self.lambda_kd, self.lambda_div = lambda_kd, lambda_div
        self.feature_role = feature_role
        self.acam: ACAMLoss | None = None
        super().__init__(student=student, teacher=teacher, **kwargs)

    def map_roles(self) -> tuple[str, ...]:
        return (self.feature_role,)

    def _check_rank(self, key: str, shape: Any) -> None:
        """A probed ``[C, h, w]`` (or a live ``[N, C, h, w]``) map shape; anything else is a one-line error."""
        if len(shape) != 3:
            paths = self.student_paths if key == "student" else self.teacher_paths
            raise KDConfigError(
                f"model.init_args.{key}_maps",
                f"the {self.feature_role!r} map ({paths.get(self.feature_role)!r}) is "
                f"[N, {', '.join(str(int(d)) for d in shape)}] but {type(self).__name__} needs a [N, C, H, W] "
                "feature map",
                f"point {key}_maps.{self.feature_role} at a convolutional map (the 'backbone' or 'head_feature' role)",
            )

    def check_probe(self, shapes: Mapping[str, Any]) -> None:
        for key in ("student", "teacher"):
            if self.feature_role in shapes.get(key, {}):
                self._check_rank(key, shapes[key][self.feature_role])
        super().check_probe(shapes)

    def build_parts(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        self._check_rank("student", student_shapes[self.feature_role])
        self._check_rank("teacher", teacher_shapes[self.feature_role])
        c_s, c_t = int(student_shapes[self.feature_role][0]), int(teacher_shapes[self.feature_role][0])
        self.acam = ACAMLoss(c_s, c_t, **self.acam_options)

    def distill_terms(
        self, student_maps: dict[str, Tensor], teacher_maps: dict[str, Tensor], masks: Tensor, batch: Any
    ) -> dict[str, Tensor]:
        if self.acam is None:
            raise KDConfigError(
                "model.init_args.input_shape",
                "SegACAMKD's modules are built from the map shapes at setup and none were probed",
                "train through a Trainer with a data module that has input_shape, or set input_shape",
            )
        student, teacher = student_maps[self.feature_role], teacher_maps[self.feature_role]
        for key, tensor in (("student", student), ("teacher", teacher)):
            if tensor.dim() != 4:
                self._check_rank(key, tensor.shape[1:])
        terms = self.acam(student, teacher)
        return {
            "acam_channel": self.lambda_kd * terms["channel"],
            "acam_spatial": self.lambda_kd * terms["spatial"],
            "acam_div": self.lambda_div * terms["diversity"],
        }
