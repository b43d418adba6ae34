"""RKD distance and angle losses: values on three points by hand, and the invariances the paper states."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.losses.relation import (
    RKDLoss,
    pairwise_distances,
    rkd_angle_loss,
    rkd_angles,
    rkd_distance_loss,
)

# A 3-4-5 right triangle (student) and an isosceles right triangle (teacher).
S = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
T = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q


def test_pairwise_distances_by_hand() -> None:
    d = pairwise_distances(S)
    assert d.flatten().tolist() == pytest.approx([0, 3, 4, 3, 0, 5, 4, 5, 0])
    assert pairwise_distances(S, squared=True).flatten().tolist() == pytest.approx([0, 9, 16, 9, 0, 25, 16, 25, 0])


def test_distance_loss_on_three_points_by_hand() -> None:
    s_norm = [3 / 4, 4 / 4, 5 / 4]  # distances 3, 4, 5 over their mean 4
    t_mean = (1 + 1 + math.sqrt(2)) / 3
    t_norm = [1 / t_mean, 1 / t_mean, math.sqrt(2) / t_mean]
    # 9 ordered pairs: the three off-diagonal pairs twice each, the diagonal (0 - 0) three times.
    expected = 2 * sum(huber(a - b) for a, b in zip(s_norm, t_norm)) / 9
    assert rkd_distance_loss(S, T).item() == pytest.approx(expected, rel=1e-9)


def test_angles_on_three_points_by_hand() -> None:
    a = rkd_angles(S)  # [j, i, k]: cosine at vertex j between points i and k
    assert a[0, 1, 2].item() == pytest.approx(0.0, abs=1e-12)  # the right angle
    assert a[1, 0, 2].item() == pytest.approx(3 / 5)
    assert a[2, 0, 1].item() == pytest.approx(4 / 5)
    assert a[1, 2, 0].item() == pytest.approx(a[1, 0, 2].item())  # symmetric in i, k
    assert a[1, 0, 0].item() == pytest.approx(1.0)  # the same edge twice
    assert a[1, 1, 0].item() == 0.0 and a[2, 0, 2].item() == 0.0  # degenerate: a zero edge


def test_angle_loss_on_three_points_by_hand() -> None:
    # Teacher cosines: 0 at the right angle, 1/sqrt(2) at the two 45-degree corners.
    r = 1 / math.sqrt(2)
    # Non-zero differences: the corners at vertex 1 and 2, each for (i, k) and (k, i); 27 triplets in the mean.
    expected = (2 * huber(3 / 5 - r) + 2 * huber(4 / 5 - r)) / 27
    assert rkd_angle_loss(S, T).item() == pytest.approx(expected, rel=1e-9)


def test_rkd_loss_weights_its_parts() -> None:
    out = RKDLoss()(S, T)
    assert out["distance"].item() == pytest.approx(25 * rkd_distance_loss(S, T).item())
    assert out["angle"].item() == pytest.approx(50 * rkd_angle_loss(S, T).item())
    assert out["loss"].item() == pytest.approx(out["distance"].item() + out["angle"].item())
    squared = RKDLoss(distance_weight=1.0, angle_weight=0.0, squared=True)(S, T)
    assert squared["distance"].item() == pytest.approx(rkd_distance_loss(S, T, squared=True).item())
    assert "angle" not in squared  # weight 0: neither computed nor returned


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_invariant_to_rotation_translation_and_uniform_scaling(which: str) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(6, 3, generator=g, dtype=torch.float64)
    ref = RKDLoss()(s, t)
    assert ref["distance"].item() > 0 and ref["angle"].item() > 0
    if which == "student":
        moved = 3.7 * s @ random_rotation(5, 1) + torch.randn(5, generator=g, dtype=torch.float64)
        out = RKDLoss()(moved, t)
    else:
        moved = 0.2 * t @ random_rotation(3, 2) - 4.0
        out = RKDLoss()(s, moved)
    for part in ("distance", "angle"):
        assert out[part].item() == pytest.approx(ref[part].item(), rel=1e-9)


def test_zero_at_equality_and_across_embedding_widths() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    out = RKDLoss()(t.clone(), t)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-12)
    # A wider student holding the teacher's points (padded, rotated, scaled) has the same relations.
    wide = 2.0 * torch.cat([t, torch.zeros(5, 4, dtype=torch.float64)], dim=1) @ random_rotation(7, 4)
    assert RKDLoss()(wide, t)["loss"].item() == pytest.approx(0.0, abs=1e-10)


def test_gradient_reaches_the_student_only_and_stays_finite_for_coincident_points() -> None:
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    RKDLoss()(s, t)["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_single_sample_batch_has_no_relations() -> None:
    s = torch.randn(1, 4, requires_grad=True)
    out = RKDLoss()(s, torch.randn(1, 2))
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()


def test_feature_maps_are_flattened_and_bf16_is_upcast() -> None:
    s, t = torch.randn(4, 2, 3, 3), torch.randn(4, 8)
    assert RKDLoss()(s, t)["loss"].item() == pytest.approx(RKDLoss()(s.flatten(1), t)["loss"].item())
    assert RKDLoss()(s.bfloat16(), t.bfloat16())["loss"].dtype == torch.float32


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"same batch size, got student \(4, 2\) and teacher \(3, 2\)"):
        rkd_distance_loss(torch.randn(4, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="distance_weight: must be a finite number >= 0"):
        RKDLoss(distance_weight=-1.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        pairwise_distances(S, eps=-1.0)
