"""KD³ loss terms: selection, λ schedule, weighted KD/feature/classifier alignment, MixDistribution, InfoNCE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.kd3 import (
    MixDistribution,
    channel_statistics,
    classifier_alignment,
    combined_prediction,
    instance_contrastive,
    lambda_schedule,
    mix_distribution,
    projected_classifier_ce,
    select_instances,
    teacher_anchored_contrastive,
    weight_alignment,
    weighted_feature_alignment,
    weighted_kd,
    weighted_mean,
)


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------ selection and schedule
def test_combined_prediction_by_hand() -> None:
    p_t = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    p_s = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    out = combined_prediction(p_t, p_s, 0.75)
    assert torch.allclose(out, torch.tensor([[0.8, 0.2], [0.4, 0.6]]))
    assert torch.equal(combined_prediction(p_t, p_s, 1.0), p_t)
    with pytest.raises(KDConfigError, match="lam: must be in"):
        combined_prediction(p_t, p_s, 1.5)


def test_selection_by_hand_rejects_noise_like_predictions() -> None:
    p_t = torch.tensor([[0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    p_s = torch.tensor([[0.7, 0.15, 0.15], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.6, 0.3], [0.6, 0.2, 0.2]])
    p_c = combined_prediction(p_t, p_s, 0.5)  # [.8,.1,.1], uniform, [.1,.7,.2], [.35,.2,.45]
    mask, labels, weights = select_instances(p_c, 0.7)
    assert mask.tolist() == [True, False, True, False]  # the uniform (noise-like) row is rejected
    assert labels.tolist() == [0, 0, 1, 2]
    assert torch.allclose(weights, torch.tensor([0.8, 1 / 3, 0.7, 0.45]))
    # Labels from the teacher alone: row 3 becomes class 2 either way, row 0 stays 0.
    _, teacher_labels, _ = select_instances(p_c, 0.7, label_probs=p_t)
    assert teacher_labels.tolist() == [0, 0, 1, 2]
    assert select_instances(p_c, 0.0)[0].all()
    with pytest.raises(KDConfigError, match="delta: must be in"):
        select_instances(p_c, 1.2)


def test_uniform_predictions_are_rejected_for_any_threshold_above_chance() -> None:
    uniform = torch.full((5, 10), 0.1)
    for delta in (0.11, 0.5, 0.7):
        assert not select_instances(combined_prediction(uniform, uniform, 0.6), delta)[0].any()


def test_lambda_schedule_endpoints_and_clamp() -> None:
    assert lambda_schedule(0.0) == 1.0 and lambda_schedule(1.0) == 0.5
    assert lambda_schedule(0.5) == pytest.approx(0.75)
    assert lambda_schedule(-1.0) == 1.0 and lambda_schedule(3.0) == 0.5
    assert lambda_schedule(0.25, start=0.8, end=0.0) == pytest.approx(0.6)
    with pytest.raises(KDConfigError, match="end: must be in"):
        lambda_schedule(0.5, end=-0.1)


# ------------------------------------------------------------------ knowledge memorisation
def test_weighted_kd_by_hand() -> None:
    zs = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    zt = [[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]]
    tau, a, y = 2.0, [0.5, 1.0], [0, 1]
    kl = []
    for s_row, t_row in zip(zs, zt, strict=True):
        p, q = _softmax(t_row, tau), _softmax(s_row, tau)
        kl.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    ce = [-math.log(_softmax(row)[k]) for row, k in zip(zs, y, strict=True)]
    out = weighted_kd(
        torch.tensor(zs), torch.tensor(zt), torch.tensor(y), torch.tensor(a), tau, kd_weight=0.5, ce_weight=2.0
    )
    kd = tau**2 * (a[0] * kl[0] + a[1] * kl[1]) / 2
    assert out["kd"].item() == pytest.approx(0.5 * kd, rel=1e-5)
    assert out["pseudo_ce"].item() == pytest.approx(2.0 * sum(ce) / 2, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * kd + sum(ce), rel=1e-5)
    by_weights = weighted_kd(
        torch.tensor(zs), torch.tensor(zt), torch.tensor(y), torch.tensor(a), tau, ce_weight=0.0, normalize="weights"
    )
    assert set(by_weights) == {"loss", "kd"}  # a weight-0 term is absent
    assert by_weights["kd"].item() == pytest.approx(tau**2 * (a[0] * kl[0] + a[1] * kl[1]) / 1.5, rel=1e-5)


def test_weighted_kd_is_zero_when_the_student_matches_and_survives_an_empty_batch() -> None:
    z = torch.randn(4, 5)
    assert weighted_kd(z, z.clone(), z.argmax(-1), ce_weight=0.0)["kd"].abs().item() < 1e-6
    empty = torch.zeros(0, 5, requires_grad=True)
    out = weighted_kd(empty, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert out["loss"].item() == 0.0
    out["loss"].backward()  # still a graph


def test_weighted_feature_alignment_by_hand() -> None:
    ps = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    ft = torch.tensor([[0.0, 0.0], [1.0, 3.0]], requires_grad=True)
    w = torch.tensor([1.0, 0.5])
    # squared distances: 5 and 10; per-dim means 2.5 and 5
    assert weighted_feature_alignment(ps, ft, w).item() == pytest.approx((2.5 + 0.5 * 5) / 2)
    assert weighted_feature_alignment(ps, ft, w, reduction="sum").item() == pytest.approx((5 + 0.5 * 10) / 2)
    assert weighted_feature_alignment(ps, ft, w, normalize="weights").item() == pytest.approx((2.5 + 2.5) / 1.5)
    assert weighted_feature_alignment(ft.detach(), ft.detach(), w).item() == 0.0
    weighted_feature_alignment(ps, ft, w).backward()
    assert ps.grad is not None and ft.grad is None  # the teacher's features are constants
    with pytest.raises(KDConfigError, match="projected_student: has shape"):
        weighted_feature_alignment(torch.zeros(2, 3), torch.zeros(2, 4))


def test_weighted_mean_normalisations() -> None:
    v, a = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 3.0])
    assert weighted_mean(v, a).item() == pytest.approx(7.0)
    assert weighted_mean(v, a, "weights").item() == pytest.approx(14 / 4)
    assert weighted_mean(v).item() == pytest.approx(3.0)


def test_weight_alignment_is_zero_when_ws_pinv_equals_wt() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 6, generator=g)  # d_T = 4, d_S = 6: full row rank, so P·P⁺ = I
    w_t = torch.randn(3, 4, generator=g)
    w_s = (w_t @ p).requires_grad_(True)  # then W_S·P⁺ = W_T·P·P⁺ = W_T
    assert weight_alignment(w_s, p, w_t).item() < 1e-8
    moved = (w_s.detach() + 0.1 * torch.randn(3, 6, generator=g)).requires_grad_(True)
    p_param = p.clone().requires_grad_(True)
    w_t_param = w_t.clone().requires_grad_(True)
    loss = weight_alignment(moved, p_param, w_t_param)
    assert loss.item() > 1e-4
    loss.backward()
    assert moved.grad is not None and p_param.grad is not None and w_t_param.grad is None
    # By hand for an invertible P: ‖W_S P⁻¹ − W_T‖².
    p2, w_s2, w_t2 = torch.tensor([[2.0, 0.0], [0.0, 4.0]]), torch.tensor([[2.0, 4.0]]), torch.tensor([[0.0, 0.0]])
    assert weight_alignment(w_s2, p2, w_t2).item() == pytest.approx(1.0 + 1.0)
    with pytest.raises(KDConfigError, match="do not fit"):
        weight_alignment(torch.zeros(3, 6), torch.zeros(6, 4), torch.zeros(3, 4))


def test_projected_classifier_ce_by_hand_and_teacher_gets_no_gradient() -> None:
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5, -1.0]))
    head.requires_grad_(False)
    z = torch.tensor([[1.0, 2.0]], requires_grad=True)
    logits = [1.0, 2.5, 2.0]
    expected = -math.log(_softmax(logits)[2])
    loss = projected_classifier_ce(z, head, torch.tensor([2]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert z.grad is not None and head.weight.grad is None
    same = classifier_alignment(
        "projected_ce", projected_student=z, teacher_classifier=head, pseudo_labels=torch.tensor([2])
    )
    assert same.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(KDConfigError, match="classifier_alignment: must be one of"):
        classifier_alignment("cosine")  # type: ignore[arg-type]


# ------------------------------------------------------------------ MixDistribution
def _features(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 1.0]).reshape(1, 3, 1, 1)
    shift = torch.arange(4.0).reshape(4, 1, 1, 1)
    return torch.randn(4, 3, 5, 5, generator=g) * scale + shift


def test_mix_distribution_shape_and_identity() -> None:
    f = _features()
    perm = torch.tensor([1, 2, 3, 0])
    assert mix_distribution(f, 0.5, perm).shape == f.shape
    assert torch.allclose(mix_distribution(f, 1.0, perm), f, atol=1e-5)
    assert torch.allclose(mix_distribution(f, torch.full((4,), 0.3), torch.arange(4)), f, atol=1e-5)


def test_mix_distribution_moves_channel_statistics_to_the_partners() -> None:
    f, perm = _features(), torch.tensor([1, 2, 3, 0])
    mu, sigma = channel_statistics(f)
    for lam in (0.0, 0.5):
        mixed_mu, mixed_sigma = channel_statistics(mix_distribution(f, lam, perm))
        assert torch.allclose(mixed_mu, lam * mu + (1 - lam) * mu[perm], atol=1e-4)
        assert torch.allclose(mixed_sigma, lam * sigma + (1 - lam) * sigma[perm], atol=1e-4)
    lam = torch.tensor([1.0, 0.0, 0.5, 0.25])  # one λ per instance
    mixed_mu, _ = channel_statistics(mix_distribution(f, lam, perm))
    assert torch.allclose(mixed_mu[0], mu[0], atol=1e-5) and torch.allclose(mixed_mu[1], mu[2], atol=1e-4)
    # The normalised content is kept: (f_mix − μ_mix)/σ_mix = (f − μ)/σ.
    out = mix_distribution(f, 0.5, perm)
    m2, s2 = channel_statistics(out)
    assert torch.allclose((out - m2) / s2, (f - mu) / sigma, atol=1e-4)


def test_mix_distribution_noise_perturbs_statistics_deterministically() -> None:
    f, perm = _features(), torch.arange(4)
    a = mix_distribution(f, 1.0, perm, noise=0.5, generator=torch.Generator().manual_seed(1))
    b = mix_distribution(f, 1.0, perm, noise=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, f, atol=1e-3)
    with pytest.raises(KDConfigError, match="noise: must be >= 0"):
        mix_distribution(f, 1.0, perm, noise=-1.0)
    with pytest.raises(KDConfigError, match="features: must be"):
        mix_distribution(torch.zeros(4, 3), 1.0, perm)


def test_mix_distribution_module_and_hook() -> None:
    torch.manual_seed(0)
    f = _features()
    out = MixDistribution(alpha=0.1)(f)
    assert out.shape == f.shape and not torch.allclose(channel_statistics(out)[0], channel_statistics(f)[0])
    conv = nn.Conv2d(3, 3, 1)
    handle = conv.register_forward_hook(MixDistribution(alpha=1.0).hook)
    hooked = conv(f)
    handle.remove()
    assert hooked.shape == conv(f).shape and not torch.allclose(hooked, conv(f))
    with pytest.raises(KDConfigError, match="mix_alpha: must be a finite number > 0"):
        MixDistribution(alpha=0.0)


# ------------------------------------------------------------------ instance alignment
def test_instance_contrastive_by_hand_2x2() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e_prime = torch.tensor([[2.0, 0.0], [0.6, 0.8]])  # normalised: [1, 0], [0.6, 0.8]
    tau = 0.5
    row0 = -2.0 + math.log(math.exp(2.0) + math.exp(1.2))  # logits [1/τ, 0.6/τ]
    row1 = -1.6 + math.log(math.exp(0.0) + math.exp(1.6))  # logits [0, 0.8/τ]
    assert instance_contrastive(e, e_prime, tau).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    col0 = -2.0 + math.log(math.exp(2.0) + math.exp(0.0))  # e' → e: logits of the columns
    col1 = -1.6 + math.log(math.exp(1.2) + math.exp(1.6))
    sym = instance_contrastive(e, e_prime, tau, symmetric=True).item()
    assert sym == pytest.approx(0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2), rel=1e-6)


def test_instance_contrastive_is_minimal_when_e_equals_e_prime() -> None:
    tau = 0.5
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # antipodal: the InfoNCE optimum for B = 2
    bound = math.log(1 + math.exp(-2 / tau))
    assert instance_contrastive(e, e.clone(), tau).item() == pytest.approx(bound, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert instance_contrastive(e, torch.randn(2, 2, generator=g), tau).item() >= bound - 1e-7
    x = torch.randn(6, 8, generator=g)
    assert instance_contrastive(x, x.clone(), tau) < instance_contrastive(x, x.roll(1, 0), tau)
    assert instance_contrastive(x[:1], x[:1], tau).item() == 0.0  # no negatives


def test_teacher_anchored_contrastive_treats_teacher_features_as_constants() -> None:
    e_prime = torch.randn(4, 3, requires_grad=True)
    phi_t = torch.randn(4, 3, requires_grad=True)
    loss = teacher_anchored_contrastive(e_prime, phi_t, 0.2)
    assert loss.item() == pytest.approx(instance_contrastive(e_prime, phi_t, 0.2).item())
    loss.backward()
    assert e_prime.grad is not None and phi_t.grad is None
