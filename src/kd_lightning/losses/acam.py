"""ACAM-KD: Adaptive and Cooperative Attention Masking for dense KD (Lan & Tian, ICCV 2025; arXiv 2503.06307).

Pure torch. For one feature-map pair (an FPN level, a segmenter's backbone map): the student map goes through a
1x1 adapter to the teacher's width (``F_S' = A(F_S)``), a Student-Teacher Cross-Attention Feature Fusion
(:class:`STCAFusion`, STCA-FF) mixes both maps, and an Adaptive Spatial-Channel Masking module
(:class:`SelectionUnits`, ASCM) turns the fusion into ``M`` channel masks and ``M`` spatial masks that weight the
squared error ``D = (F_T − F_S')²`` (:func:`acam_mask_losses`); a Dice-style diversity loss
(:func:`dice_diversity`) keeps the masks apart. :class:`ACAMLoss` bundles the three modules for one map.

Verification status (spec ``methods/04_acam_kd.md`` section 0; the paper has no public code):

- VERIFIED (abstract and third-party summaries): the teacher gives the queries and the student the keys/values of
  STCA-FF; the masks (spatial AND channel, several of them, from small learnable selection units + sigmoid) are
  computed from the fused features and recomputed every step; the distillation loss is weighted by the masks and
  normalised by the mask sum; a diversity loss keeps the masks different.
- UNVERIFIED (RECONSTRUCTION, every one an argument): the projection widths (``d = C/4`` for Q/K, ``C`` for V),
  the residual with the teacher, the pooled keys/values (``max_tokens``), the number of masks ``M = 6``, the unit
  architecture (CBAM-like: GAP -> Linear C->C/16 -> ReLU -> Linear -> sigmoid; conv3x3 over [mean_c; max_c] ->
  sigmoid), the exact Dice form of the diversity loss and its average over the channel and spatial masks, the
  objective of the mask units (``mask_objective``), whether the student's map feeds the masks with gradient
  (``student_grad_through_masks``) and the loss weights (chosen by the methods).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import upcast
from kd_lightning.losses.dense import check_maps

__all__ = [
    "MASK_OBJECTIVES",
    "MASK_SOURCES",
    "ACAMLoss",
    "STCAFusion",
    "SelectionUnits",
    "acam_mask_losses",
    "acam_options",
    "check_acam_arguments",
    "dice_diversity",
    "pooled_size",
    "reverse_gradient",
]

#: How the mask units (and the STCA-FF projections before them) are trained, see :class:`ACAMLoss`.
MASK_OBJECTIVES = ("min", "adversarial", "detach")
#: What the masks are computed from: the STCA-FF fusion (the paper's method) or the teacher map alone (ablation).
MASK_SOURCES = ("cooperative", "teacher")
_EPS = 1e-12


# ------------------------------------------------------------------------------------------------ helpers
class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward (Ganin & Lempitsky's gradient-reversal layer)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


def reverse_gradient(x: Tensor) -> Tensor:
    """``x`` unchanged, but the gradient flowing back through it is negated: what minimises a loss downstream
    maximises it upstream."""
    return _ReverseGradient.apply(x)


def _in_dtype_of(x: Tensor, module: nn.Module) -> Tensor:
    """``x`` in the dtype of ``module``'s parameters (fp32 weights under autocast, bf16 weights in bf16-true)."""
    param = next(module.parameters(), None)
    return x if param is None or not x.is_floating_point() else x.to(param.dtype)


