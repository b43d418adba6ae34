"""Borup & Andersen self-distillation: the official loss by hand, the closed-form α, the kernel-ridge theory."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses.self_distill import (
    GTSelfDistillLoss,
    kernel_ridge_self_distillation,
    kernel_ridge_self_distillation_limit,
    optimal_alpha,
    parameter_norm_penalty,
    rbf_kernel,
    softmax_mse,
)


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def mse(a: list[list[float]], b: list[list[float]]) -> float:
    values = [(x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(values) / len(values)


S1, T1 = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5]
S2, T2 = [0.0, -1.0, 3.0], [2.0, 0.5, 0.0]


def rows(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------ the loss (official code)
def test_mse_loss_hand_computed_mean_over_batch_and_classes() -> None:
    alpha = 0.6
    out = GTSelfDistillLoss(alpha=alpha)(rows(S1, S2), rows(T1, T2), torch.tensor([1, 0]))
    p = [softmax(S1), softmax(S2)]
    gt = mse(p, [[0, 1, 0], [1, 0, 0]])
    distill = mse(p, [softmax(T1), softmax(T2)])
    assert out["gt"].item() == pytest.approx(alpha * gt, rel=1e-9)
    assert out["distill"].item() == pytest.approx((1 - alpha) * distill, rel=1e-9)
    assert out["loss"].item() == pytest.approx(alpha * gt + (1 - alpha) * distill, rel=1e-9)


def test_alpha_weighs_the_ground_truth() -> None:
    s, t, y = rows(S1), rows(T1), torch.tensor([2])
    only_gt = GTSelfDistillLoss(alpha=1.0)(s, None, y)  # teacher not needed
    assert "distill" not in only_gt  # weight 0: left out
    assert only_gt["loss"].item() == pytest.approx(mse([softmax(S1)], [[0, 0, 1]]), rel=1e-9)
    only_teacher = GTSelfDistillLoss(alpha=0.0)(s, t, y)
    assert "gt" not in only_teacher
    assert only_teacher["loss"].item() == pytest.approx(mse([softmax(S1)], [softmax(T1)]), rel=1e-9)


def test_ce_kl_variant_hand_computed() -> None:
    alpha, tau = 0.3, 2.0
    out = GTSelfDistillLoss(alpha=alpha, loss="ce_kl", temperature=tau)(rows(S1), rows(T1), torch.tensor([1]))
    assert out["gt"].item() == pytest.approx(alpha * -math.log(softmax(S1)[1]), rel=1e-9)
    assert out["distill"].item() == pytest.approx((1 - alpha) * tau**2 * kl(softmax(T1, tau), softmax(S1, tau)))


def test_parameter_norm_penalty_is_sum_of_non_squared_norms() -> None:
    a = torch.tensor([3.0, 4.0])  # norm 5
    b = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # norm 5
    assert parameter_norm_penalty([a, b]).item() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no parameters"):
        parameter_norm_penalty([])


def test_softmax_mse_zero_at_target_and_gradient_to_student_only() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    assert softmax_mse(t.detach(), torch.softmax(t.detach(), -1)).item() == pytest.approx(0.0, abs=1e-12)
    GTSelfDistillLoss(alpha=0.5)(s, t, torch.tensor([0, 1, 2]))["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_parameter_norm_term_with_reg_coef() -> None:
    a, b = torch.tensor([3.0, 4.0], requires_grad=True), torch.tensor([1.0, 0.0])  # b is frozen: left out
    loss = GTSelfDistillLoss(alpha=1.0, reg_coef=0.5)
    out = loss(rows(S1), None, torch.tensor([2]), [a, b])
    assert out["reg"].item() == pytest.approx(0.5 * 5.0)
    assert out["loss"].item() == pytest.approx(out["gt"].item() + 2.5, rel=1e-9)
    with pytest.raises(ValueError, match=r"reg_coef: is 0.5: the penalty needs parameters"):
        loss(rows(S1), None, torch.tensor([2]))
    with pytest.raises(ValueError, match=r"reg_coef: must be a finite number >= 0"):
        GTSelfDistillLoss(reg_coef=-1.0)


def test_bad_arguments_named() -> None:
    with pytest.raises(ValueError, match="ground-truth weight"):
        GTSelfDistillLoss(alpha=-0.1)
    with pytest.raises(ValueError, match="loss must be"):
        GTSelfDistillLoss(loss="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="teacher_logits are needed"):
        GTSelfDistillLoss(alpha=0.5)(rows(S1), None, torch.tensor([0]))


# ------------------------------------------------------------------------------------ closed-form α
def test_optimal_alpha_matches_a_grid_search() -> None:
    g = torch.Generator().manual_seed(0)
    p0 = torch.softmax(torch.randn(50, 5, generator=g), -1)
    p1 = torch.softmax(3 * torch.randn(50, 5, generator=g), -1)
    y = torch.randint(0, 5, (50,), generator=g)
    z = torch.nn.functional.one_hot(y, 5).double()
    grid = torch.linspace(-1, 2, 30001, dtype=torch.float64)
    mixed = (1 - grid)[:, None, None] * p0.double() + grid[:, None, None] * p1.double()
    losses = (mixed - z).pow(2).sum((1, 2))
    best = grid[losses.argmin()].item()
    assert optimal_alpha(p0, p1, y, clip=False) == pytest.approx(best, abs=2e-4)
    assert optimal_alpha(p0, p1, z) == pytest.approx(min(max(best, 0.0), 1.0), abs=2e-4)


def test_optimal_alpha_clips_and_handles_identical_predictions() -> None:
    p0 = torch.tensor([[0.5, 0.5]])
    assert optimal_alpha(p0, torch.tensor([[0.6, 0.4]]), torch.tensor([0])) == 1.0  # unclipped 5
    assert optimal_alpha(p0, torch.tensor([[0.6, 0.4]]), torch.tensor([0]), clip=False) == pytest.approx(5.0)
    assert optimal_alpha(p0, torch.tensor([[0.6, 0.4]]), torch.tensor([1])) == 0.0
    assert optimal_alpha(p0, p0.clone(), torch.tensor([0])) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        optimal_alpha(p0, torch.zeros(2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="class indices"):
        optimal_alpha(p0, p0, torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------ kernel ridge (official notebook)
#: Mobahi et al. (2020)'s 11 noisy sinusoid points, as in the official toy_example.ipynb.
TOY_X = torch.arange(0, 11, dtype=torch.float64).reshape(-1, 1) / 10
TOY_Y = torch.tensor(
    [0.38476636465198066, 1.2333967683416893, 1.33232242218057, 0.6920159488889518, -0.29756145531871736,
     -0.24189291901377769, -0.7964485769175675, -0.9616480167034174, -0.49672509509916934, -0.3469066003991437,
     0.5589512650600734],
    dtype=torch.float64,
)  # fmt: skip


def tiny_problem() -> tuple[torch.Tensor, torch.Tensor, float]:
    return rbf_kernel(TOY_X, TOY_X, gamma=80.0), TOY_Y, 0.2


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_recursion_equals_the_closed_form_sum(alpha: float) -> None:
    """ŷ^(τ) = [α Σ_{k<τ} (1−α)^k A^{k+1} + (1−α)^τ A^{τ+1}] y with A = K (K + λI)^{-1}."""
    gram, y, lam = tiny_problem()
    a = gram @ torch.linalg.inv(gram + lam * torch.eye(11, dtype=torch.float64))
    preds = kernel_ridge_self_distillation(gram, y, lam, alpha, steps=5)
    for tau, pred in enumerate(preds):
        operator = sum(alpha * (1 - alpha) ** k * torch.linalg.matrix_power(a, k + 1) for k in range(tau))
        operator = operator + (1 - alpha) ** tau * torch.linalg.matrix_power(a, tau + 1)
        assert torch.allclose(pred, operator @ y, atol=1e-10), tau


def test_recursion_equals_the_diagonal_form() -> None:
    """ŷ^(τ) = V B^(τ) Vᵀ y with B^(0) = D(D+λI)^{-1}, B^(τ) = B^(0)((1−α)B^(τ−1) + αI)."""
    gram, y, lam = tiny_problem()
    alpha = 0.35
    d, v = torch.linalg.eigh(gram)
    b0 = d / (d + lam)
    b = b0.clone()
    preds = kernel_ridge_self_distillation(gram, y, lam, alpha, steps=6)
    for tau, pred in enumerate(preds):
        if tau > 0:
            b = b0 * ((1 - alpha) * b + alpha)
        assert torch.allclose(pred, v @ torch.diag(b) @ v.T @ y, atol=1e-10), tau


def test_limit_is_ridge_with_lambda_over_alpha() -> None:
    gram, y, lam = tiny_problem()
    alpha = 0.35
    many = kernel_ridge_self_distillation(gram, y, lam, alpha, steps=300)[-1]
    limit = kernel_ridge_self_distillation_limit(gram, y, lam, alpha)
    ridge = gram @ torch.linalg.solve(gram + lam / alpha * torch.eye(11, dtype=torch.float64), y)
    assert torch.allclose(limit, ridge, atol=1e-12)
    assert torch.allclose(many, limit, atol=1e-8)


def test_without_ground_truth_the_fit_collapses_small_eigendirections_first() -> None:
    gram, y, lam = tiny_problem()
    preds = kernel_ridge_self_distillation(gram, y, lam, alpha=0.0, steps=400)
    assert preds[-1].abs().max() < 1e-3 * preds[0].abs().max()
    d, v = torch.linalg.eigh(gram)
    coefficients = [(v.T @ p).abs() / (v.T @ y).abs() for p in (preds[0], preds[3])]
    shrink = coefficients[1] / coefficients[0]  # = (d/(d+λ))^3: smaller for small eigenvalues
    assert torch.allclose(shrink, (d / (d + lam)) ** 3, rtol=1e-6)
    assert (shrink.diff() >= -1e-12).all()  # eigenvalues ascending -> shrink factors ascending


def test_reproduces_the_official_readme_losses() -> None:
    """Official README table: MSE to sin(2πx) on x = 0, 0.01, ..., 1 for steps 1-6 and the limit (γ=80, λ=0.2)."""
    gram, y, lam = tiny_problem()
    x = torch.arange(0, 101, dtype=torch.float64).reshape(-1, 1) / 100
    truth = torch.sin(2 * math.pi * x.squeeze(1))
    k_eval = rbf_kernel(x, TOY_X, gamma=80.0)
    expected = {
        0.0: ([0.16477, 0.15076, 0.14915, 0.15561, 0.16735, 0.18251], 0.49505),
        0.35: ([0.16477, 0.15424, 0.15089, 0.14983, 0.14954, 0.14948], 0.14959),
    }
    for alpha, (steps, limit) in expected.items():
        preds = kernel_ridge_self_distillation(gram, y, lam, alpha, steps=5, eval_kernel=k_eval)
        got = [(p - truth).pow(2).mean().item() for p in preds]
        assert got == pytest.approx(steps, abs=6e-6), alpha
        lim = kernel_ridge_self_distillation_limit(gram, y, lam, alpha, eval_kernel=k_eval)
        assert (lim - truth).pow(2).mean().item() == pytest.approx(limit, abs=6e-6)


def test_optimal_alpha_is_exact_for_kernel_ridge() -> None:
    """ŷ^(τ) is affine in α: the closed form on (α=0, α=1) predictions is the true minimiser."""
    gram, y, lam = tiny_problem()
    x = torch.arange(0, 101, dtype=torch.float64).reshape(-1, 1) / 100
    truth = torch.sin(2 * math.pi * x.squeeze(1))
    k_eval = rbf_kernel(x, TOY_X, gamma=80.0)
    previous = kernel_ridge_self_distillation(gram, y, lam, 0.35, steps=2)[-1]  # ŷ^(τ−1) on the training points
    solve = torch.linalg.inv(gram + lam * torch.eye(11, dtype=torch.float64))

    def step(alpha: torch.Tensor) -> torch.Tensor:  # the next fit for each α of a grid: [M, G]
        return k_eval @ solve @ (y[:, None] * alpha + previous[:, None] * (1 - alpha))

    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    best = optimal_alpha(step(ends)[:, 0], step(ends)[:, 1], truth, clip=False)
    grid = torch.linspace(-0.5, 1.5, 20001, dtype=torch.float64)
    losses = (step(grid) - truth[:, None]).pow(2).sum(0)
    assert best == pytest.approx(grid[losses.argmin()].item(), abs=2e-4)


def test_kernel_arguments_checked() -> None:
    gram, y, lam = tiny_problem()
    with pytest.raises(ValueError, match="square"):
        kernel_ridge_self_distillation(gram[:3], y, lam, 0.5, 1)
    with pytest.raises(ValueError, match="ridge"):
        kernel_ridge_self_distillation_limit(gram, y, 0.0, 0.5)
    with pytest.raises(ValueError, match="rows"):
        kernel_ridge_self_distillation(gram, y[:3], lam, 0.5, 1)
