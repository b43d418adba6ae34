"""Swing Distillation loss (UNVERIFIED reconstruction): hand-computed values, noise statistics, the simplex."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.swing import (
    PrivacyScores,
    SwingLoss,
    noise_scale,
    noisy_soft_targets,
    sample_noise,
    soft_target_kl,
    swing_temperatures,
)


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


S1, T1 = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5]
S2, T2 = [0.0, -1.0, 3.0], [2.0, 0.5, 0.0]


def rows(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------ temperatures
def test_per_item_temperatures_hand_computed() -> None:
    got = swing_temperatures(torch.tensor([0.0, 0.25, 1.0]), t_min=2.0, t_max=10.0)
    assert got.tolist() == pytest.approx([2.0, 4.0, 10.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t_min": 0.0, "t_max": 1.0}, "t_min: must be a finite number > 0"),
        ({"t_min": 4.0, "t_max": 2.0}, "t_max must be >= t_min"),
    ],
)
def test_temperature_arguments_checked(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        swing_temperatures(torch.tensor([0.5]), **kwargs)


def test_scores_outside_unit_interval_rejected() -> None:
    with pytest.raises(ValueError, match=r"privacy scores must lie in \[0, 1\]"):
        swing_temperatures(torch.tensor([0.5, 1.5]), 1.0, 5.0)


# ------------------------------------------------------------------------------------ the loss without noise
@pytest.mark.parametrize("disable", [{"noise": "none"}, {"epsilon": math.inf}])
def test_loss_hand_computed_without_noise(disable) -> None:
    t_min, t_max, alpha = 1.0, 5.0, 0.7
    privacy = [0.0, 0.5]  # T = 1 and 3
    temps = [t_min + (t_max - t_min) * p for p in privacy]
    loss = SwingLoss(t_min=t_min, t_max=t_max, alpha=alpha, **disable)
    out = loss(rows(S1, S2), rows(T1, T2), torch.tensor([1, 2]), privacy=torch.tensor(privacy))
    per_item = [
        temps[0] ** 2 * kl(softmax(T1, temps[0]), softmax(S1, temps[0])),
        temps[1] ** 2 * kl(softmax(T2, temps[1]), softmax(S2, temps[1])),
    ]
    ce = (-math.log(softmax(S1)[1]) - math.log(softmax(S2)[2])) / 2
    assert out["kd"].item() == pytest.approx(alpha * sum(per_item) / 2, rel=1e-9)
    assert out["ce"].item() == pytest.approx((1 - alpha) * ce, rel=1e-9)
    assert out["loss"].item() == pytest.approx(out["kd"].item() + out["ce"].item(), rel=1e-12)


def test_without_noise_and_equal_scores_it_is_hinton_kd() -> None:
    """Every item at the same π: one temperature T, and the soft-target term is τ²·KL of Hinton's KD."""
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    loss = SwingLoss(t_min=2.0, t_max=6.0, alpha=1.0, noise="none")
    out = loss(s, t, torch.zeros(6, dtype=torch.long), privacy=torch.full((6,), 0.5))
    expected = 16.0 * forward_kl(s, t, temperature=4.0)
    assert out["kd"].item() == pytest.approx(expected.item(), rel=1e-9)
    assert "ce" not in out  # weight 0: left out


def test_soft_target_kl_matches_logit_kl_and_handles_zeros() -> None:
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    got = soft_target_kl(torch.softmax(t, -1), s)
    assert torch.allclose(got, forward_kl(s, t, reduction="none"))
    q = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    value = soft_target_kl(q, torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64))
    assert torch.isfinite(value).all()
    assert value.item() == pytest.approx(-math.log(softmax([0.0, 1.0, 2.0])[1]))


def test_private_items_get_flatter_targets() -> None:
    t = torch.tensor([[4.0, 0.0, -1.0]] * 2)
    targets = noisy_soft_targets(t, swing_temperatures(torch.tensor([0.0, 1.0]), 1.0, 10.0), noise="none")
    assert targets[1].max() < targets[0].max()
    assert targets[1].max() == pytest.approx(max(softmax([4.0, 0.0, -1.0], 10.0)), rel=1e-6)


