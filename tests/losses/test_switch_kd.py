"""Switch-KD's token objective: hand-computed switch term (DBiLD and KL), masks, pairs, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.bild import DBiLDLoss
from kd_lightning.losses.switch_kd import SwitchKDLoss, masked_token_ce_sum, switch_token_sum


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def reverse_pair_kl_top3(trained: list[float], reference: list[float], leader: list[float], tau: float) -> float:
    """KL(p_trained ‖ p_reference) over the 3 pair differences of the leader's top-3 classes (i < j in that order)."""
    order = sorted(range(len(leader)), key=lambda i: -leader[i])[:3]
    pairs = [(order[a], order[b]) for a in range(3) for b in range(a + 1, 3)]
    p_tr = softmax([(trained[i] - trained[j]) / tau for i, j in pairs])
    p_ref = softmax([(reference[i] - reference[j]) / tau for i, j in pairs])
    return kl(p_tr, p_ref)


# Two tokens of one sequence + one padded token: [1, 3, 4].
TRAINED = [[1.0, 2.0, 0.5, 1.5], [0.0, -1.0, 2.0, 0.5], [9.0, -9.0, 3.0, 1.0]]
REFERENCE = [[3.0, 1.0, 2.0, 0.0], [1.0, 0.0, 0.5, 2.5], [0.0, 0.0, 0.0, 0.0]]
MASK = torch.tensor([[True, True, False]])
FIXED_K3 = {"mass": 1.0, "k_min": 3, "k_max": 3, "temperature": 2.0}  # k = 3 for every token


def logits(values: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64, requires_grad=grad)


def test_dbild_switch_sum_matches_hand_computed_reverse_pair_kl() -> None:
    dbild = DBiLDLoss(**FIXED_K3)
    got = switch_token_sum(logits(TRAINED), logits(REFERENCE), MASK, "dbild", dbild)
    expected = 0.0
    for t in range(2):  # the padded token (t = 2) is left out
        for leader in (REFERENCE[t], TRAINED[t]):  # t-LD (reference leads) + s-LD (trained leads)
            expected += reverse_pair_kl_top3(TRAINED[t], REFERENCE[t], leader, tau=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_kl_switch_sum_matches_hand_computed_forward_kl() -> None:
    tau = 2.0
    got = switch_token_sum(logits(TRAINED), logits(REFERENCE), MASK, "kl", temperature=tau)
    expected = sum(
        kl(softmax([v / tau for v in REFERENCE[t]]), softmax([v / tau for v in TRAINED[t]])) for t in range(2)
    )
    assert got.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("divergence", ["dbild", "kl"])
def test_zero_when_equal_and_masked_tokens_ignored(divergence: str) -> None:
    z = logits(TRAINED)
    assert switch_token_sum(z, z.clone(), MASK, divergence).item() == pytest.approx(0.0, abs=1e-12)
    changed = logits(REFERENCE).clone()
    changed[0, 2] = torch.tensor([5.0, -5.0, 1.0, 0.0])  # only the padded token changes
    base = switch_token_sum(logits(TRAINED), logits(REFERENCE), MASK, divergence)
    assert switch_token_sum(logits(TRAINED), changed, MASK, divergence).item() == pytest.approx(base.item())


@pytest.mark.parametrize("divergence", ["dbild", "kl"])
def test_gradient_reaches_the_trained_side_only(divergence: str) -> None:
    trained, reference = logits(TRAINED, grad=True), logits(REFERENCE, grad=True)
    switch_token_sum(trained, reference, MASK, divergence).backward()
    assert reference.grad is None
    assert trained.grad is not None and trained.grad[0, :2].abs().sum() > 0
    assert torch.all(trained.grad[0, 2] == 0)  # padded token


def test_combined_loss_pairs_and_weights() -> None:
    student, teacher, switched = logits(TRAINED, True), logits(REFERENCE, True), logits(TRAINED).flip(-1)
    switched.requires_grad_(True)
    targets = torch.tensor([[1, 3, 0]])
    dbild = DBiLDLoss(**FIXED_K3)
    loss = SwitchKDLoss(dbild, sft_weight=0.5, dbild_weight=2.0, switch_weight=3.0)
    out = loss.token_sums(student, teacher, targets, MASK, switched)
    ce = -math.log(softmax(TRAINED[0])[1]) - math.log(softmax(TRAINED[1])[3])
    assert out["sft"].item() == pytest.approx(0.5 * ce)
    assert out["dbild"].item() == pytest.approx(2.0 * switch_token_sum(student, teacher, MASK, "dbild", dbild).item())
    # default pair: the switched output is trained towards the teacher's
    assert out["switch"].item() == pytest.approx(3.0 * switch_token_sum(switched, teacher, MASK, "dbild", dbild).item())
    assert out["loss"].item() == pytest.approx(out["sft"].item() + out["dbild"].item() + out["switch"].item())
    out["switch"].backward()
    assert teacher.grad is None and student.grad is None and switched.grad.abs().sum() > 0
    # the other pair: the student is trained towards the (detached) switched output
    other = SwitchKDLoss(dbild, switch_target="student", sft_weight=0, dbild_weight=0)
    switched.grad = None
    out = other.token_sums(student, teacher, targets, MASK, switched)
    assert sorted(out) == ["loss", "switch"]
    assert out["switch"].item() == pytest.approx(switch_token_sum(student, switched, MASK, "dbild", dbild).item())
    out["loss"].backward()
    assert switched.grad is None and student.grad.abs().sum() > 0


def test_switch_weight_zero_needs_no_switched_logits() -> None:
    out = SwitchKDLoss(switch_weight=0).token_sums(logits(TRAINED), logits(REFERENCE), torch.tensor([[0, 1, 2]]), MASK)
    assert sorted(out) == ["dbild", "loss", "sft"]
    with pytest.raises(KDConfigError, match="switched"):
        SwitchKDLoss().token_sums(logits(TRAINED), logits(REFERENCE), torch.tensor([[0, 1, 2]]), MASK)


def test_masked_token_ce_sum_hand_computed() -> None:
    got = masked_token_ce_sum(logits(TRAINED), torch.tensor([[2, 0, 1]]), MASK)
    assert got.item() == pytest.approx(-math.log(softmax(TRAINED[0])[2]) - math.log(softmax(TRAINED[1])[0]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"switch_loss": "mse"}, "switch_loss"),
        ({"switch_target": "both"}, "switch_target"),
        ({"switch_temperature": 0.0}, "switch_temperature"),
        ({"switch_weight": -1.0}, "switch_weight"),
        ({"sft_weight": 0, "dbild_weight": 0, "switch_weight": 0}, "sft_weight"),
    ],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=field):
        SwitchKDLoss(**kwargs)


def test_bad_mask_shape() -> None:
    with pytest.raises(KDConfigError, match="mask"):
        switch_token_sum(logits(TRAINED), logits(REFERENCE), torch.ones(1, 2, dtype=torch.bool))
