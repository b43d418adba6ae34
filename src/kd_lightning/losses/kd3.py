"""KD³ loss terms (Tang, Chen, Niu, Sugiyama, Gong: "Distribution Shift Matters for Knowledge Distillation with
Webly Collected Images", ICCV 2023, arXiv 2307.11469), in plain torch.

The paper's abstract gives three components, which are the verified part; every formula below is a
RECONSTRUCTION (no official code was found, the paper body was not read; see ``shared/methods/07_kd3.md``):

1. dynamic instance selection from the *combined* prediction ``p_c = λ_t·p_T + (1 − λ_t)·p_S``
   (:func:`combined_prediction`, :func:`lambda_schedule`, :func:`select_instances`);
2. knowledge memorisation: confidence-weighted KD and feature alignment, and alignment of the classifier
   parameters (:func:`weighted_kd`, :func:`weighted_feature_alignment`, :func:`classifier_alignment`);
3. MixDistribution: per-instance channel statistics mixed with a partner's (MixStyle-like) give perturbed
   features of a new distribution, aligned with the clean ones by InfoNCE (:func:`mix_distribution`,
   :class:`MixDistribution`, :func:`instance_contrastive`, :func:`teacher_anchored_contrastive`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.terms import active, weighted_terms

__all__ = [
    "CLASSIFIER_ALIGNMENTS",
    "ClassifierAlignment",
    "MixDistribution",
    "WeightNormalization",
    "classifier_alignment",
    "combined_prediction",
    "instance_contrastive",
    "lambda_schedule",
    "mix_distribution",
    "projected_classifier_ce",
    "select_instances",
    "teacher_anchored_contrastive",
    "weight_alignment",
    "weighted_feature_alignment",
    "weighted_kd",
    "weighted_mean",
]

ClassifierAlignment = Literal["projected_ce", "weights"]
CLASSIFIER_ALIGNMENTS: tuple[str, ...] = ("projected_ce", "weights")
WeightNormalization = Literal["count", "weights"]


# ------------------------------------------------------------------ (1) selection
def combined_prediction(p_teacher: Tensor, p_student: Tensor, lam: float) -> Tensor:
    """``p_c = λ·p_T + (1 − λ)·p_S`` (KD³'s combined prediction; the mixing form is a reconstruction).

    Args:
        p_teacher, p_student: class probabilities ``[B, C]`` (each row sums to 1).
        lam: λ in [0, 1], the teacher's share.

    Raises:
        KDConfigError: λ outside [0, 1] or shapes that differ.
    """
    if not 0.0 <= lam <= 1.0:
        raise KDConfigError("lam", f"must be in [0, 1], got {lam!r}", "λ is the teacher's share of p_c")
    if p_teacher.shape != p_student.shape:
        raise KDConfigError(
            "p_student", f"has shape {tuple(p_student.shape)} but p_teacher has {tuple(p_teacher.shape)}"
        )
    return lam * p_teacher + (1.0 - lam) * p_student


def lambda_schedule(progress: float, start: float = 1.0, end: float = 0.5) -> float:
    """λ_t linear from ``start`` (progress 0) to ``end`` (progress 1): ``start + (end − start)·clamp(progress)``.

    RECONSTRUCTION: the spec says only "decaying from 1 to 0.5" (the student's predictions are noise early on).
    """
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= value <= 1.0:
            raise KDConfigError(name, f"must be in [0, 1], got {value!r}", "λ is the teacher's share of p_c")
    t = min(max(float(progress), 0.0), 1.0)
    return start + (end - start) * t


def select_instances(
    p_combined: Tensor, delta: float, label_probs: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the instances whose combined confidence reaches ``delta``.

    Returns ``(mask, pseudo_labels, weights)``, each ``[B]``: ``mask = max_k p_c[k] >= δ``,
    ``pseudo_labels = argmax_k p_c`` (or ``argmax`` of ``label_probs``, e.g. ``p_T``), and the confidence
    weights ``a(x) = max_k p_c[k]`` of *every* instance (apply ``mask`` to use the kept ones). All detached:
    selection is not differentiated.

    Raises:
        KDConfigError: ``delta`` outside [0, 1].
    """
    if not 0.0 <= delta <= 1.0:
        raise KDConfigError("delta", f"must be in [0, 1], got {delta!r}", "δ is a probability threshold")
    p = p_combined.detach()
    confidence, labels = p.max(dim=-1)
    if label_probs is not None:
        labels = label_probs.detach().argmax(dim=-1)
    return confidence >= delta, labels, confidence


# ------------------------------------------------------------------ (2) knowledge memorisation
def weighted_mean(values: Tensor, weights: Tensor | None = None, normalize: WeightNormalization = "count") -> Tensor:
    """``Σ_i a_i·v_i / n`` (``normalize="count"``) or ``Σ_i a_i·v_i / Σ_i a_i`` (``"weights"``); ``a = 1`` without
    weights. An empty batch gives 0 (connected to ``values``' graph, so a backward pass still works)."""
    if normalize not in ("count", "weights"):
        raise KDConfigError("normalize", f"must be 'count' or 'weights', got {normalize!r}")
    if values.numel() == 0:
        return values.sum()
    if weights is None:
        return values.mean()
    weights = weights.detach().to(values.dtype)
    total = (weights * values).sum()
    if normalize == "count":
        return total / values.numel()
    return total / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def weighted_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    pseudo_labels: Tensor,
    weights: Tensor | None = None,
    temperature: float = 4.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    normalize: WeightNormalization = "count",
) -> dict[str, Tensor]:
    """KD³'s memorisation of the teacher's predictions on the (kept) instances:

    ``kd = mean_i a(x_i)·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ))`` and ``pseudo_ce = mean_i CE(ŷ_i, z_S)``,
    returned as :func:`~kd_lightning.losses.terms.weighted_terms` ``{"loss", "kd", "pseudo_ce"}`` (a term
    of weight 0 is neither computed nor returned; at least one weight must be positive). The confidence
    weights ``a`` scale the KL only, the pseudo-label CE is unweighted (as in the spec; RECONSTRUCTION).
    Pass the kept instances only. Teacher logits are constants.
    """
    check_temperature(temperature)
    terms: dict[str, Tensor] = {}
    if active(kd_weight):
        kl = forward_kl(student_logits, teacher_logits.detach(), temperature, reduction="none")
        terms["kd"] = weighted_mean(kl, weights, normalize) * temperature**2
    if active(ce_weight):
        if student_logits.shape[0] == 0:
            terms["pseudo_ce"] = upcast(student_logits).sum()
        else:
            terms["pseudo_ce"] = F.cross_entropy(upcast(student_logits), pseudo_labels)
    return weighted_terms(terms, {"kd": kd_weight, "pseudo_ce": ce_weight})


def weighted_feature_alignment(
    projected_student: Tensor,
    teacher_features: Tensor,
    weights: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    normalize: WeightNormalization = "count",
) -> Tensor:
    """``mean_i a(x_i)·d(P(φ_S(x_i)), φ_T(x_i))`` with ``d`` the squared distance averaged over the feature
    dimensions (``reduction="mean"``, MSE-like, the default: its size does not grow with ``d_T``) or summed
    (``"sum"``: the spec's ``‖P(φ_S) − φ_T‖²``). Teacher features are constants.

    Raises:
        KDConfigError: the projected student features do not have the teacher features' shape.
    """
    if projected_student.shape != teacher_features.shape:
        raise KDConfigError(
            "projected_student",
            f"has shape {tuple(projected_student.shape)} but the teacher features have {tuple(teacher_features.shape)}",
            "the projector must map the student's feature size to the teacher's",
        )
    if reduction not in ("mean", "sum"):
        raise KDConfigError("reduction", f"must be 'mean' or 'sum', got {reduction!r}")
    diff = (upcast(projected_student) - upcast(teacher_features).detach()).pow(2).flatten(1)
    per_item = diff.mean(1) if reduction == "mean" else diff.sum(1)
    return weighted_mean(per_item, weights, normalize)


def projected_classifier_ce(
    projected_student: Tensor,
    teacher_classifier: nn.Module,
    pseudo_labels: Tensor,
    weights: Tensor | None = None,
    normalize: WeightNormalization = "count",
) -> Tensor:
    """Classifier alignment through data: ``mean_i CE(ŷ_i, W_T·P(φ_S(x_i)) + b_T)``.

    The frozen teacher classifier is applied to the projected student features; the gradient reaches the
    student and the projector, never the teacher (its parameters should not require grad). ``weights``
    (optional) scale each instance's CE.
    """
    logits = upcast(teacher_classifier(projected_student))
    if logits.shape[0] == 0:
        return logits.sum()
    ce = F.cross_entropy(logits, pseudo_labels, reduction="none")
    return weighted_mean(ce, weights, normalize)


def weight_alignment(
    student_weight: Tensor, projector_weight: Tensor, teacher_weight: Tensor, reduction: Literal["sum", "mean"] = "sum"
) -> Tensor:
    """Classifier alignment in parameter space: ``‖W_S·P⁺ − W_T‖²_F`` (summed, or averaged over the entries).

    ``W_S ∈ R^{K×d_S}`` and ``W_T ∈ R^{K×d_T}`` are the classifiers' weights and ``P ∈ R^{d_T×d_S}`` the
    projector's (an ``nn.Linear(d_S, d_T)`` weight); ``P⁺`` is its Moore–Penrose pseudo-inverse
    (``d_S×d_T``). If ``φ_T ≈ P·φ_S`` then matching ``W_S·P⁺`` to ``W_T`` makes the two classifiers agree
    on the features. The teacher's weight is a constant. Note: with ``d_S < d_T`` the product has rank at most
    ``d_S``, so the term usually cannot reach 0, and the pseudo-inverse's gradient grows as ``P`` becomes
    ill-conditioned (why :func:`classifier_alignment` defaults to the projected CE).
    """
    k_s, d_s = student_weight.shape
    k_t, d_t = teacher_weight.shape
    if k_s != k_t or tuple(projector_weight.shape) != (d_t, d_s):
        raise KDConfigError(
            "projector_weight",
            f"W_S {tuple(student_weight.shape)}, P {tuple(projector_weight.shape)} and W_T "
            f"{tuple(teacher_weight.shape)} do not fit: need W_S [K, d_S], P [d_T, d_S], W_T [K, d_T]",
        )
    pinv = torch.linalg.pinv(upcast(projector_weight))
    diff = (upcast(student_weight) @ pinv - upcast(teacher_weight).detach()).pow(2)
    return diff.sum() if reduction == "sum" else diff.mean()


def classifier_alignment(
    mode: ClassifierAlignment,
    *,
    projected_student: Tensor | None = None,
    teacher_classifier: nn.Module | None = None,
    pseudo_labels: Tensor | None = None,
    weights: Tensor | None = None,
    student_weight: Tensor | None = None,
    projector_weight: Tensor | None = None,
    teacher_weight: Tensor | None = None,
) -> Tensor:
    """Either form of KD³'s classifier-parameter alignment (the paper's form is unverified):

    - ``"projected_ce"`` (default of :class:`~kd_lightning.methods.KD3`): :func:`projected_classifier_ce`,
      ``CE(ŷ, W_T·P(φ_S) + b_T)``. Chosen as the default because it is defined for any ``d_S``/``d_T`` (it is 0
      only when the projected student features are classified like the pseudo-labels, which is reachable),
      needs no matrix inverse, uses the teacher's bias, and only the kept instances enter it;
    - ``"weights"``: :func:`weight_alignment`, ``‖W_S·P⁺ − W_T‖²_F`` (data-free).
    """
    if mode == "projected_ce":
        if projected_student is None or teacher_classifier is None or pseudo_labels is None:
            raise KDConfigError(
                "classifier_alignment", "'projected_ce' needs projected_student, teacher_classifier and pseudo_labels"
            )
        return projected_classifier_ce(projected_student, teacher_classifier, pseudo_labels, weights)
    if mode == "weights":
        if student_weight is None or projector_weight is None or teacher_weight is None:
            raise KDConfigError(
                "classifier_alignment", "'weights' needs student_weight, projector_weight and teacher_weight"
            )
        return weight_alignment(student_weight, projector_weight, teacher_weight)
    raise KDConfigError("classifier_alignment", f"must be one of {CLASSIFIER_ALIGNMENTS}, got {mode!r}")


# ------------------------------------------------------------------ (3) MixDistribution and instance alignment
def channel_statistics(features: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-instance, per-channel mean and std over the spatial positions of ``[B, C, ...]`` features
    (``[B, C, 1, ...]``, ready to broadcast); ``std = sqrt(var + eps)``."""
    if features.dim() < 3:
        raise KDConfigError(
            "features",
            f"must be [B, C, spatial...] feature maps, got shape {tuple(features.shape)}",
            "mix the statistics of a convolutional stage",
        )
    dims = tuple(range(2, features.dim()))
    mu = features.mean(dim=dims, keepdim=True)
    sigma = (features.var(dim=dims, keepdim=True, unbiased=False) + eps).sqrt()
    return mu, sigma


def mix_distribution(
    features: Tensor,
    lam: Tensor | float,
    perm: Tensor,
    noise: float = 0.0,
    eps: float = 1e-6,
    detach_statistics: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Re-style each instance with statistics mixed from a partner's (MixStyle, Zhou et al. ICLR 2021), which
    is how KD³'s MixDistribution is reconstructed here:

    ``μ_mix = λ·μ + (1 − λ)·μ[π]``, ``σ_mix = λ·σ + (1 − λ)·σ[π]`` (per instance and channel, over the spatial
    positions), optionally perturbed as in DSU (Li et al., ICLR 2022): ``μ_mix += noise·ε·std_B(μ)``,
    ``σ_mix += noise·ε'·std_B(σ)`` with ``ε, ε' ~ N(0, 1)`` and ``std_B`` the spread of the statistic over the
    batch; then ``f_mix = σ_mix·(f − μ)/σ + μ_mix``. ``λ = 1`` and ``noise = 0`` give ``f`` back.

    Args:
        features: ``[B, C, H, W]`` (any number of spatial dimensions).
        lam: λ, a number or one per instance ``[B]``.
        perm: the partner of each instance, a permutation ``[B]`` of ``range(B)``.
        noise: scale of the statistics noise (0: none).
        eps: added to the variance.
        detach_statistics: stop the gradient through ``μ, σ`` (as MixStyle does).
        generator: random source of the noise.
    """
    if noise < 0:
        raise KDConfigError("noise", f"must be >= 0, got {noise!r}")
    b = features.shape[0]
    if perm.shape != (b,):
        raise KDConfigError("perm", f"must be a permutation of shape ({b},), got {tuple(perm.shape)}")
    mu, sigma = channel_statistics(features, eps)
    if detach_statistics:
        mu, sigma = mu.detach(), sigma.detach()
    shape = (b,) + (1,) * (features.dim() - 1)
    lam_t = torch.as_tensor(lam, dtype=features.dtype, device=features.device)
    lam_t = lam_t.reshape(shape) if lam_t.dim() else lam_t
    perm = perm.to(features.device)
    mu_mix = lam_t * mu + (1 - lam_t) * mu[perm]
    sigma_mix = lam_t * sigma + (1 - lam_t) * sigma[perm]
    if noise > 0 and b > 1:
        eps_mu = torch.randn(mu.shape, generator=generator, device="cpu").to(features)
        eps_sigma = torch.randn(sigma.shape, generator=generator, device="cpu").to(features)
        mu_mix = mu_mix + noise * eps_mu * mu.std(dim=0, keepdim=True)
        sigma_mix = (sigma_mix + noise * eps_sigma * sigma.std(dim=0, keepdim=True)).clamp_min(math.sqrt(eps))
    return sigma_mix * (features - mu) / sigma + mu_mix


class MixDistribution(nn.Module):
    """Samples ``λ ~ Beta(α, α)`` per instance and a random partner permutation, then :func:`mix_distribution`.

    Parameter-free. Use it as a forward hook that replaces a module's output for one forward pass
    (``handle = module.register_forward_hook(mixer.hook)`` … ``handle.remove()``), in training only.

    Args:
        alpha: α of the Beta distribution (0.1: most λ near 0 or 1, MixStyle's default).
        noise: statistics noise of :func:`mix_distribution` (0: none).
        eps: added to the variance.
        detach_statistics: see :func:`mix_distribution`.
    """

    def __init__(self, alpha: float = 0.1, noise: float = 0.0, eps: float = 1e-6, detach_statistics: bool = True):
        super().__init__()
        if not (math.isfinite(alpha) and alpha > 0):
            raise KDConfigError("mix_alpha", f"must be a finite number > 0, got {alpha!r}", "Beta(α, α) needs α > 0")
        if not (math.isfinite(noise) and noise >= 0):
            raise KDConfigError("mix_noise", f"must be a finite number >= 0, got {noise!r}")
        self.alpha = alpha
        self.noise = noise
        self.eps = eps
        self.detach_statistics = detach_statistics

    def forward(self, features: Tensor) -> Tensor:
        """``features`` ``[B, C, ...]`` re-styled with a random partner's statistics (global random state)."""
        b = features.shape[0]
        alpha = torch.tensor(float(self.alpha))
        lam = torch.distributions.Beta(alpha, alpha).sample((b,))
        perm = torch.randperm(b)
        return mix_distribution(features, lam.to(features), perm, self.noise, self.eps, self.detach_statistics)

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """Forward hook: return the mixed output instead of ``output``."""
        return self(output)


def instance_contrastive(
    e: Tensor, e_prime: Tensor, temperature: float = 0.1, normalize: bool = True, symmetric: bool = False
) -> Tensor:
    """InfoNCE with the positives on the diagonal: ``mean_i −log softmax_j(⟨e_i, e'_j⟩/τ)[i]``.

    ``e`` and ``e_prime`` are ``[B, D]`` embeddings of the same ``B`` instances (clean and MixDistribution-
    perturbed); the other instances of the batch are the negatives. L2-normalised first (``normalize``);
    ``symmetric`` averages with the ``e' → e`` direction. Fewer than 2 instances give 0 (no negatives).
    """
    check_temperature(temperature)
    if e.shape != e_prime.shape or e.dim() != 2:
        raise KDConfigError("e_prime", f"must match e as [B, D], got {tuple(e.shape)} and {tuple(e_prime.shape)}")
    e, e_prime = upcast(e), upcast(e_prime)
    if e.shape[0] < 2:
        return (e.sum() + e_prime.sum()) * 0.0
    if normalize:
        e, e_prime = F.normalize(e, dim=-1), F.normalize(e_prime, dim=-1)
    logits = e @ e_prime.t() / temperature
    target = torch.arange(e.shape[0], device=e.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.t(), target))
    return loss


def teacher_anchored_contrastive(
    e_prime: Tensor, teacher_features: Tensor, temperature: float = 0.1, symmetric: bool = False
) -> Tensor:
    """The teacher-anchored variant: positives ``(e'_i, normalize(φ_T(x_i)))``, the teacher's features a
    constant: :func:`instance_contrastive` ``(e', φ_T)``."""
    return instance_contrastive(e_prime, teacher_features.detach(), temperature, True, symmetric)
