"""Align-TI loss terms: hand-computed values on tiny tensors, the TPA factorisation identity, IRS properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.align_ti import (
    instruction_relevance_scores,
    instruction_to_vision_attention,
    iva_attention_kl,
    iva_loss,
    num_salient,
    salient_visual_tokens,
    transition_probability_alignment,
)


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


# ---------------------------------------------------------------------------------------------- attention vector
def test_instruction_to_vision_attention_by_hand() -> None:
    # L = 2 visual + 3 text tokens; instruction tokens at sequence positions 2 and 3 (text positions 0, 1).
    attn = torch.zeros(1, 2, 5, 5)
    attn[0, 0, 2, :3] = torch.tensor([0.6, 0.2, 0.2])
    attn[0, 1, 2, :3] = torch.tensor([0.2, 0.2, 0.6])
    attn[0, 0, 3, :4] = torch.tensor([0.1, 0.3, 0.3, 0.3])
    attn[0, 1, 3, :4] = torch.tensor([0.1, 0.1, 0.4, 0.4])
    attn[0, :, 4, :] = 0.2  # not an instruction token: ignored
    text_mask = torch.tensor([[True, True, False]])
    a = instruction_to_vision_attention(attn, text_mask, num_image_tokens=2)
    # heads mean: row 2 -> (0.4, 0.2), row 3 -> (0.1, 0.2); tokens mean -> (0.25, 0.2); L1 -> (5/9, 4/9)
    assert torch.allclose(a, torch.tensor([[5 / 9, 4 / 9]]))
    full_mask = torch.tensor([[False, False, True, True, False]])
    assert torch.allclose(instruction_to_vision_attention(attn, full_mask, 2), a)


def test_instruction_to_vision_attention_without_instruction_is_uniform_and_checks_shapes() -> None:
    attn = torch.softmax(torch.randn(2, 1, 6, 6), -1)
    a = instruction_to_vision_attention(attn, torch.zeros(2, 3, dtype=torch.bool), num_image_tokens=3)
    assert torch.allclose(a, torch.full((2, 3), 1 / 3))
    with pytest.raises(KDConfigError, match="instruction_mask"):
        instruction_to_vision_attention(attn, torch.zeros(2, 4, dtype=torch.bool), num_image_tokens=3)
    with pytest.raises(KDConfigError, match="num_image_tokens"):
        instruction_to_vision_attention(attn, torch.zeros(2, 6, dtype=torch.bool), num_image_tokens=7)


# ---------------------------------------------------------------------------------------------- IRS
def test_irs_by_hand_and_properties() -> None:
    same = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    varying = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    mixed = torch.tensor([[0.6, 0.8], [0.8, 0.6]])  # unit vectors, cos = 0.96
    scores = instruction_relevance_scores([same, varying])
    # varying: 12 ordered pairs, the only similar ones are (0, 3) and (3, 0): mean cos = 2/12
    assert torch.allclose(scores, torch.tensor([0.0, 1 - 2 / 12]), atol=1e-6)
    assert torch.allclose(instruction_relevance_scores([mixed]), torch.tensor([0.04]), atol=1e-6)
    # overlap: Σ min over a pair of L1 rows; rows (0.6, 0.4) and (0.4, 0.6) overlap 0.8
    overlap = instruction_relevance_scores([torch.tensor([[0.6, 0.4], [0.4, 0.6]])], similarity="overlap")
    assert torch.allclose(overlap, torch.tensor([0.2]), atol=1e-6)
    assert torch.allclose(instruction_relevance_scores(torch.stack([same, varying])), scores)
    with pytest.raises(KDConfigError, match="similarity"):
        instruction_relevance_scores([same], similarity="dot")
    with pytest.raises(KDConfigError, match="N >= 2"):
        instruction_relevance_scores([same[:1]])


# ---------------------------------------------------------------------------------------------- salient tokens
@pytest.mark.parametrize(("n", "ratio", "k"), [(16, 0.25, 4), (10, 0.3, 3), (7, 0.25, 2), (5, 0.01, 1), (4, 1.0, 4)])
def test_salient_keeps_ceil_ratio(n: int, ratio: float, k: int) -> None:
    assert num_salient(n, ratio) == k
    a = torch.rand(3, n)
    indices, mask = salient_visual_tokens(a, ratio)
    assert indices.shape == (3, k) and mask.sum(-1).tolist() == [k] * 3
    kept_min = torch.where(mask, a, torch.full_like(a, 2.0)).min(-1).values
    dropped_max = torch.where(mask, torch.full_like(a, -1.0), a).max(-1).values
    assert bool((kept_min >= dropped_max).all())


def test_salient_ratio_out_of_range() -> None:
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(KDConfigError, match="salient_ratio"):
            num_salient(8, bad)


# ---------------------------------------------------------------------------------------------- IVA
def test_iva_loss_by_hand_and_gradients() -> None:
    torch.manual_seed(0)
    hs = torch.tensor([[[1.0], [2.0]], [[0.0], [-1.0]]], requires_grad=True)  # d_S = 1
    ht = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 3.0], [5.0, 5.0]]], requires_grad=True)  # d_T = 2
    proj = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0], [2.0]]))
    mask = torch.tensor([[True, False], [True, False]])
    loss = iva_loss(hs, ht, mask, proj)
    # W h: (1, 2) vs (1, 1) -> 1/2 ; (0, 0) vs (0, 3) -> 9/2 ; mean over 2 salient tokens = 2.5
    assert torch.isclose(loss, torch.tensor(2.5))
    loss.backward()
    assert hs.grad is not None and proj.weight.grad is not None and ht.grad is None
    assert hs.grad[:, 1].abs().sum() == 0  # non-salient tokens get nothing
    full = iva_loss(hs.detach(), ht.detach(), None, proj)
    # + (2, 4) vs (0, 0) -> 20/2 ; (-1, -2) vs (5, 5) -> (36 + 49)/2 ; mean of four
    assert torch.isclose(full, torch.tensor((0.5 + 4.5 + 10 + 42.5) / 4))
    assert iva_loss(ht.detach(), ht.detach(), mask) == 0
    # normalize: layer norm of both sides; (1, 2) and (1, 1) -> (-1, 1) and (0, 0) -> 1 ; (0, 0) vs (-1, 1) -> 1
    assert torch.isclose(iva_loss(hs, ht, mask, proj, normalize=True), torch.tensor(1.0), atol=1e-4)
    scaled = iva_loss(hs, 10 * ht, mask, proj, normalize=True)
    assert torch.isclose(scaled, iva_loss(hs, ht, mask, proj, normalize=True), atol=1e-4)
    with pytest.raises(KDConfigError, match="projector"):
        iva_loss(hs, ht, mask)


def test_iva_attention_kl_by_hand() -> None:
    a_t = torch.tensor([[0.5, 0.3, 0.2]])
    a_s = torch.tensor([[0.2, 0.2, 0.6]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    value = iva_attention_kl(a_s, a_t, mask, eps=0.0)
    assert torch.isclose(value, torch.tensor(kl([0.625, 0.375], [0.5, 0.5])), atol=1e-6)
    value.backward()
    assert a_s.grad is not None
    assert iva_attention_kl(a_t, a_t, mask) < 1e-7


# ---------------------------------------------------------------------------------------------- TPA
def test_tpa_by_hand_top2() -> None:
    teacher = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    student = torch.tensor([[[0.0, 1.0, 5.0], [1.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True]])
    total, count = transition_probability_alignment(student, teacher, mask, top_k=2)
    # K_0 = {0, 1}; K_1 = {2, then 0 or 1 (tie: take whichever topk picks)}
    idx1 = teacher[0, 1].topk(2).indices.tolist()
    r_t0, r_s0 = softmax([2.0, 1.0]), softmax([0.0, 1.0])
    r_t1, r_s1 = softmax([teacher[0, 1, i].item() for i in idx1]), softmax([student[0, 1, i].item() for i in idx1])
    joint_t = [a * b for a in r_t0 for b in r_t1]
    joint_s = [a * b for a in r_s0 for b in r_s1]
    assert count == 1
    assert math.isclose(total.item(), kl(joint_t, joint_s), rel_tol=1e-5)


def test_tpa_equals_sum_of_restricted_token_kls() -> None:
    """log of an outer product splits: KL(J_T ‖ J_S) = restricted KL at t + restricted KL at t+1."""
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[False, True, True, True, False], [True, True, False, True, True]])
    k, tau = 4, 2.0
    total, count = transition_probability_alignment(s, t, mask, top_k=k, temperature=tau)
    index = t.topk(k, -1).indices
    log_pt = torch.log_softmax(t.gather(-1, index) / tau, -1)
    log_ps = torch.log_softmax(s.gather(-1, index) / tau, -1)
    token_kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [B, T]
    valid = mask[:, :-1] & mask[:, 1:]
    expected = ((token_kl[:, :-1] + token_kl[:, 1:]) * valid).sum()
    assert int(count) == 4  # (1,2), (2,3) in row 0; (0,1), (3,4) in row 1
    assert torch.allclose(total, expected, atol=1e-5)


def test_tpa_zero_when_equal_gradients_student_only_and_full_k_is_token_kl() -> None:
    torch.manual_seed(2)
    t = torch.randn(1, 4, 6, requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    zero, _ = transition_probability_alignment(t.detach().clone(), t, mask, top_k=3)
    assert abs(zero.item()) < 1e-6
    s = torch.randn(1, 4, 6, requires_grad=True)
    total, count = transition_probability_alignment(s, t, mask, top_k=50)  # k capped at V: full distributions
    total.backward()
    assert s.grad is not None and t.grad is None
    log_p, log_q = torch.log_softmax(t.detach(), -1), torch.log_softmax(s.detach(), -1)
    token_kl = (log_p.exp() * (log_p - log_q)).sum(-1)[0]
    assert torch.isclose(total, token_kl[:-1].sum() + token_kl[1:].sum(), atol=1e-5) and int(count) == 3


def test_tpa_bad_inputs() -> None:
    s = torch.randn(1, 3, 5)
    with pytest.raises(KDConfigError, match="tpa_top_k"):
        transition_probability_alignment(s, s, torch.ones(1, 3, dtype=torch.bool), top_k=0)
    with pytest.raises(KDConfigError, match="temperature"):
        transition_probability_alignment(s, s, torch.ones(1, 3, dtype=torch.bool), temperature=0.0)
    with pytest.raises(KDConfigError, match="logits"):
        transition_probability_alignment(s, torch.randn(1, 3, 6), torch.ones(1, 3, dtype=torch.bool))
