"""BOOT's loss (losses/boot.py): hand-checked targets, the zero at the teacher's ODE solution, stop-gradient, the
boundary term, float64 λ with clipping, the same ε at s and t."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.boot import boot_grid, boot_loss, bootstrap_target, log_snr_lambda, step_coefficient

# A small VP schedule: ᾱ decreasing from ~1 to ~0 over 11 timesteps.
ABAR = torch.tensor([0.999, 0.99, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.03, 0.005], dtype=torch.float64)


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ABAR[t].sqrt(), (1 - ABAR[t]).sqrt()


def teacher(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear stand-in for a teacher's data prediction f(x_t, t)."""
    scale = (0.5 + t.to(x.dtype) / 10).view(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x) * scale + 0.1


def lambdas() -> torch.Tensor:
    return log_snr_lambda(ABAR)


def trajectory(eps: torch.Tensor, grid: torch.Tensor, solver: str) -> dict[int, torch.Tensor]:
    """The teacher's signal trajectory through ``eps`` on ``grid``: y_T = f(ε, T), then one step per grid interval."""
    lam = lambdas()
    t_last = grid[-1].expand(eps.shape[0])
    ys = {int(grid[-1]): teacher(eps, t_last)}
    for n in range(len(grid) - 1, 0, -1):
        t, s = int(grid[n]), int(grid[n - 1])
        tb = torch.full((eps.shape[0],), t)
        a, sg = alpha_sigma(tb)
        y = ys[t]
        x = a.float().view(-1, 1) * y + sg.float().view(-1, 1) * eps
        delta = (lam[t] - lam[s]).expand(eps.shape[0])
        ys[s] = bootstrap_target(y, teacher(x, tb), delta, solver)
    return ys


def lookup_student(ys: dict[int, torch.Tensor]):
    """A 'student' that returns the trajectory: g(ε, t) = y_t (for the ε it was built for)."""

    def student(eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([ys[int(ti)][i] for i, ti in enumerate(t)])

    return student


def batch_times(grid: torch.Tensor, n: torch.Tensor):
    t, s = grid[n], grid[n - 1]
    a, sg = alpha_sigma(t)
    lam = lambdas()
    return t, s, a, sg, lam[t] - lam[s]


def test_step_coefficients_and_target_by_hand() -> None:
    delta = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.allclose(step_coefficient(delta, "euler"), delta)
    assert torch.allclose(
        step_coefficient(delta, "ddim"), torch.tensor([1 - math.exp(-0.5), 1 - math.exp(-2.0)]).double()
    )
    y_t = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    f = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # Euler: y + δ (f − y): row 0 with δ = 0.5 -> [2, 1]; row 1 with δ = 2 -> [2, 3]
    assert torch.allclose(bootstrap_target(y_t, f, delta, "euler"), torch.tensor([[2.0, 1.0], [2.0, 3.0]]))
    c = 1 - math.exp(-0.5)
    assert torch.allclose(bootstrap_target(y_t[:1], f[:1], delta[:1], "ddim"), torch.tensor([[1 + 2 * c, 2 - 2 * c]]))


def test_lambda_is_float64_and_clipped() -> None:
    abar = torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=torch.float64)
    lam = log_snr_lambda(abar, lambda_min=-7.0, lambda_max=9.0)
    assert lam.dtype == torch.float64
    assert lam[0] == -7.0 and lam[3] == 9.0  # ᾱ = 1 -> -inf, ᾱ = 0 -> +inf: clipped
    assert lam[1] == 0.0
    assert math.isclose(float(lam[2]), 0.5 * math.log(0.8 / 0.2), rel_tol=1e-12)
    # Close to the clean end the float64 computation still tells two timesteps apart (float32 would not).
    near = torch.tensor([1 - 1e-10, 1 - 2e-10], dtype=torch.float64)
    lam_near = log_snr_lambda(near, lambda_min=None, lambda_max=None)
    assert math.isclose(float(lam_near[1] - lam_near[0]), 0.5 * math.log(2.0), rel_tol=1e-5)


def test_zero_delta_from_clipping_gives_no_nan() -> None:
    eps = torch.randn(2, 3)
    t = torch.tensor([10, 10])
    s = torch.tensor([9, 9])
    a, sg = alpha_sigma(t)
    delta = torch.zeros(2, dtype=torch.float64)  # both ends clipped to the same λ
    out = boot_loss(lambda e, tt: e * 0.3, teacher, eps, t, s, a, sg, delta, t_boundary=None)
    assert torch.isfinite(out["loss"]) and out["bootstrap"] == 0


@pytest.mark.parametrize("solver", ["euler", "ddim"])
def test_zero_when_student_is_the_teachers_solution(solver: str) -> None:
    torch.manual_seed(0)
    grid = boot_grid(11, 5)  # [0, 2, 4, 6, 8, 10]
    eps = torch.randn(6, 4)
    ys = trajectory(eps, grid, solver)
    n = torch.tensor([1, 2, 3, 4, 5, 3])
    t, s, a, sg, delta = batch_times(grid, n)
    out = boot_loss(lookup_student(ys), teacher, eps, t, s, a, sg, delta, t_boundary=int(grid[-1]), solver=solver)
    assert float(out["bootstrap"]) < 1e-10 and float(out["boundary"]) < 1e-12
    # The other solver's trajectory is not a fixed point: the loss sees the difference.
    other = "ddim" if solver == "euler" else "euler"
    out_other = boot_loss(lookup_student(ys), teacher, eps, t, s, a, sg, delta, t_boundary=int(grid[-1]), solver=other)
    assert float(out_other["bootstrap"]) > 1e-4


