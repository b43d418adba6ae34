"""LELP loss math: null-space projector, per-class PCA, rotations, subclass targets, aggregation and the KL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.lelp import (
    ClassMoments,
    LELPLoss,
    SubclassStats,
    aggregate_subclasses,
    class_subspaces,
    lelp_kl,
    null_space_projector,
    random_rotation,
    subclass_log_targets,
    subclass_scores,
    subclass_targets,
)


def planted(n: int = 400, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two classes; class 0 varies mostly along u1 (std 5) then u2 (std 3), class 1 along u2 then u1; noise 0.1."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    u1, u2 = basis[:, 0], basis[:, 1]
    a = torch.randn(n, 2, generator=g, dtype=torch.float64)
    a = torch.linalg.qr(a - a.mean(0))[0] * math.sqrt(n - 1)  # latent coordinates exactly uncorrelated, unit variance
    noise = 0.1 * torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    class0 = 5 * a[:, :1] * u1 + 3 * a[:, 1:] * u2 + torch.full((d,), 2.0, dtype=torch.float64)
    class1 = 5 * a[:, :1] * u2 + 3 * a[:, 1:] * u1 - 1.0
    h = torch.cat([class0, class1]) + noise
    y = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    return h.float(), y, u1.float(), u2.float()


def toy_stats() -> SubclassStats:
    """C = 2, S = 2, d = 2: zero means, identity directions, unit scale, no projector (r = h for both classes)."""
    return SubclassStats(
        means=torch.zeros(2, 2), directions=torch.eye(2).expand(2, 2, 2).clone(), scale=torch.ones(2, 2), projector=None
    )


# ---------------------------------------------------------------------- projector
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_null_space_projector_properties(rank_deficient: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 8)
    if rank_deficient:
        w[2] = 2 * w[0]  # rank 2: (WWᵀ)⁻¹ does not exist, the pseudo-inverse does
    p = null_space_projector(w)
    assert torch.allclose(w @ p, torch.zeros(3, 8), atol=1e-5)  # P kills W's rows
    assert torch.allclose(p @ p, p, atol=1e-5)  # idempotent
    assert torch.equal(p, p.T)  # symmetric
    rank = 2 if rank_deficient else 3
    assert math.isclose(float(torch.trace(p)), 8 - rank, abs_tol=1e-4)  # projects onto a (d − rank)-dim space
    v = torch.randn(8)
    v_null = v - torch.linalg.lstsq(w.T, v).solution @ w  # v minus its part in the row space of W
    assert torch.allclose(p @ v_null, v_null, atol=1e-4)  # the null space is kept unchanged


# ---------------------------------------------------------------------- PCA and rotation
def test_pca_recovers_planted_directions_and_means() -> None:
    h, y, u1, u2 = planted()
    stats = class_subspaces(h, y, num_classes=2, num_subclasses=2, rotate=False, normalize="none")
    v = stats.directions
    assert v.shape == (2, 6, 2) and stats.means.shape == (2, 6) and stats.projector is None
    for c in range(2):
        assert torch.allclose(v[c].T @ v[c], torch.eye(2), atol=1e-5)  # orthonormal
        assert torch.allclose(stats.means[c], h[y == c].mean(0), atol=1e-4)
    assert abs(float(v[0, :, 0] @ u1)) > 0.999 and abs(float(v[0, :, 1] @ u2)) > 0.999
    assert abs(float(v[1, :, 0] @ u2)) > 0.999 and abs(float(v[1, :, 1] @ u1)) > 0.999
    # "none": the projections' variances are the principal variances (25 and 9, plus the noise's 0.01)
    r = subclass_scores(h[y == 0], stats)[:, 0]
    assert torch.allclose(r.var(0), torch.tensor([25.0, 9.0]), rtol=0.15)


def test_null_space_pca_skips_the_classifier_directions() -> None:
    h, y, u1, u2 = planted()
    w = torch.stack([u1, torch.randn(6)])  # the classifier reads the strongest direction of class 0
    stats = class_subspaces(h, y, 2, 1, null_space=w, rotate=False)
    assert torch.allclose(w @ stats.directions[0], torch.zeros(2, 1), atol=1e-5)  # directions in W's null space
    assert stats.projector is not None and torch.allclose(stats.projector, null_space_projector(w), atol=1e-6)
    next_best = null_space_projector(w) @ u2  # u1 is gone: the top direction is the projected u2
    assert abs(float(stats.directions[0, :, 0] @ next_best / next_best.norm())) > 0.999


def test_rotation_keeps_orthonormality_and_span_and_is_seeded() -> None:
    h, y, _, _ = planted()
    plain = class_subspaces(h, y, 2, 2, rotate=False)

    def rotated(seed: int) -> SubclassStats:
        return class_subspaces(h, y, 2, 2, rotate=True, generator=torch.Generator().manual_seed(seed))

    a, b, other = rotated(1), rotated(1), rotated(2)
    assert torch.equal(a.directions, b.directions)  # same seed, same rotation
    assert not torch.allclose(a.directions, other.directions)
    assert not torch.allclose(a.directions, plain.directions)
    for c in range(2):
        v, v0 = a.directions[c], plain.directions[c]
        assert torch.allclose(v.T @ v, torch.eye(2), atol=1e-5)
        assert torch.allclose(v @ v.T, v0 @ v0.T, atol=1e-5)  # same subspace
    q = random_rotation(5, torch.Generator().manual_seed(0))
    assert torch.allclose(q.T @ q, torch.eye(5, dtype=q.dtype), atol=1e-10)


@pytest.mark.parametrize("normalize", ["class", "direction"])
def test_normalisation_gives_unit_variance(normalize: str) -> None:
    h, y, _, _ = planted()
    stats = class_subspaces(h, y, 2, 2, rotate=True, generator=torch.Generator().manual_seed(0), normalize=normalize)
    for c in range(2):
        variances = subclass_scores(h[y == c], stats)[:, c].var(0)
        if normalize == "class":
            assert math.isclose(float(variances.mean()), 1.0, rel_tol=1e-3)
            assert not torch.allclose(variances, torch.ones(2), atol=0.05)  # directions keep their relative size
        else:
            assert torch.allclose(variances, torch.ones(2), atol=1e-3)


def test_streaming_moments_match_one_pass_with_a_large_offset() -> None:
    h, y, _, _ = planted()
    h = h + 1e4  # a common offset that would cancel the digits of E[hhᵀ] − μμᵀ without the reference point
    moments = ClassMoments(2, 6)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    for part in order.split(97):
        moments.update(h[part], y[part])
    counts, means, cov = moments.mean_cov()
    for c in range(2):
        exact = torch.cov(h[y == c].double().T)
        assert int(counts[c]) == int((y == c).sum())
        assert torch.allclose(means[c], h[y == c].double().mean(0), rtol=0, atol=1e-6)
        assert torch.allclose(cov[c], exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_subclasses": 7}, "d = 6"),  # more directions than dimensions
        ({"num_subclasses": 5, "null_space": torch.randn(2, 6)}, "d − rank W = 6 − 2 = 4"),
        ({"num_subclasses": 0}, ">= 1"),
    ],
)
def test_too_many_subclasses_raise(kwargs: dict, needle: str) -> None:
    h, y, _, _ = planted()
    with pytest.raises(KDConfigError, match="num_subclasses") as info:
        class_subspaces(h, y, 2, **kwargs)
    assert needle in str(info.value)


def test_too_few_samples_per_class_raise() -> None:
    h, y, _, _ = planted(d=6)
    keep = torch.cat([torch.arange(3), torch.arange(400, 800)])  # class 0 keeps 3 samples: at most S = 2
    class_subspaces(h[keep], y[keep], 2, 2, rotate=False)
    with pytest.raises(KDConfigError, match=r"num_subclasses: S = 3 needs at least S \+ 1 = 4 .* class 0 has 3"):
        class_subspaces(h[keep], y[keep], 2, 3, rotate=False)


# ---------------------------------------------------------------------- targets
def test_product_targets_by_hand() -> None:
    stats = toy_stats()
    h = torch.tensor([[1.0, 0.0]])  # r_{c,·} = (1, 0) for both classes
    z = torch.tensor([[math.log(3.0), 0.0]])  # p_T = (0.75, 0.25)
    p = subclass_targets(h, z, stats, beta=1.0, compose="product")
    e = math.e
    expected = torch.tensor([[0.75 * e / (e + 1), 0.75 / (e + 1), 0.25 * e / (e + 1), 0.25 / (e + 1)]])
    assert torch.allclose(p, expected, atol=1e-6)
    p_beta = subclass_targets(h, z, stats, beta=0.5, compose="product")  # r/β = (2, 0)
    assert math.isclose(float(p_beta[0, 0]), 0.75 * e**2 / (e**2 + 1), rel_tol=1e-6)
    p_logits = subclass_targets(h, z, stats, beta=1.0, compose="logits")  # softmax(log3 + 1, log3, 1, 0)
    total = 3 * e + 3 + e + 1
    assert torch.allclose(p_logits, torch.tensor([[3 * e, 3.0, e, 1.0]]) / total, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_class_marginals(temperature: float) -> None:
    """``product`` keeps p_T(c) exactly; ``logits`` gives p_T(c) tilted by logsumexp_s(r_{c,·}/β) (equal to p_T(c)
    only when the tilt is the same for every class)."""
    h, y, _, _ = planted()
    stats = class_subspaces(h, y, 2, 3, null_space=torch.randn(2, 6), generator=torch.Generator().manual_seed(0))
    x, z, beta = h[::50], torch.randn(16, 2), 0.7
    p_t = F.softmax(z / temperature, -1)
    for compose in ("product", "logits"):
        p = subclass_targets(x, z, stats, beta, compose, temperature)
        assert p.shape == (16, 6) and torch.allclose(p.sum(-1), torch.ones(16), atol=1e-5)
        marginals = p.reshape(16, 2, 3).sum(-1)
        if compose == "product":
            assert torch.allclose(marginals, p_t, atol=1e-6)
        else:
            tilt = torch.logsumexp(subclass_scores(x, stats) / beta, dim=-1)
            assert torch.allclose(marginals, F.softmax(z / temperature + tilt, -1), atol=1e-5)
            assert not torch.allclose(marginals, p_t, atol=1e-3)
    same_tilt = toy_stats()  # both classes have the same r, so the same tilt: logits keeps p_T(c) too
    marginals = subclass_targets(torch.randn(5, 2), z[:5], same_tilt, beta, "logits", temperature).reshape(5, 2, 2)
    assert torch.allclose(marginals.sum(-1), p_t[:5], atol=1e-6)


def test_targets_do_not_carry_gradients_to_the_teacher_outputs() -> None:
    h = torch.randn(4, 2, requires_grad=True)
    z = torch.randn(4, 2, requires_grad=True)
    assert not subclass_log_targets(h, z, toy_stats()).requires_grad


# ---------------------------------------------------------------------- aggregation and loss
def test_aggregate_subclasses_by_hand() -> None:
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 4.0, 1.0, 1.0]])) + 7.0  # shift: same softmax
    log_p = aggregate_subclasses(logits, num_classes=2, num_subclasses=2)
    assert torch.allclose(log_p.exp(), torch.tensor([[0.3, 0.7], [0.8, 0.2]]), atol=1e-6)
    with pytest.raises(KDConfigError, match="C·S"):
        aggregate_subclasses(logits, 3, 2)


def test_kl_by_hand_and_zero_when_student_matches() -> None:
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    q_logits = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    expected = float((p * (p / 0.25).log()).sum())
    assert math.isclose(float(lelp_kl(q_logits, p.log())), expected, rel_tol=1e-6)
    assert math.isclose(float(lelp_kl(q_logits, p.log(), temperature=2.0)), 4 * expected, rel_tol=1e-6)  # τ² · KL
    targets = subclass_log_targets(torch.randn(6, 2), torch.randn(6, 2), toy_stats(), beta=0.5)
    assert float(lelp_kl(targets + 3.0, targets)) < 1e-6  # any shift of the student's logits: same softmax
    assert float(lelp_kl(2.0 * targets, targets, temperature=2.0)) < 1e-6  # softmax(g/τ) = p_T at g = τ·log p_T
    assert float(lelp_kl(torch.zeros(6, 4), targets)) > 1e-3


def test_lelp_loss_terms_and_gradients() -> None:
    torch.manual_seed(0)
    targets = subclass_log_targets(torch.randn(5, 2), torch.randn(5, 2), toy_stats())
    y = torch.tensor([0, 1, 1, 0, 1])
    student = torch.randn(5, 4, requires_grad=True)
    only_kd = LELPLoss(2, 2)(student, targets, y)
    assert set(only_kd) == {"loss", "kd"}  # α = 0 by default: no CE term at all
    both = LELPLoss(2, 2, temperature=2.0, ce_weight=0.3, kd_weight=0.5)(student, targets, y)
    ce = F.nll_loss(aggregate_subclasses(student, 2, 2), y)
    assert torch.allclose(both["ce"], 0.3 * ce)
    assert torch.allclose(both["kd"], 0.5 * lelp_kl(student, targets, 2.0))
    assert torch.allclose(both["loss"], both["ce"] + both["kd"])
    both["loss"].backward()
    assert student.grad is not None and bool(student.grad.abs().sum() > 0)
    for bad in ({"temperature": 0.0}, {"ce_weight": -1.0}, {"num_subclasses": 0}):
        with pytest.raises(KDConfigError):
            LELPLoss(**{"num_classes": 2, "num_subclasses": 2, **bad})  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match="compose"):
        subclass_log_targets(torch.randn(1, 2), torch.randn(1, 2), toy_stats(), compose="sum")  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match="beta"):
        subclass_log_targets(torch.randn(1, 2), torch.randn(1, 2), toy_stats(), beta=0.0)
