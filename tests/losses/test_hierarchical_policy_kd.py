"""Per-level policy KD (STEVE-2 reconstruction) and REINFORCE: hand-computed values, masks, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.hierarchical_policy_kd import HierarchicalPolicyKDLoss, masked_cross_entropy, reinforce_loss


def outputs(*rows: list[float], key: str = "actor/action") -> dict[str, torch.Tensor]:
    return {key: torch.tensor(rows)}


def test_zero_when_student_equals_teacher_without_expert_labels() -> None:
    logits = {"manager/task": torch.randn(4, 3), "actor/action": torch.randn(4, 5)}
    labels = {"manager/task": torch.tensor([0, 1, 2, -1]), "actor/action": torch.tensor([1, 1, 1, 1])}
    out = HierarchicalPolicyKDLoss(teacher_weight=1.0, expert_weight=0.0)(logits, labels, logits)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-7)
    assert set(out) == {"loss", "manager", "actor"}


def test_hand_computed_kl_and_cross_entropy_with_level_weights() -> None:
    student = outputs([0.0, 0.0])  # p_S = (1/2, 1/2)
    teacher = outputs([math.log(3.0), 0.0])  # p_T = (3/4, 1/4)
    labels = {"actor/action": torch.tensor([0])}
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    ce = math.log(2.0)
    out = HierarchicalPolicyKDLoss(teacher_weight=1.0, expert_weight=0.5, level_weights={"actor": 2.0})(
        student, labels, teacher
    )
    assert out["actor"].item() == pytest.approx(2.0 * (kl + 0.5 * ce), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["actor"].item())


def test_temperature_scales_the_kl_by_tau_squared() -> None:
    student, teacher = outputs([0.0, 0.0]), outputs([2.0, 0.0])
    labels = {"actor/action": torch.tensor([0])}
    tau = 2.0
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    kl = float((p * (p / 0.5).log()).sum())
    out = HierarchicalPolicyKDLoss(teacher_weight=1.0, expert_weight=0.0, temperature=tau)(student, labels, teacher)
    assert out["loss"].item() == pytest.approx(tau**2 * kl, rel=1e-6)


def test_invalid_labels_drop_the_sample_from_both_terms() -> None:
    student = outputs([0.0, 0.0], [5.0, -5.0])
    teacher = outputs([0.0, 0.0], [-5.0, 5.0])  # the second sample disagrees strongly, but has no valid label
    labels = {"actor/action": torch.tensor([1, -1])}
    out = HierarchicalPolicyKDLoss(teacher_weight=1.0, expert_weight=1.0)(student, labels, teacher)
    assert out["loss"].item() == pytest.approx(math.log(2.0), rel=1e-6)  # sample 1: KL 0, CE ln 2
    none_valid = {"actor/action": torch.tensor([-1, -1])}
    assert HierarchicalPolicyKDLoss()(student, none_valid, teacher)["loss"].item() == 0.0


def test_gradients_reach_the_student_only() -> None:
    student = {"actor/action": torch.randn(3, 4, requires_grad=True)}
    teacher = {"actor/action": torch.randn(3, 4, requires_grad=True)}
    labels = {"actor/action": torch.tensor([0, 2, 3])}
    HierarchicalPolicyKDLoss()(student, labels, teacher)["loss"].backward()
    assert student["actor/action"].grad is not None and student["actor/action"].grad.abs().sum() > 0
    assert teacher["actor/action"].grad is None


def test_expert_only_loss_is_the_masked_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, -1])
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    assert masked_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    out = HierarchicalPolicyKDLoss(teacher_weight=0.0, expert_weight=1.0)(
        {"actor/action": logits}, {"actor/action": labels}
    )
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_bad_settings_and_shapes_are_one_line_errors() -> None:
    with pytest.raises(KDConfigError, match="nothing to learn from"):
        HierarchicalPolicyKDLoss(teacher_weight=0.0, expert_weight=0.0)
    with pytest.raises(KDConfigError, match="temperature"):
        HierarchicalPolicyKDLoss(temperature=0.0)
    with pytest.raises(KDConfigError, match=r"teacher: predicts actor/action with shape \(1, 3\)"):
        HierarchicalPolicyKDLoss()(outputs([0.0, 0.0]), {"actor/action": torch.tensor([0])}, outputs([0.0, 0.0, 0.0]))
    with pytest.raises(KDConfigError, match="labels: have no 'actor/action'"):
        HierarchicalPolicyKDLoss()(outputs([0.0, 0.0]), {}, None)


def test_reinforce_hand_computed_and_sign() -> None:
    logits = torch.zeros(2, 2, requires_grad=True)  # π = (1/2, 1/2) in both states
    actions = torch.tensor([0, 1])
    returns = torch.tensor([1.0, 0.0])  # advantages (after mean baseline): +0.5, -0.5
    out = reinforce_loss(logits, actions, returns, entropy_weight=0.0, normalise=False)
    assert out["loss"].item() == pytest.approx(-(0.5 * math.log(0.5) - 0.5 * math.log(0.5)) / 2, abs=1e-7)
    out["loss"].backward()
    # gradient descent raises the logit of the rewarded action in state 0 and lowers that of the unrewarded one
    assert logits.grad[0, 0] < 0 < logits.grad[1, 1]
    entropy = reinforce_loss(torch.zeros(1, 4), torch.tensor([0]), torch.tensor([0.0]), entropy_weight=1.0)
    assert entropy["entropy"].item() == pytest.approx(-math.log(4.0), rel=1e-6)
