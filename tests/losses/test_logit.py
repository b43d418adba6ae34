"""Logit losses: hand-computed values on tiny tensors and the properties their papers state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import (
    DKDLoss,
    KDLoss,
    LogitStandardKDLoss,
    PLDLoss,
    dkd_terms,
    kd_kl_div,
    pld_loss,
    standardize_logits,
)


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


S = [1.0, 2.0, 0.5]
T = [0.2, 1.0, -0.5]


def tensors(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- KD
def test_kd_kl_div_hand_computed_with_tau_squared() -> None:
    tau = 2.0
    expected = tau**2 * kl(softmax(T, tau), softmax(S, tau))
    got = kd_kl_div(tensors(S), tensors(T), temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_kl_div_is_batchmean_not_classmean() -> None:
    s2, t2 = [0.0, 0.0, 3.0], [1.0, -1.0, 0.0]
    expected = (kl(softmax(T), softmax(S)) + kl(softmax(t2), softmax(s2))) / 2
    got = kd_kl_div(tensors(S, s2), tensors(T, t2), temperature=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_weights_and_parts() -> None:
    loss = KDLoss(temperature=4.0, ce_weight=0.1, kd_weight=0.9)(tensors(S), tensors(T), torch.tensor([1]))
    ce = -math.log(softmax(S)[1])
    kd = 16 * kl(softmax(T, 4.0), softmax(S, 4.0))
    assert loss["ce"].item() == pytest.approx(0.1 * ce, rel=1e-6)
    assert loss["kd"].item() == pytest.approx(0.9 * kd, rel=1e-6)
    assert loss["loss"].item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-6)


def test_kd_zero_when_student_equals_teacher_and_positive_otherwise() -> None:
    z = torch.randn(5, 7)
    assert kd_kl_div(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl_div(z, torch.randn(5, 7)).item() > 0


def test_kd_gradient_reaches_student_only() -> None:
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    KDLoss()(s, t, torch.randint(0, 6, (4,)))["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_accepts_token_shaped_logits() -> None:
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    flat = kd_kl_div(s.reshape(6, 5), t.reshape(6, 5))
    assert kd_kl_div(s, t).item() == pytest.approx(flat.item(), rel=1e-6)


def test_kd_is_float32_under_bf16_inputs() -> None:
    s, t = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16()
    assert kd_kl_div(s, t).dtype == torch.float32


def test_class_mismatch_message_names_both_sizes() -> None:
    with pytest.raises(ValueError, match=r"student predicts 10 classes and the teacher 100"):
        KDLoss()(torch.randn(2, 10), torch.randn(2, 100), torch.tensor([0, 1]))


def test_target_shape_and_dtype_checked() -> None:
    with pytest.raises(ValueError, match="target must have shape"):
        KDLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer class indices"):
        KDLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("loss_cls", [KDLoss, DKDLoss, LogitStandardKDLoss, PLDLoss])
def test_non_positive_temperature_rejected(loss_cls: type) -> None:
    with pytest.raises(ValueError, match="temperature: must be a finite number > 0"):
        loss_cls(temperature=0.0)


# ---------------------------------------------------------------------------------------------- DKD
def official_dkd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[float, float]:
    """mdistiller's formulation: probability sums and the -1000 mask (written here independently)."""
    gt = F.one_hot(y, s.shape[1]).to(s.dtype)
    p_s, p_t = F.softmax(s / tau, 1), F.softmax(t / tau, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * tau**2
    q_t = F.softmax(t / tau - 1000.0 * gt, 1)
    log_q_s = F.log_softmax(s / tau - 1000.0 * gt, 1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") / s.shape[0] * tau**2
    return tckd.item(), nckd.item()


def test_dkd_hand_computed_three_classes() -> None:
    tau, y = 2.0, 0
    p_s, p_t = softmax(S, tau), softmax(T, tau)
    tckd = kl([p_t[0], 1 - p_t[0]], [p_s[0], 1 - p_s[0]]) * tau**2
    rest_s, rest_t = softmax(S[1:], tau), softmax(T[1:], tau)
    nckd = kl(rest_t, rest_s) * tau**2
    got_t, got_n = dkd_terms(tensors(S), tensors(T), torch.tensor([y]), tau)
    assert got_t.item() == pytest.approx(tckd, rel=1e-6)
    assert got_n.item() == pytest.approx(nckd, rel=1e-6)


def test_dkd_matches_official_formulation() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(8, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    got = dkd_terms(s, t, y, 4.0)
    want = official_dkd(s, t, y, 4.0)
    assert got[0].item() == pytest.approx(want[0], rel=1e-6)
    assert got[1].item() == pytest.approx(want[1], rel=1e-6)


def test_dkd_decomposition_of_kl() -> None:
    """The paper's identity, per sample: KL(p_T‖p_S) = TCKD + (1 − p^T_y)·NCKD."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([3])
    tckd, nckd = dkd_terms(s, t, y, 1.0)
    p_t_y = F.softmax(t, 1)[0, 3].item()
    full = kd_kl_div(s, t, 1.0).item()
    assert (tckd + (1 - p_t_y) * nckd).item() == pytest.approx(full, rel=1e-6)


def test_dkd_stable_for_confident_student() -> None:
    s = torch.tensor([[80.0, -80.0, 0.0]])
    t = torch.tensor([[1.0, 0.5, 0.0]])
    tckd, nckd = dkd_terms(s, t, torch.tensor([0]), 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)


def test_dkd_loss_weights_warmup_scale_and_zero_at_equality() -> None:
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    tckd, nckd = dkd_terms(s, t, y, 4.0)
    out = DKDLoss(alpha=2.0, beta=8.0, temperature=4.0, ce_weight=1.0)(s, t, y, kd_scale=0.25)
    assert out["tckd"].item() == pytest.approx(0.25 * 2.0 * tckd.item(), rel=1e-5)
    assert out["nckd"].item() == pytest.approx(0.25 * 8.0 * nckd.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((out["ce"] + out["tckd"] + out["nckd"]).item(), rel=1e-6)
    same = DKDLoss()(s, s.clone(), y)
    assert same["tckd"].item() == pytest.approx(0, abs=1e-6)
    assert same["nckd"].item() == pytest.approx(0, abs=1e-6)


def test_dkd_with_standardisation_is_scale_invariant() -> None:
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    loss = DKDLoss(standardize=True, ce_weight=0.0)
    assert loss(s, t, y)["loss"].item() == pytest.approx(loss(3 * s + 1, t, y)["loss"].item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------- LS
def test_standardize_hand_computed_unbiased_std() -> None:
    z = [1.0, 2.0, 4.0]
    mean = sum(z) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / 2)  # unbiased (n − 1)
    got = standardize_logits(tensors(z))[0].tolist()
    assert got == pytest.approx([(v - mean) / (std + 1e-7) for v in z], rel=1e-6)


def test_lskd_hand_computed() -> None:
    def z_score(v: list[float]) -> list[float]:
        m = sum(v) / len(v)
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
        return [(x - m) / (sd + 1e-7) for x in v]

    out = LogitStandardKDLoss(temperature=2.0, ce_weight=0.1, kd_weight=9.0)(tensors(S), tensors(T), torch.tensor([2]))
    kd = 4 * kl(softmax(z_score(T), 2.0), softmax(z_score(S), 2.0))
    assert out["kd"].item() == pytest.approx(9.0 * kd, rel=1e-6)
    assert out["ce"].item() == pytest.approx(0.1 * -math.log(softmax(S)[2]), rel=1e-6)


def test_lskd_kd_term_invariant_to_student_scale_and_shift() -> None:
    """The paper's point: the student need not match the teacher's logit range."""
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    loss = LogitStandardKDLoss(ce_weight=0.0)
    base = loss(s, t, y)["kd"].item()
    assert loss(5.0 * s - 3.0, t, y)["kd"].item() == pytest.approx(base, rel=1e-4)
    assert loss(2.0 * t + 7.0, t, y)["kd"].item() == pytest.approx(0.0, abs=1e-5)


def test_lskd_gradients_flow_through_mean_and_std() -> None:
    s = torch.randn(3, 5, requires_grad=True)
    LogitStandardKDLoss(ce_weight=0.0)(s, torch.randn(3, 5), torch.tensor([0, 1, 2]))["loss"].backward()
    # z-scoring makes the loss invariant to shifting each row, so each row's gradient sums to zero.
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert torch.allclose(s.grad.sum(-1), torch.zeros(3), atol=1e-6)


# ---------------------------------------------------------------------------------------------- PLD
def test_pld_hand_computed_three_classes() -> None:
    # y = 0; other classes by descending teacher logit: 1 (1.0), then 2 (-0.5): π* = (0, 1, 2).
    tau = 1.0
    alpha = softmax(T, tau)
    term1 = math.log(math.exp(S[0]) + math.exp(S[1]) + math.exp(S[2])) - S[0]
    term2 = math.log(math.exp(S[1]) + math.exp(S[2])) - S[1]
    expected = alpha[0] * term1 + alpha[1] * term2  # the last step (one class left) is 0
    got = pld_loss(tensors(S), tensors(T), torch.tensor([0]), temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_pld_ranking_puts_label_first_even_when_teacher_disagrees() -> None:
    # y = 2 although the teacher ranks it last: π* = (2, 1, 0).
    alpha = softmax(T, 2.0)
    term1 = math.log(sum(math.exp(v) for v in S)) - S[2]
    term2 = math.log(math.exp(S[1]) + math.exp(S[0])) - S[1]
    expected = alpha[2] * term1 + alpha[1] * term2
    got = pld_loss(tensors(S), tensors(T), torch.tensor([2]), temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_pld_equals_ce_when_teacher_weights_are_one_hot_on_label() -> None:
    s = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 1])
    t = F.one_hot(y, 6).double() * 1000.0  # softmax ≈ one-hot on the label
    assert pld_loss(s, t, y).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-9)


def test_pld_uniform_weights_is_listmle() -> None:
    s, t, y = tensors(S), tensors(T), torch.tensor([0])
    term1 = math.log(sum(math.exp(v) for v in S)) - S[0]
    term2 = math.log(math.exp(S[1]) + math.exp(S[2])) - S[1]
    got = pld_loss(s, t, y, weighting="uniform")
    assert got.item() == pytest.approx((term1 + term2) / 3, rel=1e-6)


def test_pld_translation_invariant_not_scale_invariant() -> None:
    s, t, y = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64), torch.randint(0, 8, (5,))
    base = pld_loss(s, t, y).item()
    assert pld_loss(s + 17.0, t, y).item() == pytest.approx(base, rel=1e-9)
    assert pld_loss(3.0 * s, t, y).item() != pytest.approx(base, rel=1e-3)


def test_pld_permutation_equivariant() -> None:
    s, t, y = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), torch.tensor([1, 4, 6])
    perm = torch.randperm(7)
    inverse = torch.argsort(perm)
    assert pld_loss(s[:, perm], t[:, perm], inverse[y]).item() == pytest.approx(pld_loss(s, t, y).item(), rel=1e-9)


def test_pld_gradient_matches_closed_form_and_not_teacher() -> None:
    """Appendix A: ∂L/∂s_i = Σ_{k ≤ pos(i)} α_k·softmax over the suffix from k − α_{pos(i)}."""
    s = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2])
    pld_loss(s, t, y, temperature=1.5).backward()
    others = sorted((c for c in range(5) if c != 2), key=lambda c: -t[0, c].item())
    order = [2, *others]
    alpha = F.softmax(t.detach()[0] / 1.5, 0)[order]
    sv = s.detach()[0][order]
    grad_perm = torch.zeros(5, dtype=torch.float64)
    for k in range(5):
        suffix = F.softmax(sv[k:], 0)
        grad_perm[k:] += alpha[k] * suffix
        grad_perm[k] -= alpha[k]
    expected = torch.zeros(5, dtype=torch.float64)
    expected[order] = grad_perm
    assert torch.allclose(s.grad[0], expected, atol=1e-10)
    assert t.grad is None


def test_pld_is_convex_along_a_line() -> None:
    s0, s1 = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    t, y = torch.randn(2, 6, dtype=torch.float64), torch.tensor([0, 5])
    f = [pld_loss(s0 + a * (s1 - s0), t, y).item() for a in (0.0, 0.5, 1.0)]
    assert f[1] <= (f[0] + f[2]) / 2 + 1e-12


def test_pld_module_returns_parts_and_rejects_unknown_weighting() -> None:
    out = PLDLoss(temperature=4.0)(tensors(S), tensors(T), torch.tensor([0]))
    assert set(out) == {"loss", "pld"}
    with pytest.raises(ValueError, match="weighting"):
        PLDLoss(weighting="topk")  # type: ignore[arg-type]
