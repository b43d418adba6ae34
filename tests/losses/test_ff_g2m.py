"""FF-G2M losses: LFD/HFD/GLNN against values computed by hand (pure Python), self-loop handling, properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.ff_g2m import (
    ff_g2m_terms,
    high_frequency_loss,
    low_frequency_loss,
    node_kl_loss,
    with_self_loops,
    without_self_loops,
)


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) of two probability lists."""
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True))


# A 3-node path 0 - 1 - 2, both directions, 2 classes.
EDGES = [(0, 1), (1, 0), (1, 2), (2, 1)]
S = [[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]]
T = [[2.0, -1.0], [0.0, 1.0], [1.0, 3.0]]


def tensor(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def edge_index(edges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(edges, dtype=torch.long).t()


def test_lfd_matches_hand_computation_with_student_at_source_teacher_at_target() -> None:
    loop_edges = [*EDGES, (0, 0), (1, 1), (2, 2)]
    # (1/|E|) Σ KL(p_T[j] || p_S[i]) over (i, j): 4 edges + 3 self loops.
    expected = sum(kl(softmax(T[j]), softmax(S[i])) for i, j in loop_edges) / len(loop_edges)
    got = low_frequency_loss(tensor(S), tensor(T), edge_index(loop_edges))
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # Swapping the roles (teacher at the source) is a different number on this graph (a non-symmetric edge set).
    one_way = [(0, 1), (1, 2)]
    forward = sum(kl(softmax(T[j]), softmax(S[i])) for i, j in one_way) / 2
    assert low_frequency_loss(tensor(S), tensor(T), edge_index(one_way)).item() == pytest.approx(forward, rel=1e-10)
    backward = sum(kl(softmax(T[i]), softmax(S[j])) for i, j in one_way) / 2
    assert abs(forward - backward) > 1e-3


def test_hfd_matches_hand_computation_on_absolute_logit_differences() -> None:
    tau = 1.5

    def q(z: list[list[float]], i: int, j: int) -> list[float]:
        return softmax([abs(a - b) / tau for a, b in zip(z[i], z[j], strict=True)])

    expected = sum(kl(q(T, i, j), q(S, i, j)) for i, j in EDGES) / len(EDGES)
    got = high_frequency_loss(tensor(S), tensor(T), edge_index(EDGES), tau)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # On logits, not probabilities: the same loss on softmax outputs is another number.
    on_probs = high_frequency_loss(tensor(S).softmax(-1), tensor(T).softmax(-1), edge_index(EDGES), tau)
    assert abs(on_probs.item() - expected) > 1e-3


def test_glnn_is_the_node_mean_of_kl_teacher_to_student() -> None:
    expected = sum(kl(softmax(T[i]), softmax(S[i])) for i in range(3)) / 3
    assert node_kl_loss(tensor(S), tensor(T)).item() == pytest.approx(expected, rel=1e-10)


def test_self_loops_are_replaced_by_exactly_one_per_node() -> None:
    edges = edge_index([(0, 1), (1, 1), (1, 1), (2, 1)])  # duplicated self loop on node 1
    assert without_self_loops(edges).t().tolist() == [[0, 1], [2, 1]]
    looped = with_self_loops(edges, num_nodes=3).t().tolist()
    assert sorted(looped) == [[0, 0], [0, 1], [1, 1], [2, 1], [2, 2]]
    # ff_g2m_terms builds both edge sets itself: loops in the input change nothing.
    y, mask = torch.tensor([0, 1, 1]), torch.tensor([True, False, True])
    plain = ff_g2m_terms(tensor(S), tensor(T), y, mask, edge_index(EDGES), lamb=0.3, tau=1.2)
    loops = edge_index([*EDGES, (0, 0), (2, 2), (2, 2)])
    with_loops = ff_g2m_terms(tensor(S), tensor(T), y, mask, loops, lamb=0.3, tau=1.2)
    for name in ("loss", "ce", "lfd", "hfd"):
        assert with_loops[name].item() == pytest.approx(plain[name].item(), rel=1e-12)


def test_zero_when_student_equals_teacher_where_it_holds() -> None:
    z = torch.randn(6, 4, dtype=torch.float64)
    edges = with_self_loops(edge_index([(0, 1), (1, 0), (2, 3), (3, 2), (4, 5), (5, 4)]), 6)
    assert high_frequency_loss(z, z.clone(), edges, 1.3).item() == pytest.approx(0.0, abs=1e-12)
    assert node_kl_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-12)
    # LFD compares a node with its neighbours: zero on self loops only, not on a graph with real edges.
    loops_only = with_self_loops(torch.zeros(2, 0, dtype=torch.long), 6)
    assert low_frequency_loss(z, z.clone(), loops_only).item() == pytest.approx(0.0, abs=1e-12)
    assert low_frequency_loss(z, z.clone(), edges).item() > 1e-3


def test_hfd_is_invariant_to_a_shift_shared_by_all_nodes_but_not_per_node_shifts() -> None:
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    edges = edge_index([(0, 1), (1, 0), (1, 2), (2, 3), (3, 4), (4, 0)])
    base = high_frequency_loss(s, t, edges, 1.0)
    shifted = high_frequency_loss(s + torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64), t, edges, 1.0)
    assert shifted.item() == pytest.approx(base.item(), rel=1e-12)
    per_node = high_frequency_loss(
        s + torch.arange(5, dtype=torch.float64).unsqueeze(1) * torch.tensor([1, 0, 0]), t, edges, 1.0
    )
    assert abs(per_node.item() - base.item()) > 1e-6


