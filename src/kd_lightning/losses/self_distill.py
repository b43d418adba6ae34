"""Self-distillation with weighted ground truth (Borup & Andersen, NeurIPS 2021; arXiv 2102.13088).

"Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed by
Self-Distillation". A model is fitted to ``α·y + (1 − α)·ŷ_teacher``, where the teacher is the
previous generation of the *same* architecture and α weighs the **ground truth**.

Deep-net loss (verified against the official ``self_distiller.py``)::

    L = α·MSE(softmax(z_S), onehot(y)) + (1 − α)·MSE(softmax(z_S), softmax(z_T)) + c·Σ_θ ‖θ‖₂

``MSE`` is ``F.mse_loss`` (mean over batch × classes) on probabilities, no temperature; the
regulariser sums the non-squared L2 norm of every trainable parameter tensor (c = 1e-4).

Kernel-ridge theory (verified against the official ``toy_example.ipynb``): with Gram matrix ``K``,
ridge ``λ`` and ``A = K (K + λI)^{-1}``, ``ŷ^(0) = A y`` and ``ŷ^(τ) = A (α y + (1 − α) ŷ^(τ−1))``;
for α > 0 the fixed point is the ridge fit with ``λ/α``: ``k(x)ᵀ (K + (λ/α) I)^{-1} y``.
Because ``ŷ^(τ)`` is affine in α, the α minimising a held-out squared error has a closed form
(:func:`optimal_alpha`; the derivation is ours, the paper states such a form exists).

Pure torch; no Lightning import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.logit import kd_kl_div
from kd_lightning.losses.terms import active, check_weights, weighted_terms

SelfDistillLossKind = Literal["mse", "ce_kl"]

__all__ = [
    "GTSelfDistillLoss",
    "kernel_ridge_self_distillation",
    "kernel_ridge_self_distillation_limit",
    "optimal_alpha",
    "parameter_norm_penalty",
    "rbf_kernel",
    "softmax_mse",
]


def softmax_mse(logits: Tensor, target_probs: Tensor) -> Tensor:
    """``F.mse_loss(softmax(logits), target_probs)``: mean over all items and classes (official code)."""
    probs = F.softmax(upcast(logits.reshape(-1, logits.shape[-1])), dim=-1)
    return F.mse_loss(probs, upcast(target_probs.reshape(-1, logits.shape[-1])).to(probs.dtype))


def parameter_norm_penalty(parameters: Iterable[Tensor]) -> Tensor:
    """``Σ_θ ‖θ‖₂`` over parameter tensors: the *non-squared* L2 norm of each, summed (official code)."""
    norms = [p.float().norm() for p in parameters]
    if not norms:
        raise KDConfigError("parameter_norm_penalty got no parameters.")
    return torch.stack(norms).sum()


class GTSelfDistillLoss(nn.Module):
    """Ground-truth-weighted self-distillation loss, with the official parameter-norm term ``c·Σ_θ ‖θ‖₂``.

    - ``loss="mse"`` (official): ``α·MSE(softmax(z_S), onehot(y)) + (1 − α)·MSE(softmax(z_S), softmax(z_T))``.
    - ``loss="ce_kl"`` (variant, not the paper's experiments): ``α·CE(z_S, y) + (1 − α)·τ²·KL(p_T^τ ‖ p_S^τ)``.

    Args:
        alpha: α, weight of the **ground truth** (1: plain training, 0: pure self-distillation).
        loss: ``"mse"`` or ``"ce_kl"``.
        temperature: τ of the KL term of ``"ce_kl"`` (unused by ``"mse"``).
        reg_coef: c, weight of :func:`parameter_norm_penalty` over the ``parameters`` passed to ``forward``
            (only the trainable ones count); 0 (default) leaves it out.

    ``teacher_logits`` may be ``None`` when α = 1. Returns ``{"loss", "gt", "distill"}`` plus ``"reg"`` when
    ``reg_coef > 0`` (weighted terms; a term of weight 0 is left out).
    """

    def __init__(
        self, alpha: float = 0.6, loss: SelfDistillLossKind = "mse", temperature: float = 1.0, reg_coef: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise KDConfigError(f"alpha (the ground-truth weight) must be in [0, 1], got {alpha}.")
        if loss not in ("mse", "ce_kl"):
            raise KDConfigError(f"loss must be 'mse' or 'ce_kl', got {loss!r}.")
        check_temperature(temperature)
        check_weights(reg_coef=reg_coef)
        self.alpha = alpha
        self.loss = loss
        self.temperature = temperature
        self.reg_coef = reg_coef

    @property
    def uses_teacher(self) -> bool:
        """Whether the teacher's outputs enter the loss (α < 1)."""
        return self.alpha < 1.0

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        target: Tensor,
        parameters: Iterable[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target)
        flat = upcast(student_logits.reshape(-1, student_logits.shape[-1]))
        y = target.reshape(-1)
        if self.loss == "mse":
            terms = {"gt": softmax_mse(flat, F.one_hot(y, flat.shape[-1]).to(flat.dtype))}
        else:
            terms = {"gt": F.cross_entropy(flat, y)}
        if self.uses_teacher:
            if teacher_logits is None:
                raise KDConfigError(f"teacher_logits are needed when alpha < 1 (alpha={self.alpha}).")
            t = teacher_logits.detach()
            if self.loss == "mse":
                terms["distill"] = softmax_mse(flat, F.softmax(upcast(t.reshape(flat.shape)), dim=-1))
            else:
                terms["distill"] = kd_kl_div(flat, t.reshape(flat.shape), self.temperature)
        if active(self.reg_coef):
            if parameters is None:
                raise KDConfigError("reg_coef", f"is {self.reg_coef}: the penalty needs parameters", "pass them")
            terms["reg"] = parameter_norm_penalty(p for p in parameters if p.requires_grad)
        return weighted_terms(terms, {"gt": self.alpha, "distill": 1.0 - self.alpha, "reg": self.reg_coef})


# --------------------------------------------------------------------------- choosing α
def optimal_alpha(pred_at_0: Tensor, pred_at_1: Tensor, targets: Tensor, clip: bool = True) -> float:
    """α minimising ``‖(1 − α)·pred_at_0 + α·pred_at_1 − targets‖²`` in closed form.

    With ``d = pred_at_1 − pred_at_0``: ``α* = ⟨d, targets − pred_at_0⟩ / ‖d‖²``, clipped to
    ``[0, 1]`` when ``clip``. In kernel ridge regression the step-τ fit is exactly affine in α, so
    this is the exact per-step optimum (``pred_at_0 = A ŷ^(τ−1)``, ``pred_at_1 = A y``); for deep
    nets it assumes the predictions of the α = 0 and α = 1 trainings interpolate linearly.

    Args:
        pred_at_0: predictions (e.g. held-out probabilities ``[N, C]``) of the α = 0 fit.
        pred_at_1: predictions of the α = 1 fit, same shape.
        targets: the same shape, or integer class indices ``[N]`` (turned into one-hots).
        clip: clip to ``[0, 1]``.

    Returns:
        α*. When ``d = 0`` every α is optimal and 1 (the ground truth) is returned.
    """
    p0, p1 = pred_at_0.double(), pred_at_1.double()
    if p0.shape != p1.shape:
        raise KDConfigError(f"pred_at_0 {tuple(p0.shape)} and pred_at_1 {tuple(p1.shape)} must have the same shape.")
    if not targets.is_floating_point():
        if p0.dim() < 2 or targets.shape != p0.shape[:-1]:
            raise KDConfigError(
                f"integer targets must have shape {tuple(p0.shape[:-1])} (class indices), got {tuple(targets.shape)}."
            )
        z = F.one_hot(targets.long(), p0.shape[-1]).double()
    else:
        z = targets.double()
    if z.shape != p0.shape:
        raise KDConfigError(f"targets {tuple(z.shape)} must match the predictions {tuple(p0.shape)}.")
    d = p1 - p0
    denom = float((d * d).sum())
    if denom == 0.0:
        return 1.0
    alpha = float((d * (z - p0)).sum()) / denom
    return min(max(alpha, 0.0), 1.0) if clip else alpha


# --------------------------------------------------------------------------- kernel-ridge theory
def rbf_kernel(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """``exp(−γ‖a_i − b_j‖²)`` for rows of ``a`` ``[N, D]`` and ``b`` ``[M, D]`` (scikit-learn's rbf_kernel)."""
    return torch.exp(-gamma * torch.cdist(a.double(), b.double()).pow(2))


def _check_kernel(gram: Tensor, y: Tensor, ridge: float, alpha: float) -> None:
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise KDConfigError(f"gram must be a square [N, N] kernel matrix, got {tuple(gram.shape)}.")
    if y.shape[0] != gram.shape[0]:
        raise KDConfigError(f"y must have {gram.shape[0]} rows (one per training point), got {tuple(y.shape)}.")
    if not ridge > 0:
        raise KDConfigError(f"ridge (λ) must be > 0, got {ridge}.")
    if not 0.0 <= alpha <= 1.0:
        raise KDConfigError(f"alpha must be in [0, 1], got {alpha}.")


def kernel_ridge_self_distillation(
    gram: Tensor, y: Tensor, ridge: float, alpha: float, steps: int, eval_kernel: Tensor | None = None
) -> list[Tensor]:
    """Predictions of kernel-ridge self-distillation for steps ``0..steps``.

    Step 0 fits ``y``; step τ fits ``α·y + (1 − α)·ŷ^(τ−1)`` (the training-point predictions of
    step τ − 1), always with ridge ``λ``: ``f^(τ)(x) = k(x)ᵀ (K + λI)^{-1} (α y + (1 − α) ŷ^(τ−1))``.

    Args:
        gram: ``K`` ``[N, N]`` on the training points.
        y: targets ``[N]`` or ``[N, k]``.
        ridge: λ.
        alpha: α, weight of the ground truth.
        steps: distillation steps after the first fit.
        eval_kernel: ``k(x)`` ``[M, N]`` of evaluation points; ``None`` evaluates on the training
            points (``K`` itself).

    Returns:
        ``steps + 1`` tensors (float64), the predictions of each step at the evaluation points.
    """
    _check_kernel(gram, y, ridge, alpha)
    k, yy = gram.double(), y.double()
    solve = torch.linalg.inv(k + ridge * torch.eye(len(k), dtype=k.dtype, device=k.device))
    k_eval = k if eval_kernel is None else eval_kernel.double()
    fitted, outputs = yy, []
    for step in range(steps + 1):
        fit_target = yy if step == 0 else alpha * yy + (1.0 - alpha) * fitted
        coef = solve @ fit_target
        outputs.append(k_eval @ coef)
        fitted = k @ coef
    return outputs


def kernel_ridge_self_distillation_limit(
    gram: Tensor, y: Tensor, ridge: float, alpha: float, eval_kernel: Tensor | None = None
) -> Tensor:
    """The fixed point (τ → ∞) for α > 0: ``α·k(x)ᵀ (αK + λI)^{-1} y = k(x)ᵀ (K + (λ/α) I)^{-1} y``; 0 for α = 0."""
    _check_kernel(gram, y, ridge, alpha)
    k, yy = gram.double(), y.double()
    k_eval = k if eval_kernel is None else eval_kernel.double()
    if alpha == 0.0:
        return torch.zeros(k_eval.shape[0], *yy.shape[1:], dtype=k.dtype, device=k.device)
    return k_eval @ torch.linalg.solve(k + (ridge / alpha) * torch.eye(len(k), dtype=k.dtype, device=k.device), yy)
