"""MST-Distill losses: hand-computed values, the code's schedule, gradient paths (top-k vs soft routing)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.mst import (
    co_training_loss,
    decayed_weight,
    load_balancing_loss,
    masknet_loss,
    mst_kd,
    mst_student_loss,
    soft_expert_kd,
    topk_expert_kd,
)
from kd_lightning.models.mst import GateNet


def kl(q: list[float], p: list[float]) -> float:
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))


def test_kd_is_t2_kl_of_target_to_learner_batchmean() -> None:
    # T = 1: q = softmax([ln 3, 0]) = [3/4, 1/4], p = softmax([0, 0]) = [1/2, 1/2].
    p, q = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    assert float(mst_kd(p, q, 1.0)) == pytest.approx(kl([0.75, 0.25], [0.5, 0.5]))
    # T = 2: q = softmax([ln 3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1); times T^2 = 4.
    s3 = math.sqrt(3.0)
    assert float(mst_kd(p, q, 2.0)) == pytest.approx(4 * kl([s3 / (s3 + 1), 1 / (s3 + 1)], [0.5, 0.5]), rel=1e-5)
    # batchmean: a second row identical in both gives half the value.
    p2, q2 = torch.cat([p, torch.zeros(1, 2)]), torch.cat([q, torch.zeros(1, 2)])
    assert float(mst_kd(p2, q2, 1.0)) == pytest.approx(kl([0.75, 0.25], [0.5, 0.5]) / 2)
    assert float(mst_kd(q, q, 4.0)) == pytest.approx(0.0, abs=1e-7)


def test_load_balancing_kl_has_the_codes_one_over_e() -> None:
    g = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # batch mean [3/4, 1/4]
    expected = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) / 2  # KL(U || m) / E
    assert float(load_balancing_loss(g, "kl")) == pytest.approx(expected)
    # the same value as the code's nn.KLDivLoss(batchmean) on the 1-D mean
    mean = g.mean(0)
    code = torch.nn.KLDivLoss(reduction="batchmean")(mean.log(), torch.full_like(mean, 0.5))
    assert float(load_balancing_loss(g, "kl")) == pytest.approx(float(code))
    assert float(load_balancing_loss(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), "kl")) == pytest.approx(0.0, abs=1e-7)


def test_load_balancing_cv_is_std_over_mean_of_importance() -> None:
    g = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # importance [1.5, 0.5]: mean 1, unbiased std sqrt(0.5)
    assert float(load_balancing_loss(g, "cv")) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(KDConfigError, match="lb_mode"):
        load_balancing_loss(g, "l2")  # type: ignore[arg-type]


def test_topk_distils_from_the_highest_gated_experts() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 5)
    experts = torch.randn(2, 3, 5)
    gate = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    loss, idx = topk_expert_kd(s, experts, gate, k=1, temperature=2.0)
    assert idx.tolist() == [[1], [0]]
    per_row = [float(mst_kd(s[b : b + 1], experts[b : b + 1, e], 2.0)) for b, e in ((0, 1), (1, 0))]
    assert float(loss) == pytest.approx(sum(per_row) / 2)
    loss2, idx2 = topk_expert_kd(s, experts, gate, k=2, temperature=2.0)
    assert idx2.tolist() == [[1, 2], [0, 2]]
    first = (float(mst_kd(s[:1], experts[:1, 1], 2.0)) + float(mst_kd(s[1:], experts[1:, 0], 2.0))) / 2
    second = (float(mst_kd(s[:1], experts[:1, 2], 2.0)) + float(mst_kd(s[1:], experts[1:, 2], 2.0))) / 2
    assert float(loss2) == pytest.approx((first + second) / 2)


def test_soft_routing_distils_from_the_weighted_sum_of_logits() -> None:
    s = torch.zeros(1, 2)
    experts = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    g = torch.tensor([[0.75, 0.25]])  # target logits [1.5, 0.5]
    expected = float(F.kl_div(F.log_softmax(s, -1), F.softmax(torch.tensor([[1.5, 0.5]]), -1), reduction="batchmean"))
    assert float(soft_expert_kd(s, experts, g, temperature=1.0)) == pytest.approx(expected)


@pytest.mark.parametrize(("routing", "detach", "reaches"), [("topk", False, False), ("soft", False, True),
                                                             ("soft", True, False)])  # fmt: skip
def test_kd_gradient_reaches_the_gate_only_in_soft_routing(routing: str, detach: bool, reaches: bool) -> None:
    torch.manual_seed(0)
    gate = GateNet(5, 3)
    s = torch.randn(4, 5, requires_grad=True)
    experts = torch.randn(4, 3, 5, requires_grad=True)
    terms, _ = mst_student_loss(
        s, experts, gate(s.detach()), torch.zeros(4, dtype=torch.long), k=1, ce_weight=0.0, lb_weight=0.0,
        routing=routing, detach_soft_weights=detach,  # type: ignore[arg-type]
    )  # fmt: skip
    assert set(terms) == {"loss", "kd"}
    terms["loss"].backward()
    grads = [p.grad for p in gate.parameters()]
    if reaches:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert all(g is None for g in grads)
    assert s.grad is not None and s.grad.abs().sum() > 0  # the student always learns
    assert experts.grad is None  # the experts are targets (detached)


def test_load_balancing_trains_the_gate_and_the_student_through_its_input() -> None:
    torch.manual_seed(0)
    gate = GateNet(5, 3)
    s = torch.randn(4, 5, requires_grad=True)
    terms, _ = mst_student_loss(s, torch.randn(4, 3, 5), gate(s), torch.zeros(4, dtype=torch.long), ce_weight=0,
                                kd_weight=0)  # fmt: skip
    assert set(terms) == {"loss", "lb"}
    terms["loss"].backward()
    assert all(p.grad is not None for p in gate.parameters())
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_student_loss_weights_and_bad_routing() -> None:
    torch.manual_seed(0)
    s, e, g, y = torch.randn(3, 4), torch.randn(3, 2, 4), torch.randn(3, 2), torch.tensor([0, 1, 2])
    terms, idx = mst_student_loss(s, e, g, y, ce_weight=2.0, kd_weight=0.5, lb_weight=0.25, temperature=4.0)
    kd, _ = topk_expert_kd(s, e, g.softmax(-1), 1, 4.0)
    assert float(terms["ce"]) == pytest.approx(2 * float(F.cross_entropy(s, y)))
    assert float(terms["kd"]) == pytest.approx(0.5 * float(kd))
    assert float(terms["lb"]) == pytest.approx(0.25 * float(load_balancing_loss(g.softmax(-1))))
    assert float(terms["loss"]) == pytest.approx(float(terms["ce"] + terms["kd"] + terms["lb"]))
    assert idx is not None and idx.shape == (3, 1)
    with pytest.raises(KDConfigError, match="routing"):
        mst_student_loss(s, e, g, y, routing="hard")  # type: ignore[arg-type]


def code_schedule(epochs: int, w: float, factor: float, every: int) -> list[float]:
    """The weights each stage-3 epoch trains with, by main-MST-Distill.py's loop (update at the end of the epoch)."""
    used = []
    for epoch in range(epochs):
        used.append(w)
        w *= factor if epoch % every == 0 else 1
    return used


