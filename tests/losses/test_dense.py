"""Dense-prediction losses (CWD, PKD, MGD, FGD, pixel KD, CIRKD affinity): hand-computed values and properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.dense import (
    CIRKDMemoryLoss,
    FGDLoss,
    MGDLoss,
    channel_wise_divergence,
    check_maps,
    fgd_attention,
    fgd_focal_masks,
    pairwise_affinity_kd,
    pearson_feature_loss,
    pearson_feature_loss_levels,
    pixel_kd,
)

LN3 = math.log(3.0)
# KL([1/4, 3/4] || [1/2, 1/2]): teacher logits (0, ln 3) against student logits (0, 0).
KL_QUARTER = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)


def _map(*values: float, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).reshape(shape)


def _grads_student_only(fn, student: torch.Tensor, teacher: torch.Tensor) -> None:
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    out = fn(student, teacher)
    out = out["loss"] if isinstance(out, dict) else out
    out.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def _close(got: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype))


# ------------------------------------------------------------------------------------------------- checks
def test_check_maps_names_the_loss_and_shapes() -> None:
    with pytest.raises(KDConfigError, match=r"^cwd: student \(1, 2, 3, 3\) and teacher \(1, 2, 4, 4\) do not match"):
        check_maps(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4), "cwd")
    with pytest.raises(KDConfigError, match=r"must be 4-D"):
        check_maps(torch.zeros(2, 3), torch.zeros(2, 3))
    check_maps(torch.zeros(1, 2, 3, 3), torch.zeros(1, 5, 3, 3), same_channels=False)


# ---------------------------------------------------------------------------------------------------- CWD
def test_cwd_by_hand_on_a_1x1x1x2_map() -> None:
    student = _map(0.0, 0.0, shape=(1, 1, 1, 2))
    teacher = _map(0.0, LN3, shape=(1, 1, 1, 2))
    assert channel_wise_divergence(student, teacher).item() == pytest.approx(KL_QUARTER, rel=1e-12)


def test_cwd_averages_over_batch_and_channels_and_sums_over_positions() -> None:
    # 1x2x2x2. Channel 0: S = (0, 0, 0, 0), T = (0, ln3, 0, ln3) -> p_T = (1/8, 3/8, 1/8, 3/8), p_S = 1/4 each.
    # Channel 1: equal maps -> 0. L = KL / (N*C) = KL / 2.
    student = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    teacher = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    teacher[0, 0] = torch.tensor([[0.0, LN3], [0.0, LN3]], dtype=torch.float64)
    kl = 2 * (0.125 * math.log(0.125 / 0.25) + 0.375 * math.log(0.375 / 0.25))
    assert channel_wise_divergence(student, teacher).item() == pytest.approx(kl / 2, rel=1e-12)


def test_cwd_is_zero_when_student_is_teacher_plus_a_per_channel_constant() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    student = teacher + torch.tensor([1.0, -2.0, 30.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert channel_wise_divergence(student, teacher, tau=2.0).item() == pytest.approx(0.0, abs=1e-12)
    assert channel_wise_divergence(student * 1.5, teacher).item() > 1e-3  # a scale is not a constant shift


def test_cwd_scales_with_tau_squared() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    base = channel_wise_divergence(s, t, tau=1.0)
    # Same distributions at tau = 4 (logits scaled by 4): the value is multiplied by tau^2 = 16.
    assert channel_wise_divergence(4 * s, 4 * t, tau=4.0).item() == pytest.approx(16 * base.item(), rel=1e-10)


def test_cwd_gradients_reach_the_student_only() -> None:
    torch.manual_seed(2)
    _grads_student_only(channel_wise_divergence, torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cwd_half_inputs_give_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    got = channel_wise_divergence(s.to(dtype), t.to(dtype), tau=2.0)
    assert got.dtype == torch.float32
    ref = channel_wise_divergence(s.to(dtype).float(), t.to(dtype).float(), tau=2.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_cwd_rejects_bad_tau_and_shapes() -> None:
    with pytest.raises(KDConfigError, match=r"^tau: must be a finite number > 0"):
        channel_wise_divergence(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), tau=0.0)
    with pytest.raises(KDConfigError, match=r"channel_wise_divergence"):
        channel_wise_divergence(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))


# ---------------------------------------------------------------------------------------------------- PKD
def test_pkd_by_hand_on_three_values() -> None:
    # S = (1, 2, 3), T = (3, 2, 1): unbiased std 1, standardised (-1, 0, 1) and (1, 0, -1);
    # 0.5 * mean((-2, 0, 2)^2) = 0.5 * 8/3 = 4/3 (= (1 - r)(M - 1)/M with r = -1, M = 3); the 1e-6 shifts it.
    s = _map(1.0, 2.0, 3.0, shape=(1, 1, 1, 3))
    t = _map(3.0, 2.0, 1.0, shape=(1, 1, 1, 3))
    assert pearson_feature_loss(s, t).item() == pytest.approx(4 / 3 / (1 + 1e-6) ** 2, rel=1e-12)


def test_pkd_matches_the_pearson_correlation_per_channel() -> None:
    torch.manual_seed(4)
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    s = 0.6 * t + torch.randn(2, 3, 4, 5, dtype=torch.float64)
    m = 2 * 4 * 5
    r = [torch.corrcoef(torch.stack([s[:, c].flatten(), t[:, c].flatten()]))[0, 1].item() for c in range(3)]
    expected = sum((1 - rc) * (m - 1) / m for rc in r) / 3
    assert pearson_feature_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_pkd_is_invariant_to_per_channel_affine_maps_of_both_sides() -> None:
    torch.manual_seed(5)
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    scale_s, shift_s = torch.tensor([0.5, 3.0, 7.0]).view(1, 3, 1, 1), torch.tensor([1.0, -4.0, 0.2]).view(1, 3, 1, 1)
    scale_t, shift_t = torch.tensor([2.0, 0.1, 9.0]).view(1, 3, 1, 1), torch.tensor([-3.0, 5.0, 1.0]).view(1, 3, 1, 1)
    base = pearson_feature_loss(s, t).item()
    assert pearson_feature_loss(s * scale_s + shift_s, t * scale_t + shift_t).item() == pytest.approx(base, rel=1e-5)
    assert pearson_feature_loss(3 * t + 1, t).item() == pytest.approx(0.0, abs=1e-9)
    assert pearson_feature_loss(-t, t).item() == pytest.approx(2 * (2 * 16 - 1) / (2 * 16), rel=1e-5)  # r = -1


def test_pkd_statistics_are_over_the_whole_batch_not_per_image() -> None:
    # Image 1 of the student is shifted: per-image standardisation would remove it, PKD's batch statistics do not.
    torch.manual_seed(6)
    t = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    s = t.clone()
    s[1] += 5.0
    assert pearson_feature_loss(s, t).item() > 0.1


def test_pkd_resizes_the_student_or_the_teacher() -> None:
    torch.manual_seed(7)
    s, t = torch.randn(2, 3, 8, 6), torch.randn(2, 3, 4, 3)
    resized = F.interpolate(s, size=(4, 3), mode="bilinear", align_corners=False)
    assert pearson_feature_loss(s, t).item() == pytest.approx(pearson_feature_loss(resized, t).item(), rel=1e-6)
    t_up = F.interpolate(t, size=(8, 6), mode="bilinear", align_corners=False)
    got = pearson_feature_loss(s, t, resize_student=False).item()
    assert got == pytest.approx(pearson_feature_loss(s, t_up).item(), rel=1e-6)
    # only the width differs: resized as well (mmrazor would assert)
    s_w = torch.randn(2, 3, 4, 5)
    s_w_resized = F.interpolate(s_w, size=(4, 3), mode="bilinear", align_corners=False)
    assert pearson_feature_loss(s_w, t).item() == pytest.approx(pearson_feature_loss(s_w_resized, t).item(), rel=1e-6)


def test_pkd_levels_sum_and_teacher_is_detached() -> None:
    torch.manual_seed(8)
    ss = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    ts = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    expected = pearson_feature_loss(ss[0], ts[0]) + pearson_feature_loss(ss[1], ts[1])
    assert pearson_feature_loss_levels(ss, ts).item() == pytest.approx(expected.item(), rel=1e-6)
    _grads_student_only(pearson_feature_loss, ss[0], ts[0])
    _grads_student_only(lambda s, t: pearson_feature_loss(s, t, resize_student=False), ss[0], ts[1])


def test_pkd_errors_and_dtype() -> None:
    with pytest.raises(KDConfigError, match=r"^pearson_feature_loss: needs .* equal N and C"):
        pearson_feature_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(KDConfigError, match=r"at least 2 values"):
        pearson_feature_loss(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1))
    with pytest.raises(KDConfigError, match=r"pearson_feature_loss_levels"):
        pearson_feature_loss_levels([torch.zeros(1, 2, 2, 2)], [])
    got = pearson_feature_loss(torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).half())
    assert got.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- MGD
def _identity_generator(loss: MGDLoss) -> None:
    """Both 3x3 convs copy their input (centre tap 1 on the diagonal): G(x) = relu(x)."""
    with torch.no_grad():
        for conv in (loss.generator[0], loss.generator[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(conv.weight.shape[0]):
                conv.weight[c, c, 1, 1] = 1.0


def test_mgd_without_masking_by_hand() -> None:
    loss = MGDLoss(1, 1, alpha=0.5, lambda_mask=0.0)
    _identity_generator(loss)
    student = torch.tensor([[[[1.0, 2.0], [3.0, -4.0]]], [[[0.0, 1.0], [1.0, 1.0]]]])  # relu drops the -4
    teacher = torch.tensor([[[[1.0, 0.0], [3.0, 1.0]]], [[[2.0, 1.0], [1.0, 0.0]]]])
    # squared errors: image 0: 0, 4, 0, 1; image 1: 4, 0, 0, 1 -> sum 10, / N = 2 -> 5, * alpha -> 2.5
    assert loss(student, teacher).item() == pytest.approx(2.5)
    assert torch.equal(loss.sample_mask(2, 1, 2, 2, torch.device("cpu")), torch.ones(2, 1, 2, 2))


def test_mgd_with_a_fixed_mask_by_hand() -> None:
    loss = MGDLoss(2, 2, alpha=1.0)
    _identity_generator(loss)
    student = torch.full((1, 2, 2, 2), 2.0)
    teacher = torch.zeros(1, 2, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # keep only position (0, 0), shared by both channels
    # generated: 2 at (0, 0) in both channels, 0 elsewhere -> sum of squares 2 * 4 = 8, / N = 1
    assert loss(student, teacher, mask=mask).item() == pytest.approx(8.0)
    channel_mask = torch.tensor([[[[1.0]], [[0.0]]]])  # [N, C, 1, 1]: drop channel 1
    assert loss(student, teacher, mask=channel_mask).item() == pytest.approx(16.0)
    with pytest.raises(KDConfigError, match=r"^mask: must broadcast"):
        loss(student, teacher, mask=torch.ones(1, 3, 2, 2))


def test_mgd_mask_drops_lambda_of_the_positions_and_follows_the_generator() -> None:
    loss = MGDLoss(4, 4, lambda_mask=0.65)
    mask = loss.sample_mask(8, 4, 64, 64, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert mask.shape == (8, 1, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 1 - mask.mean().item() == pytest.approx(0.65, abs=0.01)  # 32768 draws: std ~ 0.003
    again = loss.sample_mask(8, 4, 64, 64, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    channel = MGDLoss(4, 4, lambda_mask=0.75, mask_on_channel=True)
    cmask = channel.sample_mask(4096, 4, 3, 3, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert cmask.shape == (4096, 4, 1, 1)
    assert 1 - cmask.mean().item() == pytest.approx(0.75, abs=0.015)
    # the forward uses the given generator: the same seed gives the same loss
    torch.manual_seed(9)
    s, t = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    first = loss(s, t, generator=torch.Generator().manual_seed(3))
    assert loss(s, t, generator=torch.Generator().manual_seed(3)).item() == first.item()


def test_mgd_gradients_reach_align_generator_and_student_not_teacher() -> None:
    torch.manual_seed(10)
    loss = MGDLoss(3, 4, lambda_mask=0.5)
    assert isinstance(loss.align, nn.Conv2d) and MGDLoss(4, 4).align is None
    student = torch.randn(2, 3, 5, 5, requires_grad=True)
    teacher = torch.randn(2, 4, 5, 5, requires_grad=True)
    loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    for param in loss.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_mgd_checks_and_dtype() -> None:
    with pytest.raises(KDConfigError, match=r"^lambda_mask: must be a number in"):
        MGDLoss(2, 2, lambda_mask=1.5)
    with pytest.raises(KDConfigError, match=r"^alpha: must be a finite number >= 0"):
        MGDLoss(2, 2, alpha=-1.0)
    with pytest.raises(KDConfigError, match=r"^student_channels"):
        MGDLoss(0, 2)
    loss = MGDLoss(2, 3)
    with pytest.raises(KDConfigError, match=r"^MGDLoss: the student map has 4 channels"):
        loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(KDConfigError, match=r"^MGDLoss: student"):
        loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 4, 4))
    got = loss(torch.randn(2, 2, 3, 3).bfloat16(), torch.randn(2, 3, 3, 3).bfloat16())
    assert got.dtype == torch.float32 and torch.isfinite(got)


# ---------------------------------------------------------------------------------------------------- FGD
def test_fgd_focal_mask_of_one_box() -> None:
    # 32x32 image, 4x4 map: x 8..24 -> 1..3, y 0..8 -> 0..1; rows 0..1, cols 1..3 inclusive: area 6.
    boxes = [torch.tensor([[8.0, 0.0, 24.0, 8.0]])]
    fg, bg = fgd_focal_masks(boxes, (4, 4), [(32, 32)])
    s = 1 / 6
    _close(fg[0], [[0, s, s, s], [0, s, s, s], [0, 0, 0, 0], [0, 0, 0, 0]])
    b = 1 / 10  # ten background cells
    _close(bg[0], [[b, 0, 0, 0], [b, 0, 0, 0], [b, b, b, b], [b, b, b, b]])


def test_fgd_focal_mask_of_two_overlapping_boxes_keeps_the_largest_value() -> None:
    # box A (0, 0, 15, 15) -> 0..1.875 -> floor 0, ceil 2: 3x3 cells, 1/9; box B (8, 8, 16, 16) -> 1..2: 2x2, 1/4.
    boxes = [torch.tensor([[0.0, 0.0, 15.0, 15.0], [8.0, 8.0, 16.0, 16.0]])]
    fg, bg = fgd_focal_masks(boxes, (4, 4), [(32, 32)])
    a, q = 1 / 9, 1 / 4
    _close(fg[0], [[a, a, a, 0], [a, q, q, 0], [a, q, q, 0], [0, 0, 0, 0]])
    b = 1 / 7
    _close(bg[0], [[0, 0, 0, b], [0, 0, 0, b], [0, 0, 0, b], [b, b, b, b]])
    # box order does not matter
    fg_rev, _ = fgd_focal_masks([boxes[0].flip(0)], (4, 4), [(32, 32)])
    assert torch.equal(fg, fg_rev)


def test_fgd_focal_mask_border_padding_and_no_boxes() -> None:
    # A box up to the right/bottom border: ceil(4) = 4 -> the 5th row/column is off the map but counts in the area.
    fg, bg = fgd_focal_masks([torch.tensor([[0.0, 0.0, 32.0, 32.0]])], (4, 4), [(32, 32)])
    assert torch.allclose(fg, torch.full((1, 4, 4), 1 / 25))
    assert torch.equal(bg, torch.zeros(1, 4, 4))  # no background cell: left as zeros
    # Padding: image 16x32 padded to 32x32 (map 4x4). img_shape stretches y by 4/16; stride 8 does not.
    box = [torch.tensor([[0.0, 0.0, 16.0, 8.0]])]
    fg_img, _ = fgd_focal_masks(box, (4, 4), [(16, 32)])  # x' 0..2, y' 0..2: rows 0..2, cols 0..2
    fg_stride, _ = fgd_focal_masks(box, (4, 4), box_scaling="stride", stride=8)  # x' 0..2, y' 0..1
    assert (fg_img[0] > 0).sum().item() == 9 and fg_img[0, 2, 0].item() == pytest.approx(1 / 9)
    assert (fg_stride[0] > 0).sum().item() == 6 and fg_stride[0, 1, 2].item() == pytest.approx(1 / 6)
    # An image without boxes is all background: 1 / (H * W) everywhere.
    fg, bg = fgd_focal_masks([torch.zeros(0, 4), box[0]], (4, 4), [(32, 32), (32, 32)])
    assert torch.equal(fg[0], torch.zeros(4, 4))
    assert torch.allclose(bg[0], torch.full((4, 4), 1 / 16))
    assert bg.sum(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0])


def test_fgd_focal_mask_errors() -> None:
    box = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    with pytest.raises(KDConfigError, match=r"^image_sizes: box_scaling='img_shape' needs one"):
        fgd_focal_masks(box, (4, 4))
    with pytest.raises(KDConfigError, match=r"^stride: box_scaling='stride' needs"):
        fgd_focal_masks(box, (4, 4), box_scaling="stride")
    with pytest.raises(KDConfigError, match=r"^box_scaling: must be"):
        fgd_focal_masks(box, (4, 4), [(8, 8)], box_scaling="pixels")  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match=r"^boxes: image 0: must be \[k, 4\]"):
        fgd_focal_masks([torch.zeros(2, 5)], (4, 4), [(8, 8)])
    with pytest.raises(KDConfigError, match=r"x2 < x1"):
        fgd_focal_masks([torch.tensor([[4.0, 0.0, 2.0, 8.0]])], (4, 4), [(8, 8)])


def test_fgd_attention_by_hand_and_its_sums() -> None:
    x = torch.tensor([[[[1.0, -1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 2.0]]]])  # [1, 2, 2, 2]
    spatial, channel = fgd_attention(x, temperature=0.5)
    # mean_c |x| = (1, 1, 0, 1) -> / 0.5 = (2, 2, 0, 2); channel means (0.5, 1.0) -> / 0.5 = (1, 2)
    z = 3 * math.exp(2) + 1
    assert spatial.flatten().tolist() == pytest.approx([4 * math.exp(2) / z] * 2 + [4 / z, 4 * math.exp(2) / z])
    zc = math.e + math.e**2
    assert channel[0].tolist() == pytest.approx([2 * math.e / zc, 2 * math.e**2 / zc])
    torch.manual_seed(11)
    spatial, channel = fgd_attention(torch.randn(3, 5, 4, 6), temperature=0.8)
    assert spatial.sum(dim=(1, 2)).tolist() == pytest.approx([24.0] * 3)
    assert channel.sum(dim=1).tolist() == pytest.approx([5.0] * 3)


def _official_fgd(s, t, boxes, image_sizes, temp, loss: FGDLoss) -> dict[str, float]:
    """The official FGD ``FeatureLoss`` algorithm written out: per-box Python loop, sqrt-weighted MSE, matmul pool."""
    n, c, h, w = s.shape

    def attention(x):
        value = x.abs()
        sa = (h * w * F.softmax((value.mean(1, keepdim=True) / temp).view(n, -1), dim=1)).view(n, h, w)
        ca = c * F.softmax(value.mean(2).mean(2) / temp, dim=1)
        return sa, ca

    st, ct = attention(t)
    ss, cs = attention(s)
    fg, bg = torch.zeros_like(st), torch.ones_like(st)
    for i in range(n):
        b = boxes[i]
        img_h, img_w = image_sizes[i]
        wmin = torch.floor(b[:, 0] / img_w * w).int()
        wmax = torch.ceil(b[:, 2] / img_w * w).int()
        hmin = torch.floor(b[:, 1] / img_h * h).int()
        hmax = torch.ceil(b[:, 3] / img_h * h).int()
        area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
        for j in range(len(b)):
            cells = fg[i][hmin[j] : hmax[j] + 1, wmin[j] : wmax[j] + 1]
            fg[i][hmin[j] : hmax[j] + 1, wmin[j] : wmax[j] + 1] = torch.maximum(cells, area[j])
        bg[i] = torch.where(fg[i] > 0, 0.0, 1.0)
        if torch.sum(bg[i]):
            bg[i] /= torch.sum(bg[i])
    weight = torch.sqrt(st[:, None]) * torch.sqrt(ct[:, :, None, None])
    fea_t, fea_s = t * weight, s * weight
    fg_loss = ((fea_s * fg[:, None].sqrt() - fea_t * fg[:, None].sqrt()) ** 2).sum() / n
    bg_loss = ((fea_s * bg[:, None].sqrt() - fea_t * bg[:, None].sqrt()) ** 2).sum() / n
    mask_loss = (cs - ct).abs().sum() / n + (ss - st).abs().sum() / n

    def relation(x, block):
        mask = F.softmax(block.conv_mask(x).view(n, 1, h * w), dim=2).unsqueeze(-1)  # [N, 1, HW, 1]
        context = torch.matmul(x.view(n, c, h * w).unsqueeze(1), mask).view(n, c, 1, 1)
        return x + block.channel_add_conv(context)

    rela = ((relation(s, loss.context_s) - relation(t, loss.context_t)) ** 2).sum() / n
    return {"fg": fg_loss.item(), "bg": bg_loss.item(), "attention": mask_loss.item(), "relation": rela.item()}


def test_fgd_matches_the_official_algorithm() -> None:
    torch.manual_seed(12)
    loss = FGDLoss(4, 4, temperature=0.5, alpha_fg=1.0, beta_bg=1.0, gamma_attention=1.0, lambda_relation=1.0)
    with torch.no_grad():  # make the relation term non-trivial
        for block in (loss.context_s, loss.context_t):
            block.channel_add_conv[-1].weight.normal_()
            block.channel_add_conv[-1].bias.normal_()
    s, t = torch.randn(3, 4, 5, 7), torch.randn(3, 4, 5, 7)
    boxes = [
        torch.tensor([[3.0, 2.0, 20.0, 17.0], [10.0, 5.0, 13.0, 9.0], [0.0, 0.0, 40.0, 30.0]]),
        torch.zeros(0, 4),
        torch.tensor([[25.0, 11.0, 55.0, 38.0], [27.0, 12.0, 29.0, 14.0]]),
    ]
    sizes = [(30, 40), (36, 50), (40, 56)]
    got = loss(s, t, boxes, sizes)
    expected = _official_fgd(s, t, boxes, sizes, 0.5, loss)
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, rel=1e-5), name
    assert got["loss"].item() == pytest.approx(sum(expected.values()), rel=1e-5)


def test_fgd_weights_and_named_terms() -> None:
    torch.manual_seed(13)
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    boxes, sizes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])] * 2, [(16, 16)] * 2
    unit = FGDLoss(4, 4, alpha_fg=1.0, beta_bg=1.0, gamma_attention=1.0, lambda_relation=1.0)(s, t, boxes, sizes)
    default = FGDLoss(4, 4)
    assert (default.weights["fg"], default.weights["bg"]) == (1e-3, 5e-4)
    assert (default.weights["attention"], default.weights["relation"]) == (5e-4, 5e-6)
    got = default(s, t, boxes, sizes)  # relation blocks are zero-initialised: unaffected by the seed
    assert set(got) == {"loss", "fg", "bg", "attention", "relation"}
    for name, weight in default.weights.items():
        assert got[name].item() == pytest.approx(weight * unit[name].item(), rel=1e-5)
    assert got["loss"].item() == pytest.approx(sum(got[k].item() for k in default.weights), rel=1e-6)
    only_fg = FGDLoss(4, 4, beta_bg=0.0, gamma_attention=0.0, lambda_relation=0.0)(s, t, boxes, sizes)
    assert set(only_fg) == {"loss", "fg"}


def test_fgd_is_zero_when_student_equals_teacher() -> None:
    torch.manual_seed(14)
    t = torch.randn(2, 4, 4, 4)
    loss = FGDLoss(4, 4)
    got = loss(t.clone(), t, [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.zeros(0, 4)], [(16, 16), (16, 16)])
    for name in ("fg", "bg", "attention", "relation", "loss"):
        assert got[name].item() == pytest.approx(0.0, abs=1e-7), name
    # At zero init the relation term is the plain sum of squares / N
    s = torch.randn(2, 4, 4, 4)
    rel = FGDLoss(4, 4, lambda_relation=1.0)(s, t, [torch.zeros(0, 4)] * 2, [(16, 16)] * 2)["relation"]
    assert rel.item() == pytest.approx(((s - t) ** 2).sum().item() / 2, rel=1e-5)


def test_fgd_image_without_boxes_is_all_background() -> None:
    torch.manual_seed(15)
    s, t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    got = FGDLoss(3, 3, alpha_fg=1.0, beta_bg=1.0)(s, t, [torch.zeros(0, 4)], [(32, 32)])
    spatial, channel = fgd_attention(t, 0.5)
    expected_bg = (spatial[:, None] * channel[:, :, None, None] * (s - t) ** 2).sum() / 16
    assert got["fg"].item() == 0.0
    assert got["bg"].item() == pytest.approx(expected_bg.item(), rel=1e-5)


def test_fgd_stride_mode_and_gradients() -> None:
    torch.manual_seed(16)
    loss = FGDLoss(3, 4, box_scaling="stride", stride=8)
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 4, 4, 4, requires_grad=True)
    got = loss(student, teacher, [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.zeros(0, 4)])  # no image_sizes
    got["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert loss.align is not None and loss.align.weight.grad.abs().sum() > 0
    for block in (loss.context_s, loss.context_t):  # the teacher-side block is trained too
        assert block.channel_add_conv[-1].weight.grad.abs().sum() > 0


def test_fgd_checks_and_dtype() -> None:
    with pytest.raises(KDConfigError, match=r"^stride: box_scaling='stride' needs"):
        FGDLoss(4, 4, box_scaling="stride")
    with pytest.raises(KDConfigError, match=r"^temperature: must be a finite number > 0"):
        FGDLoss(4, 4, temperature=0.0)
    with pytest.raises(KDConfigError, match=r"^lambda_relation: must be a finite number >= 0"):
        FGDLoss(4, 4, lambda_relation=-1.0)
    loss = FGDLoss(4, 4)
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    with pytest.raises(KDConfigError, match=r"^boxes: needs one box tensor per image"):
        loss(s, t, [torch.zeros(0, 4)], [(16, 16)])
    with pytest.raises(KDConfigError, match=r"^image_sizes: box_scaling='img_shape' needs one"):
        loss(s, t, [torch.zeros(0, 4)] * 2)
    with pytest.raises(KDConfigError, match=r"^FGDLoss: the teacher map has 4 channels"):
        FGDLoss(4, 8)(s, t, [torch.zeros(0, 4)] * 2, [(16, 16)] * 2)
    got = loss(s.bfloat16(), t.half(), [torch.tensor([[0.0, 0.0, 8.0, 8.0]])] * 2, [(16, 16)] * 2)
    assert all(v.dtype == torch.float32 for v in got.values())


# ------------------------------------------------------------------------------------------------ pixel KD
def test_pixel_kd_by_hand() -> None:
    # [1, 2, 1, 2]: pixel 0 has student (0, 0), teacher (0, ln 3); pixel 1 equal -> KL / (N*h*w = 2)
    student = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    teacher = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    teacher[0, 1, 0, 0] = LN3
    assert pixel_kd(student, teacher).item() == pytest.approx(KL_QUARTER / 2, rel=1e-12)
    # tau = 2 with doubled logits: the same distributions, times tau^2
    assert pixel_kd(2 * student, 2 * teacher, tau=2.0).item() == pytest.approx(2 * KL_QUARTER, rel=1e-12)


def test_pixel_kd_zero_at_equality_gradients_and_dtype() -> None:
    torch.manual_seed(17)
    t = torch.randn(2, 5, 3, 4)
    assert pixel_kd(t.clone(), t, tau=3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert pixel_kd(t + 7.0, t).item() == pytest.approx(0.0, abs=1e-6)  # a per-pixel constant over classes
    _grads_student_only(pixel_kd, torch.randn(2, 5, 3, 4), t)
    assert pixel_kd(torch.randn(2, 5, 3, 4).half(), t.bfloat16()).dtype == torch.float32
    with pytest.raises(KDConfigError, match=r"^pixel_kd: student"):
        pixel_kd(torch.zeros(1, 5, 3, 3), torch.zeros(1, 4, 3, 3))
    with pytest.raises(KDConfigError, match=r"^tau"):
        pixel_kd(t, t, tau=-1.0)


# ----------------------------------------------------------------------------------------- CIRKD pair-wise
def test_pairwise_affinity_by_hand_on_one_image_with_two_positions() -> None:
    # Student positions (1, 0) and (0, 1): A_S = I. Teacher has one channel: both positions normalise to 1, A_T = 1.
    # Each row: p_T = (1/2, 1/2), p_S = softmax((1, 0)/tau) (or its mirror); KL = 0.5 * log((e^a + 1)^2 / (4 e^a)).
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)  # [1, 2, 1, 2]
    teacher = torch.tensor([[[[2.0, 3.0]]]], dtype=torch.float64)  # [1, 1, 1, 2]
    for tau in (1.0, 0.5):
        a = 1 / tau
        expected = 0.5 * math.log((math.exp(a) + 1) ** 2 / (4 * math.exp(a)))
        assert pairwise_affinity_kd(student, teacher, tau=tau).item() == pytest.approx(expected, rel=1e-12)


def _official_pairwise(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    """CIRKD's ``CriterionMiniBatchCrossImagePair``: a double loop over image pairs, batchmean KL per pair."""
    b, c = s.shape[:2]
    s, t = F.normalize(s, p=2, dim=1), F.normalize(t, p=2, dim=1)
    total = 0.0
    for i in range(b):
        for j in range(b):
            s_map = s[i].reshape(c, -1).T @ s[j].reshape(c, -1)
            t_map = t[i].reshape(t.shape[1], -1).T @ t[j].reshape(t.shape[1], -1)
            p_s, p_t = F.log_softmax(s_map / tau, dim=1), F.softmax(t_map / tau, dim=1)
            total += F.kl_div(p_s, p_t, reduction="batchmean").item()
    return total / (b * b)


