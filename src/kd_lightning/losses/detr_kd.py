"""CLoCKDistill's losses for DETR-family detectors (pure torch).

Lan & Tian, "CLoCKDistill: Consistent Location-and-Context-aware Knowledge Distillation for DETRs", WACV 2026,
arXiv 2502.10683. VERIFIED (abstract, table of contents): the encoder *memory* is distilled with ground-truth
location information, and *target-aware queries* built from the ground truth are fed to both decoders so their
logits are distilled one-to-one. RECONSTRUCTION (the code was not retrievable): the location weighting, the
query construction, the per-term losses, the optional reliability gate and every weight below are the
library's choices from the spec (``methods/05_clockdistill.md``), kept as arguments.

Boxes are ``(cx, cy, w, h)`` normalised by the un-padded image size, as DETR predicts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from kd_lightning.errors import KDConfigError

__all__ = [
    "binary_kl",
    "location_weights",
    "logit_distillation",
    "memory_distillation",
    "reliability_gate",
]

LocationPrior = Literal["box", "gaussian"]


def location_weights(
    reference: Tensor,
    padding: Tensor,
    boxes: Sequence[Tensor],
    lambda_fg: float = 4.0,
    prior: LocationPrior = "box",
    scale_normalise: bool = True,
) -> Tensor:
    """``w_n = 1 + λ_fg · max_j G_j(x_n, y_n)`` per memory token, 0 on padding tokens; ``[B, N]``.

    ``G_j`` is the box indicator (``prior="box"``: 1 when the token's reference point lies inside box ``j``) or a
    Gaussian centred on the box with standard deviations ``(w_j, h_j)/2`` (``prior="gaussian"``), multiplied by
    ``1/sqrt(w_j·h_j)`` when ``scale_normalise`` (so that small objects are not outweighed by large ones; the spec's
    reconstruction). Images without boxes get ``w_n = 1``.

    Args:
        reference: ``[B, N, 2]`` token reference points ``(x, y)`` in [0, 1].
        padding: ``[B, N]`` ``True`` for padding tokens.
        boxes: per image ``[M_i, 4]`` GT boxes ``(cx, cy, w, h)`` in [0, 1].
        lambda_fg: foreground emphasis ``λ_fg ≥ 0`` (0: uniform weights, plain memory imitation).
    """
    if prior not in ("box", "gaussian"):
        raise KDConfigError("location_prior", f"must be 'box' or 'gaussian', got {prior!r}")
    if lambda_fg < 0:
        raise KDConfigError("lambda_fg", f"must be >= 0, got {lambda_fg}")
    weights = torch.ones(reference.shape[:2], dtype=torch.float32, device=reference.device)
    for i, gt in enumerate(boxes):
        if not len(gt) or lambda_fg == 0:
            continue
        gt = gt.float()
        x, y = reference[i, :, 0:1].float(), reference[i, :, 1:2].float()  # [N, 1]
        cx, cy, w, h = gt.unbind(-1)  # [M]
        if prior == "box":
            inside = (x >= cx - w / 2) & (x <= cx + w / 2) & (y >= cy - h / 2) & (y <= cy + h / 2)
            g = inside.float()
        else:
            sx, sy = (w / 2).clamp_min(1e-6), (h / 2).clamp_min(1e-6)
            g = torch.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2) / 2)
            if scale_normalise:
                g = g / (w * h).clamp_min(1e-12).sqrt()
        weights[i] = 1 + lambda_fg * g.max(dim=1).values
    return weights.masked_fill(padding, 0.0)


def memory_distillation(student: Tensor, teacher: Tensor, weights: Tensor) -> Tensor:
    """``L_mem = Σ_n w_n ‖M_S[n] − M_T[n]‖² / (D · Σ_n w_n)`` over all tokens of the batch.

    Args:
        student: ``[B, N, D]`` student memory after the width adapter.
        teacher: ``[B, N, D]`` teacher memory (detached here).
        weights: ``[B, N]`` from :func:`location_weights` (0 on padding).

    Raises:
        KDConfigError: the memories differ in shape (token order or width).
    """
    if student.shape != teacher.shape:
        raise KDConfigError(
            "memory",
            f"student memory {tuple(student.shape)} and teacher memory {tuple(teacher.shape)} differ",
            "give both the same feature_levels, strides and input size, and an adapter for the width",
        )
    sq = (student.float() - teacher.detach().float()).pow(2).sum(-1)  # [B, N]
    return (weights * sq).sum() / (student.shape[-1] * weights.sum().clamp_min(1e-12))


def binary_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Elementwise ``KL(Bern(σ(z_T/T)) ‖ Bern(σ(z_S/T)))``: the BCE of the student against the teacher's
    sigmoid probabilities minus the teacher's own entropy (same gradient as the BCE, zero when they agree)."""
    t = teacher_logits.detach().float() / temperature
    s = student_logits.float() / temperature
    p = t.sigmoid()
    return p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))


