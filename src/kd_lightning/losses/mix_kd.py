"""MIX-KD (Choi, Jeon, Shukla, Turaga; WACV 2023; arXiv 2211.03946): Partial MixUp and the MIXSTD loss.

Partial MixUp (PMU) mixes only part of a batch; MIXSTD divides each sample's logits by their own
standard deviation (a per-sample temperature) before a soft-target CE and a KL to the teacher, who
sees the same mixed inputs. Verified against the official ``hchoi71/MIX-KD`` (``helper/loops_mixstd.py``
``PMU``/``FMU``, ``distiller_zoo/MIXSTD.py``). Pure torch; the method is
:class:`kd_lightning.methods.mix_kd.MixKD`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.terms import check_weights, weighted_terms

UnmixedSampling = Literal["replacement", "exact"]

__all__ = [
    "MixKDLoss",
    "MixupPlan",
    "apply_mixup",
    "mix_targets",
    "mixstd_loss",
    "mixup_kd_loss",
    "partial_mixup",
    "sample_mixup",
    "soft_cross_entropy",
    "std_scale",
]


class MixupPlan(NamedTuple):
    """One draw of (partial) mixup for a batch: sample ``i`` is ``λ_i·x[index_a[i]] + (1−λ_i)·x[index_b[i]]``."""

    lam: Tensor  #: ``[B]`` mixing weights, 1 for unmixed samples.
    index_a: Tensor  #: ``[B]`` first permutation π₁.
    index_b: Tensor  #: ``[B]`` second permutation π₂.

    @property
    def unmixed(self) -> Tensor:
        """``[B]`` boolean: samples left unmixed (λ = 1)."""
        return self.lam == 1


def sample_mixup(
    batch_size: int,
    unmixed_fraction: float = 0.9,
    beta_a: float = 1.0,
    sampling: UnmixedSampling = "replacement",
    device: torch.device | str | None = None,
) -> MixupPlan:
    """Draw π₁, π₂, ``λ ~ Beta(a, a)`` per sample, then reset λ to 1 for the unmixed samples.

    ``m = ⌊p·B⌋`` draws choose the unmixed samples (``p = unmixed_fraction``):

    - ``"replacement"`` (official ``PMU``): ``torch.randint`` with replacement, so repeats make
      fewer than ``m`` distinct samples unmixed. For p = 0.9 about ``1 − e^{−0.9} ≈ 59 %`` of the
      batch stays unmixed (≈ 41 % mixed), not the 90 % the official help text suggests.
    - ``"exact"``: ``m`` distinct samples (``randperm``), exactly ``⌊p·B⌋`` unmixed.

    p = 0 is Full MixUp (FMU; no draw is made). Draw order on the global torch generator (seed it
    with ``torch.manual_seed``/``seed_everything``): ``randperm`` π₁, ``randperm`` π₂, Beta λ, then
    the unmixed indices. The official code samples λ with numpy; this uses torch only.
    """
    if not 0.0 <= unmixed_fraction <= 1.0:
        raise KDConfigError(f"unmixed_fraction must be in [0, 1], got {unmixed_fraction}.")
    if not beta_a > 0:
        raise KDConfigError(f"beta_a must be > 0, got {beta_a}.")
    if sampling not in ("replacement", "exact"):
        raise KDConfigError(f"sampling must be 'replacement' or 'exact', got {sampling!r}.")
    index_a = torch.randperm(batch_size, device=device)
    index_b = torch.randperm(batch_size, device=device)
    concentration = torch.tensor(float(beta_a), device=device)
    lam = torch.distributions.Beta(concentration, concentration).sample((batch_size,))
    count = int(batch_size * unmixed_fraction)
    if count > 0:
        if sampling == "replacement":
            keep = torch.randint(0, batch_size, (count,), device=device)
        else:
            keep = torch.randperm(batch_size, device=device)[:count]
        lam[keep] = 1.0
    return MixupPlan(lam, index_a, index_b)


def apply_mixup(inputs: Tensor, plan: MixupPlan) -> Tensor:
    """``λ_i·x[π₁(i)] + (1−λ_i)·x[π₂(i)]`` for inputs of any shape ``[B, ...]``."""
    lam = plan.lam.to(inputs.dtype).reshape(-1, *([1] * (inputs.dim() - 1)))
    return lam * inputs[plan.index_a] + (1 - lam) * inputs[plan.index_b]


def mix_targets(target: Tensor, num_classes: int, plan: MixupPlan) -> Tensor:
    """``λ_i·onehot(y[π₁(i)]) + (1−λ_i)·onehot(y[π₂(i)])``: ``[B, C]`` float32 rows that sum to 1."""
    if target.dim() != 1 or target.is_floating_point():
        raise KDConfigError(
            f"target must be a [batch] tensor of class indices, got {tuple(target.shape)} {target.dtype}."
        )
    lam = plan.lam.float().unsqueeze(-1)
    one_a = F.one_hot(target[plan.index_a], num_classes).float()
    one_b = F.one_hot(target[plan.index_b], num_classes).float()
    return lam * one_a + (1 - lam) * one_b


def partial_mixup(
    inputs: Tensor,
    target: Tensor,
    num_classes: int,
    unmixed_fraction: float = 0.9,
    beta_a: float = 1.0,
    sampling: UnmixedSampling = "replacement",
) -> tuple[Tensor, Tensor, MixupPlan]:
    """Partial MixUp of a batch: ``(mixed inputs, mixed one-hot targets [B, C], plan)``; see :func:`sample_mixup`."""
    plan = sample_mixup(inputs.shape[0], unmixed_fraction, beta_a, sampling, inputs.device)
    return apply_mixup(inputs, plan), mix_targets(target, num_classes, plan), plan


def std_scale(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """``z / (std(z) + eps)`` per sample over classes, unbiased std, gradient through the std (official).

    The official code has no ``eps``; 1e-7 only guards constant logit vectors (``eps=0`` is exact).
    """
    logits = upcast(logits)
    return logits / (logits.std(dim=-1, keepdim=True, unbiased=True) + eps)


def soft_cross_entropy(logits: Tensor, soft_target: Tensor) -> Tensor:
    """``−(1/N) Σ_i Σ_c ỹ_ic·log softmax(z_i)_c`` over the ``N`` items of ``[..., C]`` logits."""
    if soft_target.shape != logits.shape:
        raise KDConfigError(
            f"soft_target must have the logits' shape {tuple(logits.shape)} (mixed one-hot targets), "
            f"got {tuple(soft_target.shape)}."
        )
    log_p = F.log_softmax(upcast(logits), dim=-1)
    return -(soft_target.to(log_p.dtype) * log_p).sum(-1).mean()


def mixstd_loss(
    student_logits: Tensor, teacher_logits: Tensor, soft_target: Tensor, eps: float = 1e-7
) -> tuple[Tensor, Tensor]:
    """Unweighted MIXSTD terms ``(CE, KL)`` (official ``MIXSTDLoss`` before γ, α).

    ``CE = −(1/B) Σ_i Σ_c ỹ_ic log softmax(z^S_i/σ^S_i)_c``,
    ``KL = (1/B) Σ_i KL(softmax(z^T_i/σ^T_i) ‖ softmax(z^S_i/σ^S_i))`` ('batchmean', no τ²),
    σ = per-sample unbiased std of the logits (:func:`std_scale`), not detached for the student.
    """
    check_logits(student_logits, teacher_logits)
    s = std_scale(student_logits, eps)
    t = std_scale(teacher_logits.detach(), eps)
    return soft_cross_entropy(s, soft_target), forward_kl(s, t)


def mixup_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, soft_target: Tensor, temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Unweighted vanilla-KD terms on a mixed batch: ``(CE(z^S, ỹ), τ²·KL(p_T^τ ‖ p_S^τ))``.

    The baseline of the paper (official ``--distill kd`` with RepDistiller's ``DistillKL``, τ = 4).
    The CE uses the mixed soft targets; the official branch (unreachable in the released script,
    whose ``--distill`` only accepts ``mixstd``) would score it against the un-permuted hard labels.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    ce = soft_cross_entropy(student_logits, soft_target)
    kd = forward_kl(student_logits, teacher_logits.detach(), temperature) * temperature**2
    return ce, kd


class MixKDLoss(nn.Module):
    """MIX-KD loss on a mixed batch: ``γ·CE + α·KL`` with std-scaled (``"mixstd"``) or τ-scaled (``"kd"``) logits.

    Args:
        distill: ``"mixstd"`` (:func:`mixstd_loss`, the paper's) or ``"kd"`` (:func:`mixup_kd_loss`, the baseline).
        gamma: γ, weight of the soft-target CE (official 0.1).
        alpha: α, weight of the KL (official 0.9).
        temperature: τ of the ``"kd"`` baseline (official ``kd_T`` 4); unused by ``"mixstd"``.
        eps: added to the std in ``"mixstd"`` (see :func:`std_scale`).

    ``forward(student_logits, teacher_logits, soft_target)`` returns ``{"loss", "ce", "kd"}`` (weighted).
    """

    def __init__(
        self,
        distill: Literal["mixstd", "kd"] = "mixstd",
        gamma: float = 0.1,
        alpha: float = 0.9,
        temperature: float = 4.0,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if distill not in ("mixstd", "kd"):
            raise KDConfigError(f"distill must be 'mixstd' or 'kd', got {distill!r}.")
        check_temperature(temperature)
        check_weights(gamma=gamma, alpha=alpha)
        if eps < 0:
            raise KDConfigError(f"eps must be >= 0, got {eps}.")
        self.distill = distill
        self.gamma = gamma
        self.alpha = alpha
        self.temperature = temperature
        self.eps = eps

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, soft_target: Tensor) -> dict[str, Tensor]:
        if self.distill == "mixstd":
            ce, kd = mixstd_loss(student_logits, teacher_logits, soft_target, self.eps)
        else:
            ce, kd = mixup_kd_loss(student_logits, teacher_logits, soft_target, self.temperature)
        return weighted_terms({"ce": ce, "kd": kd}, {"ce": self.gamma, "kd": self.alpha})