def test_pairwise_affinity_matches_the_official_double_loop() -> None:
    torch.manual_seed(18)
    s, t = torch.randn(3, 5, 3, 4, dtype=torch.float64), torch.randn(3, 7, 3, 4, dtype=torch.float64)
    assert pairwise_affinity_kd(s, t).item() == pytest.approx(_official_pairwise(s, t, 0.1), rel=1e-10)
    assert pairwise_affinity_kd(s, t, tau=0.5).item() == pytest.approx(_official_pairwise(s, t, 0.5), rel=1e-10)


def test_pairwise_affinity_invariances_and_zero_at_equality() -> None:
    torch.manual_seed(19)
    t = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    assert pairwise_affinity_kd(t.clone(), t).item() == pytest.approx(0.0, abs=1e-10)
    # A student of another width carrying the same geometry (orthonormal columns), scaled per position: zero.
    q, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))  # [6, 3], q^T q = I
    scale = torch.rand(2, 1, 3, 3, dtype=torch.float64) + 0.5
    student = torch.einsum("dc,nchw->ndhw", q, t) * scale
    assert pairwise_affinity_kd(student, t).item() == pytest.approx(0.0, abs=1e-10)
    s = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    assert pairwise_affinity_kd(9 * s, t).item() == pytest.approx(pairwise_affinity_kd(s, t).item(), rel=1e-10)
    assert pairwise_affinity_kd(s, t).item() > 1e-3


