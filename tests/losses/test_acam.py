"""ACAM-KD losses: STCA-FF attention (pooled tokens, float32 softmax), ASCM masks, the masked channel/spatial
losses and the Dice diversity on hand-computed tiny cases, gradient routing of the three mask objectives."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.acam import (
    ACAMLoss,
    SelectionUnits,
    STCAFusion,
    acam_mask_losses,
    dice_diversity,
    pooled_size,
    reverse_gradient,
)


def maps(seed: int = 0, shape: tuple[int, ...] = (2, 16, 8, 8)) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ------------------------------------------------------------------------------------------------ STCA-FF
@pytest.mark.parametrize(("size", "max_tokens"), [((8, 8), 16), ((8, 8), 1024), ((10, 40), 100), ((100, 168), 1024)])
def test_attention_is_teacher_queries_over_at_most_max_tokens_student_keys(size: tuple, max_tokens: int) -> None:
    torch.manual_seed(0)
    fusion = STCAFusion(16, max_tokens=max_tokens)
    assert fusion.key_channels == 4  # d = C/4
    h, w = size
    teacher, student = torch.randn(1, 16, h, w), torch.randn(1, 16, h, w)
    fused, attention = fusion(teacher, student, return_attention=True)
    tokens = pooled_size(h, w, max_tokens)
    assert attention.shape == (1, h * w, tokens[0] * tokens[1])  # queries at full resolution
    assert attention.shape[-1] <= max_tokens
    assert (tokens == (h, w)) == (h * w <= max_tokens)  # pooled only when the map has too many positions
    assert fused.shape == teacher.shape and fused.dtype == torch.float32
    torch.testing.assert_close(attention.sum(-1), torch.ones(1, h * w))


def test_pooled_size_keeps_the_aspect_ratio_under_the_bound() -> None:
    assert pooled_size(8, 8, 64) == (8, 8)
    assert pooled_size(8, 8, 16) == (4, 4)
    assert pooled_size(10, 40, 100) == (5, 20)
    assert pooled_size(100, 168, 1024) == (24, 42)  # P3 of an 800x1333 image: 1008 tokens
    assert pooled_size(168, 100, 1024) == (42, 24)
    assert pooled_size(200, 1, 16) == (16, 1)
    for h, w, bound in itertools.product((1, 3, 7, 64, 200), (1, 5, 33, 168, 5000), (1, 16, 1024)):
        ph, pw = pooled_size(h, w, bound)
        assert 1 <= ph <= h and 1 <= pw <= w and ph * pw <= max(bound, 1)


def test_fusion_with_zero_queries_adds_the_mean_value_to_the_teacher() -> None:
    """Q = 0 gives uniform attention: F_fuse = F_T + mean over positions of W_v·F_S' (pooling keeps the mean)."""
    torch.manual_seed(1)
    teacher, student = maps(1)
    for max_tokens in (1024, 16):
        fusion = STCAFusion(16, max_tokens=max_tokens)
        torch.nn.init.zeros_(fusion.query.weight)
        torch.nn.init.zeros_(fusion.query.bias)
        expected = teacher + fusion.value(student).mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(fusion(teacher, student), expected)


def test_fusion_uses_the_student_only_through_keys_and_values() -> None:
    torch.manual_seed(2)
    fusion = STCAFusion(16)
    teacher, student = maps(2)
    by_hand_q = fusion.query(teacher).flatten(2).transpose(1, 2)
    by_hand_k = fusion.key(student).flatten(2)
    by_hand_v = fusion.value(student).flatten(2).transpose(1, 2)
    attention = torch.softmax(by_hand_q @ by_hand_k / 2.0, dim=-1)  # sqrt(d) = 2
    expected = (attention @ by_hand_v).transpose(1, 2).reshape(teacher.shape) + teacher
    torch.testing.assert_close(fusion(teacher, student), expected)


