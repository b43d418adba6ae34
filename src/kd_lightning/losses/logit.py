"""Logit-level distillation losses (pure torch).

Functions return scalar tensors for one term; the ``nn.Module`` losses are called as
``loss(student_logits, teacher_logits, target)`` and return a dict whose ``"loss"`` entry is the
total to back-propagate and whose other entries are the *weighted* terms (they sum to ``"loss"``).
Every loss computes in float32 or higher (safe under bf16/fp16 autocast) and detaches the teacher logits.
Logits may be ``[B, C]`` or ``[..., C]``; the batch mean is over all leading positions.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.schedule import ScheduledLoss
from kd_lightning.losses.terms import check_weights, weighted_terms

__all__ = [
    "DKDLoss",
    "KDLoss",
    "LogitStandardKDLoss",
    "PLDLoss",
    "dkd_terms",
    "kd_kl_div",
    "pld_loss",
    "standardize_logits",
]


def _flat(logits: Tensor) -> Tensor:
    return upcast(logits.reshape(-1, logits.shape[-1]))


def kd_kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al. (2015) soft-target term.

    ``τ² · (1/B) Σ_i KL(softmax(z_T,i/τ) ‖ softmax(z_S,i/τ))`` — summed over classes, averaged
    over the batch ("batchmean"), scaled by τ² so gradients keep their size across temperatures.
    """
    return forward_kl(student_logits, teacher_logits.detach(), temperature) * temperature**2


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each logit vector over classes (Sun et al., CVPR 2024).

    ``Z(z) = (z − mean(z)) / (std(z) + eps)`` with the unbiased std, as in the official code.
    Gradients flow through the mean and the std.
    """
    logits = upcast(logits)
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, unbiased=True)
    return (logits - mean) / (std + eps)


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Decoupled KD (Zhao et al., CVPR 2022): ``(TCKD, NCKD)``, each ``τ²``-scaled and batch-averaged.

    TCKD is the KL between the binary distributions ``[p_y, 1 − p_y]`` of teacher and student;
    NCKD the KL between their distributions over the non-target classes. Computed with
    log-sum-exp (no ``log`` of a probability that can underflow) and an exact ``−inf`` mask for
    the target class instead of the official ``−1000`` shift (identical up to ``e^{−1000}``).
    """
    check_logits(student_logits, teacher_logits, target)
    s = _flat(student_logits) / temperature
    t = _flat(teacher_logits).detach() / temperature
    y = target.reshape(-1, 1)
    is_target = torch.zeros_like(s, dtype=torch.bool).scatter_(1, y, True)

    def binary_and_rest(z: Tensor) -> tuple[Tensor, Tensor]:
        lse_all = torch.logsumexp(z, dim=-1, keepdim=True)
        z_rest = z.masked_fill(is_target, float("-inf"))
        lse_rest = torch.logsumexp(z_rest, dim=-1, keepdim=True)
        log_binary = torch.cat([z.gather(1, y) - lse_all, lse_rest - lse_all], dim=-1)
        log_rest = z_rest - lse_rest  # -inf at the target class
        return log_binary, log_rest

    log_b_s, log_r_s = binary_and_rest(s)
    log_b_t, log_r_t = binary_and_rest(t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(-1)
    nckd_terms = log_r_t.exp() * (log_r_t - log_r_s)
    nckd = torch.where(is_target, torch.zeros_like(nckd_terms), nckd_terms).sum(-1)
    scale = temperature**2
    return tckd.mean() * scale, nckd.mean() * scale


def pld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    weighting: Literal["teacher", "uniform"] = "teacher",
) -> Tensor:
    """Plackett-Luce Distillation (Bassam, Zhu, Bian; NeurIPS 2025, arXiv 2506.12542).

    Teacher-optimal permutation π*: the label first, then the other classes by descending teacher
    logit. With ``α_k = softmax(z_T/τ)[π*_k]``::

        L = (1/B) Σ_i Σ_k α_k · (log Σ_{l≥k} exp(s_{π*_l}) − s_{π*_k})

    Student logits are not temperature-scaled. ``weighting="uniform"`` gives ListMLE
    (α_k = 1/C), the paper's ablation. Vectorised as in the paper's Appendix C: sort the teacher
    ascending with the label forced last, then a ``logcumsumexp`` gives every suffix at once.
    """
    check_logits(student_logits, teacher_logits, target)
    check_temperature(temperature)
    s = _flat(student_logits)
    t = _flat(teacher_logits).detach()
    y = target.reshape(-1, 1)
    # +inf on the label sorts it last; stable sort keeps tie order deterministic.
    order = torch.argsort(t.scatter(1, y, float("inf")), dim=-1, stable=True)
    s_perm = s.gather(1, order)
    per_position = torch.logcumsumexp(s_perm, dim=-1) - s_perm
    if weighting == "teacher":
        weights = F.softmax(t / temperature, dim=-1).gather(1, order)
    elif weighting == "uniform":
        weights = torch.full_like(s_perm, 1.0 / s.shape[-1])
    else:
        raise KDConfigError(f"weighting must be 'teacher' or 'uniform', got {weighting!r}.")
    return (weights * per_position).sum(-1).mean()


