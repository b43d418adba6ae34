"""Networks for automatic modulation recognition on raw IQ frames ``[B, 2, L]`` (RadioML 2016.10a/b, 2018.01A).

* :class:`ClST` — a convolutional transformer in the spirit of ClST (Hou et al., "ClST: A Convolutional
  Transformer Framework for Automatic Modulation Recognition by Knowledge Distillation", IEEE TWC 2024,
  arXiv 2312.17446). **RECONSTRUCTION**: only the abstract of the paper could be consulted and no official
  code was found. The component names (hierarchical stages with convolution, PSCA = parallel
  spatial-channel attention, CTP = convolutional projection) are the paper's; every internal detail
  (stage count, widths, kernels, heads, how PSCA fuses its branches) follows the CvT pattern the abstract
  describes and is an argument. It is "ClST-like": do not expect the paper's numbers or size.
* :class:`KDCNN` and :class:`KDMobileNet` — the two light students of the paper's signal knowledge
  distillation. **PLACEHOLDERS**: the paper's layer lists are unknown; these are a plain 1-D CNN and a 1-D
  MobileNetV1 of about 23 K and 35 K parameters (L = 128, 11 classes).

All three are length-agnostic (global average pooling over time); ``input_length`` only chooses defaults
(ClST's strides) and documents the expected frame length. Each exposes ``feature_stages`` (module paths whose
outputs are channel-first ``[B, C, L_s]`` stage features, for feature taps), ``feature_dims`` and
:meth:`stage_channels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError

__all__ = [
    "KDCNN",
    "PSCA",
    "CTPBlock",
    "ClST",
    "ClSTLike",
    "ConvProjection",
    "ConvTokenEmbedding",
    "KDMobileNet",
]

ChannelBranch = Literal["se", "xcit", "none"]


def _check_positive(name: str, values: Sequence[int | float]) -> None:
    bad = [v for v in values if not v > 0]
    if bad:
        raise KDConfigError(f"{name} must hold positive values, got {list(values)}.")


def _per_stage(name: str, values: Sequence[int], stages: int) -> tuple[int, ...]:
    values = tuple(int(v) for v in values)
    if len(values) != stages:
        raise KDConfigError(f"{name} needs one value per stage ({stages} stages, from embed_dims), got {list(values)}.")
    _check_positive(name, values)
    return values


class _FeatureStagesMixin:
    feature_stages: tuple[str, ...]
    feature_dims: tuple[int, ...]

    def stage_channels(self) -> dict[str, int]:
        """``{stage name: channels}`` for ``feature_stages``."""
        return dict(zip(self.feature_stages, self.feature_dims))


# ------------------------------------------------------------------------------------------------ ClST
class ConvTokenEmbedding(nn.Module):
    """Convolutional token embedding: ``Conv1d(C_in → C, k, stride r, padding k//2)`` then LayerNorm over channels.

    ``[B, C_in, L] → [B, ceil(L / r), C]`` tokens (for odd ``k``).
    """

    def __init__(self, in_channels: int, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x).transpose(1, 2))


class ConvProjection(nn.Module):
    """CTP's convolutional projection (CvT): ``Pointwise(BN(DepthwiseConv1d_k(h)))`` on tokens ``[B, L, C]``.

    ``stride > 1`` squeezes the token axis (the CvT trick for keys and values).
    """

    def __init__(self, dim: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(
            dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False
        )
        self.norm = nn.BatchNorm1d(dim)
        self.pointwise = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.pointwise(self.norm(self.depthwise(tokens.transpose(1, 2))).transpose(1, 2))


class _SqueezeExcitation(nn.Module):
    """Channel branch "se": ``h · sigmoid(W2 ReLU(W1 mean_tokens(h)))``, gate broadcast over tokens."""

    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h: Tensor) -> Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean(dim=1)))))
        return h * gate.unsqueeze(1)


class _CrossCovarianceAttention(nn.Module):
    """Channel branch "xcit" (XCiT, El-Nouby et al. 2021): attention among channels, per head.

    ``q, k, v = Linear(h)``; ``q, k`` L2-normalised along tokens; ``A = softmax(q̂ᵀ k̂ · θ_head)`` is
    ``[d_head, d_head]``; output ``v Aᵀ``. θ is a learnable per-head temperature (init 1).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))

    def forward(self, h: Tensor) -> Tensor:
        b, n, c = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)  # each [B, heads, d_head, N]
        q = nn.functional.normalize(q, dim=-1)
        k = nn.functional.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # [B, heads, d, d]
        return (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)


