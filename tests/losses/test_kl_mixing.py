"""MixedKLLoss: hand-computed values for λ = 0, 0.25, 1, its limits (KD, reverse KL), masks, checks."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses import KDLoss
from kd_lightning.losses.kl_mixing import MixedKLLoss


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


S, T, Y = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5], 1
S2, T2, Y2 = [0.0, -1.0, 3.0], [2.0, 0.0, 1.0], 0


def tensors(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def hand(lam: float, tau: float, w_ce: float, w_kd: float, rows=((S, T, Y),)) -> tuple[float, float]:
    """(weighted CE, weighted mixed KD), batch means, from plain Python."""
    ce = sum(-math.log(softmax(s)[y]) for s, _, y in rows) / len(rows)
    mix = sum(
        lam * kl(softmax(s, tau), softmax(t, tau)) + (1 - lam) * kl(softmax(t, tau), softmax(s, tau))
        for s, t, _ in rows
    ) / len(rows)
    return w_ce * ce, w_kd * tau**2 * mix


@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0])
def test_hand_computed_for_lambda_0_quarter_and_1(lam: float) -> None:
    tau, w_ce, w_kd = 2.0, 0.3, 0.7
    rows = ((S, T, Y), (S2, T2, Y2))
    out = MixedKLLoss(reverse_weight=lam, temperature=tau, ce_weight=w_ce, kd_weight=w_kd)(
        tensors(S, S2), tensors(T, T2), torch.tensor([Y, Y2])
    )
    ce, kd = hand(lam, tau, w_ce, w_kd, rows)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-9)
    assert out["loss"].item() == pytest.approx(ce + kd, rel=1e-9)


def test_lambda_zero_is_kdloss_and_lambda_one_is_reverse_kl() -> None:
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    forward = MixedKLLoss(reverse_weight=0.0, temperature=4.0, ce_weight=0.1, kd_weight=0.9)(s, t, y)
    kd = KDLoss(temperature=4.0, ce_weight=0.1, kd_weight=0.9)(s, t, y)
    for name in ("loss", "ce", "kd"):
        assert forward[name].item() == pytest.approx(kd[name].item(), rel=1e-6), name
    reverse = MixedKLLoss(reverse_weight=1.0, temperature=1.0, ce_weight=0.0, kd_weight=1.0)(s, t)
    p_s, p_t = s.softmax(-1).double(), t.softmax(-1).double()
    want = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
    assert reverse["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert "ce" not in reverse  # weight 0: left out


def test_mix_is_linear_in_lambda_and_directions_differ() -> None:
    s, t = tensors(S), tensors(T)
    kd = {lam: MixedKLLoss(lam, 1.0, 0.0, 1.0)(s, t)["kd"].item() for lam in (0.0, 0.25, 1.0)}
    assert kd[0.25] == pytest.approx(0.75 * kd[0.0] + 0.25 * kd[1.0], rel=1e-9)
    assert kd[0.0] != pytest.approx(kd[1.0], rel=1e-3)


def test_zero_at_equality_and_positive_otherwise() -> None:
    z = torch.randn(4, 7)
    loss = MixedKLLoss(0.5, 2.0, 0.0, 1.0)
    assert loss(z, z.clone())["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss(z, torch.randn(4, 7))["loss"].item() > 0


def test_token_batches_with_mask_average_selected_items_only() -> None:
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[True, False, True], [False, True, True]])
    loss = MixedKLLoss(0.25, 2.0, 0.5, 1.0)
    got = loss(s, t, y, mask=mask)
    want = loss(s[mask], t[mask], y[mask])  # the same items as a flat [4, 5] batch
    for name in ("loss", "ce", "kd"):
        assert got[name].item() == pytest.approx(want[name].item(), rel=1e-6), name
    unmasked = loss(s, t, y)
    assert unmasked["loss"].item() == pytest.approx(loss(s.reshape(6, 5), t.reshape(6, 5), y.reshape(6))["loss"].item())


def test_gradient_reaches_student_only() -> None:
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    MixedKLLoss(0.25)(s, t, torch.randint(0, 6, (4,)))["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_half_precision_logits_are_computed_in_float32() -> None:
    s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.randint(0, 4, (3,))
    loss = MixedKLLoss(0.25, 4.0)
    half = loss(s.bfloat16(), t.bfloat16(), y)["loss"]
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(loss(s.bfloat16().float(), t.bfloat16().float(), y)["loss"].item(), rel=1e-5)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="reverse_weight must be in"):
        MixedKLLoss(reverse_weight=1.5)
    with pytest.raises(ValueError, match="temperature: must be a finite number > 0"):
        MixedKLLoss(temperature=0.0)
    with pytest.raises(ValueError, match="needs a target"):
        MixedKLLoss(ce_weight=0.1)(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="do not match"):
        MixedKLLoss()(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="mask must have"):
        MixedKLLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), mask=torch.ones(3, dtype=torch.bool))
