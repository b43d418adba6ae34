"""TSD-KD loss terms: hand-computed values, the ranking term's properties and the listmle/code gradient difference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.tsd_kd import (
    TSDKDLoss,
    confidence_weights,
    entropy_regularizer,
    entropy_selection,
    plackett_luce_loss,
    plackett_luce_nll,
    prefix_mask,
    token_entropy,
    tsd_kd_terms,
    uncertain_prefix_lengths,
    weighted_jsd,
)


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p)


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def lse(values: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in values))


def t64(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


S = [[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]]  # [B=1, N=2, V=3]
T = [[[2.0, -1.0, 0.0], [0.0, 1.0, 0.0]]]


# ------------------------------------------------------------------------------------------- direct term
def test_entropy_and_confidence_weight_hand_computed() -> None:
    h_s = [entropy(softmax(row)) for row in S[0]]
    h_t = [entropy(softmax(row)) for row in T[0]]
    got_s, got_t = token_entropy(t64(S)), token_entropy(t64(T))
    assert got_s[0].tolist() == pytest.approx(h_s, rel=1e-12)
    w = confidence_weights(got_s, got_t)
    assert w[0].tolist() == pytest.approx([sigmoid(a - b) for a, b in zip(h_s, h_t)], rel=1e-12)


def test_confidence_weight_in_open_unit_interval_half_when_entropies_match_and_detached() -> None:
    torch.manual_seed(0)
    s = torch.randn(3, 7, 11, requires_grad=True)
    w = confidence_weights(token_entropy(s), token_entropy(torch.randn(3, 7, 11) * 3))
    assert bool(((w > 0) & (w < 1)).all()) and not w.requires_grad
    permuted = s.detach()[..., torch.randperm(11)]  # same distribution up to relabelling: same entropy
    w_same = confidence_weights(token_entropy(s), token_entropy(permuted))
    assert torch.allclose(w_same, torch.full_like(w_same, 0.5), atol=1e-6)


def test_weighted_jsd_hand_computed_unnormalised_beta_mixture() -> None:
    beta = 0.9
    mask = torch.tensor([[True, True]])
    expected = 0.0
    for s_row, t_row in zip(S[0], T[0]):
        q, p = softmax(s_row), softmax(t_row)
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        jsd = beta * kl(p, m) + (1 - beta) * kl(q, m)
        expected += sigmoid(entropy(q) - entropy(p)) * jsd
    s, t = t64(S), t64(T)
    w = confidence_weights(token_entropy(s), token_entropy(t))
    assert weighted_jsd(s, t, mask, w, beta).item() == pytest.approx(expected / 2, rel=1e-10)
    # A masked token is left out of the sum and of the count.
    only_first = torch.tensor([[True, False]])
    q, p = softmax(S[0][0]), softmax(T[0][0])
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    first = sigmoid(entropy(q) - entropy(p)) * (beta * kl(p, m) + (1 - beta) * kl(q, m))
    assert weighted_jsd(s, t, only_first, w, beta).item() == pytest.approx(first, rel=1e-10)


def test_direct_term_zero_when_student_equals_teacher() -> None:
    s = torch.randn(2, 4, 9, dtype=torch.float64)
    w = confidence_weights(token_entropy(s), token_entropy(s))
    assert weighted_jsd(s, s.clone(), torch.ones(2, 4, dtype=torch.bool), w).item() == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------- entropy term
def test_entropy_quantile_selection_hand_checked() -> None:
    # Valid entropies 0.1 0.5 0.2 | 0.9 0.3; padding 0.05 and 2.0.
    h = torch.tensor([[0.1, 0.5, 0.2, 0.05], [0.9, 0.3, 2.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    # q = 0.1 over 5 values: sorted 0.1 0.2 0.3 0.5 0.9, position 0.4 -> 0.1 + 0.4·0.1 = 0.14: only 0.1 dropped.
    sel = entropy_selection(h, mask, 0.1)
    assert sel.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert entropy_regularizer(h, mask, 0.1).item() == pytest.approx((0.5 + 0.2 + 0.9 + 0.3) / 4)
    # Median 0.3: E = {0.5, 0.9, 0.3}; "all_code" adds the padded positions above it (2.0, 2.0) but not 0.05.
    assert entropy_regularizer(h, mask, 0.5).item() == pytest.approx((0.5 + 0.9 + 0.3) / 3)
    code = entropy_selection(h, mask, 0.5, entropy_mask="all_code")
    assert code.tolist() == [[False, True, False, False], [True, True, True, True]]
    assert entropy_regularizer(h, mask, 0.5, "all_code").item() == pytest.approx((0.5 + 0.9 + 0.3 + 4.0) / 5)


def test_entropy_term_gradient_sharpens_selected_tokens_only() -> None:
    torch.manual_seed(1)
    s = torch.randn(1, 6, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5 + [False]])
    h = token_entropy(s)
    sel = entropy_selection(h, mask, 0.1)
    entropy_regularizer(h, mask, 0.1).backward()
    grad_norm = s.grad.abs().sum(-1)[0]
    assert bool((grad_norm[~sel[0]] == 0).all()) and bool((grad_norm[sel[0]] > 0).all())
    with torch.no_grad():  # a descent step lowers the selected entropies
        after = token_entropy(s - 0.1 * s.grad)
    assert bool((after[sel] < h.detach()[sel]).all())


# ------------------------------------------------------------------------------------------- prefix
def test_uncertain_prefix_lengths_hand_checked_sequence_and_batch() -> None:
    h = torch.tensor([[0.05, 0.05, 0.4, 0.5], [0.6, 0.2, 0.2, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    # Row 0: cum 0.05 0.10 0.50 1.00 -> first >= 0.3 at 2. Row 1 (pad ignored): cum 0.6 ... -> 0.
    assert uncertain_prefix_lengths(h, mask, 0.3).tolist() == [2, 0]
    assert uncertain_prefix_lengths(h, mask, 0.55).tolist() == [3, 0]
    # Batch (release): flattened valid 0.05 0.05 0.4 0.5 0.6 0.2 0.2, total 2: cum .025 .05 .25 .5 -> index 3.
    assert uncertain_prefix_lengths(h, mask, 0.3, scope="batch").tolist() == [3, 3]
    assert prefix_mask(torch.tensor([2, 0]), mask).tolist() == [[True, True, False, False], [False] * 4]
    assert prefix_mask(torch.tensor([3, 3]), mask).tolist() == [[True, True, True, False], [True, True, True, False]]
    # Zero entropy everywhere: no uncertain prefix.
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    assert uncertain_prefix_lengths(zeros, mask, 0.1).tolist() == [0, 0]
    assert uncertain_prefix_lengths(zeros, mask, 0.1, "batch").tolist() == [0, 0]


# ------------------------------------------------------------------------------------------- ranking term
def test_plackett_luce_nll_hand_computed_both_denominators() -> None:
    a, b, c = 1.0, 0.5, 2.0
    listmle = -(a - lse([a, b, c])) - (b - lse([b, c])) - (c - c)
    code = -(a - a) - (b - lse([a, b])) - (c - lse([a, b, c]))
    scores = t64([a, b, c])
    assert plackett_luce_nll(scores, "listmle").item() == pytest.approx(listmle, rel=1e-12)
    assert plackett_luce_nll(scores, "code").item() == pytest.approx(code, rel=1e-12)


def test_plackett_luce_loss_reranks_student_top_k_by_teacher() -> None:
    student = t64([[[2.0, 1.0, 0.5, -1.0]]])
    teacher = t64([[[0.0, 3.0, 1.0, 5.0]]])  # token 3 is the teacher's favourite but not a student candidate
    mask = torch.tensor([[True]])
    # C = tokens 0, 1, 2 (student scores 2, 1, 0.5); teacher logits on C: 0, 3, 1 -> order 1, 2, 0 -> s = 1, 0.5, 2.
    s = [1.0, 0.5, 2.0]
    expected = -(s[0] - lse(s)) - (s[1] - lse(s[1:]))
    assert plackett_luce_loss(student, teacher, mask, top_k=3).item() == pytest.approx(expected, rel=1e-12)
    code = -(s[1] - lse(s[:2])) - (s[2] - lse(s))
    assert plackett_luce_loss(student, teacher, mask, top_k=3, denominator="code").item() == pytest.approx(code)
    assert plackett_luce_loss(student, teacher, ~mask, top_k=3).item() == 0.0


def test_listmle_nonnegative_and_minimal_when_student_order_equals_teacher_order() -> None:
    torch.manual_seed(2)
    assert bool((plackett_luce_nll(torch.randn(50, 6) * 3) >= 0).all())
    scores = torch.randn(5, dtype=torch.float64)
    values = {perm: plackett_luce_nll(scores[list(perm)]).item() for perm in itertools.permutations(range(5))}
    descending = tuple(scores.argsort(descending=True).tolist())
    assert min(values, key=values.get) == descending  # the student's scores decrease along the teacher's order
    # The release's denominator is minimised by the REVERSED order instead.
    code = {perm: plackett_luce_nll(scores[list(perm)], "code").item() for perm in itertools.permutations(range(5))}
    assert min(code, key=code.get) == descending[::-1]
    # Through the full term: a teacher ranking the candidates as the student does gives the smallest loss.
    student = torch.randn(1, 1, 8, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    top = student[0, 0].topk(4).indices
    losses = []
    for perm in itertools.permutations(range(4)):
        teacher = torch.zeros_like(student)
        teacher[0, 0, top] = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)[list(perm)]
        losses.append((plackett_luce_loss(student, teacher, mask, top_k=4).item(), perm))
    assert min(losses)[1] == (0, 1, 2, 3)


@pytest.mark.parametrize("denominator", ["listmle", "code"])
def test_gradient_difference_between_listmle_and_code(denominator: str) -> None:
    """listmle raises the teacher's first candidate and lowers its last; the released code does the opposite."""
    scores = torch.zeros(4, dtype=torch.float64, requires_grad=True)  # teacher order: item 0 first ... item 3 last
    plackett_luce_nll(scores, denominator).backward()
    step = -scores.grad  # the gradient-descent direction
    if denominator == "listmle":
        assert step[0] > 0 and step[-1] < 0 and bool((step[:-1] > step[1:]).all())
    else:
        assert step[0] < 0 and step[-1] > 0 and bool((step[:-1] < step[1:]).all())
    assert step.sum().item() == pytest.approx(0.0, abs=1e-12)  # shift-invariant likelihoods
    # Training the student on the full term: listmle makes the teacher's favourite candidate the student's top-1,
    # code makes the teacher's least favourite candidate the student's top-1.
    student = torch.tensor([[[1.0, 0.9, 0.8, 0.7, -5.0]]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 9.0]]], dtype=torch.float64)  # ranks the candidates 3 > 2 > 1 > 0
    mask = torch.ones(1, 1, dtype=torch.bool)
    opt = torch.optim.SGD([student], lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        plackett_luce_loss(student, teacher, mask, top_k=4, denominator=denominator).backward()
        opt.step()
    top1 = int(student[0, 0, :4].argmax())
    assert top1 == (3 if denominator == "listmle" else 0)
    assert student.grad[0, 0, 4].item() == 0.0  # the non-candidate token gets no gradient


# ------------------------------------------------------------------------------------------- total
def test_total_is_weighted_sum_of_the_pieces_and_teacher_gets_no_gradient() -> None:
    torch.manual_seed(3)
    s = torch.randn(2, 20, 12, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 20, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 20, [True] * 15 + [False] * 5])
    terms, stats = tsd_kd_terms(s, t, mask)
    h_s, h_t = token_entropy(s), token_entropy(t)
    direct = weighted_jsd(s, t, mask, confidence_weights(h_s, h_t), 0.9)
    ent = entropy_regularizer(h_s, mask, 0.1)
    prefix = prefix_mask(uncertain_prefix_lengths(h_s, mask, 0.1), mask)
    ind = plackett_luce_loss(s, t, prefix, 10)
    assert terms["direct"].item() == pytest.approx(direct.item(), rel=1e-12)
    assert terms["entropy"].item() == pytest.approx(ent.item(), rel=1e-12)
    assert terms["indirect"].item() == pytest.approx(0.1 * ind.item(), rel=1e-12)
    assert terms["loss"].item() == pytest.approx(direct.item() + ent.item() + 0.1 * ind.item(), rel=1e-12)
    assert stats["prefix_tokens"].item() == prefix.sum().item() > 0
    terms["loss"].backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert bool((s.grad[1, 15:] == 0).all())  # padded positions get nothing (entropy_mask="valid")


