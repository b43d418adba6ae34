"""The on-policy-distillation alignment math (kd_lightning.metrics.opd_alignment): hand-computed ideal gradients, the
two distillation directions against autograd, node/candidate selection, the spec's digit-parity toy with analytic
success probabilities (a Bayes-optimal teacher aligns with the ideal gradient), and the CI aggregation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import KDConfigError
from kd_lightning.metrics.opd_alignment import (
    alignment_cosine,
    candidate_set,
    difference_ci,
    forward_kl_direction,
    ideal_gradient,
    mean_ci,
    node_alignments,
    position_bucket,
    renormalise,
    reverse_kl_direction,
    select_nodes,
    summarise,
    token_entropy,
)


# ---------------------------------------------------------------------------------------------- ideal gradient
def test_ideal_gradient_by_hand_on_three_candidates() -> None:
    pi = torch.tensor([0.5, 0.3, 0.2])
    p_succ = torch.tensor([1.0, 0.0, 0.5])
    # <pi, P> = 0.5 + 0 + 0.1 = 0.6; g* = pi * (P - 0.6)
    expected = torch.tensor([0.5 * 0.4, 0.3 * -0.6, 0.2 * -0.1])
    assert torch.allclose(ideal_gradient(pi, p_succ), expected)
    # it is the gradient of L_ideal = sum_k softmax(z)_k P_k with respect to the logits z
    z = torch.log(pi).requires_grad_(True)
    (torch.softmax(z, -1) * p_succ).sum().backward()
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_ideal_gradient_renormalises_pi_on_the_candidates_and_is_zero_elsewhere() -> None:
    # pi over 4 tokens; K_u = {0, 1, 2} holds 0.8 of the mass -> pi_K = [0.5, 0.3, 0.2]
    probs = torch.tensor([0.4, 0.24, 0.16, 0.2])
    candidates = torch.tensor([0, 1, 2])
    assert torch.allclose(renormalise(probs, candidates), torch.tensor([0.5, 0.3, 0.2]))
    result = node_alignments(
        torch.log(probs), {"t": torch.log(probs)}, candidates, torch.tensor([1.0, 0.0, 0.5]), ("forward_kl",)
    )
    assert torch.allclose(result["ideal"], torch.tensor([0.2, -0.18, -0.02, 0.0]), atol=1e-6)
    assert result["expected_success"] == pytest.approx(0.6)
    assert result["spread"] == pytest.approx(1.0)
    # the target equals the student: no distillation direction -> undefined cosine (not a number)
    assert math.isnan(result["cosine"][("t", "forward_kl")]) and result["skipped"] is None


def test_equal_success_gives_zero_ideal_gradient_and_a_skipped_node() -> None:
    logits = torch.tensor([2.0, 0.5, -1.0, 0.3])
    teacher = torch.tensor([0.0, 1.0, 0.0, 2.0])
    candidates = torch.tensor([0, 1, 3])
    for value in (0.0, 0.375, 1.0):
        result = node_alignments(logits, {"t": teacher}, candidates, torch.full((3,), value))
        assert torch.count_nonzero(result["ideal"]) == 0
        assert result["skipped"] == "equal_success"
        assert all(math.isnan(c) for c in result["cosine"].values())
    # a spread within equal_tol is "equal" too; above it the node counts
    near = torch.tensor([0.5, 0.5, 0.5 + 1e-3])
    assert node_alignments(logits, {"t": teacher}, candidates, near, equal_tol=1e-2)["skipped"] == "equal_success"
    assert node_alignments(logits, {"t": teacher}, candidates, near)["skipped"] is None


# ---------------------------------------------------------------------------------------------- directions
def test_forward_kl_direction_is_minus_the_gradient_of_kl_q_pi() -> None:
    torch.manual_seed(0)
    z, zt = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    z.requires_grad_(True)
    log_pi, log_q = F.log_softmax(z, -1), F.log_softmax(zt, -1)
    (log_q.exp() * (log_q - log_pi)).sum().backward()
    assert torch.allclose(forward_kl_direction(log_pi.detach(), log_q), -z.grad)


def test_reverse_kl_direction_by_hand_and_as_minus_the_gradient_of_kl_pi_q() -> None:
    pi, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64)
    ratio = [math.log(2.0), math.log(2.0 / 3.0)]  # log pi - log q
    kl = 0.5 * ratio[0] + 0.5 * ratio[1]
    expected = torch.tensor([-0.5 * (ratio[0] - kl), -0.5 * (ratio[1] - kl)], dtype=torch.float64)
    assert torch.allclose(reverse_kl_direction(pi.log(), q.log()), expected)
    torch.manual_seed(1)
    for _ in range(3):
        z = torch.randn(9, dtype=torch.float64, requires_grad=True)
        log_q = F.log_softmax(torch.randn(9, dtype=torch.float64), -1)
        log_pi = F.log_softmax(z, -1)
        (log_pi.exp() * (log_pi - log_q)).sum().backward()
        assert torch.allclose(reverse_kl_direction(log_pi.detach(), log_q), -z.grad)


def test_cosine_and_temperature() -> None:
    assert alignment_cosine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert alignment_cosine(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])) == pytest.approx(-1 / math.sqrt(2))
    assert math.isnan(alignment_cosine(torch.zeros(3), torch.ones(3)))
    logits = torch.tensor([1.0, 2.0, 4.0])
    assert token_entropy(logits, 2.0) == pytest.approx(float(token_entropy(logits / 2.0)))
    assert token_entropy(torch.zeros(4)) == pytest.approx(math.log(4))


# ---------------------------------------------------------------------------------------------- nodes
def test_node_selection_every_nth_plus_top_entropy() -> None:
    entropy = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.0, 0.9, 0.5, 0.1, 0.2, 0.3])
    # every 4th: 0, 4, 8; top-3 entropy: 1 and 5 (tie, both 0.9), then 6 (0.5)
    assert select_nodes(entropy, every=4, top_entropy=3).tolist() == [0, 1, 4, 5, 6, 8]
    assert select_nodes(entropy, every=0, top_entropy=2).tolist() == [1, 5]
    assert select_nodes(entropy, every=3, top_entropy=0).tolist() == [0, 3, 6, 9]
    assert select_nodes(entropy, every=100, top_entropy=100).tolist() == list(range(10))
    with pytest.raises(KDConfigError, match="nodes"):
        select_nodes(entropy, every=-1)


def test_candidate_set_top_k_plus_the_sampled_token() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, 4.0, -2.0, 3.0])
    assert candidate_set(logits, sampled_token=3, k=3).tolist() == [1, 3, 5]  # sampled among the top 3
    assert candidate_set(logits, sampled_token=4, k=3).tolist() == [1, 3, 5, 4]  # appended
    assert candidate_set(logits, sampled_token=0, k=10).tolist() == [1, 3, 5, 2, 0, 4]  # K > V: the vocabulary
    with pytest.raises(KDConfigError, match="candidates"):
        candidate_set(logits, 0, k=0)


# ---------------------------------------------------------------------------------------------- the parity toy
def _parity_success(odd_probs: list[float], parity_so_far: int) -> float:
    """P(the digit sum ends even) when the digits still to come are odd with the given probabilities."""
    prod = 1.0
    for o in odd_probs:
        prod *= 1.0 - 2.0 * o
    p_remaining_even = 0.5 * (1.0 + prod)
    return p_remaining_even if parity_so_far == 0 else 1.0 - p_remaining_even


def test_bayes_optimal_teacher_aligns_on_failing_prefixes_of_the_parity_toy() -> None:
    """Spec's toy: write L digits whose sum is even (exact verifier). The student picks digit d at step j with a
    fixed random policy pi_j; P_succ(u, k) follows analytically. The Bayes-optimal teacher is the student
    conditioned on success, q(k|u) ∝ pi(k|u) P_succ(u, k) (following it always succeeds): its forward-KL direction
    q - pi equals g*/<pi, P_succ>, so the alignment is 1 where K_u covers the vocabulary, and near 1 with K = 8."""
    generator = torch.Generator().manual_seed(0)
    length, digits = 4, 10
    odd = torch.arange(digits) % 2 == 1
    logits = [2.0 * torch.randn(digits, generator=generator) for _ in range(length)]
    policies = [torch.softmax(z, -1) for z in logits]
    odd_probs = [float(p[odd].sum()) for p in policies]
    checked, near_one = 0, []
    for step in range(length):
        for parity in (0, 1):  # the digit sum of the prefix so far
            after = odd_probs[step + 1 :]
            p_succ = torch.tensor([_parity_success(after, (parity + d) % 2) for d in range(digits)])
            pi = policies[step]
            expected = float((pi * p_succ).sum())
            if expected >= 1.0 - 1e-9:
                continue  # not a failing prefix
            teacher = torch.log(pi * p_succ / expected)  # log 0 = -inf for the digits that surely fail
            teacher = torch.where(torch.isinf(teacher), torch.full_like(teacher, -1e4), teacher)
            every = torch.arange(digits)
            full = node_alignments(logits[step], {"bayes": teacher}, every, p_succ, ("forward_kl",))
            assert full["cosine"][("bayes", "forward_kl")] == pytest.approx(1.0, abs=1e-5)
            top = candidate_set(logits[step], int(pi.argmin()), k=8)  # K = 8 + a sampled unlikely token
            cand = node_alignments(logits[step], {"bayes": teacher}, top, p_succ[top], ("forward_kl",))
            near_one.append(cand["cosine"][("bayes", "forward_kl")])
            restricted = node_alignments(
                logits[step], {"bayes": teacher}, top, p_succ[top], ("forward_kl",), space="candidates"
            )
            assert restricted["cosine"][("bayes", "forward_kl")] == pytest.approx(1.0, abs=1e-5)
            # an anti-teacher (the student conditioned on FAILURE) points the other way
            anti = torch.log((pi * (1 - p_succ)).clamp_min(1e-30))
            assert node_alignments(logits[step], {"anti": anti}, every, p_succ)["cosine"][
                ("anti", "forward_kl")
            ] == pytest.approx(-1.0, abs=1e-5)
            checked += 1
    assert checked == 2 * length  # every prefix of this random student can fail
    assert min(near_one) > 0.9


# ---------------------------------------------------------------------------------------------- aggregation
def test_mean_ci_and_difference_by_hand() -> None:
    stats = mean_ci([1.0, 2.0, 3.0, float("nan")])
    half = 1.959963984540054 * 1.0 / math.sqrt(3)  # sd = 1
    assert stats["mean"] == pytest.approx(2.0) and stats["n"] == 3
    assert stats["ci_low"] == pytest.approx(2.0 - half) and stats["ci_high"] == pytest.approx(2.0 + half)
    assert mean_ci([0.5]) == {"mean": 0.5, "ci_low": None, "ci_high": None, "n": 1}
    assert mean_ci([])["mean"] is None
    gap = difference_ci([1.0, 3.0], [0.0, 0.0, 0.0])
    assert gap["difference"] == pytest.approx(2.0)
    assert gap["ci_high"] - gap["difference"] == pytest.approx(1.959963984540054 * math.sqrt(2.0 / 2))
    with pytest.raises(KDConfigError, match="ci_level"):
        mean_ci([1.0, 2.0], level=1.5)


def test_position_buckets() -> None:
    expected = ["0-33%", "0-33%", "33-67%", "67-100%", "67-100%"]
    assert [position_bucket(x) for x in (0.0, 0.2, 0.34, 0.7, 1.0)] == expected
    assert position_bucket(0.5, 2) == "50-100%"


def test_summarise_averages_questions_first_and_counts_skipped_nodes() -> None:
    def row(question: int, correct: int, position: float, cosine: float | str) -> dict:
        return {
            "question": question,
            "rollout_correct": correct,
            "relative_position": position,
            "configuration": "teacher",
            "divergence": "forward_kl",
            "cosine": cosine,
        }

    rows = [
        row(0, 0, 0.1, 0.9),
        row(0, 0, 0.9, 0.7),  # question 0: mean 0.8
        row(1, 0, 0.5, 0.4),  # question 1: 0.4
        row(2, 1, 0.1, 0.1),
        row(2, 1, 0.5, ""),  # skipped
        row(3, 1, 0.9, -0.1),
    ]
    summary = summarise(rows, ci_unit="question")
    incorrect = summary["by_correctness"]["teacher/forward_kl"]["incorrect"]
    assert incorrect["mean"] == pytest.approx(0.6)  # (0.8 + 0.4) / 2, not the node mean 2/3
    assert (incorrect["n_nodes"], incorrect["n_questions"], incorrect["n_skipped"]) == (3, 2, 0)
    correct = summary["by_correctness"]["teacher/forward_kl"]["correct"]
    assert correct["mean"] == pytest.approx(0.0) and correct["n_skipped"] == 1
    assert summary["incorrect_minus_correct"]["teacher/forward_kl"]["difference"] == pytest.approx(0.6)
    by_node = summarise(rows, ci_unit="node")["by_correctness"]["teacher/forward_kl"]["incorrect"]
    assert by_node["mean"] == pytest.approx(2.0 / 3.0)
    positions = summary["by_position"]["teacher/forward_kl"]
    assert list(positions) == ["0-33%", "33-67%", "67-100%"]
    assert positions["0-33%"]["mean"] == pytest.approx(0.5)  # questions 0 (0.9) and 2 (0.1)
