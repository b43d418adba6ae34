"""LLKD's selection and weighted pseudo-label loss: uncertainty measures, class-wise thresholds, the AND rule,
weights, the loss and its gradients, empty selections, pool usage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.llkd import (
    ClassThresholds,
    LLKDLoss,
    PoolUsage,
    least_confidence,
    margin_uncertainty,
    normalized_entropy,
    select_samples,
    selection_weights,
    student_uncertainty,
    teacher_pseudo_labels,
    weighted_pseudo_label_ce,
)


# ------------------------------------------------------------------ uncertainty and confidence
def test_uncertainties_of_a_known_distribution() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert normalized_entropy(logits).item() == pytest.approx(1.5 * math.log(2) / math.log(3), rel=1e-5)
    assert least_confidence(logits).item() == pytest.approx(0.5, rel=1e-5)
    assert margin_uncertainty(logits).item() == pytest.approx(1 - (0.5 - 0.25), rel=1e-5)


def test_uncertainty_extremes_and_ranges() -> None:
    uniform = torch.zeros(2, 5)
    assert torch.allclose(normalized_entropy(uniform), torch.ones(2))
    assert torch.allclose(least_confidence(uniform), torch.full((2,), 1 - 1 / 5))
    assert torch.allclose(margin_uncertainty(uniform), torch.ones(2))
    certain = torch.tensor([[50.0, 0, 0, 0, 0]])
    for fn in (normalized_entropy, least_confidence, margin_uncertainty):
        assert fn(certain).item() == pytest.approx(0.0, abs=1e-6)
    logits = 3 * torch.randn(200, 7, generator=torch.Generator().manual_seed(0))
    for name, upper in (("entropy", 1.0), ("1-max_prob", 1 - 1 / 7), ("margin", 1.0)):
        u = student_uncertainty(logits, name)
        assert u.shape == (200,) and bool((u >= 0).all()) and bool((u <= upper + 1e-6).all())
    assert torch.equal(normalized_entropy(torch.randn(3, 1)), torch.zeros(3))  # one class: nothing to be unsure of


def test_teacher_confidence_is_the_tempered_max_probability() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    labels, confidence = teacher_pseudo_labels(logits, temperature=2.0)
    assert labels.tolist() == [0, 2]
    expected = torch.tensor([math.e / (math.e + 2), math.e**2 / (math.e**2 + 2)])
    assert torch.allclose(confidence, expected, rtol=1e-5)


# ------------------------------------------------------------------ thresholds
def _two_batches(thresholds: ClassThresholds) -> None:
    thresholds.update(torch.tensor([0, 0, 1]), torch.tensor([0.9, 0.7, 0.6]), torch.tensor([0.2, 0.4, 0.8]))
    thresholds.update(torch.tensor([1, 2]), torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.1]))


def test_ema_thresholds_after_two_updates_by_hand() -> None:
    thresholds = ClassThresholds(3, threshold_mode="ema", momentum=0.9)
    _two_batches(thresholds)
    # batch 1: class 0 means (0.8, 0.3), class 1 (0.6, 0.8), class 2 absent; batch 2: class 1 (1.0, 0.0), class 2
    # (0.2, 0.1), class 0 absent (keeps its value).
    teacher = [0.9 * 0.5 + 0.1 * 0.8, 0.9 * (0.9 * 0.5 + 0.1 * 0.6) + 0.1 * 1.0, 0.9 * 0.5 + 0.1 * 0.2]
    student = [0.9 * 0.5 + 0.1 * 0.3, 0.9 * (0.9 * 0.5 + 0.1 * 0.8) + 0.1 * 0.0, 0.9 * 0.5 + 0.1 * 0.1]
    assert thresholds.teacher.tolist() == pytest.approx(teacher, rel=1e-6)
    assert thresholds.student.tolist() == pytest.approx(student, rel=1e-6)
    assert int(thresholds.num_updates) == 2 and thresholds.seen.tolist() == [True, True, True]


def test_batch_mean_and_first_batch_initialisation() -> None:
    batch_mean = ClassThresholds(3, threshold_mode="batch_mean")
    _two_batches(batch_mean)
    assert batch_mean.teacher.tolist() == pytest.approx([0.8, 1.0, 0.2], rel=1e-6)
    assert batch_mean.student.tolist() == pytest.approx([0.3, 0.0, 0.1], abs=1e-6)
    first = ClassThresholds(3, momentum=0.9, threshold_init="first_batch")
    first.update(torch.tensor([0, 0, 1]), torch.tensor([0.9, 0.7, 0.6]), torch.tensor([0.2, 0.4, 0.8]))
    assert first.teacher.tolist() == pytest.approx([0.8, 0.6, 0.5], rel=1e-6)  # class 2 unseen: still 0.5
    first.update(torch.tensor([1, 2]), torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.1]))
    assert first.teacher.tolist() == pytest.approx([0.8, 0.9 * 0.6 + 0.1 * 1.0, 0.2], rel=1e-6)
    assert first.student.tolist() == pytest.approx([0.3, 0.9 * 0.8, 0.1], rel=1e-6)


def test_thresholds_load_into_an_unsized_module_and_refuse_another_class_count() -> None:
    thresholds = ClassThresholds(3, momentum=0.9)
    _two_batches(thresholds)
    fresh = ClassThresholds(None, momentum=0.9)
    fresh.load_state_dict(thresholds.state_dict())
    assert torch.equal(fresh.teacher, thresholds.teacher) and int(fresh.num_updates) == 2
    with pytest.raises(KDConfigError, match="num_classes"):
        ClassThresholds(4).load_state_dict(thresholds.state_dict())


# ------------------------------------------------------------------ selection and weights
def test_selection_is_the_and_of_both_class_wise_thresholds() -> None:
    tau_t, tau_s = torch.tensor([0.5, 0.95]), torch.tensor([0.5, 0.2])
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    c = torch.tensor([0.9, 0.9, 0.1, 0.1, 0.5, 0.9, 0.96, 0.99])
    u = torch.tensor([0.9, 0.1, 0.9, 0.1, 0.5, 0.9, 0.3, 0.1])
    selection = select_samples(c, u, labels, tau_t, tau_s)
    # class 0 needs c >= 0.5 and u >= 0.5 (ties pass); class 1 needs c >= 0.95 and u >= 0.2
    assert selection.mask.tolist() == [True, False, False, False, True, False, True, False]
    assert int(selection.count) == 3 and not bool(selection.fallback)


def test_weights_are_normalised_confidence_times_uncertainty() -> None:
    c = torch.tensor([0.9, 0.6, 0.8, 0.7])
    u = torch.tensor([0.5, 0.9, 0.2, 0.8])
    mask = torch.tensor([True, True, False, True])
    weights = selection_weights(c * u, mask)
    scores = [0.45, 0.54, 0.56]
    expected = [3 * s / sum(scores) for s in scores]
    assert weights[mask].tolist() == pytest.approx(expected, rel=1e-6)
    assert weights[2].item() == 0.0 and weights.sum().item() == pytest.approx(3.0, rel=1e-6)
    assert selection_weights(c * u, mask, "uniform").tolist() == [1.0, 1.0, 0.0, 1.0]
    assert selection_weights(torch.zeros(4), mask).tolist() == [1.0, 1.0, 0.0, 1.0]  # zero scores: uniform


def test_weights_sum_to_the_selected_count_on_random_batches() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        c, u = torch.rand(64, generator=g), torch.rand(64, generator=g)
        labels = torch.randint(0, 4, (64,), generator=g)
        selection = select_samples(c, u, labels, torch.rand(4, generator=g), torch.rand(4, generator=g))
        assert selection.weights.sum().item() == pytest.approx(float(selection.count), rel=1e-5)
        assert bool((selection.weights[~selection.mask] == 0).all())


def test_weighted_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2, 2])
    c, u = torch.tensor([0.9, 0.6, 0.8]), torch.tensor([0.5, 0.5, 0.9])
    selection = select_samples(c, u, labels, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5]))
    assert selection.mask.tolist() == [True, True, True]
    log_p = logits.log_softmax(-1)
    ce = [-log_p[0, 0].item(), -log_p[1, 2].item(), -log_p[2, 2].item()]
    scores = [0.45, 0.3, 0.72]
    w = [3 * s / sum(scores) for s in scores]
    expected = sum(wi * ci for wi, ci in zip(w, ce, strict=True)) / 3
    assert weighted_pseudo_label_ce(logits, labels, selection).item() == pytest.approx(expected, rel=1e-5)


def test_no_gradient_through_the_selection() -> None:
    g = torch.Generator().manual_seed(2)
    student = torch.randn(16, 4, generator=g).requires_grad_()
    teacher = (3 * torch.randn(16, 4, generator=g)).requires_grad_()
    loss_fn = LLKDLoss(num_classes=4, threshold_mode="batch_mean")
    loss, labels, selection = loss_fn(student, teacher)
    assert 0 < int(selection.count) < 16
    for t in (selection.mask, selection.weights, selection.score, labels, *loss_fn.thresholds.buffers()):
        assert not t.requires_grad
    loss.backward()
    assert teacher.grad is None  # nothing flows into the teacher or the selection
    # The gradient is that of the CE with the weights held constant, and zero on unselected rows.
    reference = student.detach().clone().requires_grad_()
    ce = F.cross_entropy(reference, labels, reduction="none")
    (selection.weights * ce).sum().div(selection.count).backward()
    assert torch.allclose(student.grad, reference.grad, atol=1e-6)
    assert bool((student.grad[~selection.mask] == 0).all())


# ------------------------------------------------------------------ empty selections and the order
def _hopeless_batch() -> tuple[torch.Tensor, torch.Tensor, LLKDLoss, LLKDLoss]:
    """Thresholds of 1.0 (select-first): no sample passes both."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(6, 3, generator=g).requires_grad_()
    teacher = torch.randn(6, 3, generator=g)
    common = dict(num_classes=3, teacher_threshold_init=1.0, student_threshold_init=1.0, threshold_order="select_first")
    return student, teacher, LLKDLoss(empty="skip", **common), LLKDLoss(empty="top_k", fallback_k=2, **common)


