"""Divergence building blocks: hand-computed values, masks, directions."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses.divergences import entropy, forward_kl, kl_divergence, mixed_kl, reduce_items, reverse_kl


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


S, T = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5]


def test_forward_and_reverse_kl_hand_computed() -> None:
    s, t = torch.tensor([S], dtype=torch.float64), torch.tensor([T], dtype=torch.float64)
    assert forward_kl(s, t).item() == pytest.approx(kl(softmax(T), softmax(S)), rel=1e-9)
    assert reverse_kl(s, t).item() == pytest.approx(kl(softmax(S), softmax(T)), rel=1e-9)
    assert forward_kl(s, t).item() != pytest.approx(reverse_kl(s, t).item(), rel=1e-3)


def test_mixed_kl_interpolates_and_checks_weight() -> None:
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    for lam in (0.0, 0.25, 1.0):
        want = lam * reverse_kl(s, t) + (1 - lam) * forward_kl(s, t)
        assert mixed_kl(s, t, reverse_weight=lam).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="reverse_weight"):
        mixed_kl(s, t, reverse_weight=1.5)


def test_temperature_and_zero_at_equality() -> None:
    z = torch.randn(3, 6)
    assert forward_kl(z, z).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(z, 2 * z, temperature=2.0).item() == pytest.approx(kl_divergence(z / 2, z).item(), rel=1e-6)


def test_mask_averages_over_selected_items_only() -> None:
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per_item = forward_kl(s, t, reduction="none")
    assert per_item.shape == (2, 3)
    want = per_item[mask].mean()
    assert forward_kl(s, t, mask=mask).item() == pytest.approx(want.item(), rel=1e-6)
    assert reduce_items(per_item, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="mask must have"):
        forward_kl(s, t, mask=torch.ones(2, 3, 4, dtype=torch.bool))


def test_entropy_hand_computed_and_uniform_maximum() -> None:
    p = softmax(S)
    assert entropy(torch.tensor([S], dtype=torch.float64)).item() == pytest.approx(-sum(x * math.log(x) for x in p))
    assert entropy(torch.zeros(1, 7)).item() == pytest.approx(math.log(7), rel=1e-6)