def test_softmax_runs_in_float32_under_bf16_autocast() -> None:
    torch.manual_seed(3)
    fusion = STCAFusion(16, max_tokens=16)
    teacher, student = maps(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusion.query(teacher).dtype == torch.bfloat16  # the projections do run in bf16
        fused, attention = fusion(teacher, student.bfloat16(), return_attention=True)
    assert attention.dtype == torch.float32 and fused.dtype == torch.float32
    # rows of a float32 softmax sum to 1 to float32 precision (a bf16 softmax is off by ~1e-2)
    assert (attention.sum(-1) - 1).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ ASCM
def test_selection_units_give_m_channel_and_spatial_masks_in_0_1() -> None:
    torch.manual_seed(4)
    units = SelectionUnits(32, num_masks=6)
    assert units.channel_units[0][0].out_features == 2  # C -> C/16 -> C
    x = 5 * torch.randn(2, 32, 6, 10)
    channel, spatial = units(x)
    assert channel.shape == (2, 6, 32) and spatial.shape == (2, 6, 6, 10)
    for mask in (channel, spatial):
        assert mask.min() >= 0 and mask.max() <= 1
    # unit m's spatial mask is sigmoid(conv_m([mean_c x; max_c x]))
    descriptor = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    conv = units.spatial_units
    unit2 = torch.nn.functional.conv2d(descriptor, conv.weight[2:3], conv.bias[2:3], padding=1).sigmoid()
    torch.testing.assert_close(spatial[:, 2:3], unit2)
    torch.testing.assert_close(channel[:, 4], units.channel_units[4](x.mean((2, 3))).sigmoid())


# ------------------------------------------------------------------------------------------------ losses
def test_channel_and_spatial_losses_equal_a_hand_computation() -> None:
    teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 2.0]]]])  # [1, 2, 2, 2]
    student = torch.zeros(1, 2, 2, 2)  # D = teacher²: channel means 30/4 = 7.5 and 5/4 = 1.25
    channel_masks = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # [N=1, M=2, C=2]
    spatial_masks = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.25, 0.25], [0.25, 0.25]]]])  # [1, 2, 2, 2]
    l_ch, l_sp = acam_mask_losses(student, teacher, channel_masks, spatial_masks)
    # L_ch = ½ [1·30/(4·1) + (0.5·30 + 0.5·5)/(4·1)] = ½ (7.5 + 4.375)
    torch.testing.assert_close(l_ch, torch.tensor(5.9375))
    # position means over C: 0.5, 2.5, 4.5, 10 -> L_sp = ½ [0.5 + 0.25·17.5/1] = ½ (0.5 + 4.375)
    torch.testing.assert_close(l_sp, torch.tensor(2.4375))
    # normalised by the mask sum: scaling a mask changes nothing
    torch.testing.assert_close(acam_mask_losses(student, teacher, 3 * channel_masks, 0.1 * spatial_masks), (l_ch, l_sp))


def test_losses_are_zero_when_the_adapted_student_equals_the_teacher() -> None:
    teacher, _ = maps(5)
    channel, spatial = torch.rand(2, 3, 16), torch.rand(2, 3, 8, 8)
    assert all(v == 0 for v in acam_mask_losses(teacher.clone(), teacher, channel, spatial))
    torch.manual_seed(5)
    same_width = ACAMLoss(16, 16, adapter="auto")  # identity adapter
    terms = same_width(teacher.clone(), teacher)
    assert terms["channel"] == 0 and terms["spatial"] == 0
    adapted = ACAMLoss(16, 16)  # 'always': a 1x1 conv, here set to the identity
    with torch.no_grad():
        adapted.adapter.weight.copy_(torch.eye(16).view(16, 16, 1, 1))
        adapted.adapter.bias.zero_()
    terms = adapted(teacher.clone(), teacher)
    assert terms["channel"] == 0 and terms["spatial"] == 0


def test_dice_diversity_hand_values_and_range() -> None:
    two = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # 2·1 / (1 + 2)
    torch.testing.assert_close(dice_diversity(two), torch.tensor(2 / 3))
    three = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # pairs 0, 2/3, 2/3
    torch.testing.assert_close(dice_diversity(three), torch.tensor(4 / 9))
    identical = torch.rand(2, 1, 5, 4).expand(2, 6, 5, 4)
    torch.testing.assert_close(dice_diversity(identical), torch.tensor(1.0))
    torch.manual_seed(6)
    for _ in range(20):
        value = dice_diversity(torch.rand(3, 6, 7))
        assert 0 <= value <= 1
    assert dice_diversity(torch.rand(2, 1, 4)) == 0  # one mask: no pair


# ------------------------------------------------------------------------------------------------ gradients
def _params(loss: ACAMLoss, part: str) -> list[torch.nn.Parameter]:
    return list(getattr(loss, part).parameters())


def _grads(value: Tensor, inputs: list[Tensor]) -> list[Tensor | None]:
    return list(torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True))