def test_zero_weight_terms_are_dropped_and_all_masked_batch_is_finite() -> None:
    s, t = torch.randn(1, 3, 7, requires_grad=True), torch.randn(1, 3, 7)
    loss = TSDKDLoss(entropy_weight=0.0, indirect_weight=0.0)
    out = loss(s, t, torch.ones(1, 3, dtype=torch.bool))
    assert set(out) == {"loss", "direct"} and "prefix_tokens" not in loss.last_stats
    empty = TSDKDLoss()(s, t, torch.zeros(1, 3, dtype=torch.bool))
    assert all(bool(torch.isfinite(v)) and v.item() == 0.0 for v in empty.values())
    empty["loss"].backward()
    assert bool((s.grad == 0).all())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": 1.0}, "beta"),
        ({"entropy_quantile": 1.5}, "entropy_quantile"),
        ({"prefix_threshold": 0.0}, "prefix_threshold"),
        ({"top_k": 1}, "top_k"),
        ({"pl_denominator": "flipped"}, "pl_denominator"),
        ({"prefix_scope": "token"}, "prefix_scope"),
        ({"entropy_mask": "pad"}, "entropy_mask"),
        ({"temperature": 0.0}, "temperature"),
        ({"indirect_weight": -0.1}, "indirect_weight"),
        ({"direct_weight": 0.0, "entropy_weight": 0.0, "indirect_weight": 0.0}, "direct_weight"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=field):
        TSDKDLoss(**kwargs)
