"""TGeo-KD building blocks: geometry features, fusion network, weighted loss, class-mean accumulator (incl. DDP)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_lightning.losses import kd_kl_div
from kd_lightning.losses.tgeo_kd import (
    ClassMeanAccumulator,
    FusionRatioNet,
    TGeoKDLoss,
    fusion_feature_dim,
    geometry_features,
    tgeo_kd_terms,
)


def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


S, T, Y = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5], 1
MEANS = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]


def tensors(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- features
def hand_vertices() -> tuple[list[float], list[float], list[float], list[float]]:
    g = [1.0 if c == Y else 0.0 for c in range(3)]
    return softmax(S), softmax(T), g, MEANS[Y]


def test_tabular_features_hand_computed() -> None:
    s, t, g, m = hand_vertices()
    sq = lambda a, b: [(x - z) ** 2 for x, z in zip(a, b)]  # noqa: E731
    want = s + t + g + m + sq(m, s) + sq(g, s) + sq(t, s) + sq(t, g) + sq(m, g)
    got = geometry_features(tensors(S), tensors(T), torch.tensor([Y]), tensors(*MEANS), "tabular_9c")
    assert got.shape == (1, 27) == (1, fusion_feature_dim("tabular_9c", 3))
    assert got[0].tolist() == pytest.approx(want, rel=1e-12)


def test_cifar_features_hand_computed() -> None:
    s, t, g, m = hand_vertices()
    ab = lambda a, b: [abs(x - z) for x, z in zip(a, b)]  # noqa: E731
    angle = lambda a, b: [(gc - x) * (gc - z) for gc, x, z in zip(g, a, b)]  # noqa: E731
    want = s + t + m + g + ab(s, g) + ab(s, t) + ab(s, m) + angle(m, s) + angle(t, s)
    got = geometry_features(tensors(S), tensors(T), torch.tensor([Y]), tensors(*MEANS), "cifar_9c")
    assert got[0].tolist() == pytest.approx(want, rel=1e-12)


def test_distance_features_hand_computed() -> None:
    s, t, g, m = hand_vertices()
    dist_ = lambda a, b: math.sqrt(sum((x - z) ** 2 for x, z in zip(a, b)))  # noqa: E731
    want = [dist_(s, g), dist_(t, g), dist_(s, t), dist_(s, m), dist_(m, g), s[Y], t[Y], m[Y]]
    got = geometry_features(tensors(S), tensors(T), torch.tensor([Y]), tensors(*MEANS), "distances")
    assert got.shape == (1, 8) == (1, fusion_feature_dim("distances", 100))
    assert got[0].tolist() == pytest.approx(want, rel=1e-12)


def test_features_carry_no_gradient_and_check_inputs() -> None:
    s = torch.randn(4, 3, requires_grad=True)
    feats = geometry_features(s, torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.full((3, 3), 1 / 3))
    assert not feats.requires_grad and feats.grad_fn is None
    with pytest.raises(ValueError, match=r"class_means must have shape \(3, 3\)"):
        geometry_features(s, torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.ones(4, 4))
    with pytest.raises(ValueError, match="feature variant must be one of"):
        geometry_features(s, torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.ones(3, 3), "angles")


# ---------------------------------------------------------------------------------------------- fusion net
def test_fusion_net_outputs_one_ratio_in_open_unit_interval_per_sample() -> None:
    net = FusionRatioNet(27, hidden=(32, 16), activation="leaky_relu")
    alpha = net(torch.randn(5, 27) * 10)
    assert alpha.shape == (5,)
    assert ((alpha > 0) & (alpha < 1)).all()
    assert isinstance(FusionRatioNet(8, hidden=(128,), activation="relu").mlp[1], torch.nn.ReLU)
    with pytest.raises(ValueError, match=r"expects \[N, 27\] features"):
        net(torch.randn(5, 26))
    with pytest.raises(ValueError, match="activation must be"):
        FusionRatioNet(8, activation="tanh")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- weighted loss
def test_weighted_loss_hand_computed_per_sample_ratios() -> None:
    s2, t2, y2 = [0.0, -1.0, 3.0], [2.0, 0.0, 1.0], 0
    tau, alphas = 2.0, [0.3, 0.8]
    rows = [(S, T, Y), (s2, t2, y2)]
    kd = [a * tau**2 * kl(softmax(t, tau), softmax(s, tau)) for a, (s, t, _) in zip(alphas, rows)]
    ce = [(1 - a) * -math.log(softmax(s)[y]) for a, (s, _, y) in zip(alphas, rows)]
    out = TGeoKDLoss(temperature=tau)(tensors(S, s2), tensors(T, t2), torch.tensor([Y, y2]), tensors(alphas).squeeze(0))
    assert out["kd"].item() == pytest.approx(sum(kd) / 2, rel=1e-9)
    assert out["ce"].item() == pytest.approx(sum(ce) / 2, rel=1e-9)
    assert out["loss"].item() == pytest.approx((sum(kd) + sum(ce)) / 2, rel=1e-9)


def test_ratio_limits_are_kd_and_ce() -> None:
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    loss = TGeoKDLoss(temperature=4.0)
    assert loss(s, t, y, torch.ones(6))["loss"].item() == pytest.approx(kd_kl_div(s, t, 4.0).item(), rel=1e-6)
    want_ce = torch.nn.functional.cross_entropy(s, y).item()
    assert loss(s, t, y, torch.zeros(6))["loss"].item() == pytest.approx(want_ce, rel=1e-6)
    kd_i, ce_i = tgeo_kd_terms(s, t, y, 4.0)
    assert kd_i.shape == ce_i.shape == (6,)


def test_gradients_reach_student_and_ratio_never_teacher() -> None:
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    alpha = torch.full((4,), 0.5, requires_grad=True)
    TGeoKDLoss()(s, t, torch.randint(0, 6, (4,)), alpha)["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0  # the virtual step differentiates through α
    assert t.grad is None
    with pytest.raises(ValueError, match="one ratio per sample"):
        TGeoKDLoss()(s, t, torch.randint(0, 6, (4,)), torch.ones(3))


# ---------------------------------------------------------------------------------------------- class means
def test_accumulator_is_a_sample_mean_not_a_mean_of_batch_means() -> None:
    acc = ClassMeanAccumulator(num_classes=3)
    # class 0: one sample in the first batch, three in the second; class 2 never seen
    acc.update(tensors([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]), torch.tensor([0, 1]))
    acc.update(tensors([0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]), torch.tensor([0, 0, 0]))
    means = acc.compute()
    assert means[0].tolist() == pytest.approx([0.25, 0.5, 0.25])  # mean of batch means would be [0.5, 0.25, 0.25]
    assert means[1].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert means[2].tolist() == pytest.approx([1 / 3] * 3)  # unseen: uniform
    assert acc.counts.tolist() == [4.0, 1.0, 0.0]
    assert torch.equal(acc.compute(), means)  # computing again does not double-count
    acc.reset()
    assert acc.counts.sum() == 0
    with pytest.raises(ValueError, match=r"probs must have shape \[N, 3\]"):
        acc.update(torch.ones(2, 4), torch.tensor([0, 1]))
    assert "sums" in acc.state_dict() and "counts" in acc.state_dict()


def _batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of unequal sizes and class mixes (so a mean of means would be wrong)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in (5, 2, 7, 3, 1, 6):
        probs = torch.rand(size, 4, generator=g).softmax(-1)
        out.append((probs, torch.randint(0, 4, (size,), generator=g)))
    return out


def _ddp_worker(rank: int, world_size: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        batches = _batches()
        acc = ClassMeanAccumulator(4)
        for probs, target in batches[rank::world_size]:  # each rank sees different batches
            acc.update(probs, target)
        synced = acc.compute()
        local = acc.compute(sync=False)
        single = ClassMeanAccumulator(4)
        for probs, target in batches:
            single.update(probs, target)
        assert torch.allclose(synced, single.compute(sync=False), atol=1e-7), (rank, synced, single.compute())
        assert not torch.allclose(local, synced, atol=1e-4)  # the ranks really saw different data
        assert torch.allclose(acc.compute(), synced)  # no double counting on a second call
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
def test_accumulator_adds_sums_and_counts_across_two_gloo_processes() -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True)