def test_pairwise_affinity_pooling_gradients_and_checks() -> None:
    torch.manual_seed(20)
    s, t = torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6)
    pooled_s = F.avg_pool2d(s, 2, 2, ceil_mode=True)
    pooled_t = F.avg_pool2d(t, 2, 2, ceil_mode=True)
    got = pairwise_affinity_kd(s, t, pool_size=2).item()
    assert got == pytest.approx(pairwise_affinity_kd(pooled_s, pooled_t).item(), rel=1e-6)
    _grads_student_only(pairwise_affinity_kd, s, t)
    assert pairwise_affinity_kd(s.bfloat16(), t.half()).dtype == torch.float32
    with pytest.raises(KDConfigError, match=r"^pairwise_affinity_kd: student"):
        pairwise_affinity_kd(torch.zeros(2, 4, 5, 6), torch.zeros(1, 4, 5, 6))
    with pytest.raises(KDConfigError, match=r"^pool_size"):
        pairwise_affinity_kd(s, t, pool_size=0)
    with pytest.raises(KDConfigError, match=r"^tau"):
        pairwise_affinity_kd(s, t, tau=0.0)


# ------------------------------------------------------------------------------------------------ autocast
def test_losses_under_cpu_autocast_and_bf16_weights_give_float32() -> None:
    torch.manual_seed(21)
    s3, s4, t = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    boxes, sizes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])] * 2, [(48, 48)] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MGDLoss(3, 4)(s3, t).dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in FGDLoss(3, 4)(s3, t, boxes, sizes).values())
        for value in (pairwise_affinity_kd(s3, t), pixel_kd(s4, t), pearson_feature_loss(s4, t)):
            assert value.dtype == torch.float32
        exact = pairwise_affinity_kd(s3, t)
    assert exact.item() == pytest.approx(pairwise_affinity_kd(s3, t).item(), rel=1e-6)  # autocast is off inside
    # bf16-true training: the loss modules' weights are bf16 too
    assert MGDLoss(3, 4).bfloat16()(s3.bfloat16(), t.bfloat16()).dtype == torch.float32
    assert FGDLoss(3, 4).bfloat16()(s3.bfloat16(), t.bfloat16(), boxes, sizes)["loss"].dtype == torch.float32


