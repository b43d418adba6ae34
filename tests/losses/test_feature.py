"""Feature losses (FitNet hints, attention transfer): hand-computed values and the properties the papers state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses.feature import (
    AttentionTransferLoss,
    HintLoss,
    attention_map,
    attention_transfer_loss,
    attention_transfer_term,
    hint_loss,
)

# One sample, two channels, a 2x2 map (positions in row-major order).
CH0 = [[1.0, 2.0], [0.0, -1.0]]
CH1 = [[3.0, 0.0], [1.0, 1.0]]


def feature(*channels: list[list[float]]) -> torch.Tensor:
    return torch.tensor([channels], dtype=torch.float64)


def unit(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


# ------------------------------------------------------------------------------------------- attention maps
def test_attention_map_of_a_2x2_map_by_hand() -> None:
    # p = 2: mean over channels of squares, per position: (1+9)/2, (4+0)/2, (0+1)/2, (1+1)/2 = 5, 2, 0.5, 1;
    # L2 norm sqrt(25 + 4 + 0.25 + 1) = 5.5.
    got = attention_map(feature(CH0, CH1), p=2)
    assert got.shape == (1, 4)
    assert got[0].tolist() == pytest.approx([5 / 5.5, 2 / 5.5, 0.5 / 5.5, 1 / 5.5], rel=1e-12)


def test_attention_map_uses_absolute_values_for_odd_p() -> None:
    # p = 1: (|1|+|3|)/2, (2+0)/2, (0+1)/2, (|-1|+1)/2 = 2, 1, 0.5, 1 (the paper's |A|^p, not A^p).
    got = attention_map(feature(CH0, CH1), p=1)
    assert got[0].tolist() == pytest.approx(unit([2.0, 1.0, 0.5, 1.0]), rel=1e-12)


def test_attention_term_by_hand_with_different_channel_counts() -> None:
    student = feature(CH0, CH1)  # map 5, 2, 0.5, 1
    teacher = feature([[2.0, 0.0], [0.0, 2.0]])  # one channel: squares 4, 0, 0, 4
    q_s, q_t = unit([5.0, 2.0, 0.5, 1.0]), unit([4.0, 0.0, 0.0, 4.0])
    expected = sum((a - b) ** 2 for a, b in zip(q_s, q_t)) / 4  # mean over batch (1) x positions (4)
    assert attention_transfer_term(student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_attention_loss_sums_layers_and_the_module_matches() -> None:
    torch.manual_seed(0)
    s = [torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randn(3, 5, 2, 2, dtype=torch.float64)]
    t = [torch.randn(3, 6, 4, 4, dtype=torch.float64), torch.randn(3, 2, 2, 2, dtype=torch.float64)]
    total = attention_transfer_term(s[0], t[0]) + attention_transfer_term(s[1], t[1])
    assert attention_transfer_loss(s, t).item() == pytest.approx(total.item(), rel=1e-12)
    assert AttentionTransferLoss(p=2)(s, t).item() == pytest.approx(total.item(), rel=1e-12)


def test_attention_is_invariant_to_feature_scale_and_channel_order() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(4, 8, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    ref = attention_transfer_term(s, t).item()
    assert ref > 0
    assert attention_transfer_term(7.5 * s, t).item() == pytest.approx(ref, rel=1e-10)
    assert attention_transfer_term(s, 0.01 * t).item() == pytest.approx(ref, rel=1e-10)
    assert attention_transfer_term(-s, t).item() == pytest.approx(ref, rel=1e-10)  # p = 2: sign-free
    assert attention_transfer_term(s[:, torch.randperm(8)], t).item() == pytest.approx(ref, rel=1e-10)


def test_attention_is_zero_when_the_maps_agree() -> None:
    torch.manual_seed(2)
    t = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert attention_transfer_term(t.clone(), t).item() == pytest.approx(0.0, abs=1e-15)
    assert attention_transfer_term(3.0 * t.repeat(1, 2, 1, 1), t).item() == pytest.approx(0.0, abs=1e-15)


def test_larger_map_is_average_pooled_to_the_smaller() -> None:
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)
    pooled = F.avg_pool2d(s, kernel_size=2)  # the 2x2 means of the 4x4 map
    assert attention_transfer_term(s, t).item() == pytest.approx(attention_transfer_term(pooled, t).item())
    assert attention_transfer_term(t, s).item() == pytest.approx(attention_transfer_term(t, pooled).item())


def test_attention_gradient_reaches_the_student_only() -> None:
    torch.manual_seed(4)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    attention_transfer_loss([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_attention_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"attention_map needs features \[batch, channels, \*positions\].*\(2, 8\)"):
        attention_map(torch.randn(2, 8))
    with pytest.raises(ValueError, match="p must be > 0"):
        AttentionTransferLoss(p=0)
    with pytest.raises(ValueError, match="got 2 student and 1 teacher features"):
        attention_transfer_loss([torch.randn(1, 1, 2, 2)] * 2, [torch.randn(1, 1, 2, 2)])
    with pytest.raises(ValueError, match="batch sizes differ"):
        attention_transfer_term(torch.randn(2, 1, 2, 2), torch.randn(3, 1, 2, 2))


def test_attention_computes_in_float32_under_bf16() -> None:
    s, t = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    assert attention_transfer_term(s, t).dtype == torch.float32


# --------------------------------------------------------------------------------------------------- hints
def test_hint_loss_is_the_elementwise_mean_square() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 2.0], [5.0, 1.0]], dtype=torch.float64)
    expected = (1 + 0 + 4 + 9) / 4
    assert hint_loss(s, t).item() == pytest.approx(expected)
    assert HintLoss()(s, t).item() == pytest.approx(expected)
    assert hint_loss(t.clone(), t).item() == 0.0


def test_hint_gradient_reaches_the_student_only_and_shapes_must_match() -> None:
    s = torch.randn(2, 3, 2, 2, requires_grad=True)
    t = torch.randn(2, 3, 2, 2, requires_grad=True)
    hint_loss(s, t).backward()
    assert s.grad is not None and t.grad is None
    assert torch.allclose(s.grad, 2 * (s - t).detach() / s.numel())
    with pytest.raises(ValueError, match=r"regressed student feature \(2, 4\).*teacher feature's shape \(2, 3\)"):
        hint_loss(torch.randn(2, 4), torch.randn(2, 3))
