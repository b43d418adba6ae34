"""BiLD and the DBiLD-style reconstruction: hand-computed pair distributions, index choice, properties."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses.bild import (
    BiLDLoss,
    DBiLDLoss,
    dynamic_k,
    dynamic_logit_difference_kl,
    logit_difference_kl,
    pair_differences,
)


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def pair_kl_by_hand(s: list[float], t: list[float], order: list[int], tau: float, reverse: bool = False) -> float:
    """KL between the pair-difference distributions of the classes in ``order`` (i < j in that order)."""
    pairs = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
    p_t = softmax([(t[i] - t[j]) / tau for i, j in pairs])
    p_s = softmax([(s[i] - s[j]) / tau for i, j in pairs])
    return kl(p_s, p_t) if reverse else kl(p_t, p_s)


def descending(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


T = [3.0, 1.0, 2.0, 0.0]
S = [1.0, 2.0, 0.5, 1.5]
TAU = 3.0


def rows(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------- BiLD
def test_pair_differences_upper_triangle_order() -> None:
    got = pair_differences(torch.tensor([5.0, 3.0, 2.0, -1.0]))
    assert got.tolist() == [2.0, 3.0, 6.0, 1.0, 4.0, 3.0]  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)


def test_k3_on_four_classes_hand_computed_pairs_and_kl() -> None:
    # Teacher-led: top-3 of T are classes 0, 2, 1 -> d_T = (1, 2, 1), d_S = (0.5, -1, -1.5).
    p_t = softmax([1 / TAU, 2 / TAU, 1 / TAU])
    p_s = softmax([0.5 / TAU, -1 / TAU, -1.5 / TAU])
    expected_t = kl(p_t, p_s)
    # Student-led: top-3 of S are classes 1, 3, 0 -> d_S = (0.5, 1, 0.5), d_T = (1, -2, -3).
    expected_s = kl(softmax([1 / TAU, -2 / TAU, -3 / TAU]), softmax([0.5 / TAU, 1 / TAU, 0.5 / TAU]))
    got_t = logit_difference_kl(rows(S), rows(T), top_k=3, temperature=TAU, leader="teacher")
    got_s = logit_difference_kl(rows(S), rows(T), top_k=3, temperature=TAU, leader="student")
    assert got_t.item() == pytest.approx(expected_t, rel=1e-9)
    assert got_s.item() == pytest.approx(expected_s, rel=1e-9)
    out = BiLDLoss(top_k=3, temperature=TAU)(rows(S), rows(T))
    assert set(out) == {"loss", "t_ld", "s_ld"}  # the paper's objective: no CE by default
    assert out["loss"].item() == pytest.approx(expected_t + expected_s, rel=1e-9)


def test_teacher_led_and_student_led_pick_their_leaders_top_k() -> None:
    assert descending(T, 3) == [0, 2, 1] and descending(S, 3) == [1, 3, 0]
    by_teacher = pair_kl_by_hand(S, T, [0, 2, 1], TAU)
    by_student = pair_kl_by_hand(S, T, [1, 3, 0], TAU)
    assert by_teacher != pytest.approx(by_student)
    got_t = logit_difference_kl(rows(S), rows(T), 3, TAU, "teacher").item()
    got_s = logit_difference_kl(rows(S), rows(T), 3, TAU, "student").item()
    assert got_t == pytest.approx(by_teacher, rel=1e-9) and got_s == pytest.approx(by_student, rel=1e-9)


def test_batch_mean_over_items_and_mask() -> None:
    s2, t2 = [0.0, -1.0, 2.0, 1.0], [1.0, 0.5, -0.5, 2.0]
    per_row = [pair_kl_by_hand(a, b, descending(b, 3), TAU) for a, b in ((S, T), (s2, t2))]
    got = logit_difference_kl(rows(S, s2), rows(T, t2), 3, TAU, "teacher")
    assert got.item() == pytest.approx(sum(per_row) / 2, rel=1e-9)
    masked = logit_difference_kl(rows(S, s2), rows(T, t2), 3, TAU, "teacher", mask=torch.tensor([False, True]))
    assert masked.item() == pytest.approx(per_row[1], rel=1e-9)


def test_token_shaped_logits_with_padding_mask() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss = BiLDLoss(top_k=8)
    flat = loss(s[mask], t[mask])["loss"]
    assert loss(s, t, mask=mask)["loss"].item() == pytest.approx(flat.item(), rel=1e-6)
    changed = s.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 20)  # padding positions do not count
    assert loss(changed, t, mask=mask)["loss"].item() == pytest.approx(flat.item(), rel=1e-6)


def test_zero_when_student_is_teacher_plus_a_constant_per_item() -> None:
    torch.manual_seed(0)
    t = torch.randn(5, 10, dtype=torch.float64)
    s = t + torch.randn(5, 1, dtype=torch.float64) * 7  # differences are shift-invariant
    out = BiLDLoss(top_k=6)(s, t)
    assert out["t_ld"].item() == pytest.approx(0.0, abs=1e-12) and out["s_ld"].item() == pytest.approx(0.0, abs=1e-12)
    assert BiLDLoss(top_k=6)(torch.randn(5, 10, dtype=torch.float64), t)["loss"].item() > 0


def test_top_k_equal_to_class_count_uses_every_pair_and_larger_is_rejected() -> None:
    got = logit_difference_kl(rows(S), rows(T), top_k=4, temperature=TAU, leader="teacher")
    assert got.item() == pytest.approx(pair_kl_by_hand(S, T, [0, 2, 1, 3], TAU), rel=1e-9)
    with pytest.raises(ValueError, match=r"top_k=5 is larger than the 4 classes"):
        BiLDLoss(top_k=5)(rows(S), rows(T))
    with pytest.raises(ValueError, match="top_k must be >= 2"):
        BiLDLoss(top_k=1)


def test_ce_weight_adds_cross_entropy_and_needs_target() -> None:
    out = BiLDLoss(top_k=3, temperature=TAU, ce_weight=0.5)(rows(S), rows(T), torch.tensor([2]))
    ce = -math.log(softmax(S)[2])
    assert out["ce"].item() == pytest.approx(0.5 * ce, rel=1e-9)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + out["t_ld"].item() + out["s_ld"].item())
    with pytest.raises(ValueError, match="target is required when ce_weight != 0"):
        BiLDLoss(ce_weight=1.0)(torch.randn(2, 10), torch.randn(2, 10))


def test_gradient_reaches_student_only_in_both_branches() -> None:
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    BiLDLoss(top_k=4)(s, t)["loss"].backward()
    assert t.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all()
    # Only classes in some leader's top-4 receive gradient.
    chosen = torch.zeros_like(s, dtype=torch.bool)
    chosen.scatter_(1, t.topk(4).indices, True).scatter_(1, s.detach().topk(4).indices, True)
    assert (s.grad[~chosen] == 0).all() and (s.grad[chosen] != 0).any()


def test_float32_under_bf16_inputs_and_shape_mismatch_message() -> None:
    out = BiLDLoss()(torch.randn(3, 10).bfloat16(), torch.randn(3, 10).bfloat16())
    assert out["loss"].dtype == torch.float32
    with pytest.raises(ValueError, match="student predicts 10 classes and the teacher 12"):
        BiLDLoss()(torch.randn(2, 10), torch.randn(2, 12))


# --------------------------------------------------------------------------------------------- DBiLD
def test_dynamic_k_hand_checked() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.tensor([[math.log(p) for p in probs], [math.log(p) for p in reversed(probs)]])
    # cumulative sorted mass: 0.5, 0.8, 0.95, 1.0
    assert dynamic_k(logits, mass=0.9, k_min=2, k_max=4).tolist() == [3, 3]
    assert dynamic_k(logits, mass=0.75, k_min=2, k_max=4).tolist() == [2, 2]
    assert dynamic_k(logits, mass=0.4, k_min=2, k_max=4).tolist() == [2, 2]  # k = 1 clipped up to k_min
    assert dynamic_k(logits, mass=0.99, k_min=2, k_max=3).tolist() == [3, 3]  # k = 4 clipped down to k_max
    assert dynamic_k(logits, mass=0.99, k_min=2, k_max=16).tolist() == [4, 4]  # k_max capped at C
    # A softer mass temperature spreads the mass: at τ_m = 2 the sorted mass is ∝ sqrt(p).
    soft = [math.sqrt(p) / sum(math.sqrt(q) for q in probs) for p in probs]
    expected = next(k for k in range(1, 5) if sum(soft[:k]) >= 0.9)
    assert expected == 4  # 0.37, 0.66, 0.86, 1.0
    assert dynamic_k(logits, mass=0.9, k_min=2, k_max=4, temperature=2.0).tolist() == [expected] * 2


def test_dynamic_k_per_row_matches_fixed_k_with_that_row_k() -> None:
    torch.manual_seed(0)
    t = torch.randn(6, 12, dtype=torch.float64) * torch.tensor([0.3, 1.0, 2.0, 3.0, 5.0, 8.0]).unsqueeze(1)
    s = torch.randn(6, 12, dtype=torch.float64)
    k_rows = dynamic_k(t, 0.9, 3, 7)
    assert len(set(k_rows.tolist())) > 1  # the batch really mixes several k
    got = dynamic_logit_difference_kl(s, t, "teacher", 0.9, 3, 7, TAU, reverse_weight=1.0, reduction="none")
    for row, k in enumerate(k_rows.tolist()):
        expected = pair_kl_by_hand(s[row].tolist(), t[row].tolist(), descending(t[row].tolist(), k), TAU, True)
        assert got[row].item() == pytest.approx(expected, rel=1e-9)


def test_masked_pairs_contribute_nothing_to_value_or_gradient() -> None:
    t = torch.tensor([[4.0, 3.0, 2.5, 0.0, -0.5, -3.0]], dtype=torch.float64)
    assert dynamic_k(t, 0.9, 3, 5).item() == 3  # pairs among teacher ranks 4 and 5 are masked
    s = torch.tensor([[0.5, 1.0, -1.0, 2.0, 0.3, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = dynamic_logit_difference_kl(s, t, "teacher", 0.9, 3, 5, TAU, reverse_weight=0.5)
    loss.backward()
    expected = 0.5 * pair_kl_by_hand(s[0].tolist(), t[0].tolist(), [0, 1, 2], TAU, True) + 0.5 * pair_kl_by_hand(
        s[0].tolist(), t[0].tolist(), [0, 1, 2], TAU
    )
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert torch.isfinite(s.grad).all()
    assert (s.grad[0, 3:] == 0).all() and (s.grad[0, :3] != 0).all()
    moved = s.detach().clone()
    moved[0, 3:] = torch.tensor([9.0, -9.0, 5.0], dtype=torch.float64)
    again = dynamic_logit_difference_kl(moved, t, "teacher", 0.9, 3, 5, TAU, reverse_weight=0.5)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


def test_fixed_k_dbild_equals_bild_with_the_same_direction() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    for reverse_weight in (0.0, 0.3, 1.0):
        for leader in ("teacher", "student"):
            dyn = dynamic_logit_difference_kl(s, t, leader, 0.9, 5, 5, TAU, reverse_weight=reverse_weight)
            fixed = logit_difference_kl(s, t, 5, TAU, leader, reverse_weight)
            assert dyn.item() == pytest.approx(fixed.item(), rel=1e-9)


def test_dbild_defaults_are_reverse_kl_and_zero_for_shifted_student() -> None:
    torch.manual_seed(2)
    t = torch.randn(3, 10, dtype=torch.float64)
    loss = DBiLDLoss()
    assert loss(t + 3.0, t)["loss"].item() == pytest.approx(0.0, abs=1e-12)
    s = torch.randn(3, 10, dtype=torch.float64)
    k_t = loss.dynamic_k(t)
    expected = sum(
        pair_kl_by_hand(s[r].tolist(), t[r].tolist(), descending(t[r].tolist(), int(k_t[r])), 3.0, reverse=True)
        for r in range(3)
    )
    assert loss(s, t)["t_ld"].item() == pytest.approx(expected / 3, rel=1e-9)


def test_dbild_student_led_k_source_and_gradient() -> None:
    torch.manual_seed(3)
    s = (torch.randn(4, 10) * 3).requires_grad_()
    t = (torch.randn(4, 10) * 3).requires_grad_()
    by_teacher = DBiLDLoss(k_source="teacher", k_min=3, k_max=8)(s, t)["s_ld"]
    by_leader = DBiLDLoss(k_source="leader", k_min=3, k_max=8)(s, t)["s_ld"]
    assert by_teacher.item() != pytest.approx(by_leader.item())
    (by_teacher + by_leader).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mass": 0.0}, r"mass must be in \(0, 1\]"),
        ({"k_min": 1}, "k_min must be >= 2"),
        ({"k_min": 5, "k_max": 4}, "k_max must be >= k_min"),
        ({"reverse_weight": 1.5}, r"reverse_weight must be in \[0, 1\]"),
        ({"k_source": "student"}, "k_source must be 'leader' or 'teacher'"),
        ({"mass_temperature": 0.0}, "mass_temperature: must be a finite number > 0"),
    ],
)
def test_dbild_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DBiLDLoss(**kwargs)


def test_dbild_k_min_above_class_count_rejected() -> None:
    with pytest.raises(ValueError, match=r"k_min=5 is larger than the 4 classes"):
        DBiLDLoss(k_min=5, k_max=8)(torch.randn(2, 4), torch.randn(2, 4))
