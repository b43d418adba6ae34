"""BOOT: data-free distillation of a diffusion model into a one-step generator by bootstrapping (plain torch).

Gu, Zhai, Zhang, Liu, Susskind, "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping"
(arXiv 2306.05544, 2023). The student ``g_θ(ε, t)`` maps the initial noise ``ε`` (and a time) to the *signal*
``y_t = (x_t − σ_t ε)/α_t`` of the teacher's deterministic (DDIM / probability-flow) trajectory through ``ε``;
``y`` follows the Signal-ODE ``dy_t/dλ = y_t − f_φ(x_t, t)`` with ``λ_t = log(σ_t/α_t)``, ``x_t = α_t y_t + σ_t ε``
and ``f_φ`` the teacher's data prediction. Training needs noise only:

- bootstrap (``t = t_n``, ``s = t_{n−1}`` on a grid ``t_0 = 0 < … < t_N = T``, ``δ = λ_t − λ_s > 0``, the SAME ``ε``):
  ``y_t = sg(g_θ(ε, t))``, ``x_t = α_t y_t + σ_t ε``,
  ``y_s* = sg(y_t + c(δ)·(f_φ(x_t, t) − y_t))`` with ``c(δ) = δ`` (Euler step of the Signal-ODE) or
  ``c(δ) = 1 − e^{−δ}`` (the exact DDIM step for a constant ``f_φ``),
  ``L_BS = w(δ)·‖g_θ(ε, s) − y_s*‖²`` with ``w(δ) = 1/δ²`` by default;
- boundary at ``t = T``: ``L_BC = ‖g_θ(ε, T) − f_φ(x_T, T)‖²`` with ``x_T = ε`` by default;
- ``L = w_BS·L_BS + w_BC·L_BC``; only the student gets gradients.

RECONSTRUCTION (no official code; recalled, unverified details are arguments): the step rule (``solver``),
the ``1/δ²`` normalisation (``normalization``), the boundary's teacher input (``boundary_input``), the term
weights, the λ clipping bounds and the grid (uniform in timestep index). ``λ`` and ``δ`` are computed in float64
(they diverge at the ends of VP schedules) and clipped before being cast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = [
    "boot_grid",
    "boot_loss",
    "bootstrap_target",
    "log_snr_lambda",
    "step_coefficient",
]

Solver = Literal["euler", "ddim"]
Normalization = Literal["delta_squared", "delta", "none"]
BoundaryInput = Literal["noise", "student"]


def boot_grid(num_train_timesteps: int, num_steps: int, t_min: int = 0, t_max: int | None = None) -> Tensor:
    """The time grid ``t_0 < t_1 < … < t_N`` (``N = num_steps``) as integer timesteps, evenly spaced from ``t_min``
    to ``t_max`` (default the last timestep ``num_train_timesteps − 1``).

    Raises:
        KDConfigError: fewer than one step, or more steps than distinct timesteps.
    """
    last = num_train_timesteps - 1 if t_max is None else int(t_max)
    if num_steps < 1:
        raise KDConfigError("num_steps", f"must be >= 1, got {num_steps}")
    if not 0 <= t_min < last <= num_train_timesteps - 1:
        raise KDConfigError(
            "t_min", f"needs 0 <= t_min < t_max <= {num_train_timesteps - 1}, got t_min={t_min}, t_max={last}"
        )
    if num_steps > last - t_min:
        raise KDConfigError(
            "num_steps",
            f"{num_steps} steps need {num_steps + 1} distinct timesteps but [{t_min}, {last}] has {last - t_min + 1}",
            f"use at most {last - t_min} steps",
        )
    return torch.linspace(t_min, last, num_steps + 1, dtype=torch.float64).round().long()


def log_snr_lambda(alphas_cumprod: Tensor, lambda_min: float | None = -20.0, lambda_max: float | None = 20.0) -> Tensor:
    """``λ = log(σ/α) = ½·(log(1 − ᾱ) − log ᾱ)`` in float64, clipped to ``[lambda_min, lambda_max]``.

    ``ᾱ = 1`` gives ``−inf`` and ``ᾱ = 0`` gives ``+inf`` before clipping (the ends of VP schedules); ``None``
    leaves that side unclipped.
    """
    abar = alphas_cumprod.to(torch.float64)
    lam = 0.5 * (torch.log1p(-abar) - torch.log(abar))
    if lambda_min is None and lambda_max is None:
        return lam
    return lam.clamp(min=lambda_min, max=lambda_max)


def step_coefficient(delta: Tensor, solver: Solver = "euler") -> Tensor:
    """``c(δ)`` of the step ``y_s = y_t + c(δ)(f − y_t)``: ``δ`` (Euler) or ``1 − e^{−δ}`` (DDIM), float64."""
    delta = delta.to(torch.float64)
    if solver == "euler":
        return delta
    if solver == "ddim":
        return -torch.expm1(-delta)
    raise KDConfigError("solver", f"must be 'euler' or 'ddim', got {solver!r}")


def bootstrap_target(y_t: Tensor, teacher_x0: Tensor, delta: Tensor, solver: Solver = "euler") -> Tensor:
    """``y_s* = y_t + c(δ)·(f_φ(x_t, t) − y_t)``, detached (the stop-gradient target).

    ``delta`` is per sample (``[B]``, float64) and is cast to the signal's dtype after the step coefficient.
    """
    c = step_coefficient(delta, solver).to(y_t.dtype).view(-1, *([1] * (y_t.dim() - 1)))
    y_t = y_t.detach()
    return (y_t + c * (teacher_x0.detach() - y_t)).detach()


def _normalizer(delta: Tensor, normalization: Normalization) -> Tensor:
    """Per-sample weight ``w(δ)`` (float64): ``1/δ²``, ``1/δ`` or 1; 0 where ``δ = 0`` (both ends clipped)."""
    delta = delta.to(torch.float64)
    if normalization == "none":
        return torch.ones_like(delta)
    power = 2 if normalization == "delta_squared" else 1
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    return torch.where(delta > 0, safe.pow(-power), torch.zeros_like(delta))


def boot_loss(
    student: Callable[[Tensor, Tensor], Tensor],
    teacher_x0: Callable[[Tensor, Tensor], Tensor],
    eps: Tensor,
    t: Tensor,
    s: Tensor,
    alpha_t: Tensor,
    sigma_t: Tensor,
    delta: Tensor,
    t_boundary: int | None = None,
    alpha_boundary: float = 0.0,
    sigma_boundary: float = 1.0,
    bootstrap_weight: float = 1.0,
    boundary_weight: float = 1.0,
    solver: Solver = "euler",
    normalization: Normalization = "delta_squared",
    boundary_input: BoundaryInput = "noise",
) -> dict[str, Tensor]:
    """BOOT's loss on one batch of noise: ``{"loss", "bootstrap", "boundary"}`` (weighted terms).

    Args:
        student: ``g_θ(ε, t) -> y_t`` (class labels, guidance and parametrisation closed over).
        teacher_x0: ``f_φ(x_t, t) -> x̂_0`` of the frozen teacher (guidance/clipping closed over); called without
            autograd.
        eps: the noise ``ε`` ``[B, ...]`` (the same at ``s``, ``t`` and ``T``).
        t: the later timesteps ``[B]`` (``t_n``).
        s: the earlier timesteps ``[B]`` (``t_{n−1}``).
        alpha_t: ``α_t`` ``[B]``.
        sigma_t: ``σ_t`` ``[B]``.
        delta: ``δ = λ_t − λ_s`` ``[B]`` in float64 (clipped λ: see :func:`log_snr_lambda`).
        t_boundary: the last timestep ``T`` of the boundary term (``None``: no boundary term).
        alpha_boundary: ``α_T`` (for ``boundary_input="student"``).
        sigma_boundary: ``σ_T`` (for ``boundary_input="student"``).
        bootstrap_weight: weight of ``L_BS``.
        boundary_weight: weight of ``L_BC``.
        solver: ``"euler"`` (the Signal-ODE's Euler step) or ``"ddim"`` (``1 − e^{−δ}``, exact DDIM).
        normalization: ``"delta_squared"`` (``1/δ²``), ``"delta"`` (``1/δ``) or ``"none"``.
        boundary_input: the teacher's input at ``T``: ``"noise"`` (``x_T = ε``) or ``"student"``
            (``x_T = α_T·sg(g_θ(ε, T)) + σ_T ε``).
    """
    check_weights(bootstrap_weight=bootstrap_weight, boundary_weight=boundary_weight)
    if solver not in ("euler", "ddim"):
        raise KDConfigError("solver", f"must be 'euler' or 'ddim', got {solver!r}")
    if normalization not in ("delta_squared", "delta", "none"):
        raise KDConfigError("normalization", f"must be 'delta_squared', 'delta' or 'none', got {normalization!r}")
    if boundary_input not in ("noise", "student"):
        raise KDConfigError("boundary_input", f"must be 'noise' or 'student', got {boundary_input!r}")
    view = (-1, *([1] * (eps.dim() - 1)))
    terms: dict[str, Tensor] = {}
    use_boundary = active(boundary_weight) and t_boundary is not None
    if active(bootstrap_weight):
        with torch.no_grad():
            y_t = student(eps, t)
            x_t = alpha_t.to(eps.dtype).view(view) * y_t + sigma_t.to(eps.dtype).view(view) * eps
            target = bootstrap_target(y_t, teacher_x0(x_t, t), delta, solver)
        y_s = student(eps, s)
        per_sample = (y_s - target).pow(2).flatten(1).mean(1)
        weight = _normalizer(delta, normalization).to(per_sample.dtype)
        terms["bootstrap"] = (weight * per_sample).mean()
    if use_boundary:
        t_last = torch.full_like(t, int(t_boundary))  # type: ignore[arg-type]
        y_last = student(eps, t_last)
        with torch.no_grad():
            x_last = eps if boundary_input == "noise" else alpha_boundary * y_last.detach() + sigma_boundary * eps
            target_last = teacher_x0(x_last, t_last).detach()
        terms["boundary"] = (y_last - target_last).pow(2).flatten(1).mean(1).mean()
    return weighted_terms(terms, {"bootstrap": bootstrap_weight, "boundary": boundary_weight})