class PSCA(nn.Module):
    """Parallel spatial-channel attention (RECONSTRUCTION): ``SpatialAttn(Q, K, V) + ChannelAttn(h)``.

    * Spatial branch: multi-head ``softmax(Q Kᵀ / √d_head) V`` over tokens, with ``Q, K, V`` from
      :class:`ConvProjection` (``K``, ``V`` squeezed by ``kv_stride``). Written with explicit matmuls so that
      ``torch.utils.flop_counter`` counts it on every device.
    * Channel branch (``channel_branch``): ``"se"`` squeeze-excitation over the token axis (default),
      ``"xcit"`` cross-covariance (channel) self-attention, ``"none"`` spatial attention only.

    How the paper fuses the two branches is unknown; the sum is the reconstruction's choice.

    Args:
        dim: token channels C.
        num_heads: heads of the spatial (and xcit) attention; must divide ``dim``.
        channel_branch: ``"se"``, ``"xcit"`` or ``"none"``.
        se_reduction: C / hidden width of the SE gate.
        proj_kernel: kernel of the depthwise convolutions of the projections.
        kv_stride: stride of the key/value projections (1 = no squeeze).
        attn_dropout: dropout on the spatial attention weights.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        channel_branch: ChannelBranch = "se",
        se_reduction: int = 4,
        proj_kernel: int = 3,
        kv_stride: int = 2,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise KDConfigError(f"num_heads ({num_heads}) must divide the stage width ({dim}).")
        if channel_branch not in ("se", "xcit", "none"):
            raise KDConfigError(f"channel_branch must be 'se', 'xcit' or 'none', got {channel_branch!r}.")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = ConvProjection(dim, proj_kernel, 1)
        self.k = ConvProjection(dim, proj_kernel, kv_stride)
        self.v = ConvProjection(dim, proj_kernel, kv_stride)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.channel_branch = channel_branch
        self.channel: nn.Module | None
        if channel_branch == "se":
            self.channel = _SqueezeExcitation(dim, se_reduction)
        elif channel_branch == "xcit":
            self.channel = _CrossCovarianceAttention(dim, num_heads)
        else:
            self.channel = None

    def _heads(self, t: Tensor) -> Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def spatial(self, h: Tensor) -> Tensor:
        """Multi-head token attention with convolutional Q/K/V; ``[B, N, C] → [B, N, C]``."""
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        attn = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1))
        out = attn @ v  # [B, heads, N, d_head]
        return out.transpose(1, 2).reshape(h.shape)

    def forward(self, h: Tensor) -> Tensor:
        out = self.spatial(h)
        if self.channel is not None:
            out = out + self.channel(h)
        return out


class CTPBlock(nn.Module):
    """Pre-norm transformer block with PSCA: ``x += Linear(PSCA(LN(x)))``; ``x += MLP(LN(x))``.

    MLP = ``Linear(C, r·C) – GELU – Linear(r·C, C)`` with ``r = mlp_ratio``. Tokens ``[B, N, C]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        channel_branch: ChannelBranch = "se",
        se_reduction: int = 4,
        proj_kernel: int = 3,
        kv_stride: int = 2,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PSCA(dim, num_heads, channel_branch, se_reduction, proj_kernel, kv_stride, attn_dropout)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.proj(self.attn(self.norm1(x))))
        return x + self.drop(self.mlp(self.norm2(x)))


class _ClSTStage(nn.Module):
    """Token embedding + CTP blocks; channel-first in and out: ``[B, C_in, L] → [B, C, ceil(L / r)]``."""

    def __init__(self, embed: ConvTokenEmbedding, blocks: list[CTPBlock]) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.embed(x)).transpose(1, 2)