def test_bootstrap_value_by_hand_with_normalisation() -> None:
    eps = torch.tensor([[0.5, -1.0]])
    t, s = torch.tensor([6]), torch.tensor([4])
    a, sg = alpha_sigma(t)
    lam = lambdas()
    delta = (lam[6] - lam[4]).reshape(1)

    def student(e: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return e * (1.0 + tt.float().view(-1, 1) / 10)

    y_t = eps * 1.6
    x_t = float(a) * y_t + float(sg) * eps
    target = y_t + float(delta) * (teacher(x_t, t) - y_t)
    y_s = eps * 1.4
    expected = ((y_s - target) ** 2).mean() / float(delta) ** 2
    out = boot_loss(student, teacher, eps, t, s, a, sg, delta, t_boundary=None)
    assert torch.allclose(out["bootstrap"], expected, rtol=1e-5)
    out_none = boot_loss(student, teacher, eps, t, s, a, sg, delta, t_boundary=None, normalization="none")
    assert torch.allclose(out_none["bootstrap"], expected * float(delta) ** 2, rtol=1e-5)


def test_stop_gradient_only_the_s_branch_gets_gradient() -> None:
    theta = torch.nn.Parameter(torch.tensor(0.7))
    seen_requires_grad = []

    def student(e: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return theta * e * (1 + tt.float().view(-1, 1))

    def recording_teacher(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        seen_requires_grad.append(x.requires_grad)
        return teacher(x, tt)

    eps = torch.tensor([[0.3, -0.2, 1.0]])
    t, s = torch.tensor([5]), torch.tensor([3])
    a, sg = alpha_sigma(t)
    lam = lambdas()
    delta = (lam[5] - lam[3]).reshape(1)
    out = boot_loss(student, recording_teacher, eps, t, s, a, sg, delta, t_boundary=None)
    out["loss"].backward()
    assert seen_requires_grad == [False]
    # Expected gradient: the target is a constant; only g(ε, s) = θ ε (1 + s) depends on θ.
    with torch.no_grad():
        y_t = 0.7 * eps * 6
        target = y_t + float(delta) * (teacher(float(a) * y_t + float(sg) * eps, t) - y_t)
        y_s = 0.7 * eps * 4
        grad = (2 * (y_s - target) * eps * 4).mean() / float(delta) ** 2
    assert torch.allclose(theta.grad, grad, rtol=1e-5)


def test_boundary_term_at_T() -> None:
    eps = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording_teacher(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        calls.append((x.clone(), tt.clone()))
        return teacher(x, tt)

    def student(e: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return e * 0.25

    t, s = torch.tensor([4, 6]), torch.tensor([2, 4])
    a, sg = alpha_sigma(t)
    lam = lambdas()
    delta = lam[t] - lam[s]
    out = boot_loss(student, recording_teacher, eps, t, s, a, sg, delta, t_boundary=10, bootstrap_weight=0.0)
    assert set(out) == {"loss", "boundary"}
    assert len(calls) == 1 and torch.equal(calls[0][0], eps) and calls[0][1].tolist() == [10, 10]  # x_T = ε
    expected = ((eps * 0.25 - teacher(eps, torch.tensor([10, 10]))) ** 2).mean()
    assert torch.allclose(out["boundary"], expected)
    calls.clear()
    a_T, s_T = (float(v) for v in alpha_sigma(torch.tensor([10])))
    boot_loss(
        student, recording_teacher, eps, t, s, a, sg, delta, t_boundary=10, bootstrap_weight=0.0,
        boundary_input="student", alpha_boundary=a_T, sigma_boundary=s_T,
    )  # fmt: skip
    assert torch.allclose(calls[0][0], a_T * eps * 0.25 + s_T * eps)


def test_same_eps_at_s_and_t() -> None:
    calls: list[tuple[torch.Tensor, list[int]]] = []

    def student(e: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        calls.append((e, tt.tolist()))
        return e * 0.5

    eps = torch.randn(3, 2)
    grid = boot_grid(11, 5)
    n = torch.tensor([1, 3, 5])
    t, s, a, sg, delta = batch_times(grid, n)
    boot_loss(student, teacher, eps, t, s, a, sg, delta, t_boundary=10)
    assert [c[1] for c in calls] == [t.tolist(), s.tolist(), [10, 10, 10]]
    assert all(c[0] is eps for c in calls)


def test_grid_and_bad_arguments() -> None:
    assert boot_grid(1000, 4).tolist() == [0, 250, 500, 749, 999]
    with pytest.raises(KDConfigError, match="num_steps"):
        boot_grid(11, 20)
    eps = torch.randn(1, 2)
    t, s = torch.tensor([4]), torch.tensor([2])
    a, sg = alpha_sigma(t)
    delta = torch.ones(1, dtype=torch.float64)
    with pytest.raises(KDConfigError, match="solver"):
        boot_loss(lambda e, tt: e, teacher, eps, t, s, a, sg, delta, solver="rk4")  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match="boundary_weight"):
        boot_loss(lambda e, tt: e, teacher, eps, t, s, a, sg, delta, boundary_weight=-1.0)
