"""BD-KD loss (RECONSTRUCTION / UNVERIFIED rule): weights and terms hand-computed with `math`, the rule's
direction, gradients kept apart between the two networks."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses.bd_kd import BDKDLoss, bd_kd_weights


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def entropy(p: list[float]) -> float:
    return -sum(a * math.log(a) for a in p)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Sample 0: the student is flatter than the teacher (Δ > 0, reverse KL); sample 1: it is sharper (Δ < 0, forward KL).
S = [[0.3, 0.1, -0.2], [4.0, -1.0, 0.0]]
T = [[2.5, -0.5, 0.0], [1.0, 0.5, 0.2]]
Y = [0, 1]
TAU = 2.0


def tensors(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def gaps() -> list[float]:
    return [entropy(softmax(s, TAU)) - entropy(softmax(t, TAU)) for s, t in zip(S, T)]


def test_entropy_gaps_of_the_fixture_have_both_signs() -> None:
    d = gaps()
    assert d[0] > 0.1 and d[1] < -0.1


def test_hard_rule_weights_hand_checked() -> None:
    w_f, w_r = bd_kd_weights(
        tensors(S), tensors(T), TAU, "hard", forward_weight=0.3, reverse_weight=0.7, other_weight=0.1
    )
    # Δ > 0 (student less confident): reverse KL λ_r, forward λ_0; Δ ≤ 0: forward λ_f, reverse λ_0.
    assert w_r.tolist() == pytest.approx([0.7, 0.1])
    assert w_f.tolist() == pytest.approx([0.1, 0.3])


def test_hard_rule_at_zero_gap_uses_forward_kl() -> None:
    z = tensors(S)
    w_f, w_r = bd_kd_weights(z, z.clone(), TAU, "hard", other_weight=0.5)
    assert w_f.tolist() == [1.0, 1.0] and w_r.tolist() == [0.5, 0.5]


def test_sigmoid_rule_weights_hand_checked() -> None:
    kappa = 3.0
    w_f, w_r = bd_kd_weights(tensors(S), tensors(T), TAU, "sigmoid", 0.6, 0.8, 0.0, kappa)
    want_share = [sigmoid(kappa * d) for d in gaps()]
    assert w_r.tolist() == pytest.approx([0.8 * w for w in want_share], rel=1e-9)
    assert w_f.tolist() == pytest.approx([0.6 * (1 - w) for w in want_share], rel=1e-9)


def test_weights_carry_no_gradient() -> None:
    w_f, w_r = bd_kd_weights(tensors(S, grad=True), tensors(T, grad=True), TAU, "sigmoid")
    assert not w_f.requires_grad and not w_r.requires_grad


@pytest.mark.parametrize("teacher_kl", ["reverse", "forward"])
def test_all_terms_hand_computed(teacher_kl: str) -> None:
    alpha, beta, w_ce, lam_f, lam_r, lam_0 = 0.5, 2.0, 0.7, 0.3, 0.9, 0.2
    loss = BDKDLoss(TAU, alpha, beta, w_ce, "hard", lam_f, lam_r, lam_0, teacher_kl=teacher_kl)
    out = loss(tensors(S), tensors(T), torch.tensor(Y))
    p_s = [softmax(s, TAU) for s in S]
    p_t = [softmax(t, TAU) for t in T]
    w_f, w_r = [lam_0, lam_f], [lam_r, lam_0]  # from the signs of the gaps
    kd_f = alpha * TAU**2 * sum(w_f[i] * kl(p_t[i], p_s[i]) for i in range(2)) / 2
    kd_r = alpha * TAU**2 * sum(w_r[i] * kl(p_s[i], p_t[i]) for i in range(2)) / 2
    ce = w_ce * sum(-math.log(softmax(S[i])[Y[i]]) for i in range(2)) / 2
    t_ce = w_ce * sum(-math.log(softmax(T[i])[Y[i]]) for i in range(2)) / 2
    if teacher_kl == "reverse":
        t_kl = beta * TAU**2 * sum(kl(p_s[i], p_t[i]) for i in range(2)) / 2
    else:
        t_kl = beta * TAU**2 * sum(kl(p_t[i], p_s[i]) for i in range(2)) / 2
    assert out["kd_forward"].item() == pytest.approx(kd_f, rel=1e-9)
    assert out["kd_reverse"].item() == pytest.approx(kd_r, rel=1e-9)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert out["teacher_ce"].item() == pytest.approx(t_ce, rel=1e-9)
    assert out["teacher_kl"].item() == pytest.approx(t_kl, rel=1e-9)
    assert out["loss"].item() == pytest.approx(kd_f + kd_r + ce + t_ce + t_kl, rel=1e-9)


def test_student_loss_does_not_reach_the_teacher_and_vice_versa() -> None:
    s, t = tensors(S, grad=True), tensors(T, grad=True)
    out = BDKDLoss(weighting="sigmoid")(s, t, torch.tensor(Y))
    (out["ce"] + out["kd_forward"] + out["kd_reverse"]).backward(retain_graph=True)
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    s.grad = None
    (out["teacher_ce"] + out["teacher_kl"]).backward(retain_graph=True)
    assert t.grad is not None and t.grad.abs().sum() > 0
    assert s.grad is None


def test_total_gives_each_network_its_own_gradient_with_constant_weights() -> None:
    """Back-propagating "loss" = each network's own objective, with the rule's weights as constants."""
    lam = {"forward_weight": 0.4, "reverse_weight": 0.9, "other_weight": 0.1}
    s, t = tensors(S, grad=True), tensors(T, grad=True)
    BDKDLoss(TAU, 1.5, 0.5, 1.0, "hard", **lam)(s, t, torch.tensor(Y))["loss"].backward()

    s2 = tensors(S, grad=True)
    ls = torch.log_softmax(s2 / TAU, -1)
    lt = torch.log_softmax(tensors(T) / TAU, -1)
    w_f, w_r = torch.tensor([0.1, 0.4]), torch.tensor([0.9, 0.1])
    fkl = (lt.exp() * (lt - ls)).sum(-1)
    rkl = (ls.exp() * (ls - lt)).sum(-1)
    student = torch.nn.functional.cross_entropy(s2, torch.tensor(Y)) + 1.5 * TAU**2 * (w_f * fkl + w_r * rkl).mean()
    student.backward()
    assert torch.allclose(s.grad, s2.grad, rtol=1e-9)

    t2 = tensors(T, grad=True)
    lt2 = torch.log_softmax(t2 / TAU, -1)
    ls_c = torch.log_softmax(tensors(S) / TAU, -1)
    teacher = (
        torch.nn.functional.cross_entropy(t2, torch.tensor(Y))
        + 0.5 * TAU**2 * (ls_c.exp() * (ls_c - lt2)).sum(-1).mean()
    )
    teacher.backward()
    assert torch.allclose(t.grad, t2.grad, rtol=1e-9)


def test_stable_for_confident_logits_and_float32_under_bf16() -> None:
    s = torch.tensor([[80.0, -80.0, 0.0]])
    t = torch.tensor([[-60.0, 60.0, 0.0]])
    out = BDKDLoss()(s, t, torch.tensor([0]))
    assert all(torch.isfinite(v) for v in out.values())
    out = BDKDLoss()(torch.randn(4, 5).bfloat16(), torch.randn(4, 5).bfloat16(), torch.tensor([0, 1, 2, 3]))
    assert out["loss"].dtype == torch.float32


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="weighting must be 'hard' or 'sigmoid'"):
        BDKDLoss(weighting="soft")
    with pytest.raises(ValueError, match="teacher_kl must be 'reverse' or 'forward'"):
        BDKDLoss(teacher_kl="both")
    with pytest.raises(ValueError, match="other_weight must be >= 0"):
        BDKDLoss(other_weight=-1.0)
    with pytest.raises(ValueError, match="temperature: must be a finite number > 0"):
        BDKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="student predicts 10 classes and the teacher 100"):
        BDKDLoss()(torch.randn(2, 10), torch.randn(2, 100), torch.tensor([0, 1]))
