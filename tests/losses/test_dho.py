"""DHO losses: hand-computed terms and weights, mixing in probability space, the (α, β) grid search."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.dho import (
    DHO_ALPHA_GRID,
    DHO_BETA_GRID,
    DHOLoss,
    dho_loss,
    mix_heads,
    mixed_log_probs,
    search_mixing,
)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------ training loss
def test_terms_and_official_weights_by_hand() -> None:
    ce_logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    kd_l, t_l = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    kd_u, t_u = torch.tensor([[0.0, 2.0], [4.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    ce = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    tau = 2.0
    kd_labeled = tau**2 * _kl(_softmax([1.0, 0.0]), [0.5, 0.5])  # teacher [2, 0]/τ, student uniform
    kd_unlabeled = tau**2 * (_kl([0.5, 0.5], _softmax([0.0, 1.0])) + _kl([0.5, 0.5], _softmax([2.0, 0.0]))) / 2
    few_shot = dho_loss(ce_logits, y, kd_l, t_l, kd_u, t_u, temperature=tau)
    assert few_shot["ce"].item() == pytest.approx(0.5 * ce, rel=1e-6)
    assert few_shot["kd_labeled"].item() == pytest.approx(0.5 * kd_labeled, rel=1e-6)
    assert few_shot["kd_unlabeled"].item() == pytest.approx(0.5 * kd_unlabeled, rel=1e-6)
    assert few_shot["loss"].item() == pytest.approx(0.5 * ce + 0.5 * (kd_labeled + kd_unlabeled), rel=1e-6)
    imagenet = DHOLoss(tau, 1.0, 1.0, 1.0)(ce_logits, y, kd_l, t_l, kd_u, t_u)
    assert imagenet["loss"].item() == pytest.approx(ce + kd_labeled + kd_unlabeled, rel=1e-6)


def test_parts_average_separately_not_over_the_union() -> None:
    """L_KDl and L_KDu are each a batch mean: with 1 labeled and 3 unlabeled items the labeled item weighs 3x."""
    kd_l, t_l = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    kd_u, t_u = torch.zeros(3, 2), torch.zeros(3, 2)
    out = dho_loss(None, None, kd_l, t_l, kd_u, t_u, temperature=1.0, ce_weight=0.0)
    assert out["kd_unlabeled"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["kd_labeled"].item() == pytest.approx(0.5 * _kl([0.5, 0.5], _softmax([3.0, 0.0])), rel=1e-6)


def test_zero_weight_or_missing_part_drops_the_term() -> None:
    z, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.randint(0, 3, (4,))
    out = dho_loss(z, y, z, t, None, None)
    assert set(out) == {"loss", "ce", "kd_labeled"}
    out = dho_loss(z, y, z, t, z, t, kd_unlabeled_weight=0.0)
    assert set(out) == {"loss", "ce", "kd_labeled"}
    with pytest.raises(KDConfigError, match="weight 0"):
        dho_loss(z, y, z, t, ce_weight=0.0, kd_labeled_weight=0.0)


def test_kd_terms_vanish_when_the_kd_head_equals_the_teacher() -> None:
    z = torch.randn(5, 4)
    out = dho_loss(z, torch.randint(0, 4, (5,)), z, z.clone(), z, z.clone())
    assert out["kd_labeled"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["kd_unlabeled"].item() == pytest.approx(0.0, abs=1e-6)


def test_bad_weight_or_temperature_names_the_argument() -> None:
    with pytest.raises(KDConfigError, match="kd_unlabeled_weight: must be a finite number >= 0"):
        DHOLoss(kd_unlabeled_weight=-1.0)
    with pytest.raises(KDConfigError, match="temperature: must be a finite number > 0"):
        DHOLoss(temperature=0.0)


# ------------------------------------------------------------------ mixing
def test_mixing_is_in_probability_space_by_hand() -> None:
    ce = torch.tensor([[0.0, math.log(3.0)]])  # softmax: [1/4, 3/4]
    kd = torch.tensor([[0.5 * math.log(2.0), 0.0]])  # /β = 0.5 -> [ln 2, 0] -> softmax [2/3, 1/3]
    p = mix_heads(ce, kd, alpha=0.25, beta=0.5)
    want = [0.25 * 0.25 + 0.75 * 2 / 3, 0.25 * 0.75 + 0.75 * 1 / 3]  # [0.5625, 0.4375]
    assert p[0].tolist() == pytest.approx(want, rel=1e-6)
    logit_space = torch.softmax(0.25 * ce + 0.75 * kd / 0.5, -1)  # what DHO does NOT do
    assert not torch.allclose(p, logit_space, atol=1e-3)


def test_log_mixture_is_stable_and_matches_the_mixture() -> None:
    torch.manual_seed(0)
    ce, kd = 5 * torch.randn(6, 7), 5 * torch.randn(6, 7)
    for alpha in (0.0, 0.3, 1.0):
        log_p = mixed_log_probs(ce, kd, alpha, 1.25)
        assert torch.isfinite(log_p).all()
        assert torch.allclose(log_p.exp(), mix_heads(ce, kd, alpha, 1.25), atol=1e-6)
        assert torch.allclose(log_p.exp().sum(-1), torch.ones(6), atol=1e-6)
    assert torch.allclose(mixed_log_probs(ce, kd, 1.0, 2.0), ce.log_softmax(-1), atol=1e-6)
    assert torch.allclose(mixed_log_probs(ce, kd, 0.0, 2.0), (kd / 2).log_softmax(-1), atol=1e-6)


# ------------------------------------------------------------------ search
def test_search_picks_the_only_pair_that_gets_both_items_right() -> None:
    """Item 1 (y=0): CE head p0 = 0.119, KD head p0 = 0.953 at β=1 but 0.679 at β=4.
    Item 2 (y=1): CE head p1 = 0.881, KD head p1 = 0.401 at β=1, 0.475 at β=4.
    α=0 or α=1 get one item right; α=0.5, β=1: p0 = 0.536, p1 = 0.641 (both right); α=0.5, β=4: p0 = 0.399."""
    ce = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    kd = torch.tensor([[3.0, 0.0], [0.4, 0.0]])
    y = torch.tensor([0, 1])
    assert search_mixing(ce, kd, y, alphas=[0.0, 0.5, 1.0], betas=[4.0, 1.0]) == (0.5, 1.0, 1.0)


def test_search_agrees_with_a_brute_force_loop_and_breaks_ties_in_loop_order() -> None:
    torch.manual_seed(1)
    ce, kd, y = torch.randn(40, 5), 3 * torch.randn(40, 5), torch.randint(0, 5, (40,))
    best, first = -1.0, None
    for b in DHO_BETA_GRID:  # the official loop: β outer, α inner, strict improvement
        for a in DHO_ALPHA_GRID:
            p = [
                [a * pc + (1 - a) * pk for pc, pk in zip(_softmax(c), _softmax([v / b for v in k]), strict=True)]
                for c, k in zip(ce.tolist(), kd.tolist(), strict=True)
            ]
            acc = sum(max(range(5), key=row.__getitem__) == t for row, t in zip(p, y.tolist(), strict=True)) / 40
            if acc > best:
                best, first = acc, (a, b)
    alpha, beta, acc = search_mixing(ce, kd, y)
    assert (alpha, beta) == first and acc == pytest.approx(best)
    same = torch.randn(10, 3)  # identical heads at β = 1: every α scores the same
    assert search_mixing(same, same, same.argmax(-1), alphas=[0.7, 0.2], betas=[1.0]) == (0.7, 1.0, 1.0)


def test_official_grids() -> None:
    assert len(DHO_ALPHA_GRID) == 21 and DHO_ALPHA_GRID[0] == 0.0 and DHO_ALPHA_GRID[-1] == 1.0
    assert DHO_ALPHA_GRID[7] == 0.35
    assert DHO_BETA_GRID == (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


def test_search_refuses_bad_grids_and_no_items() -> None:
    z, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    with pytest.raises(KDConfigError, match="alphas: must be in"):
        search_mixing(z, z, y, alphas=[1.5])
    with pytest.raises(KDConfigError, match="betas: must be a finite number > 0"):
        search_mixing(z, z, y, betas=[0.0])
    with pytest.raises(KDConfigError, match="betas: the search grid is empty"):
        search_mixing(z, z, y, betas=[])
    with pytest.raises(KDConfigError, match="no items"):
        search_mixing(z[:0], z[:0], y[:0])
