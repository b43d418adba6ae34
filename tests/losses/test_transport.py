"""Log-domain Sinkhorn and SinKD: an exact OT solution found another way, the official plain-space
formulation, stability at small ε, hand-computed loss parts, gradients to the student only."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses.transport import (
    SinKDLoss,
    annealed_temperature,
    l1_cost,
    sinkhorn_distance,
    sinkhorn_plan,
)


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def l1(p: list[float], q: list[float]) -> float:
    return sum(abs(a - b) for a, b in zip(p, q))


def official_plain_sinkhorn(p_s: torch.Tensor, p_t: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """SinKD's official formulation, written here independently: cdist, Gibbs kernel, row/column sums."""
    cost = torch.cdist(p_s, p_t, p=1)
    plan = torch.exp(-cost / epsilon)
    for _ in range(n_iters):
        plan = plan / plan.sum(dim=1, keepdim=True)
        plan = plan / plan.sum(dim=0, keepdim=True)
    return (plan * cost).sum()


# Three student and three teacher probability vectors whose unique optimal assignment is (1, 0, 2), with the
# identity only 0.0133 worse: a plan that is not sharp enough lands between the two.
PS = [[0.26, 0.37, 0.37], [0.37, 0.31, 0.32], [0.38, 0.56, 0.06]]
PT = [[0.43, 0.22, 0.35], [0.44, 0.19, 0.37], [0.55, 0.36, 0.09]]


def exact_ot_uniform(ps: list[list[float]], pt: list[list[float]]) -> tuple[float, tuple[int, ...]]:
    """With uniform marginals 1/n an optimal plan is a permutation (Birkhoff): brute force all n! of them."""
    n = len(ps)
    return min((sum(l1(ps[i], pt[perm[i]]) for i in range(n)) / n, perm) for perm in itertools.permutations(range(n)))


def test_l1_cost_hand_computed() -> None:
    cost = l1_cost(torch.tensor(PS, dtype=torch.float64), torch.tensor(PT, dtype=torch.float64))
    for i, j in itertools.product(range(3), range(3)):
        assert cost[i, j].item() == pytest.approx(l1(PS[i], PT[j]), abs=1e-12)


def test_small_epsilon_matches_exact_optimal_transport_by_brute_force() -> None:
    exact, perm = exact_ot_uniform(PS, PT)
    assert perm == (1, 0, 2)  # not the identity: the test cannot pass with a diagonal plan
    ps, pt = torch.tensor(PS, dtype=torch.float64), torch.tensor(PT, dtype=torch.float64)
    got = sinkhorn_distance(ps, pt, epsilon=1e-3, n_iters=1000, marginals="uniform")
    assert got.item() == pytest.approx(exact, abs=1e-4)
    plan = sinkhorn_plan(l1_cost(ps, pt), epsilon=1e-3, n_iters=1000, marginals="uniform")
    want = torch.zeros(3, 3, dtype=torch.float64)
    want[torch.arange(3), torch.tensor(perm)] = 1 / 3
    assert torch.allclose(plan, want, atol=1e-3)
    # The spec's ε = 0.1 blurs the plan: its value is measurably above the exact optimum (and below the identity's).
    blurred = sinkhorn_distance(ps, pt, epsilon=0.1, n_iters=20, marginals="uniform").item()
    assert blurred > exact + 0.01


def test_spec_epsilon_plan_has_uniform_marginals() -> None:
    """ε = 0.1, 20 iterations on logits of std 3 at τ_sin = 2: columns exact, rows within 2 % (0.8 % here)."""
    g = torch.Generator().manual_seed(0)
    ps = F.softmax(torch.randn(16, 10, generator=g) * 3 / 2, -1)
    pt = F.softmax(torch.randn(16, 10, generator=g) * 3 / 2, -1)
    for marginals, mass in (("uniform", 1 / 16), ("unit", 1.0)):
        plan = sinkhorn_plan(l1_cost(ps, pt), epsilon=0.1, n_iters=20, marginals=marginals)
        assert (plan >= 0).all()
        assert torch.allclose(plan.sum(0), torch.full((16,), mass), rtol=1e-5)  # columns: exact after each iteration
        assert torch.allclose(plan.sum(1), torch.full((16,), mass), rtol=2e-2)  # rows: within tolerance
    longer = sinkhorn_plan(l1_cost(ps, pt), epsilon=0.1, n_iters=300, marginals="uniform")
    assert torch.allclose(longer.sum(1), torch.full((16,), 1 / 16), rtol=1e-4)  # and converging


def test_unit_marginals_reproduce_the_official_plain_space_code_and_are_batch_times_uniform() -> None:
    g = torch.Generator().manual_seed(1)
    ps = F.softmax(torch.randn(8, 5, generator=g, dtype=torch.float64), -1)
    pt = F.softmax(torch.randn(8, 5, generator=g, dtype=torch.float64), -1)
    official = official_plain_sinkhorn(ps, pt, epsilon=0.1, n_iters=20).item()
    unit = sinkhorn_distance(ps, pt, epsilon=0.1, n_iters=20, marginals="unit").item()
    uniform = sinkhorn_distance(ps, pt, epsilon=0.1, n_iters=20, marginals="uniform").item()
    assert unit == pytest.approx(official, rel=1e-10)
    assert uniform == pytest.approx(official / 8, rel=1e-10)


