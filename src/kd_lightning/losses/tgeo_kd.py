"""TGeo-KD building blocks (Hu, Wu et al., ICLR 2024, "Less or More From Teacher: Exploiting
Trilateral Geometry for Knowledge Distillation", arXiv 2312.15112), pure torch.

A per-sample fusion ratio ``α_i = f_ω(Δ_i) ∈ (0, 1)`` weighs the two terms of KD::

    ℓ_i = α_i · τ² · KL(softmax(t_i/τ) ‖ softmax(s_i/τ)) + (1 − α_i) · CE(s_i, y_i)

``Δ_i`` encodes the triangle of student prediction S, teacher prediction T and one-hot label G,
plus the teacher's class-mean prediction T̄ for the sample's class (inter-sample anchor). This file
holds the geometry features (:func:`geometry_features`), the fusion-ratio network
(:class:`FusionRatioNet`), the weighted loss (:func:`tgeo_kd_terms`, :class:`TGeoKDLoss`) and the
per-class mean accumulator (:class:`ClassMeanAccumulator`, DDP-aware). The bilevel training of
``f_ω`` lives in :class:`kd_lightning.methods.tgeo_kd.TGeoKD`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.terms import weighted_terms

FeatureVariant = Literal["tabular_9c", "cifar_9c", "distances"]
FEATURE_VARIANTS: tuple[str, ...] = ("tabular_9c", "cifar_9c", "distances")

__all__ = [
    "FEATURE_VARIANTS",
    "ClassMeanAccumulator",
    "FusionRatioNet",
    "TGeoKDLoss",
    "fusion_feature_dim",
    "geometry_features",
    "tgeo_kd_terms",
]


def fusion_feature_dim(variant: str, num_classes: int) -> int:
    """Width of :func:`geometry_features`: ``9C`` for the two official variants, 8 for ``"distances"``."""
    if variant in ("tabular_9c", "cifar_9c"):
        return 9 * num_classes
    if variant == "distances":
        return 8
    raise KDConfigError(f"feature variant must be one of {FEATURE_VARIANTS}, got {variant!r}.")


@torch.no_grad()
def geometry_features(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    class_means: Tensor,
    variant: str = "tabular_9c",
) -> Tensor:
    """Fusion-network input ``Δ_i`` per sample, ``[N, D]`` (computed without autograd).

    With ``S = softmax(s)``, ``T = softmax(t)`` (τ = 1), ``G = onehot(y)`` and ``T̄ = class_means[y]``:

    - ``"tabular_9c"`` (official tabular code, option 3, the one it runs):
      ``[S, T, G, T̄, (T̄−S)², (G−S)², (T−S)², (T−G)², (T̄−G)²]`` (element-wise squares).
    - ``"cifar_9c"`` (official, later deleted CIFAR-100 code):
      ``[S, T, T̄, G, |S−G|, |S−T|, |S−T̄|, (G−T̄)⊙(G−S), (G−T)⊙(G−S)]``.
    - ``"distances"`` (compact, this library's design, not from the paper): the five Euclidean
      edge lengths ``‖S−G‖, ‖T−G‖, ‖S−T‖, ‖S−T̄‖, ‖T̄−G‖`` and the true-class probabilities
      ``S_y, T_y, T̄_y`` (``G_y ≡ 1`` is left out). Width 8 whatever the class count.

    Args:
        student_logits: ``[N, C]`` (``[..., C]`` is flattened).
        teacher_logits: ``[N, C]``.
        target: ``[N]`` class indices.
        class_means: ``[C, C]``, row ``c`` = the teacher's mean probability vector over class ``c``.
        variant: one of :data:`FEATURE_VARIANTS`.
    """
    check_logits(student_logits, teacher_logits, target)
    num_classes = student_logits.shape[-1]
    if class_means.shape != (num_classes, num_classes):
        raise KDConfigError(
            f"class_means must have shape {(num_classes, num_classes)}, got {tuple(class_means.shape)}."
        )
    fusion_feature_dim(variant, num_classes)  # validates the name
    s = F.softmax(upcast(student_logits.detach()).reshape(-1, num_classes), dim=-1)
    t = F.softmax(upcast(teacher_logits.detach()).reshape(-1, num_classes), dim=-1)
    y = target.reshape(-1)
    g = F.one_hot(y, num_classes).to(s.dtype)
    mean = class_means.detach().to(s.dtype)[y]
    if variant == "tabular_9c":
        parts = [s, t, g, mean, (mean - s) ** 2, (g - s) ** 2, (t - s) ** 2, (t - g) ** 2, (mean - g) ** 2]
    elif variant == "cifar_9c":
        parts = [s, t, mean, g, (s - g).abs(), (s - t).abs(), (s - mean).abs(), (g - mean) * (g - s), (g - t) * (g - s)]
    else:
        edges = [s - g, t - g, s - t, s - mean, mean - g]
        rows = y.unsqueeze(1)
        true_class = [p.gather(1, rows) for p in (s, t, mean)]
        parts = [torch.linalg.vector_norm(e, dim=-1, keepdim=True) for e in edges] + true_class
    return torch.cat(parts, dim=-1)


class FusionRatioNet(nn.Module):
    """The fusion-ratio network ``f_ω``: an MLP with a sigmoid output, ``α = f_ω(Δ) ∈ (0, 1)``, shape ``[N]``.

    Official tabular code: hidden ``(32, 16)`` with LeakyReLU; official CIFAR code: ``(128,)`` with ReLU.

    Args:
        in_features: input width (:func:`fusion_feature_dim`).
        hidden: widths of the hidden layers (empty: logistic regression).
        activation: ``"relu"`` or ``"leaky_relu"`` (slope 0.01, PyTorch's default).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (32, 16),
        activation: Literal["relu", "leaky_relu"] = "leaky_relu",
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise KDConfigError(f"in_features must be >= 1, got {in_features}.")
        if activation not in ("relu", "leaky_relu"):
            raise KDConfigError(f"activation must be 'relu' or 'leaky_relu', got {activation!r}.")
        if any(int(h) < 1 for h in hidden):
            raise KDConfigError(f"hidden widths must be >= 1, got {list(hidden)}.")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU() if activation == "relu" else nn.LeakyReLU()]
            width = int(h)
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.in_features = in_features

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise KDConfigError(
                f"FusionRatioNet expects [N, {self.in_features}] features, got {tuple(features.shape)}."
            )
        weight = self.mlp[0].weight
        return torch.sigmoid(self.mlp(features.to(weight.dtype))).squeeze(-1)


def tgeo_kd_terms(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Per-sample, unweighted ``(τ²·KL(p_T^τ ‖ p_S^τ), CE(s, y))``, each ``[N]`` (teacher detached)."""
    check_logits(student_logits, teacher_logits, target)
    check_temperature(temperature)
    num_classes = student_logits.shape[-1]
    s = upcast(student_logits.reshape(-1, num_classes))
    t = upcast(teacher_logits.detach().reshape(-1, num_classes))
    kd = forward_kl(s, t, temperature, reduction="none") * temperature**2
    ce = F.cross_entropy(s, target.reshape(-1), reduction="none")
    return kd, ce


class TGeoKDLoss(nn.Module):
    """``(1/N) Σ_i [α_i·τ²·KL(p_T^τ ‖ p_S^τ) + (1 − α_i)·CE(s_i, y_i)]`` for given fusion ratios ``α``.

    The τ² factor follows the official tabular code and Hinton KD (the official CIFAR code omits
    it). ``α`` is used as given: detach it for the student's real update, keep its graph for the
    virtual step of the bilevel problem. Returns ``{"loss", "kd", "ce"}`` (weighted means, ``kd + ce = loss``).

    Args:
        temperature: τ of the KL term.
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        check_temperature(temperature)
        self.temperature = temperature

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: Tensor
    ) -> dict[str, Tensor]:
        kd, ce = tgeo_kd_terms(student_logits, teacher_logits, target, self.temperature)
        alpha = alpha.reshape(-1)
        if alpha.shape != kd.shape:
            raise KDConfigError(f"alpha must hold one ratio per sample ({kd.shape[0]}), got {alpha.shape[0]}.")
        alpha = alpha.to(kd.dtype)
        return weighted_terms({"kd": (alpha * kd).mean(), "ce": ((1 - alpha) * ce).mean()})

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class ClassMeanAccumulator(nn.Module):
    """Per-class mean of probability vectors, ``T̄_c = Σ_{i: y_i = c} p_i / |{i: y_i = c}|``.

    Keeps a sum and a count per class (in float64), so the result is the mean over all samples
    seen, not a mean of batch means. :meth:`compute` adds the sums and counts of every process
    (``all_reduce``) when ``torch.distributed`` is initialised with more than one process: every
    rank may see different samples and gets the same global mean. A class never seen gets the
    uniform vector ``1/C``. The buffers are persistent (they survive a checkpoint).

    Args:
        num_classes: C.
    """

    sums: Tensor
    counts: Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise KDConfigError(f"num_classes must be >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.register_buffer("sums", torch.zeros(num_classes, num_classes, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    @torch.no_grad()
    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add ``probs`` (``[N, C]``, rows are distributions) of samples with labels ``target`` (``[N]``)."""
        if probs.dim() != 2 or probs.shape[1] != self.num_classes:
            raise KDConfigError(f"probs must have shape [N, {self.num_classes}], got {tuple(probs.shape)}.")
        target = target.reshape(-1).to(self.sums.device)
        if target.shape[0] != probs.shape[0]:
            raise KDConfigError(f"target must hold {probs.shape[0]} labels, got {target.shape[0]}.")
        self.sums.index_add_(0, target, probs.detach().to(self.sums))
        self.counts.index_add_(0, target, torch.ones_like(target, dtype=self.counts.dtype))

    @torch.no_grad()
    def compute(self, sync: bool = True) -> Tensor:
        """The ``[C, C]`` class means (float32), over every process when ``sync`` and DDP is running.

        The buffers stay per process (syncing copies), so calling it twice never double-counts.
        """
        sums, counts = self.sums.clone(), self.counts.clone()
        if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        means = sums / counts.clamp_min(1).unsqueeze(1)
        means[counts == 0] = 1.0 / self.num_classes
        return means.float()