def test_gradients_reach_the_student_adapter_and_mask_modules_never_the_teacher() -> None:
    torch.manual_seed(7)
    loss = ACAMLoss(8, 64, num_masks=3)  # 64 channels: 4 hidden units per channel MLP (16 would give 1, often dead)
    student = torch.randn(2, 8, 6, 6, requires_grad=True)
    teacher = torch.randn(2, 64, 6, 6, requires_grad=True)
    terms = loss(student, teacher)
    (terms["channel"] + terms["spatial"] + terms["diversity"]).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    for part in ("adapter", "fusion", "units"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _params(loss, part)), part


def _three_objectives() -> dict[str, ACAMLoss]:
    torch.manual_seed(8)
    base = ACAMLoss(8, 16, num_masks=3).double()
    out = {}
    for objective in ("min", "adversarial", "detach"):
        loss = ACAMLoss(8, 16, num_masks=3, mask_objective=objective).double()
        loss.load_state_dict(base.state_dict())
        out[objective] = loss
    return out


def test_mask_objectives_route_the_gradients() -> None:
    losses = _three_objectives()
    g = torch.Generator().manual_seed(9)
    student = torch.randn(2, 8, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 16, 6, 6, generator=g, dtype=torch.float64)
    kd, div, student_side = {}, {}, {}
    for name, loss in losses.items():
        terms = loss(student, teacher)
        masks = _params(loss, "units") + _params(loss, "fusion")
        kd[name] = _grads(terms["channel"] + terms["spatial"], masks)
        div[name] = _grads(terms["diversity"], masks)
        student_side[name] = _grads(terms["channel"] + terms["spatial"], [student, *_params(loss, "adapter")])
    for a, b in zip(kd["adversarial"], kd["min"]):
        torch.testing.assert_close(a, -b)  # the mask units ascend L_ch + L_sp
    assert all(g is None for g in kd["detach"])  # no KD gradient at all
    for name in ("adversarial", "detach"):
        for a, b in zip(div[name], div["min"]):
            torch.testing.assert_close(a, b)  # the diversity loss is minimised in every mode
        for a, b in zip(student_side[name], student_side["min"]):
            torch.testing.assert_close(a, b)  # the student's gradient does not depend on the mode
    assert all(g is not None and g.abs().sum() > 0 for g in kd["min"] + div["min"])


def test_min_gradient_is_the_derivative_of_the_kd_loss_and_adversarial_its_negative() -> None:
    """Finite differences on one spatial-unit bias: 'min' gives +dL/dθ, 'adversarial' −dL/dθ, 'detach' 0."""
    losses = _three_objectives()
    g = torch.Generator().manual_seed(10)
    student = torch.randn(2, 8, 6, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 16, 6, 6, generator=g, dtype=torch.float64)

    def kd(loss: ACAMLoss) -> Tensor:
        terms = loss(student, teacher)
        return terms["channel"] + terms["spatial"]

    probe = copy.deepcopy(losses["min"])
    bias = probe.units.spatial_units.bias
    eps = 1e-6
    with torch.no_grad():
        bias[1] += eps
        up = kd(probe)
        bias[1] -= 2 * eps
        down = kd(probe)
    derivative = (up - down) / (2 * eps)
    assert derivative.abs() > 1e-6
    for name, sign in (("min", 1.0), ("adversarial", -1.0)):
        (grad,) = torch.autograd.grad(kd(losses[name]), [losses[name].units.spatial_units.bias])
        torch.testing.assert_close(grad[1], sign * derivative, rtol=1e-5, atol=1e-8)
    total = lambda loss: kd(loss) + 0.5 * loss(student, teacher)["diversity"]  # noqa: E731
    (min_total,) = torch.autograd.grad(total(losses["min"]), [losses["min"].units.spatial_units.bias])
    (div_only,) = torch.autograd.grad(
        losses["min"](student, teacher)["diversity"], [losses["min"].units.spatial_units.bias]
    )
    torch.testing.assert_close(min_total[1], derivative + 0.5 * div_only[1], rtol=1e-5, atol=1e-8)
    (detach_total,) = torch.autograd.grad(total(losses["detach"]), [losses["detach"].units.spatial_units.bias])
    torch.testing.assert_close(detach_total, 0.5 * div_only)  # only L_div trains the units


