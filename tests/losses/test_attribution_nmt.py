"""The Attributor's per-row KL (kd_lightning.losses.attribution_nmt)."""

from __future__ import annotations

import math

import torch

from kd_lightning.losses.attribution_nmt import attribution_row_kl


def test_row_kl_by_hand() -> None:
    target = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    pred = torch.tensor([[[0.25, 0.75, 0.0], [0.5, 0.25, 0.25]]])
    log_pred = pred.clamp_min(1e-30).log()
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = math.log(1.0 / 0.5)
    torch.testing.assert_close(attribution_row_kl(target, log_pred), torch.tensor((row0 + row1) / 2))
    torch.testing.assert_close(attribution_row_kl(target, log_pred, torch.tensor([[True, False]])), torch.tensor(row0))


def test_row_kl_zero_at_equality_ignores_padding_and_minus_inf() -> None:
    target = torch.tensor([[[0.2, 0.8, 0.0]]])
    log_pred = torch.tensor([[[math.log(0.2), math.log(0.8), float("-inf")]]])
    assert attribution_row_kl(target, log_pred).abs() < 1e-6
    assert attribution_row_kl(target, log_pred, torch.tensor([[False]])) == 0


def test_row_kl_gradient_reaches_prediction_only() -> None:
    target = torch.tensor([[[0.3, 0.7]]], requires_grad=True)
    logits = torch.tensor([[[0.1, -0.4]]], requires_grad=True)
    attribution_row_kl(target.detach(), logits.log_softmax(-1)).backward()
    # d KL / d logits = softmax(logits) - target
    torch.testing.assert_close(logits.grad, logits.detach().softmax(-1) - target.detach())
    assert target.grad is None
