"""Feature-distillation losses (pure torch): FitNet hints and attention transfer.

Inputs are intermediate features ``[batch, channels, height, width]`` (hints also accept ``[batch, dim]``
vectors). The teacher's features are detached: they are targets. Every term is computed in at least
float32 (safe under bf16/fp16 autocast).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import upcast

__all__ = [
    "AttentionTransferLoss",
    "HintLoss",
    "attention_map",
    "attention_transfer_loss",
    "attention_transfer_term",
    "hint_loss",
]


def hint_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets hint term (Romero et al., ICLR 2015; arXiv 1412.6550): ``mean((r(f_S) − f_T)²)``.

    ``student_feat`` is the student's feature after the regressor ``r`` (it must have the teacher's
    shape). The mean runs over every element (batch, channels, positions), as ``nn.MSELoss`` in
    RepDistiller's ``HintLoss``; the paper's ``½‖·‖²`` only rescales the weight.

    Raises:
        ValueError: the shapes differ (the regressor does not map to the teacher's shape).
    """
    if student_feat.shape != teacher_feat.shape:
        raise KDConfigError(
            f"hint_loss: the regressed student feature {tuple(student_feat.shape)} must have the teacher "
            f"feature's shape {tuple(teacher_feat.shape)}."
        )
    return F.mse_loss(upcast(student_feat), upcast(teacher_feat).detach())


def attention_map(feat: Tensor, p: float = 2.0, eps: float = 1e-12) -> Tensor:
    """Activation-based spatial attention (Zagoruyko & Komodakis, ICLR 2017; arXiv 1612.03928).

    ``Q = mean_c |f_c|^p`` over channels, flattened over positions, then divided by its L2 norm:
    ``Q / max(‖Q‖₂, eps)``, one ``[batch, positions]`` row per sample. The official code and
    RepDistiller use ``f.pow(p)``; ``|f|^p`` (the paper's definition) is the same for even ``p`` and for
    post-ReLU features.

    Raises:
        ValueError: ``feat`` has no spatial dimensions, or ``p <= 0``.
    """
    if feat.dim() < 3:
        raise KDConfigError(
            f"attention_map needs features [batch, channels, *positions], got shape {tuple(feat.shape)}: "
            "tap a convolutional stage, not a pooled vector."
        )
    if not p > 0:
        raise KDConfigError(f"p must be > 0, got {p}.")
    q = upcast(feat).abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(q, p=2.0, dim=1, eps=eps)


def _match_positions(student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two ``[B, C, H, W]`` maps to the other's size (RepDistiller's rule)."""
    s_size, t_size = tuple(student_feat.shape[2:]), tuple(teacher_feat.shape[2:])
    if s_size == t_size:
        return student_feat, teacher_feat
    if student_feat.dim() != 4 or teacher_feat.dim() != 4:
        raise KDConfigError(
            f"attention transfer: student positions {s_size} and teacher positions {t_size} differ; only "
            "[B, C, H, W] maps can be pooled to a common size."
        )
    size = (min(s_size[0], t_size[0]), min(s_size[1], t_size[1]))
    if s_size != size:
        student_feat = F.adaptive_avg_pool2d(student_feat, size)
    if t_size != size:
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size)
    return student_feat, teacher_feat


def attention_transfer_term(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """One layer of attention transfer: ``mean((Q_S/‖Q_S‖ − Q_T/‖Q_T‖)²)`` over batch and positions.

    Channel counts may differ (attention averages over channels). Maps of different sizes are first
    average-pooled to the smaller size, as in RepDistiller and mdistiller. The mean of squared
    differences is the official code's (the paper writes a p-norm of the difference).
    """
    if student_feat.shape[0] != teacher_feat.shape[0]:
        sizes = f"student {student_feat.shape[0]}, teacher {teacher_feat.shape[0]}"
        raise KDConfigError(f"attention transfer: batch sizes differ ({sizes}).")
    student_feat, teacher_feat = _match_positions(student_feat, teacher_feat.detach())
    return (attention_map(student_feat, p) - attention_map(teacher_feat, p)).pow(2).mean()


def attention_transfer_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """Attention transfer summed over layer pairs: ``Σ_j attention_transfer_term(S_j, T_j)``.

    The paper weights the sum by ``β/2``; RepDistiller and mdistiller multiply it by their weight
    (1000 on CIFAR-100) directly. The weight is the caller's.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise KDConfigError(
            f"attention transfer pairs student and teacher layers one to one: got {len(student_feats)} student and "
            f"{len(teacher_feats)} teacher features."
        )
    terms = [attention_transfer_term(s, t, p) for s, t in zip(student_feats, teacher_feats)]
    return sum(terms[1:], terms[0])


class HintLoss(nn.Module):
    """FitNets hint loss as a module: ``hint_loss(regressed_student_feat, teacher_feat)`` (no weight)."""

    def forward(self, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        return hint_loss(student_feat, teacher_feat)


class AttentionTransferLoss(nn.Module):
    """Attention transfer over paired layers: ``attention_transfer_loss(student_feats, teacher_feats, p)``.

    Args:
        p: exponent of the activation-based attention map (2 in the paper and RepDistiller).
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if not p > 0:
            raise KDConfigError(f"p must be > 0, got {p}.")
        self.p = p

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        return attention_transfer_loss(student_feats, teacher_feats, self.p)
