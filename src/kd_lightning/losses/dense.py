"""Dense-prediction distillation losses on feature maps ``[N, C, H, W]`` (pure torch).

Shared by the detection (FPN levels) and segmentation (logits, features) methods. Teacher maps are targets:
they are detached. Every term is computed in float32 (safe under bf16/fp16 autocast).

CWD (:func:`channel_wise_divergence`), PKD (:func:`pearson_feature_loss`), MGD (:class:`MGDLoss`), FGD
(:class:`FGDLoss`), segmentation pixel KD (:func:`pixel_kd`) and CIRKD (:func:`pairwise_affinity_kd`,
:class:`CIRKDMemoryLoss`); formulas and defaults follow the official code named in each docstring. FitNet-style
imitation of FPN levels is :func:`kd_lightning.losses.feature.hint_loss` (mean squared error).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = [
    "CIRKDMemoryLoss",
    "FGDLoss",
    "MGDLoss",
    "channel_wise_divergence",
    "check_maps",
    "fgd_attention",
    "fgd_focal_masks",
    "pairwise_affinity_kd",
    "pearson_feature_loss",
    "pearson_feature_loss_levels",
    "pixel_kd",
]


def check_maps(student: Tensor, teacher: Tensor, name: str = "feature maps", same_channels: bool = True) -> None:
    """Both maps are ``[N, C, H, W]`` with equal batch and spatial size (and channels unless ``same_channels``).

    Raises:
        KDConfigError: naming ``name``, both shapes and the usual fix (an adapter, or matching resolutions).
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise KDConfigError(
            name,
            f"must be 4-D [N, C, H, W], got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}",
            "tap convolutional maps (FPN levels, backbone stages or logits before upsampling)",
        )
    s_n, s_c, *s_hw = student.shape
    t_n, t_c, *t_hw = teacher.shape
    if s_n != t_n or s_hw != t_hw or (same_channels and s_c != t_c):
        raise KDConfigError(
            name,
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} do not match",
            "use an adapter for differing channels and give both networks the same input and output stride",
        )


def channel_wise_divergence(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """CWD (Shu et al., ICCV 2021; arXiv 2011.13256): each channel's map as a distribution over positions.

    ``p_T[n,c,:] = softmax(T[n,c,:]/τ)`` over the ``H·W`` positions (not over channels),
    ``L = τ² / (N·C) · Σ_{n,c,hw} p_T (log p_T − log_softmax(S[n,c,:]/τ))``: the exact KL of mmrazor's
    ``ChannelWiseDivergence`` and the official code's ``'channel'`` normalisation (summed over positions,
    averaged over ``N·C``; the scale grows with the map's resolution). Zero iff ``S = T + const`` per channel.

    Args:
        student: ``[N, C, H, W]`` (after any adapter to the teacher's channels).
        teacher: ``[N, C, H, W]``; detached.
        tau: temperature ``τ > 0``.

    Raises:
        KDConfigError: shapes differ or ``tau <= 0``.
    """
    check_temperature(tau, "tau")
    check_maps(student, teacher, "channel_wise_divergence")
    n, c = student.shape[:2]
    s = upcast(student).flatten(2) / tau
    t = upcast(teacher).detach().flatten(2) / tau
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=-1))).sum()
    return kl * tau**2 / (n * c)


# ------------------------------------------------------------------------------------------------ helpers
def _param_dtype(x: Tensor, module: nn.Module) -> Tensor:
    """``x`` in the dtype of ``module``'s parameters (fp32 weights under autocast, bf16 weights in bf16-true)."""
    param = next(module.parameters(), None)
    return x if param is None or not x.is_floating_point() else x.to(param.dtype)


def _check_channels(tensor: Tensor, expected: int, who: str, name: str) -> None:
    if tensor.shape[1] != expected:
        raise KDConfigError(
            name,
            f"the {who} map has {tensor.shape[1]} channels, the loss was built for {expected}",
            f"build it with {who}_channels={tensor.shape[1]} (one loss module per tapped level)",
        )


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KDConfigError(name, f"must be a positive integer, got {value!r}", "give the channel count of the map")


def _check_fraction(value: float, name: str, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise KDConfigError(name, f"must be a number in [0, 1], got {value!r}", fix)


# ---------------------------------------------------------------------------------------------------- PKD
def _standardise_channels(x: Tensor) -> Tensor:
    """Per channel over ``(N, H, W)`` jointly: ``(x − mean_c) / (std_c + 1e-6)``, unbiased std (mmrazor's ``norm``)."""
    flat = x.transpose(0, 1).flatten(1)  # [C, N·H·W]
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True)
    return ((flat - mean) / (std + 1e-6)).reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)


