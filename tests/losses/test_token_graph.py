"""TRG token-graph losses: hand-computed graph rows and terms on 3 tokens, the reconstruction's properties."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses.token_graph import (
    TRGLoss,
    contextual_loss,
    edge_loss,
    gather_tokens,
    node_loss,
    sample_token_indices,
    token_graph,
    tokens_from_features,
)

# Three 2-d tokens: cos(t1, t2) = 0, cos(t1, t3) = cos(t2, t3) = 1/sqrt(2).
T3 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
S3 = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def graph_rows(nodes: list[list[float]], tau: float) -> list[list[float]]:
    """Row i: softmax over j != i of cos(x_i, x_j)/tau, with 0 at j = i."""
    rows = []
    for i, a in enumerate(nodes):
        exps = [math.exp(cos(a, b) / tau) if j != i else 0.0 for j, b in enumerate(nodes)]
        rows.append([e / sum(exps) for e in exps])
    return rows


def mean_row_kl(teacher: list[list[float]], student: list[list[float]], tau: float) -> float:
    p_rows, q_rows = graph_rows(teacher, tau), graph_rows(student, tau)
    kls = [sum(p * math.log(p / q) for p, q in zip(pr, qr) if p > 0) for pr, qr in zip(p_rows, q_rows)]
    return sum(kls) / len(kls)


def tensor(rows: list, **kwargs) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, **kwargs)


# ---------------------------------------------------------------------------------------------- tokens
def test_tokens_from_cnn_map_are_row_major_positions() -> None:
    fmap = torch.randn(2, 5, 3, 4)
    tokens = tokens_from_features(fmap)
    assert tokens.shape == (2, 12, 5)
    assert torch.equal(tokens[1, 2 * 4 + 3], fmap[1, :, 2, 3])


def test_vit_tokens_drop_prefix_and_pool_to_common_grid() -> None:
    patches = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, one channel: token value = its index
    tokens = torch.cat([torch.full((1, 1, 1), -100.0), patches], dim=1)  # CLS first
    assert torch.equal(tokens_from_features(tokens, num_prefix_tokens=1), patches)
    pooled = tokens_from_features(tokens, num_prefix_tokens=1, grid=2)
    # mean of each 2x2 block of [[0..3], [4..7], [8..11], [12..15]]
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(tokens_from_features(fmap, grid=(2, 2)), pooled)


def test_tokens_from_features_bad_inputs_name_the_cause() -> None:
    with pytest.raises(ValueError, match=r"needs spatial features.*tap an earlier layer"):
        tokens_from_features(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"num_prefix_tokens=5 must be in \[0, 5\)"):
        tokens_from_features(torch.randn(2, 5, 3), num_prefix_tokens=5)
    with pytest.raises(ValueError, match=r"6 tokens do not form a square grid"):
        tokens_from_features(torch.randn(2, 6, 3), grid=2)
    assert tokens_from_features(torch.randn(2, 6, 3), grid=(1, 3), token_grid=(2, 3)).shape == (2, 3, 3)


# ---------------------------------------------------------------------------------------------- graph
def test_graph_rows_hand_computed_on_three_tokens_diagonal_excluded() -> None:
    tau = 0.5
    got = token_graph(tensor(T3), temperature=tau)
    expected = graph_rows(T3, tau)
    for got_row, row in zip(got.tolist(), expected):
        assert got_row == pytest.approx(row, rel=1e-9)
    # Row 1: exp(0)/(exp(0) + exp(sqrt(1/2)/tau)), no self term.
    r = 1.0 / (1.0 + math.exp(math.sqrt(0.5) / tau))
    assert got[0, 1].item() == pytest.approx(r, rel=1e-9)
    assert torch.all(got.diagonal() == 0)
    assert got.sum(-1).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_edge_loss_hand_computed() -> None:
    tau = 0.5
    got = edge_loss(tensor([S3]), tensor([T3]), temperature=tau)  # one image, k = 3 nodes
    assert got.item() == pytest.approx(mean_row_kl(T3, S3, tau), rel=1e-9)


def test_edge_graph_is_cross_instance_over_all_sampled_nodes() -> None:
    tau = 0.3
    s, t = [S3[:2], S3[1:]], [T3[:2], T3[1:]]  # two images of two nodes: one graph of four nodes
    got = edge_loss(tensor(s), tensor(t), temperature=tau)
    assert got.item() == pytest.approx(mean_row_kl(t[0] + t[1], s[0] + s[1], tau), rel=1e-9)


def test_node_loss_hand_computed() -> None:
    expected = sum(2 - 2 * cos(a, b) for a, b in zip(S3, T3)) / 3  # ||a^ - b^||^2 = 2 - 2 cos
    assert node_loss(tensor([S3]), tensor([T3])).item() == pytest.approx(expected, rel=1e-9)


def test_contextual_loss_is_per_image_mean_over_all_tokens() -> None:
    tau = 0.2
    s_imgs = [S3, [[0.5, 1.0], [2.0, -1.0], [1.0, 1.0]]]
    t_imgs = [T3, [[1.0, 2.0], [1.0, -1.0], [0.0, 1.0]]]
    got = contextual_loss(tensor(s_imgs), tensor(t_imgs), temperature=tau)
    expected = sum(mean_row_kl(t, s, tau) for s, t in zip(s_imgs, t_imgs)) / 2  # equal rows per image
    assert got.item() == pytest.approx(expected, rel=1e-9)
    cross = mean_row_kl(t_imgs[0] + t_imgs[1], s_imgs[0] + s_imgs[1], tau)
    assert got.item() != pytest.approx(cross, rel=1e-3)  # not the cross-instance graph


# ---------------------------------------------------------------------------------------------- properties
def test_zero_when_student_equals_teacher_positive_otherwise_and_scale_invariant() -> None:
    torch.manual_seed(0)
    t = torch.randn(4, 16, 8)
    loss = TRGLoss(ce_weight=0.0, kd_weight=0.0, num_sampled_tokens=5)
    z = torch.zeros(4, 3)
    same = loss(z, z, torch.zeros(4, dtype=torch.long), t.clone(), t, generator=torch.Generator().manual_seed(1))
    for name in ("node", "edge", "context"):
        assert abs(same[name].item()) < 1e-5, name
    scaled = loss(z, z, torch.zeros(4, dtype=torch.long), t * torch.rand(4, 16, 1).add(0.5), t)
    assert abs(scaled["loss"].item()) < 1e-5  # cosine relations ignore each token's norm
    other = loss(z, z, torch.zeros(4, dtype=torch.long), torch.randn(4, 16, 8), t)
    for name in ("node", "edge", "context"):
        assert other[name].item() > 1e-3, name


def test_same_sampled_indices_for_teacher_and_student() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 10, 4), torch.randn(3, 10, 4)
    loss = TRGLoss(ce_weight=0.0, kd_weight=0.0, context_weight=0.0, num_sampled_tokens=4, edge_temperature=0.5)
    y, z = torch.zeros(3, dtype=torch.long), torch.zeros(3, 2)
    out = loss(z, z, y, s, t, generator=torch.Generator().manual_seed(7))
    (idx,) = loss.last_indices
    assert idx.shape == (3, 4) and all(len(set(row.tolist())) == 4 for row in idx)
    assert out["edge"].item() == pytest.approx(edge_loss(gather_tokens(s, idx), gather_tokens(t, idx), 0.5).item())
    assert out["node"].item() == pytest.approx(node_loss(gather_tokens(s, idx), gather_tokens(t, idx)).item())
    again = sample_token_indices(3, 10, 4, torch.Generator().manual_seed(7))
    assert torch.equal(again, idx)  # seeded: reproducible
    assert not torch.equal(sample_token_indices(3, 10, 4, torch.Generator().manual_seed(8)), idx)
    assert torch.equal(sample_token_indices(2, 3, 16), torch.tensor([[0, 1, 2], [0, 1, 2]]))  # k >= N: all


def test_gradients_reach_the_student_tokens_only() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 9, 4, requires_grad=True)
    t = torch.randn(2, 9, 4, requires_grad=True)
    zs = torch.randn(2, 3, requires_grad=True)
    zt = torch.randn(2, 3, requires_grad=True)
    TRGLoss(num_sampled_tokens=3)(zs, zt, torch.tensor([0, 2]), s, t)["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert t.grad is None and zt.grad is None


def test_similarity_softmax_in_float32_under_bf16() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 9, 4).bfloat16(), torch.randn(2, 9, 4).bfloat16()
    z = torch.randn(2, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = TRGLoss(num_sampled_tokens=3)(z, z, torch.tensor([0, 1]), s, t)
    assert all(v.dtype == torch.float32 for v in out.values())
    ref = edge_loss(s.float()[:, :3], t.float()[:, :3], 0.1)
    assert edge_loss(s[:, :3], t[:, :3], 0.1).item() == pytest.approx(ref.item(), rel=1e-6)


def test_trg_loss_weights_parts_and_switches() -> None:
    zs, zt, y = tensor([[1.0, 2.0, 0.5]]), tensor([[0.2, 1.0, -0.5]]), torch.tensor([1])
    s, t = tensor([S3]), tensor([T3])
    loss = TRGLoss(ce_weight=0.5, kd_weight=2.0, temperature=2.0, node_weight=3.0, edge_weight=0.0, context_weight=4.0)
    out = loss(zs, zt, y, s, t)
    assert set(out) == {"loss", "ce", "kd", "node", "context"}  # edge_weight = 0: not computed
    p_s = [math.exp(v) / sum(math.exp(u) for u in [1.0, 2.0, 0.5]) for v in [1.0, 2.0, 0.5]]
    assert out["ce"].item() == pytest.approx(-0.5 * math.log(p_s[1]), rel=1e-9)
    soft = [[math.exp(v / 2) for v in row] for row in ([0.2, 1.0, -0.5], [1.0, 2.0, 0.5])]
    p, q = ([e / sum(r) for e in r] for r in soft)
    assert out["kd"].item() == pytest.approx(2.0 * 4 * sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-9)
    assert out["node"].item() == pytest.approx(3.0 * node_loss(s, t).item(), rel=1e-9)
    assert out["context"].item() == pytest.approx(4.0 * mean_row_kl(T3, S3, 0.1), rel=1e-9)
    assert out["loss"].item() == pytest.approx(sum(v.item() for k, v in out.items() if k != "loss"), rel=1e-12)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"student tokens \(1, 3, 2\) and teacher tokens \(1, 3, 4\) differ"):
        edge_loss(torch.randn(1, 3, 2), torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match=r"at least 2 nodes"):
        edge_loss(torch.randn(1, 1, 2), torch.randn(1, 1, 2))
    with pytest.raises(ValueError, match=r"edge_temperature: must be a finite number > 0"):
        TRGLoss(edge_temperature=0.0)
    with pytest.raises(ValueError, match=r"num_sampled_tokens must be >= 1"):
        TRGLoss(num_sampled_tokens=0)
    with pytest.raises(ValueError, match=r"every weight is 0"):
        TRGLoss(0, 0, 4, 0, 0, 0)(
            torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 4, 2), torch.randn(2, 4, 2)
        )