def test_brute_force_loop_over_edges_on_a_random_graph() -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 12, 4
    s, t = torch.randn(n, c, generator=g, dtype=torch.float64), torch.randn(n, c, generator=g, dtype=torch.float64)
    edges = torch.randint(0, n, (2, 30), generator=g)
    y, mask = torch.randint(0, c, (n,), generator=g), torch.rand(n, generator=g) < 0.5
    lamb, tau = 0.3, 1.4
    lfd_edges = [(i, j) for i, j in edges.t().tolist() if i != j] + [(i, i) for i in range(n)]
    hfd_edges = [(i, j) for i, j in edges.t().tolist() if i != j]
    sl, tl = s.tolist(), t.tolist()
    lfd = sum(kl(softmax(tl[j]), softmax(sl[i])) for i, j in lfd_edges) / len(lfd_edges)
    qs = [softmax([abs(a - b) / tau for a, b in zip(sl[i], sl[j], strict=True)]) for i, j in hfd_edges]
    qt = [softmax([abs(a - b) / tau for a, b in zip(tl[i], tl[j], strict=True)]) for i, j in hfd_edges]
    hfd = sum(kl(a, b) for a, b in zip(qt, qs, strict=True)) / len(hfd_edges)
    labelled = mask.nonzero().squeeze(1).tolist()
    ce = sum(-math.log(softmax(sl[i])[int(y[i])]) for i in labelled) / len(labelled)
    terms = ff_g2m_terms(s, t, y, mask, edges, mode="ff_g2m", lamb=lamb, tau=tau)
    assert terms["lfd"].item() == pytest.approx((1 - lamb) * lfd, rel=1e-10)
    assert terms["hfd"].item() == pytest.approx((1 - lamb) * hfd, rel=1e-10)
    assert terms["ce"].item() == pytest.approx(lamb * ce, rel=1e-10)
    assert terms["loss"].item() == pytest.approx(lamb * ce + (1 - lamb) * (lfd + hfd), rel=1e-10)


def test_modes_pick_the_code_ablations() -> None:
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y, mask, edges = torch.tensor([0, 1, 2, 0]), torch.tensor([True, True, False, False]), edge_index(EDGES)
    ce = F.cross_entropy(s[mask], y[mask])
    assert set(ff_g2m_terms(s, t, y, mask, edges, mode="glnn", lamb=0.2)) == {"loss", "ce", "kd"}
    glnn = ff_g2m_terms(s, t, y, mask, edges, mode="glnn", lamb=0.2)
    assert glnn["loss"].item() == pytest.approx((0.2 * ce + 0.8 * node_kl_loss(s, t)).item(), rel=1e-12)
    assert set(ff_g2m_terms(s, t, y, mask, edges, mode="lfd", lamb=0.2)) == {"loss", "ce", "lfd"}
    assert set(ff_g2m_terms(s, t, y, mask, edges, mode="hfd", lamb=0.2)) == {"loss", "ce", "hfd"}
    mlp = ff_g2m_terms(s, None, y, mask, edges, mode="mlp", lamb=0.2)  # CE with weight 1, no teacher needed
    assert set(mlp) == {"loss", "ce"} and mlp["loss"].item() == pytest.approx(ce.item(), rel=1e-12)
    assert "ce" not in ff_g2m_terms(s, t, y, mask, edges, lamb=0.0)  # Pubmed's lamb 0: no label term at all
    assert set(ff_g2m_terms(s, None, y, mask, edges, lamb=1.0)) == {"loss", "ce"}


def test_gradient_reaches_the_student_only() -> None:
    s = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    terms = ff_g2m_terms(s, t, torch.tensor([0, 1, 0]), torch.tensor([True, False, True]), edge_index(EDGES))
    terms["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"mode": "kd"}, "mode"), ({"lamb": 1.5}, "lamb"), ({"lamb": -0.1}, "lamb"), ({"tau": 0.0}, "tau")],
)
def test_bad_arguments_name_their_field(kwargs: dict, field: str) -> None:
    s, t = torch.randn(3, 2), torch.randn(3, 2)
    with pytest.raises(KDConfigError, match=rf"^{field}: "):
        ff_g2m_terms(s, t, torch.tensor([0, 1, 0]), torch.tensor([True, True, True]), edge_index(EDGES), **kwargs)