def _cross_entropy(student_logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return F.cross_entropy(_flat(student_logits), target.reshape(-1), label_smoothing=label_smoothing)


class KDLoss(nn.Module):
    """Vanilla KD (Hinton, Vinyals, Dean 2015): ``w_CE·CE(z_S, y) + w_KD·τ²·KL(p_T^τ ‖ p_S^τ)``.

    Defaults are mdistiller's CIFAR-100 recipe (τ = 4, w_CE = 0.1, w_KD = 0.9).
    Returns ``{"loss", "ce", "kd"}``.
    """

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target)
        terms = {
            "ce": _cross_entropy(student_logits, target),
            "kd": kd_kl_div(student_logits, teacher_logits, self.temperature),
        }
        return weighted_terms(terms, {"ce": self.ce_weight, "kd": self.kd_weight})


class DKDLoss(nn.Module, ScheduledLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): ``w_CE·CE + s·(α·TCKD + β·NCKD)``.

    ``s`` is the warm-up factor ``min((epoch + 1)/warmup_epochs, 1)`` (epochs counted from 1, as mdistiller
    does; 1 without warm-up or when no training progress was set), or ``kd_scale`` when given to a call.
    ``standardize=True`` applies logit standardisation to both logits first (DKD+LS, Sun et al. 2024; then use
    the LS weights, e.g. α, β multiplied by 9 and τ = 2). Returns ``{"loss", "ce", "tckd", "nckd"}``.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        standardize: bool = False,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(alpha=alpha, beta=beta, ce_weight=ce_weight)
        if warmup_epochs < 0:
            raise KDConfigError("warmup_epochs", f"must be >= 0, got {warmup_epochs}")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.standardize = standardize
        self.warmup_epochs = warmup_epochs

    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup_epochs, 1)`` at the current progress; 1 without warm-up."""
        if self.warmup_epochs == 0 or self.progress is None:
            return 1.0
        return min((self.progress.epoch + 1) / self.warmup_epochs, 1.0)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, kd_scale: float | None = None
    ) -> dict[str, Tensor]:
        scale = self.warmup_factor() if kd_scale is None else kd_scale
        ce = _cross_entropy(student_logits, target)
        s, t = student_logits, teacher_logits
        if self.standardize:
            s, t = standardize_logits(s), standardize_logits(t.detach())
        tckd, nckd = dkd_terms(s, t, target, self.temperature)
        weights = {"ce": self.ce_weight, "tckd": scale * self.alpha, "nckd": scale * self.beta}
        return weighted_terms({"ce": ce, "tckd": tckd, "nckd": nckd}, weights)


class LogitStandardKDLoss(nn.Module):
    """KD with logit standardisation (Sun et al., CVPR 2024 "Logit Standardization in KD").

    ``w_CE·CE(z_S, y) + w_KD·τ_b²·KL(softmax(Z(z_T)/τ_b) ‖ softmax(Z(z_S)/τ_b))`` with the z-score
    ``Z`` of :func:`standardize_logits`; CE uses the raw student logits. Official defaults:
    τ_b = 2, w_KD = 9, w_CE = 0.1. Returns ``{"loss", "ce", "kd"}``.
    """

    def __init__(self, temperature: float = 2.0, ce_weight: float = 0.1, kd_weight: float = 9.0) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target)
        terms = {
            "ce": _cross_entropy(student_logits, target),
            "kd": kd_kl_div(
                standardize_logits(student_logits), standardize_logits(teacher_logits.detach()), self.temperature
            ),
        }
        return weighted_terms(terms, {"ce": self.ce_weight, "kd": self.kd_weight})


class PLDLoss(nn.Module):
    """Plackett-Luce Distillation (NeurIPS 2025): replaces CE + KD; see :func:`pld_loss`.

    ``temperature`` is the teacher-weight temperature τ_T (1.0 is the paper's ImageNet optimum;
    its CIFAR section states τ = 4). Returns ``{"loss", "pld"}``.
    """

    def __init__(self, temperature: float = 1.0, weighting: Literal["teacher", "uniform"] = "teacher") -> None:
        super().__init__()
        check_temperature(temperature)
        if weighting not in ("teacher", "uniform"):
            raise KDConfigError(f"weighting must be 'teacher' or 'uniform', got {weighting!r}.")
        self.temperature = temperature
        self.weighting = weighting

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        loss = pld_loss(student_logits, teacher_logits, target, self.temperature, self.weighting)
        return {"loss": loss, "pld": loss}
