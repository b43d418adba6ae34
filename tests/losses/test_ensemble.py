"""Ensemble KD loss: hand-computed values, the one-teacher case, weights and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses import EnsembleKDLoss, KDLoss, ensemble_log_probs


def test_ensemble_target_by_hand() -> None:
    # Two teachers over two classes at T = 1: p1 = softmax([0, ln 3]) = [1/4, 3/4], p2 = softmax([0, 0]) = [1/2, 1/2].
    teachers = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, 0.0]]])
    mean = ensemble_log_probs(teachers, 1.0).exp()
    assert torch.allclose(mean, torch.tensor([[0.375, 0.625]]))
    weighted = ensemble_log_probs(teachers, 1.0, weights=[3.0, 1.0]).exp()  # normalised to 3/4, 1/4
    assert torch.allclose(weighted, torch.tensor([[0.75 * 0.25 + 0.25 * 0.5, 0.75 * 0.75 + 0.25 * 0.5]]))


def test_loss_value_by_hand() -> None:
    teachers = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, 0.0]]])
    student = torch.tensor([[0.0, 0.0]])  # q = [1/2, 1/2]
    target = torch.tensor([1])
    out = EnsembleKDLoss(temperature=1.0, ce_weight=0.5, kd_weight=2.0)(student, teachers, target)
    kl = 0.375 * math.log(0.375 / 0.5) + 0.625 * math.log(0.625 / 0.5)
    assert out["kd"].item() == pytest.approx(2.0 * kl, rel=1e-6)
    assert out["ce"].item() == pytest.approx(0.5 * math.log(2.0), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["kd"].item() + out["ce"].item())


def test_one_teacher_is_vanilla_kd() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    ours = EnsembleKDLoss(temperature=3.0)(s, t.unsqueeze(0), y)
    ref = KDLoss(temperature=3.0)(s, t, y)
    for key in ("loss", "ce", "kd"):
        assert torch.allclose(ours[key], ref[key], atol=1e-6), key


def test_zero_when_the_student_matches_the_ensemble_and_gradients_reach_only_the_student() -> None:
    torch.manual_seed(1)
    teachers = torch.randn(3, 4, 6, requires_grad=True)
    student = (ensemble_log_probs(teachers.detach(), 2.0) * 2.0).clone().requires_grad_(True)  # softmax(z/2) = p̄
    out = EnsembleKDLoss(temperature=2.0, ce_weight=0.0, kd_weight=1.0)(
        student, teachers, torch.zeros(4, dtype=torch.long)
    )
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)
    out["loss"].backward()
    assert teachers.grad is None and student.grad is not None


def test_bad_inputs_are_named() -> None:
    with pytest.raises(KDConfigError, match=r"teacher_weights: must be finite"):
        EnsembleKDLoss(teacher_weights=[0.0, 0.0])
    with pytest.raises(KDConfigError, match=r"kd_weight: must be a finite number >= 0"):
        EnsembleKDLoss(kd_weight=-1.0)
    with pytest.raises(KDConfigError, match=r"teacher_logits: must be stacked per teacher"):
        EnsembleKDLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
