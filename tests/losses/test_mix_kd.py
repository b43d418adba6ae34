"""MIX-KD: Partial MixUp draws and the MIXSTD loss, hand-computed and by their stated properties."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses import KDLoss
from kd_lightning.losses.mix_kd import (
    MixKDLoss,
    apply_mixup,
    mix_targets,
    mixstd_loss,
    partial_mixup,
    sample_mixup,
    std_scale,
)


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def unbiased_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mixstd_by_hand(s: list[float], t: list[float], y: list[float]) -> tuple[float, float]:
    p_s = softmax([v / unbiased_std(s) for v in s])
    p_t = softmax([v / unbiased_std(t) for v in t])
    ce = -sum(yc * math.log(pc) for yc, pc in zip(y, p_s))
    kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return ce, kl


# --------------------------------------------------------------------------------------------- PMU
def test_replacement_sampling_keeps_exactly_the_drawn_samples_unmixed() -> None:
    batch, p = 10, 0.9
    torch.manual_seed(3)
    plan = sample_mixup(batch, p, 1.0, "replacement")
    torch.manual_seed(3)  # replay the documented draw order: π₁, π₂, λ, then randint
    pi_a, pi_b = torch.randperm(batch), torch.randperm(batch)
    torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample((batch,))
    drawn = set(torch.randint(0, batch, (int(batch * p),)).tolist())
    assert torch.equal(plan.index_a, pi_a) and torch.equal(plan.index_b, pi_b)
    assert set(torch.nonzero(plan.unmixed).flatten().tolist()) == drawn
    assert len(drawn) < int(batch * p)  # repeats: fewer than ⌊p·B⌋ distinct samples for this seed


def test_exact_sampling_leaves_exactly_floor_p_b_unmixed() -> None:
    torch.manual_seed(0)
    for batch, p in ((10, 0.9), (64, 0.5), (7, 0.3)):
        assert int(sample_mixup(batch, p, 1.0, "exact").unmixed.sum()) == int(batch * p)


def test_replacement_fraction_is_one_minus_exp_minus_p() -> None:
    torch.manual_seed(0)
    plan = sample_mixup(20000, 0.9, 1.0, "replacement")
    assert plan.unmixed.float().mean().item() == pytest.approx(1 - math.exp(-0.9), abs=0.01)  # ≈ 0.593, not 0.9


def test_mixed_inputs_and_targets_are_convex_combinations() -> None:
    torch.manual_seed(1)
    x = torch.randn(12, 3, 5, 5)
    y = torch.randint(0, 6, (12,))
    mixed_x, soft_y, plan = partial_mixup(x, y, 6, 0.5, 0.4, "exact")
    assert soft_y.shape == (12, 6) and (soft_y >= 0).all()
    assert torch.allclose(soft_y.sum(-1), torch.ones(12))
    lam = plan.lam
    assert ((lam >= 0) & (lam <= 1)).all()
    for i in range(12):
        a, b = plan.index_a[i], plan.index_b[i]
        assert torch.allclose(mixed_x[i], lam[i] * x[a] + (1 - lam[i]) * x[b])
        expected = torch.zeros(6)
        expected[y[a]] += lam[i]
        expected[y[b]] += 1 - lam[i]
        assert torch.allclose(soft_y[i], expected)
    kept = plan.unmixed
    assert torch.equal(mixed_x[kept], x[plan.index_a[kept]])  # unmixed samples are clean images, one-hot targets
    assert torch.equal(soft_y[kept].argmax(-1), y[plan.index_a[kept]]) and (soft_y[kept].max(-1).values == 1).all()


def test_full_mixup_is_partial_mixup_with_p_zero() -> None:
    torch.manual_seed(5)
    plan = sample_mixup(16, 0.0, 1.0, "replacement")
    assert not plan.unmixed.any()
    torch.manual_seed(5)
    assert torch.equal(sample_mixup(16, 0.0, 1.0, "exact").lam, plan.lam)


def test_mixup_arguments_checked() -> None:
    with pytest.raises(ValueError, match=r"unmixed_fraction must be in \[0, 1\]"):
        sample_mixup(4, 1.5)
    with pytest.raises(ValueError, match="beta_a must be > 0"):
        sample_mixup(4, 0.5, beta_a=0.0)
    with pytest.raises(ValueError, match="sampling must be"):
        sample_mixup(4, 0.5, sampling="some")
    with pytest.raises(ValueError, match="class indices"):
        mix_targets(torch.tensor([0.5, 1.0]), 3, sample_mixup(2, 0.5))


def test_apply_mixup_any_input_shape() -> None:
    plan = sample_mixup(4, 0.0, 1.0)
    for shape in ((4, 7), (4, 2, 3, 3, 3)):
        x = torch.randn(shape)
        assert apply_mixup(x, plan).shape == x.shape


# --------------------------------------------------------------------------------------------- MIXSTD
S1, T1, Y1 = [0.0, 2.0, 4.0], [3.0, 0.0, 0.0], [0.3, 0.7, 0.0]
S2, T2, Y2 = [1.0, -1.0, 0.5], [0.2, 1.5, -2.0], [0.0, 0.0, 1.0]


def test_mixstd_hand_computed() -> None:
    # Row 1: std(S1) = 2 so S1/σ = (0, 1, 2); std(T1) = √3 so T1/σ = (√3, 0, 0).
    ce1, kl1 = mixstd_by_hand(S1, T1, Y1)
    assert ce1 == pytest.approx(-(0.3 * math.log(softmax([0, 1, 2])[0]) + 0.7 * math.log(softmax([0, 1, 2])[1])))
    ce2, kl2 = mixstd_by_hand(S2, T2, Y2)
    s, t, y = (torch.tensor(v, dtype=torch.float64) for v in ([S1, S2], [T1, T2], [Y1, Y2]))
    ce, kl = mixstd_loss(s, t, y, eps=0.0)
    assert ce.item() == pytest.approx((ce1 + ce2) / 2, rel=1e-9)  # per-sample sum, batch mean
    assert kl.item() == pytest.approx((kl1 + kl2) / 2, rel=1e-9)  # 'batchmean', no τ²
    out = MixKDLoss(gamma=0.1, alpha=0.9, eps=0.0)(s, t, y)
    assert out["ce"].item() == pytest.approx(0.1 * (ce1 + ce2) / 2, rel=1e-9)
    assert out["kd"].item() == pytest.approx(0.9 * (kl1 + kl2) / 2, rel=1e-9)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["kd"].item(), rel=1e-12)


def test_default_eps_is_negligible() -> None:
    s, t, y = torch.tensor([S1, S2]), torch.tensor([T1, T2]), torch.tensor([Y1, Y2])
    exact = MixKDLoss(eps=0.0)(s, t, y)["loss"]
    assert MixKDLoss()(s, t, y)["loss"].item() == pytest.approx(exact.item(), rel=1e-5)


def test_student_std_is_not_detached() -> None:
    """z/σ(z) is scale-invariant, so with σ in the graph the gradient is orthogonal to z."""
    torch.manual_seed(0)
    s = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 10, dtype=torch.float64)
    y = torch.softmax(torch.randn(4, 10, dtype=torch.float64), -1)
    MixKDLoss(eps=0.0)(s, t, y)["loss"].backward()
    assert (s.grad * s.detach()).sum(-1).abs().max().item() < 1e-10
    detached = s.detach().clone().requires_grad_()
    scaled = detached / detached.std(-1, keepdim=True).detach()
    (0.1 * -(y * scaled.log_softmax(-1)).sum(-1).mean()).backward()
    assert (detached.grad * s.detach()).sum(-1).abs().max().item() > 1e-6  # what detaching σ would give


def test_std_scale_scale_invariant_and_zero_for_equal_logits_up_to_scale() -> None:
    z = torch.randn(3, 8, dtype=torch.float64)
    assert torch.allclose(std_scale(5.0 * z, eps=0.0), std_scale(z, eps=0.0))
    y = torch.softmax(z, -1)
    _, kl = mixstd_loss(3.0 * z, z, y, eps=0.0)  # std-scaled logits equal: no KD term
    assert kl.item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_reaches_student_only() -> None:
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    y = torch.softmax(torch.randn(4, 6), -1)
    for distill in ("mixstd", "kd"):
        MixKDLoss(distill=distill)(s, t, y)["loss"].backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_kd_baseline_on_one_hot_targets_is_vanilla_kd() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (5,))
    ours = MixKDLoss(distill="kd", gamma=0.1, alpha=0.9, temperature=4.0)(s, t, torch.eye(7, dtype=s.dtype)[y])
    vanilla = KDLoss(temperature=4.0, ce_weight=0.1, kd_weight=0.9)(s, t, y)
    for key in ("loss", "ce", "kd"):
        assert ours[key].item() == pytest.approx(vanilla[key].item(), rel=1e-9)


def test_bad_arguments_and_shapes() -> None:
    with pytest.raises(ValueError, match="distill must be 'mixstd' or 'kd'"):
        MixKDLoss(distill="crd")
    with pytest.raises(ValueError, match="temperature: must be a finite number > 0"):
        MixKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="soft_target must have the logits' shape"):
        MixKDLoss()(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="student predicts 5 classes and the teacher 6"):
        MixKDLoss()(torch.randn(2, 5), torch.randn(2, 6), torch.zeros(2, 5))
