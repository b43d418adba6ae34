"""CLoCKDistill's losses: hand-computed values on tiny tensors, zero when student equals teacher, gates in [0, 1]."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.detr_kd import (
    binary_kl,
    location_weights,
    logit_distillation,
    memory_distillation,
    reliability_gate,
)


def test_box_location_weights_hand_values() -> None:
    reference = torch.tensor([[[0.25, 0.25], [0.75, 0.75], [0.5, 0.9]]])
    padding = torch.tensor([[False, False, True]])
    boxes = [torch.tensor([[0.25, 0.25, 0.2, 0.2]])]  # covers token 0 only
    w = location_weights(reference, padding, boxes, lambda_fg=4.0)
    torch.testing.assert_close(w, torch.tensor([[5.0, 1.0, 0.0]]))
    # no boxes: uniform; lambda_fg 0: uniform
    torch.testing.assert_close(location_weights(reference, padding, [torch.zeros(0, 4)]), torch.tensor([[1.0, 1, 0]]))
    torch.testing.assert_close(location_weights(reference, padding, boxes, 0.0), torch.tensor([[1.0, 1, 0]]))


def test_gaussian_location_weights_hand_values() -> None:
    reference = torch.tensor([[[0.5, 0.5], [0.6, 0.5]]])
    padding = torch.zeros(1, 2, dtype=torch.bool)
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.4]])]
    w = location_weights(reference, padding, boxes, 2.0, "gaussian", scale_normalise=True)
    # centre: G = 1/sqrt(0.08); 0.1 to the right with sx = 0.1: exp(-1/2)/sqrt(0.08)
    expected = torch.tensor([[1 + 2 / math.sqrt(0.08), 1 + 2 * math.exp(-0.5) / math.sqrt(0.08)]])
    torch.testing.assert_close(w, expected)
    plain = location_weights(reference, padding, boxes, 2.0, "gaussian", scale_normalise=False)
    torch.testing.assert_close(plain, torch.tensor([[3.0, 1 + 2 * math.exp(-0.5)]]))


def test_memory_distillation_hand_value_and_zero_when_equal() -> None:
    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    w = torch.tensor([[3.0, 1.0]])
    # (3·1 + 1·4) / (2 · 4)
    torch.testing.assert_close(memory_distillation(s, t, w), torch.tensor(7.0 / 8.0))
    assert float(memory_distillation(t, t, w)) == 0.0
    with pytest.raises(KDConfigError, match=r"^memory: student memory \(1, 2, 2\) and teacher memory"):
        memory_distillation(s, t[:, :1], w)


def test_binary_kl_is_zero_at_agreement_and_has_the_bce_gradient() -> None:
    t = torch.tensor([0.3, -1.0, 2.0])
    assert float(binary_kl(t, t).abs().max()) < 1e-7
    s = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    kl = binary_kl(s, t, temperature=2.0)
    p, q = torch.sigmoid(t / 2), torch.sigmoid(s.detach() / 2)
    expected = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(kl, expected)
    kl.sum().backward()
    torch.testing.assert_close(s.grad, (q - p) / 2)  # d/ds BCE(σ(s/T), p) = (σ(s/T) − p)/T


def test_logit_distillation_hand_value_valid_mask_and_gate() -> None:
    layers, batch, queries, classes = 1, 1, 2, 2
    t_logits = torch.zeros(layers, batch, queries, classes)
    s_logits = t_logits.clone()
    s_logits[0, 0, 0, 0] = 1.0
    t_boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]]])
    s_boxes = t_boxes.clone()
    s_boxes[0, 0, 0, 0] = 0.6  # shifted right by 0.1: L1 0.1, IoU 1/3, hull 0.06 x 0.2 = union -> GIoU 1/3
    valid = torch.tensor([[True, True]])
    out = logit_distillation(s_logits, s_boxes, t_logits, t_boxes, valid)
    kl = 0.5 * math.log(0.5 / torch.sigmoid(torch.tensor(1.0)).item()) + 0.5 * math.log(
        0.5 / (1 - torch.sigmoid(torch.tensor(1.0)).item())
    )
    assert float(out["cls"]) == pytest.approx(kl / 2, rel=1e-5)
    assert float(out["box"]) == pytest.approx((0.1 + 1 - 1 / 3) / 2, rel=1e-5)
    # a padded query counts nothing; a gate scales each query
    out_pad = logit_distillation(s_logits, s_boxes, t_logits, t_boxes, torch.tensor([[False, True]]))
    assert float(out_pad["cls"]) == 0.0 and float(out_pad["box"]) == 0.0
    gated = logit_distillation(s_logits, s_boxes, t_logits, t_boxes, valid, gate=torch.tensor([[0.5, 1.0]]))
    assert float(gated["cls"]) == pytest.approx(kl / 4, rel=1e-5)
    same = logit_distillation(t_logits, t_boxes, t_logits, t_boxes, valid, class_loss="kl")
    assert float(same["cls"]) == 0.0 and float(same["box"]) == pytest.approx(0.0, abs=1e-6)


def test_logit_distillation_refuses_mismatched_predictions() -> None:
    a, b = torch.zeros(2, 1, 3, 4), torch.zeros(3, 1, 3, 4)
    boxes_a, boxes_b = torch.rand(2, 1, 3, 4), torch.rand(3, 1, 3, 4)
    with pytest.raises(KDConfigError, match=r"^distill_layers: student predictions \(2, 1, 3, 4\)") as err:
        logit_distillation(a, boxes_a, b, boxes_b, torch.ones(1, 3, dtype=torch.bool))
    assert "\n" not in str(err.value)


def test_reliability_gate_hand_value_and_range() -> None:
    gt = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    teacher_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])  # exact, disjoint
    logits = torch.tensor([[[0.0, 3.0], [5.0, 5.0]]])
    gate = reliability_gate(logits, teacher_boxes, gt, torch.tensor([[0, 1]]))
    torch.testing.assert_close(gate, torch.tensor([[0.5, 0.0]]))  # IoU 1 · σ(0); IoU 0
    random = reliability_gate(torch.randn(2, 5, 3) * 5, torch.rand(2, 5, 4), torch.rand(2, 5, 4), torch.zeros(2, 5))
    assert bool(((random >= 0) & (random <= 1)).all())
    soft = reliability_gate(torch.tensor([[[0.0, 0.0]]]), gt[:, :1], gt[:, :1], torch.tensor([[1]]), sigmoid=False)
    torch.testing.assert_close(soft, torch.tensor([[0.5]]))


def test_bad_arguments_are_one_line_errors() -> None:
    reference, padding = torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.bool)
    with pytest.raises(KDConfigError, match=r"^location_prior: must be 'box' or 'gaussian'"):
        location_weights(reference, padding, [torch.zeros(0, 4)], prior="disc")  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match=r"^lambda_fg: must be >= 0"):
        location_weights(reference, padding, [torch.zeros(0, 4)], lambda_fg=-1.0)
    x, boxes, valid = torch.zeros(1, 1, 1, 2), torch.rand(1, 1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(KDConfigError, match=r"^class_loss: must be 'bce' or 'kl'"):
        logit_distillation(x, boxes, x, boxes, valid, class_loss="mse")  # type: ignore[arg-type]
