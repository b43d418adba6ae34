"""SKD loss (RECONSTRUCTION): hand-computed values, the alpha/temperature limits, gradients, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses.skd import SKDLoss


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


S1, T1 = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5]
S2, T2 = [0.0, -1.0, 3.0], [1.0, -1.0, 0.0]


def tensors(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_hand_computed_two_frames_default_tau_alpha() -> None:
    tau, alpha = 4.0, 0.3
    target = [1, 2]
    ce = (-math.log(softmax(S1)[1]) - math.log(softmax(S2)[2])) / 2
    kd = tau**2 * (kl(softmax(T1, tau), softmax(S1, tau)) + kl(softmax(T2, tau), softmax(S2, tau))) / 2  # batchmean
    out = SKDLoss()(tensors(S1, S2), tensors(T1, T2), torch.tensor(target))
    assert sorted(out) == ["ce", "kd", "loss"]
    assert out["ce"].item() == pytest.approx(alpha * ce, rel=1e-9)
    assert out["kd"].item() == pytest.approx((1 - alpha) * kd, rel=1e-9)
    assert out["loss"].item() == pytest.approx(alpha * ce + (1 - alpha) * kd, rel=1e-9)


def test_alpha_one_is_cross_entropy_and_alpha_zero_is_pure_soft_targets() -> None:
    s, t, y = tensors(S1), tensors(T1), torch.tensor([0])
    assert SKDLoss(alpha=1.0)(s, t, y)["loss"].item() == pytest.approx(-math.log(softmax(S1)[0]), rel=1e-9)
    soft = SKDLoss(temperature=2.0, alpha=0.0)(s, t, y)
    assert "ce" not in soft  # weight 0: left out
    assert soft["loss"].item() == pytest.approx(4.0 * kl(softmax(T1, 2.0), softmax(S1, 2.0)), rel=1e-9)


def test_soft_term_vanishes_when_student_matches_teacher() -> None:
    z = torch.randn(6, 11)
    out = SKDLoss()(z, z.clone(), torch.randint(0, 11, (6,)))
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["ce"].item())


def test_gradient_reaches_the_student_only() -> None:
    s = torch.randn(4, 11, requires_grad=True)
    t = torch.randn(4, 11, requires_grad=True)
    SKDLoss()(s, t, torch.randint(0, 11, (4,)))["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_half_precision_logits_are_computed_in_float32() -> None:
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    full = SKDLoss()(s, t, y)["loss"]
    half = SKDLoss()(s.bfloat16(), t.bfloat16(), y)["loss"]
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=2e-2)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="alpha must be in"):
        SKDLoss(alpha=1.5)
    with pytest.raises(ValueError, match="temperature: must be a finite number > 0"):
        SKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        SKDLoss()(torch.randn(2, 11), torch.randn(2, 10), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        SKDLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