def test_log_domain_is_stable_at_tiny_epsilon_where_plain_space_fails() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 10, generator=g, requires_grad=True)
    t = torch.randn(6, 10, generator=g)
    ps, pt = F.softmax(s / 2, -1), F.softmax(t / 2, -1)
    with torch.no_grad():  # the official kernel underflows to 0 and its normalisation gives 0/0
        assert torch.isnan(official_plain_sinkhorn(ps, pt, epsilon=1e-4, n_iters=20))
    value = sinkhorn_distance(ps, pt, epsilon=1e-4, n_iters=20, marginals="unit")
    assert torch.isfinite(value) and value > 0
    value.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_identical_sets_have_vanishing_distance_at_small_epsilon_and_order_does_not_matter() -> None:
    g = torch.Generator().manual_seed(3)
    ps = F.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64) * 2, -1)
    pt = F.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64) * 2, -1)
    same = sinkhorn_distance(ps, ps[torch.tensor([3, 0, 4, 1, 2])], epsilon=1e-3, n_iters=500, marginals="uniform")
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    # Batch-wise OT compares *sets*: shuffling the student batch leaves the distance unchanged.
    shuffled = ps[torch.tensor([4, 2, 0, 3, 1])]
    assert sinkhorn_distance(shuffled, pt).item() == pytest.approx(sinkhorn_distance(ps, pt).item(), rel=1e-9)


def test_batch_of_one_is_the_l1_distance_with_either_marginals() -> None:
    s, t = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5]
    want = l1(softmax(s, 2.0), softmax(t, 2.0))
    ps = F.softmax(torch.tensor([s], dtype=torch.float64) / 2, -1)
    pt = F.softmax(torch.tensor([t], dtype=torch.float64) / 2, -1)
    for marginals in ("unit", "uniform"):
        assert sinkhorn_distance(ps, pt, marginals=marginals).item() == pytest.approx(want, rel=1e-12)


def test_sinkd_loss_parts_hand_computed_on_a_batch_of_one() -> None:
    s, t, y = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5], 2
    alpha, T, beta, lam = 0.9, 3.0, 0.8, 1e-3
    loss = SinKDLoss(alpha=alpha, temperature=T, sinkhorn_weight=beta, sinkhorn_scale=lam)
    out = loss(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), torch.tensor([y]))
    ce = -math.log(softmax(s)[y])
    soft_ce = -sum(pt * math.log(ps) for pt, ps in zip(softmax(t, T), softmax(s, T)))  # no T² (official)
    sink = l1(softmax(s, 2.0), softmax(t, 2.0))  # τ_sin = 2; one point each: the only coupling
    assert out["ce"].item() == pytest.approx((1 - alpha) * ce, rel=1e-9)
    assert out["kd"].item() == pytest.approx(alpha * soft_ce, rel=1e-9)
    assert out["sinkhorn"].item() == pytest.approx(beta * lam * sink, rel=1e-9)
    assert out["loss"].item() == pytest.approx((1 - alpha) * ce + alpha * soft_ce + beta * lam * sink, rel=1e-9)


def test_kd_mode_kl_is_tau_squared_kl_and_temperature_override() -> None:
    s, t = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5]
    p_t, p_s = softmax(t, 2.0), softmax(s, 2.0)
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    out = SinKDLoss(alpha=1.0, temperature=5.0, kd_mode="kl")(
        torch.tensor([s], dtype=torch.float64),
        torch.tensor([t], dtype=torch.float64),
        torch.tensor([0]),
        temperature=2.0,
    )
    assert out["kd"].item() == pytest.approx(4.0 * kl, rel=1e-9)
    assert "ce" not in out  # weight 0: left out


def test_sinkd_loss_matches_official_formulation_on_a_batch() -> None:
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(8, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    out = SinKDLoss(temperature=4.0)(s, t, y)
    soft_ce = -(F.softmax(t / 4, -1) * F.log_softmax(s / 4, -1)).sum(-1).mean()
    sink = official_plain_sinkhorn(F.softmax(s / 2, 1), F.softmax(t / 2, 1), 0.1, 20)
    assert out["kd"].item() == pytest.approx(0.9 * soft_ce.item(), rel=1e-9)
    assert out["sinkhorn"].item() == pytest.approx(0.8 * 1e-3 * sink.item(), rel=1e-9)
    assert out["ce"].item() == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-9)


def test_gradients_reach_the_student_only() -> None:
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5, requires_grad=True)
    out = SinKDLoss(alpha=0.0, sinkhorn_weight=1.0, sinkhorn_scale=1.0)(s, t, torch.randint(0, 5, (6,)))
    out["sinkhorn"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_annealed_temperature_is_linear_to_one() -> None:
    assert [annealed_temperature(4.0, e, 5) for e in range(5)] == pytest.approx([4.0, 3.25, 2.5, 1.75, 1.0])
    assert annealed_temperature(4.0, 0, 1) == 4.0  # documented: the official formula divides by zero here
    assert annealed_temperature(4.0, 9, 5) == pytest.approx(1.0)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        SinKDLoss(epsilon=0.0)
    with pytest.raises(ValueError, match="n_iters must be >= 1"):
        SinKDLoss(n_iters=0)
    with pytest.raises(ValueError, match="marginals must be 'unit' or 'uniform'"):
        SinKDLoss(marginals="ones")
    with pytest.raises(ValueError, match="alpha must be in"):
        SinKDLoss(alpha=1.5)
    with pytest.raises(ValueError, match="kd_mode"):
        SinKDLoss(kd_mode="js")
    with pytest.raises(ValueError, match="sinkhorn_temperature: must be a finite number > 0"):
        SinKDLoss(sinkhorn_temperature=0.0)
    with pytest.raises(ValueError, match="square cost matrix"):
        sinkhorn_plan(torch.rand(2, 3), marginals="unit")
    with pytest.raises(ValueError, match="non-empty batch"):
        sinkhorn_distance(torch.rand(0, 3), torch.rand(0, 3))
    with pytest.raises(ValueError, match="student predicts 10 classes and the teacher 100"):
        SinKDLoss()(torch.randn(2, 10), torch.randn(2, 100), torch.tensor([0, 1]))
