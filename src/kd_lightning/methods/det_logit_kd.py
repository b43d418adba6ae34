"""Logit KD on a dense detector's classification head: per-anchor sigmoid class scores of the student vs the
teacher on the same anchors (Hinton, Vinyals, Dean, 2015, arXiv 1503.02531, with the per-class binary
distributions of sigmoid/focal-loss heads instead of a softmax)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.terms import check_weights
from kd_lightning.methods.tasks.detection import DetectionContext, DetectionDistillation
from kd_lightning.models.detection import detector_family

__all__ = ["DetLogitKD", "sigmoid_kd"]


def sigmoid_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Binary KL between per-class sigmoid scores, summed over classes and averaged over anchors.

    With ``p = σ(z_T/T)`` and ``q = σ(z_S/T)`` per anchor and class:
    ``L = T² · mean_{anchors} Σ_c [p log(p/q) + (1 − p) log((1 − p)/(1 − q))]``
    (= BCE-with-soft-targets minus the teacher's entropy: the same gradient, zero when ``z_S = z_T``).

    Args:
        student_logits: ``[..., C]`` (e.g. ``[N, anchors, K+1]``).
        teacher_logits: same shape; detached.
        temperature: ``T > 0``.
    """
    if not temperature > 0:
        raise KDConfigError("temperature", f"must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise KDConfigError(
            "cls_logits",
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ",
            "both heads must predict on the same anchors and classes",
        )
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    p = t.sigmoid()
    kl = F.binary_cross_entropy_with_logits(s, p, reduction="none") - F.binary_cross_entropy_with_logits(
        t, p, reduction="none"
    )
    anchors = max(1, kl.numel() // kl.shape[-1])
    return kl.sum() / anchors * temperature**2


class DetLogitKD(DetectionDistillation):
    """``L = weight · sigmoid_kd(z_S, z_T, T)`` on the classification logits of a RetinaNet/FCOS head.

    The teacher's head runs on its own FPN features of the student's batch; student and teacher must share the
    anchor layout (family, FPN levels and strides, ``anchor_sizes``, ``aspect_ratios``, ``num_classes``),
    checked once at ``setup``. Faster R-CNN is not supported (its box head scores proposals, not anchors).

    Args:
        student, teacher: RetinaNet or FCOS detectors of the same family.
        temperature: T of the sigmoid (T² rescales the gradient, as in Hinton et al.).
        weight: weight of the term (default 1.0; not from a paper — the term averages over all anchors, most of
            them background, so it is small next to the focal loss, which is normalised by the positives).
        **kwargs: ``task_weight``, ``map_backend`` and the core's arguments.

    Logged term: ``logit_kd`` (weighted).
    """

    needs_teacher_head: ClassVar[bool] = True

    def __init__(
        self, student: nn.Module, teacher: nn.Module, temperature: float = 1.0, weight: float = 1.0, **kwargs: Any
    ) -> None:
        for field, network in (("student", student), ("teacher", teacher)):
            if isinstance(network, nn.Module):
                try:
                    family = detector_family(network)
                except KDConfigError:
                    continue  # the task sibling names the field
                if family == "faster_rcnn":
                    raise KDConfigError(
                        field,
                        "DetLogitKD distils the dense classification head of RetinaNet/FCOS; Faster R-CNN scores RPN "
                        "proposals instead and is not supported",
                        "use DetFPNImitation or DetCWD for Faster R-CNN",
                    )
        super().__init__(student=student, teacher=teacher, **kwargs)
        if not temperature > 0:
            raise KDConfigError("temperature", f"must be > 0, got {temperature}")
        check_weights(weight=weight)
        self.temperature = temperature
        self.weight = weight

    def distill_terms(
        self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], context: DetectionContext
    ) -> dict[str, Tensor]:
        assert context.student_head is not None and context.teacher_head is not None
        kd = sigmoid_kd(context.student_head["cls_logits"], context.teacher_head["cls_logits"], self.temperature)
        return {"logit_kd": self.weight * kd}
