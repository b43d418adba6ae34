"""Relational distillation losses (pure torch): RKD distance and angle (Park et al., CVPR 2019; arXiv 1904.05068).

RKD transfers the *structure* of a batch of embeddings rather than the embeddings themselves: the
pairwise distances (normalised by their mean) and the angles of every triplet. Embeddings of student
and teacher may have different dimensions; anything beyond ``[batch, ...]`` is flattened. The teacher
is detached. Both terms are batch-level: under DDP they see each rank's batch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import upcast
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = [
    "RKDLoss",
    "pairwise_distances",
    "rkd_angle_loss",
    "rkd_angles",
    "rkd_distance_loss",
]


def _embeddings(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise KDConfigError(
            "RKD needs embeddings [batch, ...] with the same batch size, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}."
        )
    return upcast(student).flatten(1), upcast(teacher).detach().flatten(1)


def pairwise_distances(embeddings: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """``[N, N]`` Euclidean distances ``‖e_i − e_j‖`` with a zero diagonal.

    Squared distances are clamped at ``eps`` before the square root (as in the official code), so the
    gradient stays finite for coincident points; ``squared=True`` returns the clamped squares.
    """
    if eps < 0:
        raise KDConfigError(f"eps must be >= 0, got {eps}.")
    diff = embeddings.unsqueeze(1) - embeddings.unsqueeze(0)
    dist = diff.pow(2).sum(dim=-1).clamp_min(eps)
    if not squared:
        dist = dist.sqrt()
    eye = torch.eye(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    return dist.masked_fill(eye, 0.0)


def _normalise_by_mean(dist: Tensor) -> Tensor:
    """``dist / μ`` with ``μ`` the mean of the positive entries (the off-diagonal pairs)."""
    count = (dist > 0).sum().clamp_min(1)
    mean = dist.sum() / count
    return dist / mean.clamp_min(torch.finfo(dist.dtype).tiny)


def rkd_distance_loss(student: Tensor, teacher: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """RKD-D: ``mean_{i,j} huber(d_S(i,j)/μ_S − d_T(i,j)/μ_T)`` over all ``N²`` ordered pairs.

    ``d`` are the pairwise distances, ``μ`` the mean over the pairs ``i ≠ j``, ``huber`` the smooth L1
    with δ = 1 (``F.smooth_l1_loss``). The mean counts the zero diagonal, as in the official code and
    RepDistiller. A batch of one sample has no pairs: the loss is 0.
    """
    s, t = _embeddings(student, teacher)
    if s.shape[0] < 2:
        return s.sum() * 0.0
    target = _normalise_by_mean(pairwise_distances(t, squared, eps))
    return F.smooth_l1_loss(_normalise_by_mean(pairwise_distances(s, squared, eps)), target)


def rkd_angles(embeddings: Tensor, eps: float = 1e-12) -> Tensor:
    """``[N, N, N]`` cosines: entry ``[j, i, k] = ⟨(e_i − e_j)/‖e_i − e_j‖, (e_k − e_j)/‖e_k − e_j‖⟩``.

    The cosine of the angle at ``e_j`` in the triangle ``(e_i, e_j, e_k)``. Degenerate triplets
    (``i = j`` or ``k = j``) have a zero unit vector and give 0.
    """
    diff = embeddings.unsqueeze(0) - embeddings.unsqueeze(1)  # [j, i] = e_i - e_j
    unit = F.normalize(diff, p=2.0, dim=2, eps=eps)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_angle_loss(student: Tensor, teacher: Tensor, eps: float = 1e-12) -> Tensor:
    """RKD-A: ``mean_{j,i,k} huber(cos∠_S(i,j,k) − cos∠_T(i,j,k))`` over all ``N³`` ordered triplets.

    Degenerate triplets count in the mean with a zero difference, as in the official code.
    """
    s, t = _embeddings(student, teacher)
    return F.smooth_l1_loss(rkd_angles(s, eps), rkd_angles(t, eps))


class RKDLoss(nn.Module):
    """Relational KD: ``w_D · RKD-D + w_A · RKD-A`` on a batch of embeddings.

    Defaults are the paper's and RepDistiller's (w_D = 25, w_A = 50, non-squared distances,
    eps 1e-12). Called as ``loss(student_emb, teacher_emb)``; returns
    ``{"loss": total, "distance": w_D·RKD-D, "angle": w_A·RKD-A}`` (a term of weight 0 is neither computed
    nor returned).

    Args:
        distance_weight: w_D.
        angle_weight: w_A.
        squared: compare squared distances instead of distances.
        eps: clamp of the squared distances (and of the norms of the angle vectors).
    """

    def __init__(
        self, distance_weight: float = 25.0, angle_weight: float = 50.0, squared: bool = False, eps: float = 1e-12
    ) -> None:
        super().__init__()
        check_weights(distance_weight=distance_weight, angle_weight=angle_weight)
        if eps < 0:
            raise KDConfigError(f"eps must be >= 0, got {eps}.")
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.squared = squared
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if active(self.distance_weight):
            terms["distance"] = rkd_distance_loss(student, teacher, self.squared, self.eps)
        if active(self.angle_weight):
            terms["angle"] = rkd_angle_loss(student, teacher, self.eps)
        return weighted_terms(terms, {"distance": self.distance_weight, "angle": self.angle_weight})