# ------------------------------------------------------------------------------------------- CIRKD memory
def _memory(**kwargs: object) -> CIRKDMemoryLoss:
    defaults = {"student_channels": 2, "teacher_channels": 2, "num_classes": 2, "pixel_memory_size": 5}
    defaults.update({"region_memory_size": 2, "pixel_contrast_size": 20, "region_contrast_size": 20})
    defaults.update({"pixel_update_freq": 2, "pixel_weight": 1.0, "region_weight": 1.0})
    defaults.update(kwargs)
    return CIRKDMemoryLoss(**defaults)  # type: ignore[arg-type]


def _rows_among(rows: torch.Tensor, candidates: torch.Tensor) -> bool:
    """Every row of ``rows`` [k, C] equals (to 1e-6) one column of ``candidates`` [C, n]."""
    return bool((torch.cdist(rows, candidates.T).min(dim=1).values < 1e-6).all())


def test_memory_defaults_and_queues() -> None:
    loss = CIRKDMemoryLoss(8, 16, num_classes=19, pixel_memory_size=50, region_memory_size=10)
    assert (loss.pixels_per_class, loss.regions_per_class) == (4096 // 19 + 1, 1024 // 19 + 1) == (216, 54)
    assert (loss.tau, loss.kd_tau, loss.weights) == (0.1, 1.0, {"pixel": 0.1, "region": 0.1})
    assert loss.pixel_queue.shape == (19, 50, 16) and loss.region_queue.shape == (19, 10, 16)
    assert torch.allclose(loss.pixel_queue.norm(dim=2), torch.ones(19, 50))
    assert {"pixel_queue", "pixel_queue_ptr", "region_queue", "region_queue_ptr"} <= set(loss.state_dict())
    with pytest.raises(KDConfigError, match=r"^pixel_enqueue: must be"):
        CIRKDMemoryLoss(8, 16, 19, pixel_enqueue="random")  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match=r"^num_classes: must be a positive integer"):
        CIRKDMemoryLoss(8, 16, 0)