def test_soften_student_false_compares_with_plain_student_softmax() -> None:
    loss = SwingLoss(t_min=1.0, t_max=3.0, alpha=1.0, noise="none", soften_student=False)
    out = loss(rows(S1), rows(T1), torch.tensor([0]), privacy=torch.tensor([1.0]))
    assert out["kd"].item() == pytest.approx(kl(softmax(T1, 3.0), softmax(S1)), rel=1e-9)


# ------------------------------------------------------------------------------------ noise
def test_noise_scale_formulas() -> None:
    assert noise_scale("laplace", sensitivity=2.0, epsilon=4.0) == pytest.approx(0.5)
    sigma = noise_scale("gaussian", sensitivity=1.0, epsilon=0.5, delta=1e-5)
    assert sigma == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 0.5)
    assert noise_scale("laplace", 1.0, math.inf) == 0.0
    assert noise_scale("none", 1.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="epsilon"):
        noise_scale("laplace", 1.0, 0.0)
    with pytest.raises(ValueError, match="noise must be"):
        noise_scale("uniform", 1.0, 1.0)  # type: ignore[arg-type]


def test_laplace_draw_has_mean_zero_and_scale_delta_over_epsilon() -> None:
    """Laplace(0, b): mean 0, E|ξ| = b, Var = 2b²; b = Δ/ε (drawn before any clipping)."""
    b = noise_scale("laplace", sensitivity=1.0, epsilon=5.0)
    xi = sample_noise((200_000,), "laplace", b, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert xi.mean().item() == pytest.approx(0.0, abs=3e-3)
    assert xi.abs().mean().item() == pytest.approx(0.2, rel=0.01)
    assert xi.var().item() == pytest.approx(2 * 0.2**2, rel=0.02)
    # the draw used by the targets is the same distribution: scale recovered from the returned noise
    _, drawn = noisy_soft_targets(
        torch.randn(20_000, 10),
        torch.ones(20_000),
        "laplace",
        b,
        generator=torch.Generator().manual_seed(1),
        return_noise=True,
    )
    assert drawn.abs().mean().item() == pytest.approx(b, rel=0.01)


def test_gaussian_draw_has_the_calibrated_sigma() -> None:
    sigma = noise_scale("gaussian", 1.0, 0.9, 1e-5)
    xi = sample_noise((100_000,), "gaussian", sigma, generator=torch.Generator().manual_seed(0))
    assert xi.std().item() == pytest.approx(sigma, rel=0.01)


@pytest.mark.parametrize("noise", ["laplace", "gaussian"])
@pytest.mark.parametrize("noise_on", ["probs", "logits"])
def test_noisy_targets_stay_on_the_simplex(noise, noise_on) -> None:
    t = 5 * torch.randn(512, 10)
    targets = noisy_soft_targets(
        t, torch.full((512,), 2.0), noise, scale=0.5, noise_on=noise_on, generator=torch.Generator().manual_seed(0)
    )
    assert (targets >= 0).all()
    assert torch.allclose(targets.sum(-1), torch.ones(512), atol=1e-6)


def test_all_zero_after_clipping_becomes_uniform() -> None:
    """With noise far larger than the probabilities, a draw negative in every class clips to all zeros."""
    logits = torch.zeros(1, 4)
    for seed in range(200):  # P(all four draws negative) = 1/16 per seed
        if (sample_noise((1, 4), "gaussian", 1e6, generator=torch.Generator().manual_seed(seed)) < -1).all():
            break
    else:  # pragma: no cover - (15/16)^200
        pytest.fail("no all-negative draw found")
    targets = noisy_soft_targets(logits, torch.ones(1), "gaussian", 1e6, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(targets, torch.full((1, 4), 0.25))


def test_noise_is_resampled_every_call() -> None:
    loss = SwingLoss(t_min=1.0, t_max=1.0, alpha=1.0, epsilon=5.0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.zeros(8, dtype=torch.long)
    torch.manual_seed(0)
    first, second = loss(s, t, y)["kd"], loss(s, t, y)["kd"]
    assert first.item() != second.item()
    torch.manual_seed(0)
    assert loss(s, t, y)["kd"].item() == first.item()  # ...from the global RNG, so seeded runs repeat


def test_noise_on_probs_pulls_targets_toward_uniform_in_expectation() -> None:
    """The documented side effect of clipping + renormalising: E[q̃] is flatter than q."""
    t = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).expand(20_000, 4)
    q = torch.softmax(t[0], -1)
    targets = noisy_soft_targets(t, torch.ones(20_000), "laplace", 0.2, generator=torch.Generator().manual_seed(0))
    mean = targets.mean(0)
    assert mean[0] < q[0] and (mean[1:] > q[1:]).all()


# ------------------------------------------------------------------------------------ gradients and inputs
def test_gradient_reaches_student_only() -> None:
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    SwingLoss()(s, t, torch.randint(0, 6, (4,)), privacy=torch.rand(4))["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_bad_inputs_named() -> None:
    with pytest.raises(ValueError, match="alpha must be in"):
        SwingLoss(alpha=1.5)
    with pytest.raises(ValueError, match="noise_on"):
        SwingLoss(noise_on="features")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"privacy scores must have the items' shape \(4,\)"):
        SwingLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), privacy=torch.rand(3))
    with pytest.raises(ValueError, match="do not match"):
        SwingLoss()(torch.randn(4, 3), torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------ privacy sources
def test_per_class_table_list_and_dict() -> None:
    y = torch.tensor([0, 2, 1])
    assert PrivacyScores([0.0, 0.5, 1.0])(None, y).tolist() == [0.0, 1.0, 0.5]
    table = PrivacyScores({2: 1.0}, num_classes=4)
    assert table.table.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert PrivacyScores({"1": 0.25})(None, y).tolist() == [0.0, 0.0, 0.25]  # keys as printed by --print_config


def test_per_sample_tensor_and_file(tmp_path) -> None:
    scores = torch.tensor([0.0, 0.1, 0.2, 0.9])
    y, index = torch.zeros(2, dtype=torch.long), torch.tensor([3, 1])
    assert PrivacyScores(scores)(None, y, index).tolist() == pytest.approx([0.9, 0.1])
    torch.save(scores, tmp_path / "scores.pt")
    assert PrivacyScores(str(tmp_path / "scores.pt"))(None, y, index).tolist() == pytest.approx([0.9, 0.1])
    # one score per sample broadcast over the tokens of the sample
    tokens = torch.zeros(2, 3, dtype=torch.long)
    assert torch.allclose(PrivacyScores(scores)(None, tokens, index), torch.tensor([[0.9] * 3, [0.1] * 3]))


def test_per_sample_table_without_indices_says_how_to_get_them() -> None:
    with pytest.raises(ValueError, match=r"carries no indices.*return_index=true"):
        PrivacyScores(torch.rand(10))(None, torch.zeros(2, dtype=torch.long), None)


def test_callable_source_and_its_checks() -> None:
    source = PrivacyScores(lambda x, y, i: (y == 1).float())
    assert source(None, torch.tensor([1, 0, 1])).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="outside"):
        PrivacyScores(lambda x, y, i: y.float() * 2)(None, torch.tensor([1]))
    with pytest.raises(ValueError, match="shape"):
        PrivacyScores(lambda x, y, i: torch.ones(5))(None, torch.tensor([1, 0]))


def test_privacy_table_errors() -> None:
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\]"):
        PrivacyScores([0.5, 2.0])
    with pytest.raises(ValueError, match="needs 3 scores"):
        PrivacyScores([0.5, 0.5], num_classes=3)
    with pytest.raises(FileNotFoundError, match="no file at"):
        PrivacyScores("/nonexistent/scores.pt")
    with pytest.raises(ValueError, match="beyond the per-sample table"):
        PrivacyScores(torch.rand(3))(None, torch.zeros(1, dtype=torch.long), torch.tensor([5]))