def pearson_feature_loss(student: Tensor, teacher: Tensor, resize_student: bool = True) -> Tensor:
    """PKD term of one level (Cao et al., NeurIPS 2022; arXiv 2207.02039), as mmrazor's ``PKDLoss`` (official code).

    Each map is standardised per channel over the batch and all positions jointly,
    ``norm(X)_c = (X_c − mean_c) / (std_c + 1e-6)`` with the unbiased std (``torch.std``), then
    ``L = 0.5 · mean_{n,c,h,w} (norm(S) − norm(T))²`` ``= mean_c (1 − r_c)·(M−1)/M`` (up to the ``1e-6``),
    ``r_c`` the Pearson correlation of channel ``c`` over the ``M = N·H·W`` values. Statistics are those of the
    given (per-device) batch. No adapter, temperature or mask; the loss weight (mmrazor configs: 6 for Faster
    R-CNN, 10 for RetinaNet/FCOS teachers) and the sum over FPN levels (neck outputs 0..3) are the caller's, see
    :func:`pearson_feature_loss_levels`.

    Spatial sizes: when they differ the student is resized bilinearly (``align_corners=False``) to the teacher's
    ``(H, W)`` (``resize_student=False``: the teacher to the student's). mmrazor compares only dim 2 (``H``) and
    asserts otherwise; resizing on any difference gives the same result wherever mmrazor runs.

    Args:
        student: ``[N, C, H, W]``.
        teacher: ``[N, C, H', W']``, same ``N`` and ``C``; detached.
        resize_student: resize the student (default, mmrazor's ``resize_stu=True``) or the teacher.

    Raises:
        KDConfigError: not 4-D maps, different batch or channel counts, or fewer than 2 values per channel.
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[:2] != teacher.shape[:2]:
        raise KDConfigError(
            "pearson_feature_loss",
            f"needs [N, C, H, W] maps with equal N and C, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}",
            "PKD has no adapter: tap FPN levels of the same width (256 channels)",
        )
    s = upcast(student)
    t = upcast(teacher).detach()
    if s.shape[2:] != t.shape[2:]:
        if resize_student:
            s = F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=False)
        else:
            t = F.interpolate(t, size=s.shape[2:], mode="bilinear", align_corners=False)
    if s.shape[0] * s.shape[2] * s.shape[3] < 2:
        raise KDConfigError(
            "pearson_feature_loss",
            f"needs at least 2 values per channel (batch x positions), got map {tuple(s.shape)}",
            "the unbiased std of one value is undefined: use a larger batch or map",
        )
    return 0.5 * (_standardise_channels(s) - _standardise_channels(t)).pow(2).mean()


def pearson_feature_loss_levels(
    students: Sequence[Tensor], teachers: Sequence[Tensor], resize_student: bool = True
) -> Tensor:
    """PKD over FPN levels: ``Σ_l`` :func:`pearson_feature_loss` ``(S_l, T_l)`` (mmrazor sums the levels it gets).

    The official configs pass neck outputs 0..3 (RetinaNet P3..P6, Faster R-CNN P2..P5), not P7/P6.

    Raises:
        KDConfigError: the level lists are empty or of different lengths, or a level fails the per-level checks.
    """
    students, teachers = list(students), list(teachers)
    if not students or len(students) != len(teachers):
        raise KDConfigError(
            "pearson_feature_loss_levels",
            f"needs as many student as teacher levels (at least one), got {len(students)} and {len(teachers)}",
            "tap the same FPN levels of both networks",
        )
    total = pearson_feature_loss(students[0], teachers[0], resize_student)
    for s, t in zip(students[1:], teachers[1:]):
        total = total + pearson_feature_loss(s, t, resize_student)
    return total


# ---------------------------------------------------------------------------------------------------- MGD
class MGDLoss(nn.Module):
    """MGD of one level (Yang et al., ECCV 2022; arXiv 2205.01529): the official ``FeatureLoss`` (yzd-v/MGD).

    ``A = align(S)`` (a 1x1 conv with bias, only when ``C_S ≠ C_T``), a random mask ``M`` dropping each
    position with probability ``λ`` (``M = 0 if u > 1 − λ else 1``, ``u ~ U(0, 1)`` drawn every forward, one value
    per ``(n, h, w)`` shared by all channels; ``mask_on_channel``: one per ``(n, c)``, mmrazor's option), a
    generator ``G = Conv3x3(C_T→C_T) → ReLU → Conv3x3(C_T→C_T)`` (padding 1, bias) and
    ``L = α · Σ_{n,c,h,w} (G(A ⊙ M) − T)² / N``: a sum over ``C·H·W`` divided by the batch size only, hence the
    tiny ``α``. Align and generator are trained with the student and dropped after training.

    Defaults (official configs): ``α = 2e-5, λ = 0.65`` for RetinaNet/RepPoints/SOLO (all five FPN levels);
    Faster/Mask R-CNN ``α = 5e-7, λ = 0.45`` (P2..P5); segmentation ``α = 2e-5, λ = 0.75`` on the last backbone
    stage (the seg numbers also include a CWD logits term). The convolutions run in the dtype of their weights (or
    autocast's); the squared error is summed in float32.

    Args:
        student_channels: ``C_S``.
        teacher_channels: ``C_T``.
        alpha: loss weight ``α`` (``alpha_mgd``).
        lambda_mask: drop probability ``λ`` in ``[0, 1]`` (``lambda_mgd``).
        mask_on_channel: mask whole channels (``[N, C, 1, 1]``) instead of positions (``[N, 1, H, W]``).

    Raises:
        KDConfigError: non-positive channel counts, ``alpha < 0`` or ``lambda_mask`` outside ``[0, 1]``.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        alpha: float = 2e-5,
        lambda_mask: float = 0.65,
        mask_on_channel: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int(student_channels, "student_channels")
        _check_positive_int(teacher_channels, "teacher_channels")
        check_weights(alpha=alpha)
        _check_fraction(lambda_mask, "lambda_mask", "it is the probability of masking a position")
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.alpha, self.lambda_mask, self.mask_on_channel = alpha, lambda_mask, mask_on_channel
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else None
        self.generator = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
        )

    def sample_mask(
        self, n: int, c: int, h: int, w: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Tensor:
        """A float 0/1 mask, ``[n, 1, h, w]`` (or ``[n, c, 1, 1]``), each entry 0 with probability ``lambda_mask``."""
        shape = (n, c, 1, 1) if self.mask_on_channel else (n, 1, h, w)
        if generator is None:
            u = torch.rand(shape, device=device)
        else:
            u = torch.rand(shape, generator=generator, device=generator.device).to(device)
        return (u <= 1 - self.lambda_mask).float()

    def forward(
        self, student: Tensor, teacher: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``α · Σ (G(align(S) ⊙ M) − T)² / N`` (already weighted by ``alpha``).

        Args:
            student: ``[N, C_S, H, W]``.
            teacher: ``[N, C_T, H, W]``; detached.
            mask: a fixed 0/1 mask broadcastable to ``[N, C_T, H, W]`` (1 = keep) instead of a random one.
            generator: random generator for the mask (default: the global RNG).
        """
        check_maps(student, teacher, "MGDLoss", same_channels=False)
        _check_channels(student, self.student_channels, "student", "MGDLoss")
        _check_channels(teacher, self.teacher_channels, "teacher", "MGDLoss")
        n, c, h, w = teacher.shape
        feat = student if self.align is None else self.align(_param_dtype(student, self.align))
        if mask is None:
            mask = self.sample_mask(n, c, h, w, feat.device, generator)
        elif mask.dim() != 4 or any(m not in (1, full) for m, full in zip(mask.shape, (n, c, h, w))):
            raise KDConfigError(
                "mask", f"must broadcast to {(n, c, h, w)}, got {tuple(mask.shape)}", "e.g. [N, 1, H, W]"
            )
        masked = feat * mask.to(device=feat.device, dtype=feat.dtype)
        generated = upcast(self.generator(_param_dtype(masked, self.generator)))
        return self.alpha * (generated - upcast(teacher).detach()).pow(2).sum() / n


# ---------------------------------------------------------------------------------------------------- FGD
def fgd_attention(x: Tensor, temperature: float = 0.5) -> tuple[Tensor, Tensor]:
    """FGD's spatial and channel attention of ``x`` ``[N, C, H, W]`` (official ``get_attention``), in float32.

    ``a = |x|``; spatial ``A_S[n,h,w] = H·W · softmax_{hw}(mean_c a / t)`` (sums to ``H·W`` per image); channel
    ``A_C[n,c] = C · softmax_c(mean_{hw} a / t)`` (sums to ``C``). Returns ``(A_S [N, H, W], A_C [N, C])``.
    """
    check_temperature(temperature, "temperature")
    n, c, h, w = x.shape
    a = upcast(x).abs()
    spatial = h * w * F.softmax(a.mean(dim=1).flatten(1) / temperature, dim=1)
    channel = c * F.softmax(a.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.view(n, h, w), channel


BoxScaling = Literal["img_shape", "stride"]


def fgd_focal_masks(
    boxes: Sequence[Tensor],
    feature_size: tuple[int, int],
    image_sizes: Sequence[tuple[int, int]] | None = None,
    box_scaling: BoxScaling = "img_shape",
    stride: float | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background masks ``[N, H, W]`` from GT boxes (official ``FeatureLoss.forward``).

    Each box ``(x1, y1, x2, y2)`` (pixels of the resized input) is mapped to feature cells, then
    ``x1' = floor, x2' = ceil, y1' = floor, y2' = ceil`` and the cells of rows ``y1'..y2'`` and columns
    ``x1'..x2'`` *inclusive* get ``1 / area``, ``area = (y2'−y1'+1)(x2'−x1'+1)``; a cell covered by several boxes
    keeps the largest value (the smallest box). ``bg = 1[fg == 0] / count(fg == 0)`` (all zero when every cell is
    foreground). An image without boxes is all background.

    Box scaling: ``"img_shape"`` (faithful): ``x · W / img_w`` and ``y · H / img_h`` with ``(img_h, img_w)`` the
    un-padded resized image (torchvision: ``images.image_sizes``) while ``H, W`` belong to the padded batch, so
    boxes are stretched whenever there is padding; ``"stride"`` (geometric alternative): ``x / stride``,
    ``y / stride``. Cells outside the map are dropped but still count in ``area`` (as the official slicing does,
    e.g. for a box touching the right border); negative cell indices are clipped at 0 (the official slicing would
    paint nothing for them; boxes are normally inside the image).

    Args:
        boxes: per image a ``[k, 4]`` tensor, ``k`` may be 0.
        feature_size: ``(H, W)`` of the level.
        image_sizes: per image ``(h, w)``; required for ``"img_shape"``.
        box_scaling: ``"img_shape"`` or ``"stride"``.
        stride: the level's stride; required for ``"stride"``.
        device: where to build the masks (default: that of the first box tensor).

    Raises:
        KDConfigError: a box tensor is not ``[k, 4]`` or has ``x2 < x1`` / ``y2 < y1``, ``image_sizes`` or
            ``stride`` is missing or invalid, or ``box_scaling`` is unknown.
    """
    _check_box_scaling(box_scaling, image_sizes, stride, len(boxes))
    h, w = int(feature_size[0]), int(feature_size[1])
    if device is None:
        device = boxes[0].device if len(boxes) else "cpu"
    fg = torch.zeros(len(boxes), h, w, device=device)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[-1] != 4:
            raise KDConfigError("boxes", f"image {i}: must be [k, 4] xyxy, got {tuple(b.shape)}", "pass targets' boxes")
        if b.shape[0] == 0:
            continue
        b = b.detach().to(device=device, dtype=torch.float32)
        if bool((b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any()):
            raise KDConfigError("boxes", f"image {i}: has boxes with x2 < x1 or y2 < y1", "give xyxy boxes")
        if box_scaling == "img_shape":
            img_h, img_w = image_sizes[i]  # type: ignore[index]
            x1, x2 = b[:, 0] / float(img_w) * w, b[:, 2] / float(img_w) * w
            y1, y2 = b[:, 1] / float(img_h) * h, b[:, 3] / float(img_h) * h
        else:
            x1, y1, x2, y2 = (b / float(stride)).unbind(1)  # type: ignore[arg-type]
        wmin, wmax = torch.floor(x1).long(), torch.ceil(x2).long()
        hmin, hmax = torch.floor(y1).long(), torch.ceil(y2).long()
        value = 1.0 / (hmax + 1 - hmin).float() / (wmax + 1 - wmin).float()  # [k], from the unclipped ranges
        in_rows = (rows[None] >= hmin[:, None]) & (rows[None] <= hmax[:, None])  # [k, H]
        in_cols = (cols[None] >= wmin[:, None]) & (cols[None] <= wmax[:, None])  # [k, W]
        covered = in_rows[:, :, None] & in_cols[:, None, :]  # [k, H, W]
        fg[i] = torch.where(covered, value[:, None, None], torch.zeros((), device=device)).amax(dim=0)
    bg = (fg == 0).float()
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
    return fg, bg


def _check_box_scaling(
    box_scaling: str, image_sizes: Sequence[tuple[int, int]] | None, stride: float | None, n: int
) -> None:
    if box_scaling not in ("img_shape", "stride"):
        raise KDConfigError(
            "box_scaling", f"must be 'img_shape' or 'stride', got {box_scaling!r}", "'img_shape' is the official rule"
        )
    if box_scaling == "img_shape":
        if image_sizes is None or len(image_sizes) != n:
            got = "none" if image_sizes is None else len(image_sizes)
            raise KDConfigError(
                "image_sizes",
                f"box_scaling='img_shape' needs one (h, w) per image ({n}), got {got}",
                "pass the un-padded resized image sizes (torchvision: images.image_sizes)",
            )
        for size in image_sizes:
            if len(size) != 2 or not all(float(v) > 0 for v in size):
                raise KDConfigError("image_sizes", f"each must be a positive (h, w), got {size!r}", "give (h, w)")
    elif stride is None or isinstance(stride, bool) or not float(stride) > 0:
        raise KDConfigError(
            "stride", f"box_scaling='stride' needs the level's stride > 0, got {stride!r}", "e.g. 8 for P3"
        )


class _ContextBlock(nn.Module):
    """FGD's GcBlock half: attention pooling ``conv_mask`` and the transform ``channel_add_conv`` (last conv zero)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, a=0, mode="fan_in", nonlinearity="relu")  # mmcv kaiming_init
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add_conv[-1].weight)  # mmcv constant_init(m[-1], 0)
        nn.init.zeros_(self.channel_add_conv[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x + channel_add_conv(Σ_hw softmax_hw(conv_mask(x)) · x)`` in float32 (``x`` float32 ``[N, C, H, W]``)."""
        n, c = x.shape[:2]
        weights = F.softmax(upcast(self.conv_mask(_param_dtype(x, self.conv_mask))).flatten(1), dim=1)  # [N, HW]
        context = (x.flatten(2) * weights[:, None, :]).sum(dim=2).view(n, c, 1, 1)
        return x + upcast(self.channel_add_conv(_param_dtype(context, self.channel_add_conv)))


class FGDLoss(nn.Module):
    """FGD of one level (Yang et al., CVPR 2022; arXiv 2111.11837): the official ``FeatureLoss`` (yzd-v/FGD).

    With ``S`` after ``align`` (1x1 conv with bias, only when ``C_S ≠ C_T``), attention from
    :func:`fgd_attention` at temperature ``t``, focal masks from :func:`fgd_focal_masks` and the *teacher's*
    attention weighting both maps, ``W_t[n,c,h,w] = A_S^T[n,h,w] · A_C^T[n,c]``:

    - ``fg = Σ M_fg · W_t · (S − T)² / N``, ``bg = Σ M_bg · W_t · (S − T)² / N``;
    - ``attention = Σ |A_C^S − A_C^T| / N + Σ |A_S^S − A_S^T| / N`` (the only place the student's attention enters);
    - ``relation = Σ (R_s(S) − R_t(T))² / N`` with separate GcBlocks ``R_x(X) = X + channel_add_conv_x(ctx_x)``,
      ``ctx_x = Σ_hw softmax_hw(conv_mask_x(X)) · X``; the teacher-side block is trained by this loss, the
      teacher map itself is detached. Last convs are zero-initialised, so ``relation`` starts as ``Σ (S − T)² / N``.

    Sums run over ``C·H·W`` and are divided by the batch size only. Returned terms are already weighted:
    ``{"loss", "fg": α·fg, "bg": β·bg, "attention": γ·attention, "relation": λ·relation}`` (a term of weight 0
    is neither computed nor returned). Defaults ``t, α, β, γ, λ = 0.5, 1e-3, 5e-4, 5e-4, 5e-6`` are the official
    RetinaNet / GFL / SOLO configs (the class itself defaults to ``γ = 1e-3``); Faster/Mask R-CNN:
    ``0.5, 5e-5, 2.5e-5, 5e-5, 5e-7``; RepPoints ``0.5, 1.6e-3, 8e-4, 8e-4, 8e-6``; FCOS ``0.8`` and the RepPoints
    weights. Attention, masks and all reductions are float32; the convs run in their weights' (or autocast's) dtype.

    Args:
        student_channels: ``C_S``.
        teacher_channels: ``C_T``.
        temperature: ``t`` of the attention softmaxes.
        alpha_fg, beta_bg, gamma_attention, lambda_relation: the weights ``α, β, γ, λ``.
        box_scaling: ``"img_shape"`` (faithful, needs ``image_sizes``) or ``"stride"`` (needs ``stride``); see
            :func:`fgd_focal_masks`.
        stride: the level's stride (for ``box_scaling="stride"``).

    Raises:
        KDConfigError: bad channel counts, temperature, weights, ``box_scaling`` or ``stride``.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temperature: float = 0.5,
        alpha_fg: float = 1e-3,
        beta_bg: float = 5e-4,
        gamma_attention: float = 5e-4,
        lambda_relation: float = 5e-6,
        box_scaling: BoxScaling = "img_shape",
        stride: float | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int(student_channels, "student_channels")
        _check_positive_int(teacher_channels, "teacher_channels")
        check_temperature(temperature, "temperature")
        check_weights(
            alpha_fg=alpha_fg, beta_bg=beta_bg, gamma_attention=gamma_attention, lambda_relation=lambda_relation
        )
        _check_box_scaling(box_scaling, [], stride, 0)
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.temperature, self.box_scaling, self.stride = temperature, box_scaling, stride
        self.weights = {"fg": alpha_fg, "bg": beta_bg, "attention": gamma_attention, "relation": lambda_relation}
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else None
        self.context_s = _ContextBlock(teacher_channels)
        self.context_t = _ContextBlock(teacher_channels)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        boxes: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor]:
        """Weighted FGD terms of this level.

        Args:
            student: ``[N, C_S, H, W]``.
            teacher: ``[N, C_T, H, W]``; detached.
            boxes: per image ``[k, 4]`` xyxy GT boxes in the resized-input pixel frame.
            image_sizes: per image the un-padded resized ``(h, w)`` (needed for ``box_scaling="img_shape"``).

        Returns:
            ``{"loss", "fg", "bg", "attention", "relation"}`` (weighted; zero-weight terms left out).
        """
        check_maps(student, teacher, "FGDLoss", same_channels=False)
        _check_channels(student, self.student_channels, "student", "FGDLoss")
        _check_channels(teacher, self.teacher_channels, "teacher", "FGDLoss")
        if len(boxes) != student.shape[0]:
            raise KDConfigError(
                "boxes", f"needs one box tensor per image ({student.shape[0]}), got {len(boxes)}", "pass every target"
            )
        n, _, h, w = teacher.shape
        s = upcast(student if self.align is None else self.align(_param_dtype(student, self.align)))
        t = upcast(teacher).detach()
        spatial_t, channel_t = fgd_attention(t, self.temperature)
        terms: dict[str, Tensor] = {}
        if active(self.weights["fg"]) or active(self.weights["bg"]):
            fg, bg = fgd_focal_masks(boxes, (h, w), image_sizes, self.box_scaling, self.stride, device=s.device)
            weighted_sq = spatial_t[:, None] * channel_t[:, :, None, None] * (s - t).pow(2)
            terms["fg"] = (fg[:, None] * weighted_sq).sum() / n
            terms["bg"] = (bg[:, None] * weighted_sq).sum() / n
        if active(self.weights["attention"]):
            spatial_s, channel_s = fgd_attention(s, self.temperature)
            terms["attention"] = (channel_s - channel_t).abs().sum() / n + (spatial_s - spatial_t).abs().sum() / n
        if active(self.weights["relation"]):
            terms["relation"] = (self.context_s(s) - self.context_t(t)).pow(2).sum() / n
        return weighted_terms(terms, self.weights)


# ---------------------------------------------------------------------------------------------- CIRKD
def pixel_kd(student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0) -> Tensor:
    """Pixel-wise KD of segmentation logits, as CIRKD's ``CriterionKD`` (official code, winycg/CIRKD).

    Every pixel of ``[N, K, h, w]`` logits (native output stride, before upsampling) is a distribution over the
    ``K`` classes: ``L = τ² · 1/(N·h·w) · Σ_pixels KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``. Ignore-label pixels are
    *not* masked (as in the official code). CIRKD default ``τ = 1`` (weight 1.0). Not the older TorchDistiller
    ``CriterionKD`` (mean over ``N·K·h·w``, no ``τ²``).

    Raises:
        KDConfigError: the logits are not equal-shaped ``[N, K, h, w]``, or ``tau`` is not > 0.
    """
    check_temperature(tau, "tau")
    check_maps(student_logits, teacher_logits, "pixel_kd")
    n, _, h, w = student_logits.shape
    log_p_t = F.log_softmax(upcast(teacher_logits).detach() / tau, dim=1)
    log_p_s = F.log_softmax(upcast(student_logits) / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() * tau**2 / (n * h * w)


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def pairwise_affinity_kd(
    student_feat: Tensor, teacher_feat: Tensor, tau: float = 0.1, pool_size: int | None = None
) -> Tensor:
    """CIRKD's mini-batch pixel-to-pixel affinity loss (Yang et al., CVPR 2022; arXiv 2204.06986).

    As ``CriterionMiniBatchCrossImagePair`` of the official code (winycg/CIRKD @ 2d8ad0f): both maps are
    L2-normalised over channels separately (no projection, so ``C_S`` may differ from ``C_T``); for every ordered
    pair ``(i, j)`` of the batch, ``i = j`` included, ``A_ij = f_iᵀ f_j ∈ R^{HW×HW}`` and
    ``L = 1/B² · Σ_{i,j} 1/HW · Σ_u KL(softmax_v(A^T_ij[u,:]/τ) ‖ softmax_v(A^S_ij[u,:]/τ))``, no ``τ²`` factor.
    Default ``τ = 0.1`` (weight 1.0). ``B`` is the per-device batch (the official cross-GPU gather is commented out).

    Memory: all pairs at once, ``B²·(HW)²`` floats per affinity tensor (B = 2 at 64x128: about 1 GB each, and a
    few are alive for the backward). ``pool_size`` (default None = faithful) average-pools both maps with a
    ``pool_size`` kernel and stride (``ceil_mode=True``) before normalising, dividing ``HW`` by ``pool_size²``;
    CIRKD v2 (the repository's later HEAD) does this with 4. Computed in float32 with autocast off.

    Raises:
        KDConfigError: not ``[B, C, H, W]`` maps with equal ``B, H, W``, ``tau`` not > 0 or a bad ``pool_size``.
    """
    check_temperature(tau, "tau")
    check_maps(student_feat, teacher_feat, "pairwise_affinity_kd", same_channels=False)
    if pool_size is not None and (isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1):
        raise KDConfigError("pool_size", f"must be None or a positive integer, got {pool_size!r}", "e.g. 4")
    with _no_autocast(student_feat.device):
        s, t = upcast(student_feat), upcast(teacher_feat).detach()
        if pool_size is not None and pool_size > 1:
            s = F.avg_pool2d(s, pool_size, pool_size, ceil_mode=True)
            t = F.avg_pool2d(t, pool_size, pool_size, ceil_mode=True)
        b = s.shape[0]
        hw = s.shape[2] * s.shape[3]
        fs = F.normalize(s.flatten(2), p=2, dim=1)  # [B, C_S, HW]
        ft = F.normalize(t.flatten(2), p=2, dim=1)
        a_s = torch.einsum("icu,jcv->ijuv", fs, fs) / tau  # [B, B, HW, HW]
        a_t = torch.einsum("icu,jcv->ijuv", ft, ft) / tau
        log_p_t = F.log_softmax(a_t, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - F.log_softmax(a_s, dim=-1))).sum()
        return kl / (b * b * hw)


def _kl_rows(teacher_logits: Tensor, student_logits: Tensor, tau: float) -> Tensor:
    """``τ² · Σ_rows KL(softmax(t/τ) ‖ softmax(s/τ))`` (summed over rows; the caller divides)."""
    log_p_t = F.log_softmax(teacher_logits / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - F.log_softmax(student_logits / tau, dim=1))).sum() * tau**2


class CIRKDMemoryLoss(nn.Module):
    """CIRKD's memory-based pixel-to-pixel and pixel-to-region distillation (Yang et al., CVPR 2022).

    As ``StudentSegContrast`` of the official code (winycg/CIRKD @ 2d8ad0f, ``losses/cirkd_memory.py``):

    - student ``f_S = L2norm(proj(S))``, ``proj = Conv1x1(C_S→C_T, no bias) → BN → ReLU → Conv1x1(C_T→C_T, no
      bias)`` (trained with the student, dropped at test; the official BN is SyncBN: convert it with
      ``nn.SyncBatchNorm.convert_sync_batchnorm`` or the trainer's ``sync_batchnorm``); teacher ``f_T = L2norm(T)``;
    - labels nearest-resized to the feature size; pixels with ``ignore_index`` are not anchors;
    - class-wise teacher queues (buffers, saved with the module): pixels ``[K, pixel_memory_size, C_T]`` and
      regions ``[K, region_memory_size, C_T]``, initialised as L2-normalised Gaussian noise (so early targets are
      noise). In training mode every forward first enqueues (keys gathered over DDP ranks): per image and present
      class ``c`` one region slot ``L2norm(mean of f_T over c)`` (ring pointer) and up to ``pixel_update_freq``
      pixel slots (if ``ptr + k >= size`` the last ``k`` slots are written and the pointer reset to 0);
    - then ``pixel_contrast_size // K + 1`` pixel and ``region_contrast_size // K + 1`` region slots are sampled,
      the same random indices for every class, giving ``Q``; ``t_u = f_T,u·Q/τ``, ``s_u = f_S,u·Q/τ`` and
      ``L = T_c² / #anchors · Σ_u KL(softmax(t_u/T_c) ‖ softmax(s_u/T_c))``, once for pixels, once for regions.

    Official pixel enqueue (``pixel_enqueue="official"``, default, faithful): it draws ``k`` random *positions
    among the first n_c flattened positions of the image* (``this_feat[:, randperm(n_c)[:k]]``, n_c = the number
    of class-``c`` pixels), i.e. pixels of any class; ``"class"`` draws ``k`` random pixels of class ``c`` (what
    the paper describes). Defaults are the Cityscapes ones (``train_cirkd.py``): memory 20000 / 2000, contrast
    4096 / 1024, ``τ = 0.1``, ``T_c = 1``, weights 0.1 / 0.1 (VOC: 0.01). Queues take ~``K·20000·C_T`` floats
    (19 x 20000 x 256: ~390 MB). Logits are computed in float32 with autocast off.

    Args:
        student_channels, teacher_channels: ``C_S``, ``C_T``.
        num_classes: ``K``.
        ignore_index: label of ignored pixels (the project's 255; CIRKD uses -1).
        pixel_memory_size, region_memory_size: queue lengths per class.
        pixel_contrast_size, region_contrast_size: total samples; ``// K + 1`` are taken per class.
        pixel_update_freq: pixels enqueued per image and class.
        tau: similarity temperature ``τ`` (``contrast_temperature``).
        kd_tau: distillation temperature ``T_c`` (``contrast_kd_temperature``).
        pixel_weight, region_weight: weights of the two terms.
        pixel_enqueue: ``"official"`` or ``"class"`` (see above).

    Raises:
        KDConfigError: invalid sizes, temperatures, weights or ``pixel_enqueue``.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        ignore_index: int = 255,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int = 4096,
        region_contrast_size: int = 1024,
        pixel_update_freq: int = 16,
        tau: float = 0.1,
        kd_tau: float = 1.0,
        pixel_weight: float = 0.1,
        region_weight: float = 0.1,
        pixel_enqueue: Literal["official", "class"] = "official",
    ) -> None:
        super().__init__()
        for name, value in {
            "student_channels": student_channels,
            "teacher_channels": teacher_channels,
            "num_classes": num_classes,
            "pixel_memory_size": pixel_memory_size,
            "region_memory_size": region_memory_size,
            "pixel_contrast_size": pixel_contrast_size,
            "region_contrast_size": region_contrast_size,
            "pixel_update_freq": pixel_update_freq,
        }.items():
            _check_positive_int(value, name)
        check_temperature(tau, "tau")
        check_temperature(kd_tau, "kd_tau")
        check_weights(pixel_weight=pixel_weight, region_weight=region_weight)
        if pixel_enqueue not in ("official", "class"):
            raise KDConfigError(
                "pixel_enqueue", f"must be 'official' or 'class', got {pixel_enqueue!r}", "'official' is faithful"
            )
        self.student_channels, self.teacher_channels, self.num_classes = student_channels, teacher_channels, num_classes
        self.ignore_index, self.pixel_update_freq, self.pixel_enqueue = ignore_index, pixel_update_freq, pixel_enqueue
        self.tau, self.kd_tau = tau, kd_tau
        self.weights = {"pixel": pixel_weight, "region": region_weight}
        self.pixels_per_class = pixel_contrast_size // num_classes + 1
        self.regions_per_class = region_contrast_size // num_classes + 1
        self.project_head = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
        )
        c = teacher_channels
        self.register_buffer("pixel_queue", F.normalize(torch.randn(num_classes, pixel_memory_size, c), dim=2))
        self.register_buffer("pixel_queue_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("region_queue", F.normalize(torch.randn(num_classes, region_memory_size, c), dim=2))
        self.register_buffer("region_queue_ptr", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> None:
        """Write normalised teacher ``keys`` ``[B, C_T, h, w]`` with ``labels`` ``[B, h, w]`` into the queues.

        Under DDP both are first gathered from every rank (:func:`~kd_lightning.losses.contrastive.all_gather_cat`).
        """
        from kd_lightning.losses.contrastive import all_gather_cat

        keys, labels = all_gather_cat(keys.detach(), labels)
        pixel_size, region_size = self.pixel_queue.shape[1], self.region_queue.shape[1]
        for feat, label in zip(keys.flatten(2), labels.flatten(1)):  # [C, hw], [hw]
            for cls in torch.unique(label).tolist():
                if cls == self.ignore_index:
                    continue
                idx = (label == cls).nonzero().squeeze(1)
                ptr = int(self.region_queue_ptr[cls])
                region = F.normalize(feat[:, idx].mean(dim=1), p=2, dim=0)
                self.region_queue[cls, ptr] = region.to(self.region_queue.dtype)
                self.region_queue_ptr[cls] = (ptr + 1) % region_size
                perm = torch.randperm(idx.numel(), generator=generator).to(idx.device)
                k = min(idx.numel(), self.pixel_update_freq)
                chosen = perm[:k] if self.pixel_enqueue == "official" else idx[perm[:k]]
                pixels = F.normalize(feat[:, chosen].T, p=2, dim=1).to(self.pixel_queue.dtype)
                ptr = int(self.pixel_queue_ptr[cls])
                if ptr + k >= pixel_size:
                    self.pixel_queue[cls, pixel_size - k :] = pixels
                    self.pixel_queue_ptr[cls] = 0
                else:
                    self.pixel_queue[cls, ptr : ptr + k] = pixels
                    self.pixel_queue_ptr[cls] = ptr + k

    def _sample(self, queue: Tensor, per_class: int, generator: torch.Generator | None) -> Tensor:
        index = torch.randperm(queue.shape[1], generator=generator)[:per_class].to(queue.device)
        return queue[:, index].reshape(-1, queue.shape[2]).float()  # class-major, as the official _sample_negative

    def forward(
        self, student_feat: Tensor, teacher_feat: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Weighted memory terms ``{"loss", "pixel", "region"}`` (zero-weight terms left out).

        Args:
            student_feat: ``[B, C_S, h, w]`` penultimate student map.
            teacher_feat: ``[B, C_T, h, w]``; detached.
            labels: ``[B, H, W]`` integer labels (any resolution; nearest-resized to ``h x w``).
            generator: CPU random generator for the enqueue and sampling permutations (default: global RNG).
        """
        check_maps(student_feat, teacher_feat, "CIRKDMemoryLoss", same_channels=False)
        _check_channels(student_feat, self.student_channels, "student", "CIRKDMemoryLoss")
        _check_channels(teacher_feat, self.teacher_channels, "teacher", "CIRKDMemoryLoss")
        b, _, h, w = teacher_feat.shape
        if labels.dim() != 3 or labels.shape[0] != b or labels.is_floating_point():
            raise KDConfigError(
                "labels", f"must be integer [B={b}, H, W], got {labels.dtype} {tuple(labels.shape)}", "pass the masks"
            )
        labels = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        valid = labels != self.ignore_index
        if bool(((labels[valid] < 0) | (labels[valid] >= self.num_classes)).any()):
            raise KDConfigError(
                "labels",
                f"must lie in [0, {self.num_classes}) or be ignore_index={self.ignore_index}",
                "check num_classes and ignore_index",
            )
        with _no_autocast(student_feat.device):
            t = F.normalize(upcast(teacher_feat).detach().float(), p=2, dim=1)
            s = F.normalize(upcast(self.project_head(_param_dtype(student_feat, self.project_head))).float(), dim=1)
            if self.training:
                self.enqueue(t, labels, generator)
            valid = valid.flatten()
            s_anchor = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])[valid]
            t_anchor = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])[valid]
            terms: dict[str, Tensor] = {}
            sources = {
                "pixel": (self.pixel_queue, self.pixels_per_class),
                "region": (self.region_queue, self.regions_per_class),
            }
            for name, (queue, per_class) in sources.items():
                if not active(self.weights[name]):
                    continue
                if s_anchor.shape[0] == 0:  # every pixel ignored: a zero that keeps the graph
                    terms[name] = 0.0 * s.pow(2).mean()
                    continue
                keys = self._sample(queue, per_class, generator)
                kl = _kl_rows(t_anchor @ keys.T / self.tau, s_anchor @ keys.T / self.tau, self.kd_tau)
                terms[name] = kl / s_anchor.shape[0]
        return weighted_terms(terms, self.weights)