def test_memory_enqueue_regions_pixels_and_ring_pointers() -> None:
    loss = _memory(pixel_enqueue="class")
    # one image, 2x3 map; class 0 at positions 0, 1, 4; class 1 at 5; 255 at 2, 3
    keys = F.normalize(torch.tensor([[[[1.0, 2.0, 5.0], [5.0, 0.0, 3.0]], [[0.0, 1.0, 5.0], [5.0, 1.0, -1.0]]]]), dim=1)
    labels = torch.tensor([[[0, 0, 255], [255, 0, 1]]])
    loss.enqueue(keys, labels, torch.Generator().manual_seed(0))
    flat = keys[0].flatten(1)  # [C, 6]
    mean0 = F.normalize(flat[:, [0, 1, 4]].mean(dim=1), dim=0)
    assert torch.allclose(loss.region_queue[0, 0], mean0) and torch.allclose(loss.region_queue[1, 0], flat[:, 5])
    assert loss.region_queue_ptr.tolist() == [1, 1]
    # class 0: two of its three pixels in slots 0..1; class 1: its only pixel in slot 0
    class0 = flat[:, [0, 1, 4]]
    assert _rows_among(loss.pixel_queue[0, :2], class0)
    assert not _rows_among(loss.pixel_queue[0, 2:], class0)  # still the random initial slots
    assert torch.allclose(loss.pixel_queue[1, 0], flat[:, 5])
    assert loss.pixel_queue_ptr.tolist() == [2, 1]
    loss.enqueue(keys, labels)  # second time: region ring wraps (size 2), pixel pointers 4 and 2
    assert loss.region_queue_ptr.tolist() == [0, 0] and loss.pixel_queue_ptr.tolist() == [4, 2]
    before = loss.pixel_queue[0].clone()
    loss.enqueue(keys, labels)  # class 0: ptr 4 + 2 >= 5 -> the last two slots (3, 4) are written, ptr reset
    assert loss.pixel_queue_ptr.tolist() == [0, 3]
    assert torch.equal(loss.pixel_queue[0, :3], before[:3])
    assert _rows_among(loss.pixel_queue[0, 3:], class0)


