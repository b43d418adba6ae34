"""Optimal-transport distillation losses (pure torch): log-domain Sinkhorn and SinKD.

SinKD (Cui, Qin et al., LREC-COLING 2024 / TNNLS 2024; arXiv 2402.17110) compares the *batch* of
student probability vectors with the batch of teacher probability vectors as two point clouds of B
points in the simplex, through an entropy-regularised optimal-transport (Sinkhorn) distance.

The Sinkhorn iterations run in the log domain (``logsumexp`` updates of the dual potentials), so
they stay finite for any ε > 0: the Gibbs kernel ``exp(−D/ε)`` is never formed. Gradients flow
through the unrolled iterations (plan and cost), as in the official code.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import entropy, forward_kl
from kd_lightning.losses.schedule import ScheduledLoss
from kd_lightning.losses.terms import active, check_weights, weighted_terms

Marginals = Literal["unit", "uniform"]

__all__ = [
    "SinKDLoss",
    "annealed_temperature",
    "l1_cost",
    "sinkhorn_distance",
    "sinkhorn_plan",
]


def _check_sinkhorn_args(epsilon: float, n_iters: int, marginals: str) -> None:
    if not epsilon > 0:
        raise KDConfigError(f"epsilon must be > 0, got {epsilon}.")
    if n_iters < 1:
        raise KDConfigError(f"n_iters must be >= 1, got {n_iters}.")
    if marginals not in ("unit", "uniform"):
        raise KDConfigError(f"marginals must be 'unit' or 'uniform', got {marginals!r}.")


def l1_cost(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise L1 distances ``D_ij = ‖x_i − y_j‖_1`` of ``x`` ``[N, C]`` and ``y`` ``[M, C]``: ``[N, M]``."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[-1] != y.shape[-1]:
        raise KDConfigError(f"l1_cost needs [N, C] and [M, C] tensors, got {tuple(x.shape)} and {tuple(y.shape)}.")
    return (x.unsqueeze(1) - y.unsqueeze(0)).abs().sum(-1)


def sinkhorn_plan(cost: Tensor, epsilon: float = 0.1, n_iters: int = 20, marginals: Marginals = "uniform") -> Tensor:
    """Entropic transport plan for ``cost`` ``[N, M]`` after ``n_iters`` log-domain Sinkhorn iterations.

    Approximates ``argmin_{P ∈ U(a, b)} ⟨P, D⟩ − ε·H(P)``. With potentials ``u, v`` (``v = 0`` at
    the start) each iteration is a row then a column normalisation of ``P = exp(−D/ε + u_i + v_j)``::

        u_i = log a_i − logsumexp_j(−D_ij/ε + v_j)
        v_j = log b_j − logsumexp_i(−D_ij/ε + u_i)

    so after any number of iterations the columns sum exactly to ``b`` and the rows approximately
    to ``a``. ``marginals="uniform"``: ``a = 1/N``, ``b = 1/M`` (a probability coupling; the
    standard OT definition). ``marginals="unit"``: every row and column sums to 1 (total mass N,
    needs N = M): the scale of SinKD's official plain-space code (``K`` row- then
    column-normalised), whose plan is exactly ``N`` times the uniform one.
    """
    _check_sinkhorn_args(epsilon, n_iters, marginals)
    if cost.dim() != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise KDConfigError(f"cost must be a non-empty [N, M] matrix, got shape {tuple(cost.shape)}.")
    n, m = cost.shape
    if marginals == "unit" and n != m:
        raise KDConfigError(f"marginals='unit' needs a square cost matrix (equal masses), got {n}x{m}.")
    log_kernel = -upcast(cost) / epsilon
    log_a = -math.log(n) if marginals == "uniform" else 0.0
    log_b = -math.log(m) if marginals == "uniform" else 0.0
    v = torch.zeros(m, dtype=log_kernel.dtype, device=log_kernel.device)
    for _ in range(n_iters):
        u = log_a - torch.logsumexp(log_kernel + v.unsqueeze(0), dim=1)
        v = log_b - torch.logsumexp(log_kernel + u.unsqueeze(1), dim=0)
    return torch.exp(log_kernel + u.unsqueeze(1) + v.unsqueeze(0))


def sinkhorn_distance(
    student_probs: Tensor,
    teacher_probs: Tensor,
    epsilon: float = 0.1,
    n_iters: int = 20,
    marginals: Marginals = "unit",
) -> Tensor:
    """Batch-wise Sinkhorn distance ``Σ_ij P_ij·‖p^S_i − p^T_j‖_1`` between two sets of distributions.

    ``student_probs`` ``[B, C]`` and ``teacher_probs`` ``[B, C]`` are the two point clouds; ``P`` is
    :func:`sinkhorn_plan` of the L1 cost (no entropy term in the returned value, as in Cuturi 2013 and
    the official code). ``marginals="unit"`` (official scale) returns B times the ``"uniform"`` value.
    A batch of one has a single coupling: the value is ``‖p^S_1 − p^T_1‖_1`` with either marginals.
    """
    if student_probs.shape != teacher_probs.shape or student_probs.dim() != 2:
        raise KDConfigError(
            "student_probs and teacher_probs must both be [batch, num_classes], got "
            f"{tuple(student_probs.shape)} and {tuple(teacher_probs.shape)}."
        )
    if student_probs.shape[0] == 0:
        raise KDConfigError("sinkhorn_distance needs a non-empty batch.")
    cost = l1_cost(upcast(student_probs), upcast(teacher_probs))
    plan = sinkhorn_plan(cost, epsilon, n_iters, marginals)
    return (plan * cost).sum()


def annealed_temperature(initial: float, epoch: int, num_epochs: int) -> float:
    """SinKD's ``kd_anneal`` schedule: linear from ``initial`` at epoch 0 to 1 at epoch ``num_epochs − 1``.

    ``T_e = (1 − T_0)/(E − 1)·e + T_0``. With ``num_epochs == 1`` the single epoch uses ``T_0``
    (the official formula divides by zero there); epochs past the end stay at 1.
    """
    check_temperature(initial, "initial temperature")
    if num_epochs < 1:
        raise KDConfigError(f"num_epochs must be >= 1, got {num_epochs}.")
    if num_epochs == 1:
        return float(initial)
    epoch = min(max(epoch, 0), num_epochs - 1)
    return (1.0 - initial) / (num_epochs - 1) * epoch + initial


class SinKDLoss(nn.Module, ScheduledLoss):
    """SinKD: ``(1 − α)·CE(z_S, y) + α·L_KD + β·λ_s·Σ_ij P_ij·D_ij``.

    ``D_ij = ‖softmax(z_S,i/τ_sin) − softmax(z_T,j/τ_sin)‖_1`` over the B×B pairs of the batch and
    ``P`` the log-domain Sinkhorn plan of ``D`` (ε, ``n_iters``, ``marginals``). ``L_KD`` follows the
    official GLUE code: ``kd_mode="soft_ce"`` is ``−Σ_c p_T,c log p_S,c`` at temperature T *without*
    the τ² factor; ``kd_mode="kl"`` is Hinton's ``T²·KL(p_T ‖ p_S)`` (same student gradient up to
    the factor T²). The teacher logits are detached everywhere.

    Defaults: the official Sinkhorn internals (τ_sin = 2, ε = 0.1, 20 iterations, λ_s = 1e-3),
    β = 0.8, α = 0.9 of the GLUE scripts, T = 4 (the scripts use 2-4; 4 is the CIFAR KD norm).
    Returns ``{"loss", "ce", "kd", "sinkhorn"}`` (weighted terms).

    Args:
        alpha: α: weight of the KD term; CE gets ``1 − α``.
        temperature: T of the KD term (the initial T when the caller anneals it).
        sinkhorn_weight: β.
        sinkhorn_scale: λ_s, the official constant inside the Sinkhorn loss.
        sinkhorn_temperature: τ_sin of the probabilities compared by the Sinkhorn distance.
        epsilon: ε, entropic regularisation.
        n_iters: Sinkhorn iterations.
        marginals: ``"unit"`` (official scale: loss ∝ B) or ``"uniform"`` (1/B each: a probability
            coupling, loss independent of the batch size's scale).
        kd_mode: ``"soft_ce"`` (official) or ``"kl"`` (τ²-scaled KL).
    """

    def __init__(
        self,
        alpha: float = 0.9,
        temperature: float = 4.0,
        sinkhorn_weight: float = 0.8,
        sinkhorn_scale: float = 1e-3,
        sinkhorn_temperature: float = 2.0,
        epsilon: float = 0.1,
        n_iters: int = 20,
        marginals: Marginals = "unit",
        kd_mode: Literal["soft_ce", "kl"] = "soft_ce",
        anneal_temperature: bool = False,
        anneal_epochs: int | None = None,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        if anneal_epochs is not None and anneal_epochs < 1:
            raise KDConfigError("anneal_epochs", f"must be >= 1 or null, got {anneal_epochs}")
        check_temperature(sinkhorn_temperature, "sinkhorn_temperature")
        _check_sinkhorn_args(epsilon, n_iters, marginals)
        if not 0.0 <= alpha <= 1.0:
            raise KDConfigError(f"alpha must be in [0, 1], got {alpha}.")
        if kd_mode not in ("soft_ce", "kl"):
            raise KDConfigError(f"kd_mode must be 'soft_ce' or 'kl', got {kd_mode!r}.")
        check_weights(sinkhorn_weight=sinkhorn_weight, sinkhorn_scale=sinkhorn_scale)
        self.alpha = alpha
        self.temperature = temperature
        self.sinkhorn_weight = sinkhorn_weight
        self.sinkhorn_scale = sinkhorn_scale
        self.sinkhorn_temperature = sinkhorn_temperature
        self.epsilon = epsilon
        self.n_iters = n_iters
        self.marginals = marginals
        self.kd_mode = kd_mode
        self.anneal_temperature = anneal_temperature
        self.anneal_epochs = anneal_epochs

    def current_temperature(self) -> float:
        """The KD temperature at the current progress: constant unless ``anneal_temperature`` (then linear to 1
        over ``anneal_epochs``, by default the run's ``max_epochs``)."""
        if not self.anneal_temperature or self.progress is None:
            return self.temperature
        epochs = self.anneal_epochs or self.progress.max_epochs
        if epochs is None:
            raise KDConfigError(
                "anneal_temperature", "needs the run's length", "set anneal_epochs or trainer.max_epochs"
            )
        return annealed_temperature(self.temperature, self.progress.epoch, epochs)

    def schedule_stats(self) -> dict[str, float | Tensor]:
        return {"kd_temperature": self.current_temperature()} if self.anneal_temperature else {}

    def kd_term(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        """Unweighted KD term at ``temperature``: soft cross-entropy, or ``T²·KL`` with ``kd_mode="kl"``."""
        kl = forward_kl(student_logits, teacher_logits, temperature)
        if self.kd_mode == "kl":
            return kl * temperature**2
        return kl + entropy(teacher_logits, temperature)  # −Σ p_T log p_S = KL(p_T‖p_S) + H(p_T)

    def sinkhorn_term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Unweighted (no β, no λ_s) Sinkhorn distance of the batch's τ_sin-probabilities."""
        tau = self.sinkhorn_temperature
        p_s = F.softmax(upcast(student_logits) / tau, dim=-1)
        p_t = F.softmax(upcast(teacher_logits) / tau, dim=-1)
        return sinkhorn_distance(p_s, p_t, self.epsilon, self.n_iters, self.marginals)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float | None = None
    ) -> dict[str, Tensor]:
        """Loss parts; ``temperature`` overrides the (annealed) T for this call. ``[..., C]`` logits are flattened:
        every item is one point of the transport problem."""
        check_logits(student_logits, teacher_logits, target)
        temperature = self.current_temperature() if temperature is None else temperature
        check_temperature(temperature)
        s = upcast(student_logits.reshape(-1, student_logits.shape[-1]))
        t = upcast(teacher_logits.reshape(-1, teacher_logits.shape[-1])).detach()
        terms = {"ce": F.cross_entropy(s, target.reshape(-1)), "kd": self.kd_term(s, t, temperature)}
        if active(self.sinkhorn_weight):
            terms["sinkhorn"] = self.sinkhorn_term(s, t)
        weights = {"ce": 1.0 - self.alpha, "kd": self.alpha, "sinkhorn": self.sinkhorn_weight * self.sinkhorn_scale}
        return weighted_terms(terms, weights)
