"""Loss of the Attributor in attribution-guided NMT distillation (Nourbakhsh et al., arXiv 2603.11342).

The Attributor ``f(src, tgt) -> Â`` learns to reconstruct the teacher's attribution map ``A`` (rows = target
positions, each a distribution over the source tokens) with the per-row KL divergence, averaged over the real
target rows (RECONSTRUCTION: the paper names the reconstruction objective only by its purpose)::

    L = (1 / |rows|) Σ_{b, t real} Σ_{j real} A[b, t, j] (log A[b, t, j] - log Â[b, t, j])     (0 log 0 = 0)

Plain torch (no Lightning).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attribution_row_kl"]


def attribution_row_kl(target: Tensor, log_pred: Tensor, row_mask: Tensor | None = None) -> Tensor:
    """Mean over the real target rows of ``KL(target_row ‖ exp(log_pred_row))``.

    Args:
        target: ``[B, T, S]`` row distributions ``A`` (zero on padding columns).
        log_pred: ``[B, T, S]`` log-probabilities ``log Â`` (finite on the columns where ``target`` > 0).
        row_mask: ``[B, T]`` true at the rows that count (default: all).

    Returns:
        Scalar mean KL (0 when no row counts).
    """
    target = target.float()
    log_pred = log_pred.float()
    positive = target > 0
    log_target = torch.where(positive, target.clamp_min(torch.finfo(target.dtype).tiny).log(), torch.zeros_like(target))
    safe_pred = torch.where(positive, log_pred, torch.zeros_like(log_pred))
    per_row = (target * (log_target - safe_pred)).sum(-1)  # [B, T]
    if row_mask is None:
        return per_row.mean()
    mask = row_mask.to(per_row.device).float()
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)