def test_memory_official_pixel_enqueue_takes_the_first_positions_of_the_image() -> None:
    loss = _memory(pixel_update_freq=3)
    keys = F.normalize(torch.randn(1, 2, 2, 3), dim=1)
    labels = torch.tensor([[[1, 1, 1], [0, 0, 0]]])  # class 0 at positions 3..5, but n_0 = 3 -> positions 0..2
    loss.enqueue(keys, labels, torch.Generator().manual_seed(1))
    assert _rows_among(loss.pixel_queue[0, :3], keys[0].flatten(1)[:, :3])
    assert not _rows_among(loss.pixel_queue[0, :1], keys[0].flatten(1)[:, 3:])
    classwise = _memory(pixel_update_freq=3, pixel_enqueue="class")
    classwise.enqueue(keys, labels)
    assert _rows_among(classwise.pixel_queue[0, :3], keys[0].flatten(1)[:, 3:])


def test_memory_loss_matches_the_formula_and_ignores_ignored_pixels() -> None:
    torch.manual_seed(22)
    loss = _memory(tau=0.5, kd_tau=2.0)
    loss.project_head = nn.Identity()  # type: ignore[assignment]
    loss.eval()  # no enqueue: the queues stay as they are
    s, t = torch.randn(2, 2, 2, 3), torch.randn(2, 2, 2, 3)
    labels = torch.tensor([[[0, 1, 255], [1, 1, 0]], [[255, 255, 0], [1, 0, 1]]])
    got = loss(s, t, labels)
    # per-class sample sizes (20 // 2 + 1 = 11) exceed the queues: every slot is used; KL ignores column order
    valid = (labels != 255).flatten()
    fs = F.normalize(s, dim=1).permute(0, 2, 3, 1).reshape(-1, 2)[valid]
    ft = F.normalize(t, dim=1).permute(0, 2, 3, 1).reshape(-1, 2)[valid]
    for name, queue in (("pixel", loss.pixel_queue), ("region", loss.region_queue)):
        keys = queue.reshape(-1, 2)
        p_t = F.softmax(ft @ keys.T / 0.5 / 2.0, dim=1)
        log_p_s = F.log_softmax(fs @ keys.T / 0.5 / 2.0, dim=1)
        expected = 4.0 * (p_t * (p_t.log() - log_p_s)).sum() / valid.sum()
        assert got[name].item() == pytest.approx(expected.item(), rel=1e-5), name
    s_changed = s.clone()
    s_changed[0, :, 0, 2] += 5.0  # an ignored pixel
    assert loss(s_changed, t, labels)["loss"].item() == pytest.approx(got["loss"].item(), rel=1e-6)
    assert loss(t.clone(), t, labels)["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_memory_gradients_all_ignored_and_label_checks() -> None:
    torch.manual_seed(23)
    loss = _memory(student_channels=3)
    student = torch.randn(2, 3, 2, 2, requires_grad=True)
    teacher = torch.randn(2, 2, 2, 2, requires_grad=True)
    labels = torch.tensor([[0, 0, 1, 1], [1, 0, 255, 0], [0, 1, 1, 0], [1, 1, 0, 0]]).view(1, 4, 4).repeat(2, 1, 1)
    got = loss(student, teacher, labels)  # labels at 4x4, features at 2x2: nearest resize
    assert set(got) == {"loss", "pixel", "region"}
    got["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    assert all(p.grad is not None for p in loss.project_head.parameters())
    assert not loss.pixel_queue.requires_grad
    ignored = loss(student, teacher, torch.full((2, 2, 2), 255))
    assert ignored["loss"].item() == 0.0
    ignored["loss"].backward()
    with pytest.raises(KDConfigError, match=r"^labels: must lie in \[0, 2\)"):
        loss(student, teacher, torch.full((2, 2, 2), 7))
    with pytest.raises(KDConfigError, match=r"^labels: must be integer"):
        loss(student, teacher, torch.zeros(2, 2, 2))