class ClST(_FeatureStagesMixin, nn.Module):
    """ClST-like hierarchical convolutional transformer for IQ frames (RECONSTRUCTION, unverified).

    Hou et al., IEEE TWC 23(7) 2024, arXiv 2312.17446. Stage ``s``: a convolutional token embedding
    (``Conv1d(C_{s-1} → C_s, k_s, stride r_s)`` + LayerNorm) followed by ``depths[s]`` :class:`CTPBlock`s whose
    attention is :class:`PSCA` (spatial multi-head attention with convolutional Q/K/V projections, plus a
    parallel channel-attention branch). Head: LayerNorm, mean over tokens, dropout, ``Linear(C_S, K)``.
    Only the component names come from the paper's abstract; all sizes are kd-lightning's guesses
    (CvT-style defaults) and arguments. With the defaults (L = 128, 11 classes) it has
    about 0.57 M parameters (570,483) (the paper's size is unknown).

    Args:
        num_classes: K (11 for RML2016.10a, 10 for 2016.10b, 24 for 2018.01A).
        in_channels: input channels (2: I and Q).
        input_length: frame length L (128 or 1024); picks the default ``strides``.
        embed_dims: C_s per stage.
        kernel_sizes: token-embedding kernel per stage.
        strides: token-embedding stride per stage; ``None`` = ``(2, 2, 2)`` for ``input_length <= 256``,
            else ``(4, 2, 2)`` (1024 → 64 tokens at the last stage).
        depths: CTP blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratio: MLP hidden width / C.
        channel_branch: PSCA's channel branch: ``"se"``, ``"xcit"`` or ``"none"``.
        se_reduction: reduction of the SE gate.
        proj_kernel: depthwise kernel of the Q/K/V projections.
        kv_stride: stride of the K/V projections (1 disables the squeeze).
        dropout: dropout after the attention projection and in the MLP.
        attn_dropout: dropout on attention weights.
        head_dropout: dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 11,
        in_channels: int = 2,
        input_length: int = 128,
        embed_dims: Sequence[int] = (32, 64, 128),
        kernel_sizes: Sequence[int] = (7, 3, 3),
        strides: Sequence[int] | None = None,
        depths: Sequence[int] = (1, 2, 2),
        num_heads: Sequence[int] = (1, 2, 4),
        mlp_ratio: float = 4.0,
        channel_branch: ChannelBranch = "se",
        se_reduction: int = 4,
        proj_kernel: int = 3,
        kv_stride: int = 2,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        embed_dims = tuple(int(c) for c in embed_dims)
        stages = len(embed_dims)
        if stages == 0:
            raise KDConfigError("embed_dims must name at least one stage.")
        _check_positive("embed_dims", embed_dims)
        if strides is None:
            strides = (2,) * stages if input_length <= 256 else (4,) + (2,) * (stages - 1)
        kernel_sizes = _per_stage("kernel_sizes", kernel_sizes, stages)
        strides = _per_stage("strides", strides, stages)
        num_heads = _per_stage("num_heads", num_heads, stages)
        depths = tuple(int(d) for d in depths)
        if len(depths) != stages or any(d < 0 for d in depths):
            raise KDConfigError(f"depths needs one value >= 0 per stage ({stages} stages), got {list(depths)}.")
        for dim, heads in zip(embed_dims, num_heads):
            if dim % heads:
                raise KDConfigError(
                    f"num_heads {list(num_heads)} must divide embed_dims {list(embed_dims)} stage-wise."
                )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_length = input_length
        self.strides = strides
        blocks_of = []
        width = in_channels
        for dim, k, r, depth, heads in zip(embed_dims, kernel_sizes, strides, depths, num_heads):
            embed = ConvTokenEmbedding(width, dim, k, r)
            blocks = [
                CTPBlock(
                    dim, heads, mlp_ratio, channel_branch, se_reduction, proj_kernel, kv_stride, dropout, attn_dropout
                )
                for _ in range(depth)
            ]
            blocks_of.append(_ClSTStage(embed, blocks))
            width = dim
        self.stages = nn.Sequential(*blocks_of)
        self.norm = nn.LayerNorm(width)
        self.head_drop = nn.Dropout(head_dropout)
        self.fc = nn.Linear(width, num_classes)
        self.feature_stages = tuple(f"stages.{i}" for i in range(stages))
        self.feature_dims = embed_dims
        self.classifier_in_features = width

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise KDConfigError(f"ClST expects [B, {self.in_channels}, L] IQ frames, got {tuple(x.shape)}.")
        tokens = self.norm(self.stages(x).transpose(1, 2))
        return self.fc(self.head_drop(tokens.mean(dim=1)))


#: The spec's name for the reconstruction; the same class.
ClSTLike = ClST


# ------------------------------------------------------------------------------------------------ students
class KDCNN(_FeatureStagesMixin, nn.Module):
    """KD-CNN student of SKD (PLACEHOLDER: the paper's layers are unknown).

    ``len(channels) × [Conv1d(k, pad k//2) → BN → ReLU → MaxPool1d(pool)]``, global average pool over time,
    dropout, ``Linear(channels[-1], K)``. Defaults (32, 32, 64, 64), k = 3: 22,987 parameters for 11 classes.

    Args:
        num_classes: K.
        in_channels: input channels (2: I and Q).
        input_length: frame length L (documentation only: the network pools globally). Needs
            ``L >= pool ** len(channels)``.
        channels: output channels of each conv block.
        kernel_size: temporal kernel.
        pool: max-pool size after each block (1 disables pooling).
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 11,
        in_channels: int = 2,
        input_length: int = 128,
        channels: Sequence[int] = (32, 32, 64, 64),
        kernel_size: int = 3,
        pool: int = 2,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise KDConfigError("channels must name at least one block.")
        _check_positive("channels", channels)
        if pool > 1 and input_length < pool ** len(channels):
            raise KDConfigError(f"input_length {input_length} is too short for {len(channels)} max-pools of {pool}.")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_length = input_length
        blocks = []
        width = in_channels
        for c in channels:
            layers: list[nn.Module] = [
                nn.Conv1d(width, c, kernel_size, padding=kernel_size // 2),
                nn.BatchNorm1d(c),
                nn.ReLU(),
            ]
            if pool > 1:
                layers.append(nn.MaxPool1d(pool))
            blocks.append(nn.Sequential(*layers))
            width = c
        self.blocks = nn.Sequential(*blocks)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        self.feature_stages = tuple(f"blocks.{i}" for i in range(len(channels)))
        self.feature_dims = channels
        self.classifier_in_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.blocks(x).mean(dim=-1)))


class _DepthwiseSeparable(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__(
            nn.Conv1d(
                in_channels,
                in_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=in_channels,
                bias=False,
            ),
            nn.BatchNorm1d(in_channels),
            nn.ReLU(),
            nn.Conv1d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(),
        )


class KDMobileNet(_FeatureStagesMixin, nn.Module):
    """KD-MobileNet student of SKD (PLACEHOLDER: the paper's layers are unknown): a 1-D MobileNetV1.

    Stem ``Conv1d(C_in → stem_channels, k, stride 2) → BN → ReLU``, then depthwise-separable blocks
    ``[DWConv1d(k, stride s) → BN → ReLU → PWConv1d → BN → ReLU]`` with ``channels``/``strides``, global average
    pool, dropout, ``Linear``. Defaults (stem 16; 32, 64s2, 64, 128s2, 128): 35,131 parameters for 11 classes.

    Args:
        num_classes: K.
        in_channels: input channels (2: I and Q).
        input_length: frame length L (documentation only: the network pools globally).
        stem_channels: channels of the stem convolution.
        channels: output channels of each depthwise-separable block.
        strides: stride of each block's depthwise convolution.
        kernel_size: temporal kernel of stem and depthwise convolutions.
        dropout: dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 11,
        in_channels: int = 2,
        input_length: int = 128,
        stem_channels: int = 16,
        channels: Sequence[int] = (32, 64, 64, 128, 128),
        strides: Sequence[int] = (1, 2, 1, 2, 1),
        kernel_size: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        strides = tuple(int(s) for s in strides)
        if not channels or len(strides) != len(channels):
            raise KDConfigError(
                f"channels and strides need one value per block, got {list(channels)} and {list(strides)}."
            )
        _check_positive("channels", (stem_channels, *channels))
        _check_positive("strides", strides)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_length = input_length
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, stem_channels, kernel_size, stride=2, padding=kernel_size // 2, bias=False),
            nn.BatchNorm1d(stem_channels),
            nn.ReLU(),
        )
        blocks = []
        width = stem_channels
        for c, s in zip(channels, strides):
            blocks.append(_DepthwiseSeparable(width, c, kernel_size, s))
            width = c
        self.blocks = nn.Sequential(*blocks)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        self.feature_stages = ("stem", *(f"blocks.{i}" for i in range(len(channels))))
        self.feature_dims = (stem_channels, *channels)
        self.classifier_in_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.blocks(self.stem(x)).mean(dim=-1)))