def test_empty_selection_skip_gives_a_zero_loss_still_attached() -> None:
    student, teacher, skip, _ = _hopeless_batch()
    loss, _, selection = skip(student, teacher)
    assert int(selection.count) == 0 and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert student.grad is not None and torch.equal(student.grad, torch.zeros_like(student.grad))


def test_empty_selection_top_k_falls_back_to_the_best_scores() -> None:
    student, teacher, _, top_k = _hopeless_batch()
    loss, labels, selection = top_k(student, teacher)
    score = teacher.softmax(-1).amax(-1) * normalized_entropy(student.detach())
    best = set(score.topk(2).indices.tolist())
    assert bool(selection.fallback) and set(selection.mask.nonzero().flatten().tolist()) == best
    assert selection.weights.sum().item() == pytest.approx(2.0, rel=1e-6)
    ce = F.cross_entropy(student.detach(), labels, reduction="none")
    assert loss.item() == pytest.approx(((selection.weights * ce).sum() / 2).item(), rel=1e-5)
    # A non-empty selection is left alone by the top-k mode.
    nonempty = select_samples(torch.ones(3), torch.ones(3), torch.zeros(3, dtype=torch.long), torch.zeros(1),
                              torch.zeros(1), empty="top_k", fallback_k=1)  # fmt: skip
    assert nonempty.mask.tolist() == [True] * 3 and not bool(nonempty.fallback)