def reliability_gate(
    teacher_logits: Tensor, teacher_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, sigmoid: bool = True
) -> Tensor:
    """``q_j = IoU(b_T^j, b_j^gt) · p_T(c_j)`` in [0, 1], detached; ``[B, G]``.

    Args:
        teacher_logits: ``[B, G, K]`` the teacher's class logits for the GT queries (last layer).
        teacher_boxes: ``[B, G, 4]`` its boxes (cxcywh); ``gt_boxes`` ``[B, G, 4]``; ``gt_labels`` ``[B, G]``.
        sigmoid: the head's probabilities are sigmoids (DETR focal heads), else a softmax over the classes.
    """
    probs = teacher_logits.detach().float()
    probs = probs.sigmoid() if sigmoid else probs.softmax(-1)
    p = probs.gather(-1, gt_labels.long().unsqueeze(-1)).squeeze(-1)
    a = box_convert(teacher_boxes.detach().float().reshape(-1, 4), "cxcywh", "xyxy")
    b = box_convert(gt_boxes.float().reshape(-1, 4), "cxcywh", "xyxy")
    iou = box_iou(a, b).diagonal().reshape(p.shape) if len(a) else p.new_zeros(p.shape)
    return (iou * p).clamp(0.0, 1.0)


def logit_distillation(
    student_logits: Tensor,
    student_boxes: Tensor,
    teacher_logits: Tensor,
    teacher_boxes: Tensor,
    valid: Tensor,
    gate: Tensor | None = None,
    temperature: float = 1.0,
    class_loss: Literal["bce", "kl"] = "bce",
) -> dict[str, Tensor]:
    """Target-aware consistent logit distillation over decoder layers and GT queries.

    ``L_cls = Σ_{l,j} q_j · Σ_k KL_Bern(σ(z_T^{l,j,k}/T) ‖ σ(z_S^{l,j,k}/T))`` (``class_loss="bce"``, sigmoid
    heads; ``"kl"``: ``T²·KL(softmax(z_T/T) ‖ softmax(z_S/T))`` for softmax heads),
    ``L_box = Σ_{l,j} q_j · (‖b_S − b_T‖₁ + 1 − GIoU(b_S, b_T))``, both divided by the number of valid GT queries
    (``q_j = 1`` without a gate).

    Args:
        student_logits, teacher_logits: ``[L, B, G, K]`` (the same layers; teacher detached here).
        student_boxes, teacher_boxes: ``[L, B, G, 4]`` cxcywh in [0, 1].
        valid: ``[B, G]`` ``False`` for padded queries.
        gate: ``[B, G]`` per-query weights in [0, 1] or ``None``.

    Returns:
        ``{"cls": ..., "box": ...}`` (unweighted).
    """
    if student_logits.shape != teacher_logits.shape or student_boxes.shape != teacher_boxes.shape:
        raise KDConfigError(
            "distill_layers",
            f"student predictions {tuple(student_logits.shape)} and teacher predictions "
            f"{tuple(teacher_logits.shape)} differ ([layers, batch, queries, classes])",
            "give both the same num_classes and decoder depth, or set distill_layers: last",
        )
    if temperature <= 0:
        raise KDConfigError("temperature", f"must be > 0, got {temperature}")
    weight = valid.float() if gate is None else valid.float() * gate.detach().float()  # [B, G]
    count = valid.float().sum().clamp_min(1.0)
    if class_loss == "bce":
        per_query = binary_kl(student_logits, teacher_logits, temperature).sum(-1)
    elif class_loss == "kl":
        t = teacher_logits.detach().float() / temperature
        s = student_logits.float() / temperature
        per_query = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1) * temperature**2
    else:
        raise KDConfigError("class_loss", f"must be 'bce' or 'kl', got {class_loss!r}")
    sb, tb = student_boxes.float(), teacher_boxes.detach().float()
    l1 = (sb - tb).abs().sum(-1)
    flat_s = box_convert(sb.reshape(-1, 4), "cxcywh", "xyxy")
    flat_t = box_convert(tb.reshape(-1, 4), "cxcywh", "xyxy")
    giou = _paired_giou(flat_s, flat_t).reshape(l1.shape)
    box = l1 + 1 - giou
    return {
        "cls": (per_query * weight).sum() / count,
        "box": (box * weight).sum() / count,
    }


def _paired_giou(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of row ``i`` of ``a`` with row ``i`` of ``b`` (xyxy), ``O(n)``."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(-1), (b[:, 2:] - b[:, :2]).prod(-1)
    union = area_a + area_b - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp_min(0).prod(-1)
    return inter / union.clamp_min(eps) - (hull - union) / hull.clamp_min(eps)
