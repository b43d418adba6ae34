"""AdaKD: hand-computed scores, IDTS temperatures, LATF selection and ratio schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kd_lightning.losses.adakd import AdaKDLoss, adakd_difficulty, idts_temperatures, select_hardest
from kd_lightning.losses.divergences import forward_kl, reverse_kl


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def hellinger(s: list[float], t: list[float]) -> float:
    ps, pt = softmax(s), softmax(t)
    return math.sqrt(sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in zip(ps, pt))) / math.sqrt(2)


def idts(score: float, median: float, base: float, c: float, soften: bool = False) -> float:
    sign = 1 if soften else -1
    return base * math.exp(sign * c * math.tanh(math.log(score / median)))


STUDENT = [[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [0.3, 0.2, 0.1], [2.0, -1.0, 0.0]]
TEACHER = [[0.2, 1.0, -0.5], [1.0, -1.0, 0.0], [0.3, 0.25, 0.1], [-1.0, 2.0, 0.5]]


def tensors(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- scores
def test_hellinger_and_kl_scores_hand_computed() -> None:
    s, t = tensors(STUDENT), tensors(TEACHER)
    got = adakd_difficulty(s, t, "hellinger")
    assert got.tolist() == pytest.approx([hellinger(a, b) for a, b in zip(STUDENT, TEACHER)], rel=1e-9)
    assert ((got >= 0) & (got <= 1)).all()
    rkl = adakd_difficulty(s, t, "reverse_kl")
    assert rkl.tolist() == pytest.approx([kl(softmax(a), softmax(b)) for a, b in zip(STUDENT, TEACHER)], rel=1e-9)
    fkl = adakd_difficulty(s, t, "forward_kl")
    assert fkl.tolist() == pytest.approx([kl(softmax(b), softmax(a)) for a, b in zip(STUDENT, TEACHER)], rel=1e-9)


def test_scores_carry_no_gradient() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    assert not adakd_difficulty(s, torch.randn(3, 4)).requires_grad


# ----------------------------------------------------------------------------------- temperatures
def test_idts_temperatures_hand_computed_median_item_gets_base() -> None:
    scores = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)
    got = idts_temperatures(scores, base_temperature=2.0, scale=0.5, eps=0.0)
    assert got.tolist() == pytest.approx([idts(s, 0.2, 2.0, 0.5) for s in (0.1, 0.2, 0.4)], rel=1e-12)
    assert got[1].item() == 2.0  # the median item
    assert got[2] < 2.0 < got[0]  # harder -> lower temperature
    soft = idts_temperatures(scores, base_temperature=2.0, scale=0.5, soften=True, eps=0.0)
    assert soft.tolist() == pytest.approx([idts(s, 0.2, 2.0, 0.5, soften=True) for s in (0.1, 0.2, 0.4)])
    assert soft[2] > 2.0 > soft[0]  # ablation: harder -> higher temperature
    # bounded by T_base·exp(±c) (tanh ∈ (−1, 1))
    extreme = idts_temperatures(torch.tensor([1e-9, 1.0, 1e9]), base_temperature=1.0, scale=0.5)
    assert extreme.min() > math.exp(-0.5) - 1e-6 and extreme.max() < math.exp(0.5) + 1e-6


def test_idts_median_over_valid_items_and_equal_or_zero_scores_give_base() -> None:
    scores = torch.tensor([0.1, 0.3, 0.9, 100.0], dtype=torch.float64)
    mask = torch.tensor([True, True, True, False])
    got = idts_temperatures(scores, 1.0, 0.6, mask=mask, eps=0.0)
    assert got[:3].tolist() == pytest.approx([idts(s, 0.3, 1.0, 0.6) for s in (0.1, 0.3, 0.9)], rel=1e-12)
    assert got[3].item() == 1.0  # not valid: T_base
    assert idts_temperatures(torch.full((5,), 0.7), 3.0, 0.5).tolist() == pytest.approx([3.0] * 5)
    assert idts_temperatures(torch.zeros(4), 3.0, 0.5).tolist() == pytest.approx([3.0] * 4)


# -------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize(("ratio", "n_valid", "expected"), [(1.0, 7, 7), (0.5, 7, 3), (0.3, 10, 3), (0.05, 7, 1)])
def test_selection_picks_exactly_max1_floor_r_nvalid_hardest(ratio: float, n_valid: int, expected: int) -> None:
    torch.manual_seed(0)
    scores = torch.rand(10)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:n_valid] = True
    selected = select_hardest(scores, ratio, mask)
    assert int(selected.sum()) == expected == max(1, math.floor(ratio * n_valid))
    assert not (selected & ~mask).any()
    chosen, rest = scores[selected], scores[mask & ~selected]
    assert rest.numel() == 0 or chosen.min() > rest.max()  # the hardest valid ones


def test_masked_items_are_never_selected_even_when_hardest() -> None:
    scores = torch.tensor([[0.1, 9.0, 0.2], [8.0, 0.3, 0.4]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    selected = select_hardest(scores, 0.5, mask)  # 4 valid items -> the 2 hardest valid ones (0.3, 0.4)
    assert selected.tolist() == [[False, False, False], [False, True, True]]
    assert not select_hardest(scores, 1.0, torch.zeros_like(mask)).any()


# ------------------------------------------------------------------------------------------- loss
def test_full_loss_hand_computed_with_selection_and_temperatures() -> None:
    criterion = AdaKDLoss(divergence="reverse_kl", score="hellinger", base_temperature=2.0, temperature_scale=0.5)
    criterion.ratio.fill_(0.75)  # 4 items -> 3 selected
    scores = [hellinger(a, b) for a, b in zip(STUDENT, TEACHER)]
    chosen = sorted(range(4), key=lambda i: -scores[i])[:3]
    median = sorted(scores[i] for i in chosen)[1]
    total = 0.0
    for i in chosen:
        temp = idts(scores[i], median, 2.0, 0.5)
        total += temp**2 * kl(softmax(STUDENT[i], temp), softmax(TEACHER[i], temp))
    out = criterion(tensors(STUDENT), tensors(TEACHER))
    assert out["adakd"].item() == pytest.approx(total / 3, rel=1e-6)  # mean over the selected, not over all
    assert out["loss"].item() == pytest.approx(out["adakd"].item())
    assert criterion.last_selected_fraction == pytest.approx(0.75)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_latf_and_idts_off_is_the_plain_divergence_at_base_temperature(divergence: str) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    mask = torch.rand(2, 5) > 0.3
    criterion = AdaKDLoss(divergence=divergence, latf=False, idts=False, base_temperature=3.0)
    criterion.ratio.fill_(0.2)  # ignored without LATF
    plain = {"reverse_kl": reverse_kl, "forward_kl": forward_kl}[divergence](s, t, temperature=3.0, mask=mask)
    assert criterion(s, t, mask=mask)["loss"].item() == pytest.approx(9.0 * plain.item(), rel=1e-9)


def test_token_batch_masked_tokens_are_never_selected_nor_counted() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    s[~mask] = 50 * torch.randn_like(s[~mask])  # masked tokens: by far the largest discrepancy
    criterion = AdaKDLoss()
    criterion.ratio.fill_(0.4)  # 5 valid tokens -> 2 selected
    per_item, selected, _ = criterion.distillation_terms(s, t, mask)
    assert int(selected.sum()) == 2 and not (selected & ~mask).any()
    assert (per_item[~selected] == 0).all()
    loss = criterion(s, t, mask=mask)["loss"]
    s2 = s.clone()
    s2[~mask] = 0.0
    assert criterion(s2, t, mask=mask)["loss"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_gradient_reaches_student_only_and_is_finite() -> None:
    for detach in (True, False):
        s = torch.randn(6, 5, requires_grad=True)
        t = torch.randn(6, 5, requires_grad=True)
        criterion = AdaKDLoss(detach_temperature=detach, kd_ratio=0.8)
        criterion.ratio.fill_(0.5)
        criterion(s, t, torch.randint(0, 5, (6,)))["loss"].backward()
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
        assert t.grad is None
    same = torch.randn(3, 4, requires_grad=True)  # zero discrepancy: Hellinger's sqrt at 0 must not give NaN
    AdaKDLoss(detach_temperature=False)(same, same.detach().clone())["loss"].backward()
    assert torch.isfinite(same.grad).all()


def test_cross_entropy_part_and_weights() -> None:
    criterion = AdaKDLoss(kd_ratio=0.7, latf=False, idts=False)
    s, t, y = tensors(STUDENT), tensors(TEACHER), torch.tensor([1, 2, 0, 0])
    out = criterion(s, t, y)
    ce = sum(-math.log(softmax(row)[label]) for row, label in zip(STUDENT, y.tolist())) / 4
    rkl = sum(kl(softmax(a), softmax(b)) for a, b in zip(STUDENT, TEACHER)) / 4
    assert out["ce"].item() == pytest.approx(0.3 * ce, rel=1e-6)
    assert out["adakd"].item() == pytest.approx(0.7 * rkl, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.3 * ce + 0.7 * rkl, rel=1e-6)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="min_ratio must be in"):
        AdaKDLoss(min_ratio=0.0)
    with pytest.raises(ValueError, match="initial_ratio must be in"):
        AdaKDLoss(min_ratio=0.5, initial_ratio=0.2)
    with pytest.raises(ValueError, match="divergence must be one of"):
        AdaKDLoss(divergence="tvd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base_temperature: must be a finite number > 0"):
        AdaKDLoss(base_temperature=0.0)
    with pytest.raises(ValueError, match="mask must have the items' shape"):
        AdaKDLoss()(torch.randn(2, 3, 4), torch.randn(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pass target"):
        AdaKDLoss(kd_ratio=0.5)(torch.randn(2, 3), torch.randn(2, 3))


# ----------------------------------------------------------------------------------- LATF schedule
def test_latf_update_hand_computed() -> None:
    criterion = AdaKDLoss(ema_decay=0.0, loss_tolerance=0.1, ratio_step=0.5, min_ratio=0.1, warmup_fraction=0.1)
    criterion.update_ratio(2.0, progress=0.05)  # warm-up: EMA only
    assert not criterion.has_reference and criterion.ratio.item() == 1.0
    criterion.update_ratio(1.0, progress=0.2)  # first step after warm-up: reference := EMA
    assert criterion.has_reference and criterion.reference.item() == 1.0 and criterion.ratio.item() == 1.0
    criterion.update_ratio(0.95, 0.3)  # fell 5% < ε: nothing moves
    assert criterion.ratio.item() == 1.0 and criterion.reference.item() == 1.0
    criterion.update_ratio(0.8, 0.4)  # fell 20%: r·(1 − σ), new reference
    assert criterion.ratio.item() == pytest.approx(0.5) and criterion.reference.item() == pytest.approx(0.8)
    criterion.update_ratio(0.9, 0.5)  # rose 12.5% > ε: r·(1 + σ)
    assert criterion.ratio.item() == pytest.approx(0.75) and criterion.reference.item() == pytest.approx(0.9)


def test_ema_is_seeded_by_the_first_loss_then_decays() -> None:
    criterion = AdaKDLoss(ema_decay=0.99)
    criterion.update_ratio(3.0, 0.0)
    criterion.update_ratio(1.0, 0.0)
    assert criterion.ema.item() == pytest.approx(0.99 * 3.0 + 0.01 * 1.0)


def test_ratio_shrinks_on_falling_loss_and_grows_back_on_rising_loss_within_bounds() -> None:
    criterion = AdaKDLoss(min_ratio=0.3, warmup_fraction=0.0)
    steps = 1500
    ratios = []
    for step in range(steps):
        criterion.update_ratio(10.0 * 0.995**step, progress=(step + 1) / (2 * steps))
        ratios.append(criterion.ratio.item())
    assert all(b <= a + 1e-7 for a, b in itertools.pairwise(ratios))  # never grows while the loss falls
    assert ratios[-1] == pytest.approx(0.3)  # reached r_min and stays there
    low = ratios[-1]
    for step in range(steps):
        criterion.update_ratio(10.0 * 0.995 ** (steps - step), progress=0.5 + (step + 1) / (2 * steps))
        ratios.append(criterion.ratio.item())
    assert ratios[-1] == pytest.approx(1.0) and ratios[-1] > low  # grew back, capped at 1
    assert all(0.3 - 1e-7 <= r <= 1.0 + 1e-7 for r in ratios)


def test_latf_off_keeps_ratio_and_state_in_state_dict() -> None:
    criterion = AdaKDLoss(latf=False, warmup_fraction=0.0)
    for step in range(50):
        criterion.update_ratio(10.0 / (step + 1), 0.5)
    assert criterion.ratio.item() == 1.0
    assert set(AdaKDLoss().state_dict()) == {"ratio", "ema", "reference", "has_reference", "num_updates"}


def test_update_schedule_averages_recorded_calls() -> None:
    criterion = AdaKDLoss(ema_decay=0.5)
    values = [criterion(torch.randn(4, 5), torch.randn(4, 5))["adakd"].item() for _ in range(3)]
    assert criterion.update_schedule(0.0)
    assert criterion.ema.item() == pytest.approx(sum(values) / 3, rel=1e-6)
    assert not criterion.update_schedule(0.1)
