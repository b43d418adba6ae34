"""LELP: pseudo-subclass targets from linear projections of the teacher's embedding (pure torch).

Loo, Iliopoulos, Hu, Vee, "Linear Projections of Teacher Embeddings for Few-Class Distillation"
(arXiv 2409.20449). RECONSTRUCTION: no official code is public and the paper body was not readable; the
structure (per-class PCA of the teacher's final-layer embedding after removing the directions of its output
layer, a random rotation, S·C pseudo-subclasses, a single KL with α = 0) comes from reviews of the paper, the
formulas below are reconstructed and every uncertain choice is an argument.

Offline, once, from the training set:

- ``P = I − Wᵀ(WWᵀ)⁺W``, the projector onto the null space of the teacher's output weights ``W`` (``[C, d]``);
- for each class ``c``: the mean ``μ_c`` and the top-S principal directions ``V_c`` (``[d, S]``) of the
  projected embeddings ``P h_T(x)`` of that class, optionally rotated ``V_c ← V_c Q_c`` by a random ``S×S``
  orthogonal ``Q_c``, and a scale ``σ_c`` that gives the projections unit variance.

Per batch: ``r_{c,s}(x) = ⟨v_{c,s}, P h_T(x) − μ_c⟩ / σ_{c,s}`` and the ``C·S``-way target

- ``compose="product"``: ``p_T(c, s | x) = softmax(z_T/τ)_c · softmax_s(r_{c,·}/β)_s`` (class marginals = p_T(c));
- ``compose="logits"``: one softmax over ``z_{T,c}/τ + r_{c,s}/β`` (class marginals tilted by
  ``logsumexp_s r_{c,s}/β``: equal to p_T(c) only when that is the same for every class).

Student: ``S·C`` logits ``g`` laid out class-major (index ``c·S + s``), ``L = τ²·KL(p_T ‖ softmax(g/τ))``
(+ an optional CE on the aggregated class probabilities ``p_S(c) = Σ_s p_S(c, s)``).
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = [
    "COMPOSE_MODES",
    "NORMALIZE_MODES",
    "ClassMoments",
    "LELPLoss",
    "SubclassStats",
    "aggregate_subclasses",
    "class_subspaces",
    "lelp_kl",
    "null_space_projector",
    "random_rotation",
    "subclass_log_targets",
    "subclass_scores",
    "subclass_targets",
]

Compose = Literal["product", "logits"]
Normalize = Literal["class", "direction", "none"]
#: How the class and subclass parts make the ``C·S`` target (see the module docstring).
COMPOSE_MODES: tuple[str, ...] = ("product", "logits")
#: How the projections are scaled: one σ per class (rotation-invariant), one per direction, or not at all.
NORMALIZE_MODES: tuple[str, ...] = ("class", "direction", "none")


def null_space_projector(weight: Tensor) -> Tensor:
    """``P = I − Wᵀ(WWᵀ)⁺W`` (``[d, d]``) for ``W`` of shape ``[C, d]``: the orthogonal projector onto the null
    space of ``W`` (the embedding directions the teacher's output layer ignores).

    Uses the pseudo-inverse, so a rank-deficient ``W`` (two equal rows, a zero row) is fine; computed in float64
    and returned in ``W``'s floating dtype. ``P`` is symmetric and idempotent and ``W P = 0``.
    """
    if weight.dim() != 2:
        raise KDConfigError("teacher_classifier", f"needs a weight matrix [C, d], got shape {tuple(weight.shape)}")
    w = weight.detach().double()
    gram_pinv = torch.linalg.pinv(w @ w.T, hermitian=True)
    projector = torch.eye(w.shape[1], dtype=w.dtype, device=w.device) - w.T @ gram_pinv @ w
    projector = 0.5 * (projector + projector.T)  # exactly symmetric
    return projector.to(weight.dtype if weight.is_floating_point() else torch.float32)


def random_rotation(size: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """A Haar-random ``size × size`` orthogonal matrix (QR of a Gaussian matrix, signs fixed by ``diag(R)``)."""
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(dtype)


class SubclassStats(NamedTuple):
    """The offline statistics of LELP.

    Attributes:
        means: ``[C, d]`` class means μ_c of the (projected) embeddings.
        directions: ``[C, d, S]`` orthonormal directions V_c (columns), after the optional rotation.
        scale: ``[C, S]`` σ_{c,s} that divides the projections (ones without normalisation).
        projector: ``[d, d]`` null-space projector P applied to the embeddings, or ``None``.
    """

    means: Tensor
    directions: Tensor
    scale: Tensor
    projector: Tensor | None


class ClassMoments:
    """Streaming per-class count, mean and covariance of embeddings (float64), for datasets too large to hold.

    ``update(embeddings, labels)`` per batch, then :meth:`subspaces`. The sums are taken around a reference
    point (the first batch's mean) so that the covariance ``E[(h − m)(h − m)ᵀ] − (μ − m)(μ − m)ᵀ`` does not lose
    its digits to a large common offset.

    Args:
        num_classes: C.
        dim: d, the embedding size.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        self.num_classes = num_classes
        self.dim = dim
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.outer = torch.zeros(num_classes, dim, dim, dtype=torch.float64)
        self.reference: Tensor | None = None

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add a batch: ``embeddings`` ``[B, d]`` (any leading shape flattened to ``[B, -1]``), ``labels`` ``[B]``."""
        h = embeddings.detach().reshape(embeddings.shape[0], -1).double().cpu()
        y = labels.detach().reshape(-1).long().cpu()
        if h.shape[1] != self.dim or y.shape[0] != h.shape[0]:
            raise KDConfigError(
                f"ClassMoments expects embeddings [B, {self.dim}] and B labels, got {tuple(h.shape)} and "
                f"{tuple(y.shape)}."
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise KDConfigError(
                f"ClassMoments got class ids in [{int(y.min())}, {int(y.max())}] for {self.num_classes} classes."
            )
        if self.reference is None:
            self.reference = h.mean(0) if h.shape[0] else torch.zeros(self.dim, dtype=torch.float64)
        h = h - self.reference
        for c in y.unique().tolist():
            part = h[y == c]
            self.counts[c] += part.shape[0]
            self.sums[c] += part.sum(0)
            self.outer[c] += part.T @ part

    def mean_cov(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(counts [C], means [C, d], unbiased covariances [C, d, d])``; classes with < 2 samples get zeros."""
        counts = self.counts
        safe = counts.clamp_min(1.0)
        centred_mean = self.sums / safe[:, None]
        second = self.outer / safe[:, None, None]
        cov = second - centred_mean[:, :, None] * centred_mean[:, None, :]
        cov = cov * (counts / (counts - 1).clamp_min(1.0))[:, None, None]  # unbiased
        reference = self.reference if self.reference is not None else torch.zeros(self.dim, dtype=torch.float64)
        return counts, centred_mean + reference, 0.5 * (cov + cov.transpose(1, 2))

    def subspaces(
        self,
        num_subclasses: int,
        null_space: Tensor | None = None,
        rotate: bool = True,
        generator: torch.Generator | None = None,
        normalize: Normalize = "class",
        eps: float = 1e-12,
    ) -> SubclassStats:
        """The LELP statistics of the accumulated embeddings (see :func:`class_subspaces` for the arguments)."""
        counts, means, cov = self.mean_cov()
        return _subspaces(counts, means, cov, num_subclasses, null_space, rotate, generator, normalize, eps)


def class_subspaces(
    embeddings: Tensor,
    labels: Tensor,
    num_classes: int,
    num_subclasses: int,
    null_space: Tensor | None = None,
    rotate: bool = True,
    generator: torch.Generator | None = None,
    normalize: Normalize = "class",
    eps: float = 1e-12,
) -> SubclassStats:
    """Per-class means and top-S principal directions of the (null-space projected) embeddings.

    Args:
        embeddings: ``[N, d]`` teacher embeddings of the training set (any ``[N, ...]`` is flattened).
        labels: ``[N]`` class of each embedding (the label, or the teacher's prediction).
        num_classes: C.
        num_subclasses: S, the directions per class.
        null_space: the teacher's output weight ``W`` (``[C', d]``): embeddings are projected with
            :func:`null_space_projector` before the PCA; ``None``: no projection.
        rotate: rotate each class's directions by a random ``S×S`` orthogonal matrix (from ``generator``).
        generator: seeds the rotations (CPU generator).
        normalize: ``"class"`` — one σ_c = sqrt(mean_s Var(r_{c,s})) per class, so the projections have unit
            variance on average (unchanged by the rotation); ``"direction"`` — σ_{c,s} = std(r_{c,s}) per
            direction; ``"none"`` — σ = 1.
        eps: floor of the variances (a variance below ``eps`` times the largest one warns: the class's
            embeddings span fewer than S directions).

    PCA: the eigenvectors of the class's (unbiased) covariance with the S largest eigenvalues, each signed so
    that its largest-magnitude entry is positive (deterministic). Returns float32 :class:`SubclassStats`.

    Raises:
        KDConfigError: ``num_subclasses`` is larger than the dimension available (d, or d − rank W with the
            null-space projection) or than a class's sample count − 1.
    """
    h = embeddings.reshape(embeddings.shape[0], -1)
    moments = ClassMoments(num_classes, h.shape[1])
    moments.update(h, labels)
    return moments.subspaces(num_subclasses, null_space, rotate, generator, normalize, eps)


def _subspaces(
    counts: Tensor,
    means: Tensor,
    cov: Tensor,
    num_subclasses: int,
    null_space: Tensor | None,
    rotate: bool,
    generator: torch.Generator | None,
    normalize: str,
    eps: float,
) -> SubclassStats:
    num_classes, dim = means.shape
    s = num_subclasses
    if not isinstance(s, int) or s < 1:
        raise KDConfigError("num_subclasses", f"must be an integer >= 1, got {s!r}")
    if normalize not in NORMALIZE_MODES:
        raise KDConfigError("normalize", f"must be one of {list(NORMALIZE_MODES)}, got {normalize!r}")
    projector: Tensor | None = None
    available, where = dim, f"the embedding dimension d = {dim}"
    if null_space is not None:
        if null_space.dim() != 2 or null_space.shape[1] != dim:
            raise KDConfigError(
                "teacher_classifier",
                f"its weight has shape {tuple(null_space.shape)} but the embeddings have {dim} features",
                "the null-space projection needs the classifier whose input is the embedding (teacher_embedding "
                "'<classifier>:input'), or turn null_space off",
            )
        projector = null_space_projector(null_space.double().cpu())
        rank = int(torch.linalg.matrix_rank(null_space.double().cpu()))
        available = dim - rank
        where = f"the null space of the teacher's classifier, of dimension d − rank W = {dim} − {rank} = {available}"
    if s > available:
        raise KDConfigError(
            "num_subclasses",
            f"S = {s} is larger than {where}",
            f"use num_subclasses <= {max(available, 1)}" + (" or null_space: false" if null_space is not None else ""),
        )
    few = [(c, int(n)) for c, n in enumerate(counts.tolist()) if n - 1 < s]
    if few:
        c, n = few[0]
        smallest = min(n for _, n in few)
        raise KDConfigError(
            "num_subclasses",
            f"S = {s} needs at least S + 1 = {s + 1} training samples per class, class {c} has {n}"
            + (f" ({len(few)} classes have too few)" if len(few) > 1 else ""),
            f"use num_subclasses <= {smallest - 1}"
            if smallest >= 2
            else "every class needs at least 2 samples (with group_by: teacher, the teacher must predict every class)",
        )
    if projector is not None:
        means = means @ projector  # P symmetric: P μ as rows
        cov = projector @ cov @ projector
        cov = 0.5 * (cov + cov.transpose(1, 2))
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values = values.flip(-1)[:, :s].clamp_min(0.0)  # [C, S]
    directions = vectors.flip(-1)[:, :, :s]  # [C, d, S]
    peak = directions.abs().argmax(dim=1, keepdim=True)  # sign: largest-magnitude entry positive
    directions = directions * torch.where(directions.gather(1, peak) < 0, -1.0, 1.0)
    top = values[:, :1].clamp_min(eps)
    if bool((values < eps * top).any()):
        warnings.warn(
            f"LELP: some class's embeddings span fewer than S = {s} directions (a principal variance is below "
            f"{eps:g} of the largest); those directions are arbitrary. Use fewer subclasses.",
            stacklevel=3,
        )
    if rotate:
        rotations = torch.stack([random_rotation(s, generator) for _ in range(num_classes)])  # [C, S, S]
        directions = directions @ rotations
    if normalize == "none":
        scale = torch.ones(num_classes, s, dtype=torch.float64)
    elif normalize == "class":
        scale = values.mean(-1, keepdim=True).clamp_min(eps).sqrt().expand(-1, s).clone()
    else:  # per direction: Var(r_{c,s}) = v_sᵀ Σ_c v_s (after the rotation)
        variances = torch.einsum("cds,cde,ces->cs", directions, cov, directions)
        scale = variances.clamp_min(eps).sqrt()
    return SubclassStats(
        means=means.float(),
        directions=directions.float(),
        scale=scale.float(),
        projector=None if projector is None else projector.float(),
    )


def subclass_scores(embeddings: Tensor, stats: SubclassStats) -> Tensor:
    """``r[b, c, s] = ⟨v_{c,s}, P h_b − μ_c⟩ / σ_{c,s}`` (``[B, C, S]``) for embeddings ``[B, d]`` (or ``[B, ...]``)."""
    h = upcast(embeddings.reshape(embeddings.shape[0], -1)).float()
    if h.shape[1] != stats.means.shape[1]:
        raise KDConfigError(
            f"LELP: the embeddings have {h.shape[1]} features but the statistics were computed for "
            f"{stats.means.shape[1]}."
        )
    if stats.projector is not None:
        h = h @ stats.projector.to(h)
    directions = stats.directions.to(h)
    r = torch.einsum("bd,cds->bcs", h, directions) - torch.einsum("cd,cds->cs", stats.means.to(h), directions)
    return r / stats.scale.to(h)


def subclass_log_targets(
    embeddings: Tensor,
    teacher_logits: Tensor,
    stats: SubclassStats,
    beta: float = 1.0,
    compose: Compose = "product",
    temperature: float = 1.0,
) -> Tensor:
    """``log p_T(c, s | x)``, ``[B, C·S]`` class-major (index ``c·S + s``); see the module docstring.

    Args:
        embeddings: ``[B, d]`` teacher embeddings.
        teacher_logits: ``[B, C]`` teacher class logits ``z_T``.
        stats: :class:`SubclassStats` of the training set.
        beta: β, the temperature of the subclass part.
        compose: ``"product"`` — ``log softmax(z/τ)_c + log softmax_s(r_{c,·}/β)_s`` (class marginals kept);
            ``"logits"`` — ``log_softmax`` over all ``z_c/τ + r_{c,s}/β``.
        temperature: τ, the KD temperature of the class part.
    """
    check_temperature(beta, "beta")
    check_temperature(temperature)
    if compose not in COMPOSE_MODES:
        raise KDConfigError("compose", f"must be one of {list(COMPOSE_MODES)}, got {compose!r}")
    z = upcast(teacher_logits.detach()).float()
    r = subclass_scores(embeddings.detach(), stats) / beta  # [B, C, S]
    if z.shape[-1] != r.shape[1]:
        raise KDConfigError(
            f"LELP: the teacher has {z.shape[-1]} class logits but the statistics hold {r.shape[1]} classes."
        )
    if compose == "product":
        log_p = F.log_softmax(z / temperature, dim=-1)[:, :, None] + F.log_softmax(r, dim=-1)
        return log_p.reshape(z.shape[0], -1)
    return F.log_softmax((z[:, :, None] / temperature + r).reshape(z.shape[0], -1), dim=-1)


def subclass_targets(
    embeddings: Tensor,
    teacher_logits: Tensor,
    stats: SubclassStats,
    beta: float = 1.0,
    compose: Compose = "product",
    temperature: float = 1.0,
) -> Tensor:
    """``p_T(c, s | x)``, ``[B, C·S]``: the probabilities of :func:`subclass_log_targets`."""
    return subclass_log_targets(embeddings, teacher_logits, stats, beta, compose, temperature).exp()


def aggregate_subclasses(student_logits: Tensor, num_classes: int, num_subclasses: int) -> Tensor:
    """Class log-probabilities ``log p(c) = logsumexp_s g_{c,s} − logsumexp_{c',s} g_{c',s}`` of ``[..., C·S]``
    class-major subclass logits (``[..., C]``)."""
    if student_logits.shape[-1] != num_classes * num_subclasses:
        raise KDConfigError(
            f"aggregate_subclasses: {student_logits.shape[-1]} logits are not C·S = {num_classes}·{num_subclasses}."
        )
    g = upcast(student_logits)
    grouped = g.reshape(*g.shape[:-1], num_classes, num_subclasses)
    return torch.logsumexp(grouped, dim=-1) - torch.logsumexp(g, dim=-1, keepdim=True)


def lelp_kl(student_logits: Tensor, target_log_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """``τ² · mean_b KL(p_T ‖ softmax(g/τ))`` over the ``C·S`` subclasses; ``p_T`` given as log-probabilities."""
    check_temperature(temperature)
    if student_logits.shape != target_log_probs.shape:
        raise KDConfigError(
            "model.init_args.student",
            f"has {student_logits.shape[-1]} outputs but the LELP target has {target_log_probs.shape[-1]} "
            "(num_subclasses·classes)",
            f"build it with num_classes: {target_log_probs.shape[-1]}",
        )
    log_q = F.log_softmax(upcast(student_logits).reshape(-1, student_logits.shape[-1]) / temperature, dim=-1)
    log_p = target_log_probs.detach().reshape(log_q.shape).to(log_q.dtype)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * temperature**2


class LELPLoss(nn.Module):
    """``w_KD·τ²·KL(p_T(c, s) ‖ p_S(c, s)) + w_CE·CE(log p_S(c), y)`` with ``p_S(c) = Σ_s p_S(c, s)``.

    Called as ``loss(student_logits [B, C·S], target_log_probs [B, C·S], target [B])`` (the targets from
    :func:`subclass_log_targets`); returns ``{"loss", "kd"[, "ce"]}`` (weighted terms). The paper's main
    experiments use α = 0 (``ce_weight = 0``).

    Args:
        num_classes: C.
        num_subclasses: S.
        temperature: τ of the student's softmax (and τ² scale); the teacher's τ is applied in the targets.
        ce_weight: w_CE on the aggregated class log-probabilities.
        kd_weight: w_KD.
    """

    def __init__(
        self,
        num_classes: int,
        num_subclasses: int,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        kd_weight: float = 1.0,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, kd_weight=kd_weight)
        if not (isinstance(num_subclasses, int) and num_subclasses >= 1):
            raise KDConfigError("num_subclasses", f"must be an integer >= 1, got {num_subclasses!r}")
        self.num_classes = num_classes
        self.num_subclasses = num_subclasses
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def forward(self, student_logits: Tensor, target_log_probs: Tensor | None, target: Tensor | None) -> dict:
        terms: dict[str, Tensor] = {}
        if active(self.kd_weight):
            if target_log_probs is None:
                raise KDConfigError("LELPLoss: kd_weight > 0 needs the subclass targets.")
            terms["kd"] = lelp_kl(student_logits, target_log_probs, self.temperature)
        if active(self.ce_weight) and target is not None:
            log_p = aggregate_subclasses(student_logits, self.num_classes, self.num_subclasses)
            terms["ce"] = F.nll_loss(log_p.reshape(-1, self.num_classes), target.reshape(-1))
        return weighted_terms(terms, {"ce": self.ce_weight, "kd": self.kd_weight})