def test_adversarial_step_raises_the_kd_loss_for_the_masks_and_lowers_it_for_the_student() -> None:
    losses = _three_objectives()
    loss = losses["adversarial"]
    g = torch.Generator().manual_seed(11)
    student = torch.randn(2, 8, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 16, 6, 6, generator=g, dtype=torch.float64)

    def kd() -> Tensor:
        terms = loss(student, teacher)
        return terms["channel"] + terms["spatial"]

    before = kd()
    masks = _params(loss, "units") + _params(loss, "fusion")
    grads = torch.autograd.grad(before, [student, *masks])
    with torch.no_grad():
        for p, grad in zip(masks, grads[1:]):
            p -= 1e-3 * grad  # a descent step on the joint loss...
        after_masks = kd()
        student -= 1e-3 * grads[0]
        after_student = kd()
    assert after_masks > before  # ...raises the KD loss through the mask units
    assert after_student < after_masks  # and lowers it through the student


def test_reverse_gradient_is_identity_forward_negation_backward() -> None:
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = reverse_gradient(x)
    assert torch.equal(y, x)
    (3 * y).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-3.0, -3.0]))


def test_student_gradient_through_masks_is_off_by_default() -> None:
    torch.manual_seed(12)
    default = ACAMLoss(8, 16, num_masks=3).double()
    through = ACAMLoss(8, 16, num_masks=3, student_grad_through_masks=True).double()
    through.load_state_dict(default.state_dict())
    g = torch.Generator().manual_seed(12)
    student = torch.randn(2, 8, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 16, 6, 6, generator=g, dtype=torch.float64)
    (off,) = torch.autograd.grad(default(student, teacher)["diversity"], [student], allow_unused=True)
    (on,) = torch.autograd.grad(through(student, teacher)["diversity"], [student], allow_unused=True)
    assert off is None  # the student map enters STCA-FF detached
    assert on is not None and on.abs().sum() > 0
    with pytest.raises(KDConfigError, match=r"^student_grad_through_masks: cannot be true with mask_objective"):
        ACAMLoss(8, 16, mask_objective="adversarial", student_grad_through_masks=True)


def test_teacher_mask_source_ignores_the_student() -> None:
    torch.manual_seed(13)
    teacher_only = ACAMLoss(8, 16, mask_source="teacher")
    assert teacher_only.fusion is None  # no STCA-FF parameters
    cooperative = ACAMLoss(8, 16)
    teacher = torch.randn(2, 16, 6, 6)
    one, other = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    for a, b in zip(
        teacher_only.masks(teacher_only.adapt(one), teacher), teacher_only.masks(teacher_only.adapt(other), teacher)
    ):
        assert torch.equal(a, b)
    torch.testing.assert_close(teacher_only.masks(teacher_only.adapt(one), teacher), teacher_only.units(teacher))
    changed = (
        cooperative.masks(cooperative.adapt(one), teacher)[1] - cooperative.masks(cooperative.adapt(other), teacher)[1]
    )
    assert changed.abs().max() > 0  # cooperative masks follow the student
    with pytest.raises(KDConfigError, match=r"^student_grad_through_masks: has no effect with mask_source"):
        ACAMLoss(8, 16, mask_source="teacher", student_grad_through_masks=True)


def test_loss_runs_under_bf16_autocast_with_float32_terms() -> None:
    torch.manual_seed(14)
    loss = ACAMLoss(8, 16, max_tokens=8)
    student, teacher = torch.randn(2, 8, 6, 6), torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss(student.bfloat16(), teacher)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    reference = loss(student.bfloat16().float(), teacher)
    torch.testing.assert_close(terms["channel"], reference["channel"], rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ACAMLoss(8, 16, mask_objective="max"), r"^mask_objective: must be one of \['min', 'adversarial'"),
        (lambda: ACAMLoss(8, 16, mask_source="student"), r"^mask_source: must be one of"),
        (lambda: ACAMLoss(8, 16, num_masks=0), r"^num_masks: must be a positive integer, got 0"),
        (lambda: ACAMLoss(8, 16, spatial_kernel=4), r"^spatial_kernel: must be odd, got 4"),
        (lambda: ACAMLoss(8, 16, max_tokens=0), r"^max_tokens: must be a positive integer"),
        (lambda: ACAMLoss(8, 16)(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)), r"^ACAMLoss: the teacher map"),
        (lambda: ACAMLoss(8, 16)(torch.randn(1, 8, 4), torch.randn(1, 16, 4, 4)), r"^ACAMLoss: must be 4-D"),
        (
            lambda: acam_mask_losses(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 3), None),
            r"^channel_masks: must be \[N=1, M, C=2\]",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(make, match: str) -> None:
    with pytest.raises(KDConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)
