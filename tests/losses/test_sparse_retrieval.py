"""Sparse-retrieval distillation losses (Geng et al. 2024): hand-computed values and properties."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.schedule import Progress
from kd_lightning.losses.sparse_retrieval import (
    FlopsRegularizer,
    document_frequency,
    ensemble_targets,
    flops_lambda,
    flops_loss,
    gather_with_grad,
    idf_from_document_frequency,
    info_nce,
    margin_mse,
    minmax_per_query,
    ranking_kl,
)

pytest.importorskip("transformers")
from kd_lightning.models.sparse_retrieval import inference_free_query, splade_max_pool


def test_minmax_rows_by_hand() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 7.0]])
    out = minmax_per_query(scores, eps=1e-6)
    expected = torch.tensor([[0.0, 2 / (2 + 1e-6), 1 / (2 + 1e-6)], [0.0, 0.0, 2 / (2 + 1e-6)]])
    torch.testing.assert_close(out, expected)
    assert out.min() >= 0 and out.max() < 1


def test_ensemble_targets_average_then_scale_by_30() -> None:
    a = torch.tensor([[1.0, 3.0, 2.0]])  # -> [0, 1, 0.5]
    b = torch.tensor([[10.0, 0.0, 5.0]])  # -> [1, 0, 0.5]
    out = ensemble_targets({"a": a, "b": b}, eps=1e-9)
    torch.testing.assert_close(out, torch.tensor([[15.0, 15.0, 15.0]]))
    weighted = ensemble_targets({"a": a, "b": b}, score_scale=30.0, weights={"a": 3.0, "b": 1.0}, eps=1e-9)
    torch.testing.assert_close(weighted, 30 * torch.tensor([[0.25, 0.75, 0.5]]))
    # per teacher and per query: a teacher's scale does not matter
    torch.testing.assert_close(ensemble_targets([a * 1000, b], eps=1e-9), out)


def test_ensemble_bad_weights_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"teacher_weights"):
        ensemble_targets({"a": torch.zeros(1, 2)}, weights={"b": 1.0})
    with pytest.raises(KDConfigError, match=r"teacher_weights"):
        ensemble_targets([torch.zeros(1, 2)], weights=[-1.0])


def test_ranking_kl_by_hand_nonnegative_and_zero_at_teacher() -> None:
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax = [0.75, 0.25]
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert ranking_kl(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 4
    assert ranking_kl(s, t).item() >= 0
    assert ranking_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert ranking_kl(t + 3.0, t).item() == pytest.approx(0.0, abs=1e-6)  # shift invariant per row


def test_margin_mse_and_info_nce_by_hand() -> None:
    s, t = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([[2.0, 1.0, 1.0]])
    assert margin_mse(s, t).item() == pytest.approx(((2 - 1) ** 2 + (3 - 1) ** 2) / 2)
    scores = torch.tensor([[2.0, 0.0, 1.0]])
    expected = -math.log(math.exp(0.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(1.0)))
    assert info_nce(scores, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(KDConfigError, match=r"margin_mse"):
        margin_mse(torch.zeros(2, 1), torch.zeros(2, 1))


def test_flops_by_hand_with_and_without_groups() -> None:
    assert flops_loss(torch.tensor([[1.0, -2.0], [3.0, 0.0]])).item() == pytest.approx(2.0**2 + 1.0**2)
    reps = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0]])  # [q0 pos, q0 neg, q1 pos, q1 neg]
    # slots: positives mean [2, 0], negatives mean [0, 3]
    assert flops_loss(reps, group_size=2).item() == pytest.approx(4.0 + 9.0)
    assert flops_loss(reps, group_size=1).item() == pytest.approx(1.0**2 + 1.5**2)
    # the alternative: mean |w_v| / idf_v
    assert flops_loss(reps, group_size=1, idf=torch.tensor([2.0, 1.0])).item() == pytest.approx(0.5**2 + 1.5**2)
    with pytest.raises(KDConfigError, match=r"group_size"):
        flops_loss(reps, group_size=3)


def test_lambda_schedule_values() -> None:
    assert flops_lambda(0, 0.01, 10) == pytest.approx(0.01 * (1 / 10) ** 2)
    assert flops_lambda(4, 0.01, 10) == pytest.approx(0.01 * 0.25)
    assert flops_lambda(9, 0.01, 10) == pytest.approx(0.01)
    assert flops_lambda(10, 0.01, 10) == flops_lambda(1000, 0.01, 10) == pytest.approx(0.01)
    assert flops_lambda(0, 0.01, 0) == pytest.approx(0.01)
    reg = FlopsRegularizer(0.01, 10)
    assert reg.weight() == pytest.approx(0.01)  # no progress set: after the warm-up
    reg.set_progress(Progress(step=4))
    assert reg.weight() == pytest.approx(0.0025)
    assert reg.schedule_stats() == {"flops_lambda": pytest.approx(0.0025)}
    with pytest.raises(KDConfigError, match=r"flops_warmup_steps"):
        FlopsRegularizer(0.01, -1)


def test_idf_formula_by_hand() -> None:
    df, n = document_frequency([[5, 6], [5], [5, 7, 7], [8]], vocab_size=10)
    assert n == 4
    assert df.tolist() == [0, 0, 0, 0, 0, 3, 1, 1, 1, 0]  # multiplicity ignored
    idf = idf_from_document_frequency(df, n)
    assert idf[5].item() == pytest.approx(math.log(1 + (4 - 3 + 0.5) / (3 + 0.5)), rel=1e-6)
    assert idf[6].item() == pytest.approx(math.log(1 + (4 - 1 + 0.5) / (1 + 0.5)), rel=1e-6)
    assert idf[0].item() == 1.0 and idf[9].item() == 1.0  # never seen
    with pytest.raises(KDConfigError, match=r"vocab_size"):
        document_frequency([[12]], vocab_size=10)


def test_query_vector_is_binary_times_idf_with_special_tokens_zeroed() -> None:
    idf = torch.tensor([0.5, 0.6, 0.7, 0.8, 1.1, 1.2, -0.3, 2.0, 3.0, 4.0])
    ids = torch.tensor([[2, 7, 7, 9, 6, 3, 0], [2, 4, 3, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]])
    q = inference_free_query(ids, mask, idf, special_ids=[0, 2, 3])
    expected = torch.zeros(2, 10)
    expected[0, 7], expected[0, 9] = 2.0, 4.0  # token 7 twice: counted once; token 6: relu(-0.3) = 0
    expected[1, 4] = 1.1
    torch.testing.assert_close(q, expected)


def test_splade_pooling_by_hand() -> None:
    logits = torch.tensor([[[1.0, -1.0], [math.e - 1, 0.0], [5.0, 5.0]]])
    w = splade_max_pool(logits, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0]]))  # max(log 2, 1) and the masked token ignored


def test_ranking_loss_gradient_on_documents_is_proportional_to_idf() -> None:
    """IDF-aware: dL/dw_d[v] = dL/dS · q[v] = dL/dS · idf[v] for the query's tokens, 0 for the others."""
    idf = torch.tensor([0.0, 0.4, 1.3, 2.9, 0.7, 5.0])
    q = inference_free_query(torch.tensor([[1, 2, 3, 5]]), None, idf, special_ids=[0])
    g = torch.Generator().manual_seed(1)
    docs = torch.rand(4, 6, generator=g).requires_grad_(True)
    loss = ranking_kl(q @ docs.T, torch.randn(1, 4, generator=g) * 5)
    (grad,) = torch.autograd.grad(loss, docs)
    ratio = grad[:, [1, 2, 3, 5]] / idf[[1, 2, 3, 5]]
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    assert torch.all(grad[:, [0, 4]] == 0)
    assert grad.abs().sum() > 0
    # the FLOPS gradient is not scaled by IDF: d/dw (mean|w|)^2 does not see the query
    (flops_grad,) = torch.autograd.grad(flops_loss(docs), docs)
    assert torch.all(flops_grad[:, 4] > 0)


def test_gather_without_process_group_is_identity() -> None:
    x = torch.randn(3, 2)
    out, offset = gather_with_grad(x)
    assert out is x and offset == 0