def test_update_first_selects_with_this_batchs_thresholds() -> None:
    # One class; batch-mean thresholds: update-first compares each sample with the batch's means, select-first with
    # the initial 0.5.
    teacher = torch.tensor([[4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    student = torch.zeros(4, 2)  # u = 1 everywhere
    first = LLKDLoss(num_classes=2, threshold_mode="batch_mean", threshold_order="update_first")
    later = LLKDLoss(num_classes=2, threshold_mode="batch_mean", threshold_order="select_first")
    c = teacher.softmax(-1)[:, 0]
    assert first(student, teacher)[2].mask.tolist() == (c >= c.mean()).tolist()
    assert later(student, teacher)[2].mask.tolist() == [True] * 4
    assert torch.allclose(first.thresholds.teacher, later.thresholds.teacher)  # both updated once


# ------------------------------------------------------------------ pool usage
def test_pool_usage_marks_selected_items_and_only_grows() -> None:
    usage = PoolUsage(10)
    usage.mark(torch.tensor([1, 3, 3, 5]), torch.tensor([True, False, True, False]))
    assert usage.used.nonzero().flatten().tolist() == [1, 3]
    usage.mark(torch.tensor([1, 2]), torch.tensor([False, False]))  # unselected now: stays used
    assert usage.fraction().item() == pytest.approx(0.2)
    fresh = PoolUsage()
    assert fresh.fraction().item() == 0.0
    fresh.load_state_dict(usage.state_dict())
    assert torch.equal(fresh.used, usage.used)
    with pytest.raises(KDConfigError, match="unlabeled pool has 12 items"):
        PoolUsage(10).build(12)


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"threshold_mode": "percentile"}, "threshold_mode"),
        ({"threshold_init": "zero"}, "threshold_init"),
        ({"teacher_threshold_init": 1.5}, "teacher_threshold_init"),
        ({"uncertainty": "variance"}, "uncertainty"),
        ({"threshold_order": "never"}, "threshold_order"),
        ({"empty": "raise"}, "empty"),
        ({"fallback_k": 0}, "fallback_k"),
        ({"weighting": "softmax"}, "weighting"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=rf"^{field}: "):
        LLKDLoss(**kwargs)