def test_decayed_weight_follows_the_codes_loop_including_epoch_zero() -> None:
    assert [decayed_weight(1.0, e, 0.5, 30) for e in range(70)] == pytest.approx(code_schedule(70, 1.0, 0.5, 30))
    assert [decayed_weight(1.0, e, 0.9, 10) for e in range(70)] == pytest.approx(code_schedule(70, 1.0, 0.9, 10))
    # by hand: epoch 0 the initial weight, epochs 1..30 halved once, 31.. twice
    assert [decayed_weight(1.0, e, 0.5, 30) for e in (0, 1, 30, 31)] == [1.0, 0.5, 0.5, 0.25]
    assert [decayed_weight(2.0, e, 0.9, 10) for e in (0, 1, 10, 11)] == pytest.approx([2.0, 1.8, 1.8, 1.62])
    assert decayed_weight(1.0, 50, 0.5, 0) == 1.0


def test_co_training_sums_every_networks_ce_and_kd_from_the_others() -> None:
    torch.manual_seed(0)
    a, b, c = (torch.randn(4, 3, requires_grad=True) for _ in range(3))
    y = torch.tensor([0, 1, 2, 0])
    terms = co_training_loss({"s": a, "t": b, "x": c}, y, temperature=2.0)
    expected_s = F.cross_entropy(a, y) + mst_kd(a, b, 2.0) + mst_kd(a, c, 2.0)
    assert float(terms["s"]) == pytest.approx(float(expected_s))
    assert float(terms["loss"]) == pytest.approx(float(terms["s"] + terms["t"] + terms["x"]))
    # not detached (as the code): a's KD terms also move b
    (terms["s"]).backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_co_training_detached_targets_only_train_the_learner() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    terms = co_training_loss({"s": a, "t": b}, torch.tensor([0, 1, 2, 0]), detach_targets=True)
    terms["s"].backward()
    assert b.grad is None and a.grad is not None


def test_masknet_loss_pulls_the_masked_teacher_not_the_student() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    loss = masknet_loss(t, s, 4.0)
    assert float(loss) == pytest.approx(float(mst_kd(t, s, 4.0)))
    loss.backward()
    assert s.grad is None and t.grad is not None
    assert float(masknet_loss(s, s, 4.0)) == pytest.approx(0.0, abs=1e-5)