def _positive_int(value: Any, field: str, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KDConfigError(field, f"must be a positive integer, got {value!r}", fix)


def pooled_size(height: int, width: int, max_tokens: int) -> tuple[int, int]:
    """The ``(h', w')`` the key/value map is average-pooled to: ``(H, W)`` when ``H·W <= max_tokens``, else (about)
    the same aspect ratio with ``h'·w' <= max_tokens``: the shorter side scaled by ``√(max_tokens / (H·W))``, the
    longer one as long as the bound allows (never longer than the map)."""
    _positive_int(max_tokens, "max_tokens", "the key/value tokens of STCA-FF (default 1024)")
    if height * width <= max_tokens:
        return height, width
    scale = math.sqrt(max_tokens / (height * width))
    short, long = sorted((height, width))
    pooled_short = min(short, max(1, int(short * scale)))  # <= sqrt(max_tokens)
    pooled_long = min(long, max_tokens // pooled_short)
    return (pooled_short, pooled_long) if height <= width else (pooled_long, pooled_short)


def check_acam_arguments(
    num_masks: int,
    key_channels: int | None,
    max_tokens: int,
    reduction: int,
    spatial_kernel: int,
    mask_objective: str,
    mask_source: str,
    student_grad_through_masks: bool,
    adapter: str,
) -> None:
    """Validate the shared ACAM-KD arguments (used by :class:`ACAMLoss` and by the methods, before any build).

    Raises:
        KDConfigError: naming the argument; ``student_grad_through_masks`` with ``mask_objective='adversarial'``
            (the student would ascend the KD loss through the reversed mask path: ambiguous) or with
            ``mask_source='teacher'`` (no student map enters the masks: the flag would do nothing).
    """
    _positive_int(num_masks, "num_masks", "the number M of selection units (default 6)")
    if key_channels is not None:
        _positive_int(key_channels, "key_channels", "the query/key width d of STCA-FF (null: C/4)")
    _positive_int(max_tokens, "max_tokens", "the key/value tokens of STCA-FF (default 1024)")
    _positive_int(reduction, "reduction", "the channel-mask MLP is C -> C/reduction -> C (default 16)")
    _positive_int(spatial_kernel, "spatial_kernel", "an odd kernel size, default 3")
    if spatial_kernel % 2 == 0:
        raise KDConfigError("spatial_kernel", f"must be odd, got {spatial_kernel}", "an odd size keeps H x W (3)")
    if mask_objective not in MASK_OBJECTIVES:
        raise KDConfigError("mask_objective", f"must be one of {list(MASK_OBJECTIVES)}, got {mask_objective!r}")
    if mask_source not in MASK_SOURCES:
        raise KDConfigError("mask_source", f"must be one of {list(MASK_SOURCES)}, got {mask_source!r}")
    if adapter not in ("always", "auto"):
        raise KDConfigError("adapter", f"must be 'always' or 'auto', got {adapter!r}")
    if student_grad_through_masks and mask_objective == "adversarial":
        raise KDConfigError(
            "student_grad_through_masks",
            "cannot be true with mask_objective 'adversarial': the reversed mask gradient would make the student "
            "ascend the KD loss through the mask path",
            "keep it false (the student learns from the masked error only) or use mask_objective 'min'",
        )
    if student_grad_through_masks and mask_source == "teacher":
        raise KDConfigError(
            "student_grad_through_masks",
            "has no effect with mask_source 'teacher' (the masks see the teacher map only)",
            "set it to false",
        )


def acam_options(lambda_div: float, **options: Any) -> dict[str, Any]:
    """The :class:`ACAMLoss` options of a method, validated (:func:`check_acam_arguments`) before anything is built.

    Raises:
        KDConfigError: a bad option, or ``mask_objective='detach'`` with ``lambda_div = 0`` (nothing would train
            the mask units).
    """
    check_acam_arguments(**options)
    if options["mask_objective"] == "detach" and lambda_div == 0:
        raise KDConfigError(
            "lambda_div",
            "is 0 with mask_objective 'detach': nothing would train the mask units",
            "give lambda_div > 0 or use mask_objective 'min'",
        )
    return dict(options)


# ------------------------------------------------------------------------------------------------ STCA-FF
class STCAFusion(nn.Module):
    """STCA-FF: ``F_fuse = reshape(softmax(Q Kᵀ / √d) V) + F_T`` with ``Q = W_q F_T`` (teacher queries) and
    ``K = W_k P(F_S')``, ``V = W_v P(F_S')`` (student keys/values), all 1x1 convs with bias.

    VERIFIED: the teacher provides the queries, the (adapted) student the keys and values. RECONSTRUCTION:
    ``d = C/4`` (``key_channels``), ``V`` of width ``C`` and the residual with ``F_T`` (spec section 3).
    ``P`` average-pools the student map to at most ``max_tokens`` positions (:func:`pooled_size`, adaptive
    average pooling) so the attention is ``[N, H·W, h'·w']`` — bounded memory on P3 of an 800x1333 image
    (``100x168`` queries x 1024 keys instead of ``16800²``); the queries stay at full resolution, so the fusion has
    the teacher's size. ``Q Kᵀ``, the softmax and ``A V`` run in float32 with autocast disabled.

    Args:
        channels: ``C`` (the teacher's width; the student map is adapted to it beforehand).
        key_channels: ``d``; ``None``: ``max(1, C // 4)``.
        max_tokens: most key/value positions (default 1024 = 32x32).
    """

    def __init__(self, channels: int, key_channels: int | None = None, max_tokens: int = 1024) -> None:
        super().__init__()
        _positive_int(channels, "channels", "the teacher's channel count")
        if key_channels is not None:
            _positive_int(key_channels, "key_channels", "the query/key width d of STCA-FF (null: C/4)")
        _positive_int(max_tokens, "max_tokens", "the key/value tokens of STCA-FF (default 1024)")
        self.channels = channels
        self.key_channels = key_channels or max(1, channels // 4)
        self.max_tokens = max_tokens
        self.query = nn.Conv2d(channels, self.key_channels, 1)
        self.key = nn.Conv2d(channels, self.key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)

    def forward(
        self, teacher: Tensor, student: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The float32 fusion ``[N, C, H, W]`` (and, with ``return_attention``, ``A`` ``[N, H·W, h'·w']``).

        Args:
            teacher: ``F_T`` ``[N, C, H, W]`` (the caller detaches it).
            student: ``F_S'`` ``[N, C, H, W]`` (adapted; detached or not, as the caller decides).
        """
        check_maps(student, teacher, "STCAFusion")
        if teacher.shape[1] != self.channels:
            raise KDConfigError(
                "STCAFusion", f"the maps have {teacher.shape[1]} channels, the module was built for {self.channels}"
            )
        n, c, h, w = teacher.shape
        tokens = pooled_size(h, w, self.max_tokens)
        source = student if tokens == (h, w) else F.adaptive_avg_pool2d(student, tokens)
        q = self.query(_in_dtype_of(teacher, self.query))
        k = self.key(_in_dtype_of(source, self.key))
        v = self.value(_in_dtype_of(source, self.value))
        with torch.autocast(device_type=q.device.type, enabled=False):
            q32 = q.float().flatten(2).transpose(1, 2)  # [N, HW, d]
            k32 = k.float().flatten(2)  # [N, d, T]
            v32 = v.float().flatten(2).transpose(1, 2)  # [N, T, C]
            attention = torch.softmax(q32 @ k32 / math.sqrt(self.key_channels), dim=-1)  # [N, HW, T]
            fused = (attention @ v32).transpose(1, 2).reshape(n, c, h, w) + teacher.float()
        return (fused, attention) if return_attention else fused


# ------------------------------------------------------------------------------------------------ ASCM
class SelectionUnits(nn.Module):
    """ASCM: ``M`` selection units, each giving a channel mask and a spatial mask of a map ``X`` ``[N, C, H, W]``.

    ``Mc_m = σ(MLP_m(GAP(X)))`` ``[N, C]`` with ``MLP_m`` = Linear(C → C/r) → ReLU → Linear(C/r → C);
    ``Ms_m = σ(Conv_m([mean_c X; max_c X]))`` ``[N, 1, H, W]`` with ``Conv_m`` a ``k x k`` conv (2 → 1, padding
    ``k // 2``, bias). The ``M`` spatial convs are one ``Conv2d(2, M, k)`` (output channel ``m`` is unit ``m``).
    VERIFIED: several learnable units with sigmoid masks, spatial and channel. RECONSTRUCTION: the CBAM-like
    layout, ``M = 6``, ``r = 16``, ``k = 3`` (spec section 3).

    Args:
        channels: ``C``.
        num_masks: ``M``.
        reduction: ``r`` (hidden width ``max(1, C // r)``).
        spatial_kernel: ``k`` (odd).
    """

    def __init__(self, channels: int, num_masks: int = 6, reduction: int = 16, spatial_kernel: int = 3) -> None:
        super().__init__()
        _positive_int(channels, "channels", "the channel count of the fused map")
        _positive_int(num_masks, "num_masks", "the number M of selection units (default 6)")
        _positive_int(reduction, "reduction", "the channel-mask MLP is C -> C/reduction -> C (default 16)")
        _positive_int(spatial_kernel, "spatial_kernel", "an odd kernel size, default 3")
        if spatial_kernel % 2 == 0:
            raise KDConfigError("spatial_kernel", f"must be odd, got {spatial_kernel}", "an odd size keeps H x W (3)")
        hidden = max(1, channels // reduction)
        self.channels, self.num_masks = channels, num_masks
        self.channel_units = nn.ModuleList(
            nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)) for _ in range(num_masks)
        )
        self.spatial_units = nn.Conv2d(2, num_masks, spatial_kernel, padding=spatial_kernel // 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(channel masks [N, M, C], spatial masks [N, M, H, W])``, every entry in ``[0, 1]``."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise KDConfigError("SelectionUnits", f"needs a [N, {self.channels}, H, W] map, got {tuple(x.shape)}")
        x = _in_dtype_of(x, self.spatial_units)
        pooled = x.mean(dim=(2, 3))
        channel = torch.stack([unit(pooled) for unit in self.channel_units], dim=1).sigmoid()
        descriptor = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        spatial = self.spatial_units(descriptor).sigmoid()
        return channel, spatial


# ------------------------------------------------------------------------------------------------ losses
def acam_mask_losses(
    student: Tensor, teacher: Tensor, channel_masks: Tensor, spatial_masks: Tensor
) -> tuple[Tensor, Tensor]:
    """The mask-weighted, mask-sum-normalised channel and spatial losses of ACAM-KD (spec section 4).

    With ``D = (F_T − F_S')²`` ``[N, C, H, W]`` (teacher detached), per sample:

    ``L_ch = (1/M) Σ_m Σ_c Mc_m[c] · (Σ_{h,w} D[c,h,w]) / (H·W · Σ_c Mc_m[c])``,
    ``L_sp = (1/M) Σ_m Σ_{h,w} Ms_m[h,w] · (Σ_c D[c,h,w]) / (C · Σ_{h,w} Ms_m[h,w])``,

    i.e. mask-weighted averages of the per-channel and per-position mean squared errors; both averaged over the
    batch. Computed in float32. VERIFIED: weighting by the masks and normalisation by the mask sum.

    Args:
        student: ``F_S'`` ``[N, C, H, W]`` (after the adapter).
        teacher: ``F_T`` ``[N, C, H, W]``.
        channel_masks: ``[N, M, C]`` in ``[0, 1]``.
        spatial_masks: ``[N, M, H, W]`` in ``[0, 1]``.

    Returns:
        ``(L_ch, L_sp)``, scalars; both 0 when ``F_S' = F_T``.

    Raises:
        KDConfigError: the maps or masks have the wrong shapes.
    """
    check_maps(student, teacher, "acam_mask_losses")
    n, c, h, w = teacher.shape
    if channel_masks.dim() != 3 or channel_masks.shape[0] != n or channel_masks.shape[2] != c:
        raise KDConfigError(
            "channel_masks", f"must be [N={n}, M, C={c}], got {tuple(channel_masks.shape)}", "one mask per unit"
        )
    if spatial_masks.shape != (n, channel_masks.shape[1], h, w):
        raise KDConfigError(
            "spatial_masks",
            f"must be [N={n}, M={channel_masks.shape[1]}, H={h}, W={w}], got {tuple(spatial_masks.shape)}",
            "as many spatial as channel masks, at the map's size",
        )
    error = (upcast(student) - upcast(teacher).detach()).pow(2)
    per_channel = error.mean(dim=(2, 3))  # [N, C]: Σ_hw D / (H·W)
    per_position = error.mean(dim=1).flatten(1)  # [N, HW]: Σ_c D / C
    mc = upcast(channel_masks)
    ms = upcast(spatial_masks).flatten(2)
    l_ch = (mc * per_channel.unsqueeze(1)).sum(-1) / mc.sum(-1).clamp_min(_EPS)  # [N, M]
    l_sp = (ms * per_position.unsqueeze(1)).sum(-1) / ms.sum(-1).clamp_min(_EPS)
    return l_ch.mean(), l_sp.mean()


def dice_diversity(masks: Tensor) -> Tensor:
    """Dice overlap of every pair of masks, averaged: ``(2 / (M(M−1))) Σ_{m<n} 2⟨X_m, X_n⟩ / (‖X_m‖² + ‖X_n‖²)``
    per sample (``X_m`` the flattened mask), averaged over the batch; MasKD's Dice convention.

    In ``[0, 1]`` for non-negative masks (``2ab <= a² + b²``); 1 when all masks are equal, 0 when they do not
    overlap. Minimising it pushes the masks apart. RECONSTRUCTION of the exact form (spec section 4).
    With one mask (``M = 1``) there is no pair and the loss is 0.

    Args:
        masks: ``[N, M, ...]`` (channel masks ``[N, M, C]`` or spatial masks ``[N, M, H, W]``).
    """
    if masks.dim() < 3:
        raise KDConfigError("masks", f"must be [N, M, ...], got {tuple(masks.shape)}", "one row of masks per sample")
    x = upcast(masks).flatten(2)
    m = x.shape[1]
    if m < 2:
        return x.sum() * 0.0
    with torch.autocast(device_type=x.device.type, enabled=False):  # the Gram matrix in float32
        gram = x @ x.transpose(1, 2)  # [N, M, M]
    squares = gram.diagonal(dim1=1, dim2=2)  # [N, M]
    dice = 2 * gram / (squares.unsqueeze(2) + squares.unsqueeze(1)).clamp_min(_EPS)
    rows, cols = torch.triu_indices(m, m, offset=1, device=x.device)
    return dice[:, rows, cols].mean()


# ------------------------------------------------------------------------------------------------ bundle
class ACAMLoss(nn.Module):
    """ACAM-KD for one map pair: adapter + STCA-FF + ASCM + the masked losses (unweighted terms).

    ``F_S' = A(F_S)`` (1x1 conv with bias, ``C_S → C_T``); masks ``(Mc, Ms) = ASCM(STCA(F_T, F_S'))``
    (``mask_source='teacher'``: ``ASCM(F_T)``, no STCA-FF); terms ``channel = L_ch``, ``spatial = L_sp``
    (:func:`acam_mask_losses` with the masks as set by ``mask_objective``) and
    ``diversity = (dice_diversity(Mc) + dice_diversity(Ms)) / 2`` (RECONSTRUCTION: the mean of the two, so it stays
    in ``[0, 1]``). The teacher map is detached everywhere.

    Gradient routing (RECONSTRUCTION; the paper's objective for the mask units is not verified):

    - ``student_grad_through_masks=False`` (default): the student map enters STCA-FF detached: the student and
      its adapter learn only from the squared error ``D``; the masks are a weighting computed from a frozen copy
      of the current student map.
    - ``mask_objective='min'`` (default): the mask units and the STCA-FF projections minimise
      ``L_ch + L_sp`` (and the diversity loss) jointly with the student.
    - ``'adversarial'``: the masks pass through a gradient-reversal layer inside ``L_ch``/``L_sp``, so with one
      optimiser the units and projections *ascend* the KD loss (they seek what the student imitates worst) while
      the student descends it; the diversity loss is still *minimised* by the units (it prevents collapse onto
      one channel/position). The student's gradient is the same as with ``'min'``.
    - ``'detach'``: the masks are detached inside ``L_ch``/``L_sp``; the units and projections learn from the
      diversity loss only.

    Args:
        student_channels: ``C_S``.
        teacher_channels: ``C_T`` (``C`` of the spec).
        num_masks: ``M`` (default 6).
        key_channels: ``d`` of STCA-FF; ``None``: ``C_T // 4``.
        max_tokens: key/value positions of STCA-FF at most (default 1024).
        reduction: channel-MLP reduction ``r`` (default 16).
        spatial_kernel: spatial-unit kernel (default 3).
        mask_objective: ``'min'``, ``'adversarial'`` or ``'detach'`` (above).
        mask_source: ``'cooperative'`` (STCA-FF fusion, the paper) or ``'teacher'`` (teacher-only masks: the
            paper's ablation baseline).
        student_grad_through_masks: let the student's map carry gradient through STCA-FF (above).
        adapter: ``'always'`` a 1x1 conv (the spec's standard adapter) or ``'auto'`` only when ``C_S ≠ C_T``.

    Raises:
        KDConfigError: bad arguments (:func:`check_acam_arguments`), maps of other widths than built for.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_masks: int = 6,
        key_channels: int | None = None,
        max_tokens: int = 1024,
        reduction: int = 16,
        spatial_kernel: int = 3,
        mask_objective: Literal["min", "adversarial", "detach"] = "min",
        mask_source: Literal["cooperative", "teacher"] = "cooperative",
        student_grad_through_masks: bool = False,
        adapter: Literal["always", "auto"] = "always",
    ) -> None:
        super().__init__()
        _positive_int(student_channels, "student_channels", "the student map's channel count")
        _positive_int(teacher_channels, "teacher_channels", "the teacher map's channel count")
        check_acam_arguments(
            num_masks,
            key_channels,
            max_tokens,
            reduction,
            spatial_kernel,
            mask_objective,
            mask_source,
            student_grad_through_masks,
            adapter,
        )
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.mask_objective, self.mask_source = mask_objective, mask_source
        self.student_grad_through_masks = student_grad_through_masks
        self.adapter: nn.Module = (
            nn.Conv2d(student_channels, teacher_channels, 1)
            if adapter == "always" or student_channels != teacher_channels
            else nn.Identity()
        )
        self.fusion = STCAFusion(teacher_channels, key_channels, max_tokens) if mask_source == "cooperative" else None
        self.units = SelectionUnits(teacher_channels, num_masks, reduction, spatial_kernel)

    def adapt(self, student: Tensor) -> Tensor:
        """``F_S' = A(F_S)``."""
        return self.adapter(_in_dtype_of(student, self.adapter))

    def masks(self, adapted: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """``(channel masks [N, M, C], spatial masks [N, M, H, W])`` from the fusion of ``F_T`` (detached) and the
        adapted student ``F_S'`` (detached unless ``student_grad_through_masks``), or from ``F_T`` alone."""
        teacher = teacher.detach()
        if self.fusion is None:
            return self.units(teacher)
        student = adapted if self.student_grad_through_masks else adapted.detach()
        return self.units(self.fusion(teacher, student))

    def _for_kd(self, mask: Tensor) -> Tensor:
        if self.mask_objective == "adversarial":
            return reverse_gradient(mask)
        if self.mask_objective == "detach":
            return mask.detach()
        return mask

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        """``{"channel": L_ch, "spatial": L_sp, "diversity": L_div}`` (unweighted float32 scalars).

        Args:
            student: ``F_S`` ``[N, C_S, H, W]``.
            teacher: ``F_T`` ``[N, C_T, H, W]`` (detached).
        """
        check_maps(student, teacher, "ACAMLoss", same_channels=False)
        for who, tensor, expected in (
            ("student", student, self.student_channels),
            ("teacher", teacher, self.teacher_channels),
        ):
            if tensor.shape[1] != expected:
                raise KDConfigError(
                    "ACAMLoss",
                    f"the {who} map has {tensor.shape[1]} channels, the loss was built for {expected}",
                    "build one ACAMLoss per map with its channel counts",
                )
        adapted = self.adapt(student)
        channel, spatial = self.masks(adapted, teacher)
        l_ch, l_sp = acam_mask_losses(adapted, teacher, self._for_kd(channel), self._for_kd(spatial))
        diversity = 0.5 * (dice_diversity(channel) + dice_diversity(spatial))
        return {"channel": l_ch, "spatial": l_sp, "diversity": diversity}
