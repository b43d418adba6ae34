"""MST-Distill's plug-in parts in plain torch: channel MaskNets, the routing GateNet and masked forwards.

MST-Distill (Li, Yang, Chen, Dong, Chen, Wang; ACM MM 2025, arXiv 2507.07015; official code
github.com/Gray-OREO/MST-Distill, ``KD_methods/MST.py``) turns each teacher into several "specialised" experts:
the teacher with one intermediate layer's output gated channel-wise by a MaskNet, ``f' = mask(f) * f``.

- :class:`MaskNet1d` (features ``[B, D]``): each channel becomes a token, ``e = Linear(D -> h*D)(f)`` reshaped to
  ``[B, D, h]``, self-attention with ``n_h`` heads, ``mask = sigmoid(Linear(h -> 1)(a))`` ``[B, D]``.
- :class:`MaskNet2d` (feature maps ``[B, C, H, W]``): a spatial reduction (depthwise conv 3x3 stride 2, conv 1x1,
  BN, ReLU, global average pool) to ``[B, C]``, then as above; the mask is broadcast over ``H, W``.
- :class:`GateNet`: ``Linear(K -> 2K) -> Linear(2K -> E)`` (no activation in between, as in the code) on the
  student's logits; its softmax routes each sample to experts.
- :func:`masked` / :func:`masked_forward`: install the mask hooks for one forward and always remove them
  (``try/finally``), so hooks never stack across forwards and the unmasked teacher is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from kd_lightning.errors import KDConfigError

__all__ = [
    "GateNet",
    "MaskNet1d",
    "MaskNet2d",
    "SpatialReduction",
    "apply_mask",
    "build_masknet",
    "mask_hidden_dim",
    "masked",
    "masked_forward",
]


def mask_hidden_dim(feat_dim: int, hidden_dim_factor: int = 2, num_heads: int = 3) -> int:
    """The code's token width ``h = (D // (factor * n_h)) * n_h`` (a multiple of the head count, about ``D / factor``).

    Raises:
        KDConfigError: ``h`` would be 0 (``D < factor * n_h``): naming ``mask_hidden_factor``.
    """
    if hidden_dim_factor < 1:
        raise KDConfigError("mask_hidden_factor", f"must be >= 1, got {hidden_dim_factor}")
    if num_heads < 1:
        raise KDConfigError("mask_heads", f"must be >= 1, got {num_heads}")
    hidden = (feat_dim // (hidden_dim_factor * num_heads)) * num_heads
    if hidden < 1:
        raise KDConfigError(
            "mask_hidden_factor",
            f"a masked layer of {feat_dim} channels with factor {hidden_dim_factor} and {num_heads} heads gives "
            "a token width of 0",
            f"use mask_hidden_factor * mask_heads <= {feat_dim}, or mask a wider layer",
        )
    return hidden


class MaskNet1d(nn.Module):
    """Channel mask for features ``[B, D]``: channels as tokens, self-attention, sigmoid per channel (official code).

    Args:
        feat_dim: D, the channels of the masked feature.
        hidden_dim: h, the token width (:func:`mask_hidden_dim`); a multiple of ``num_heads``.
        num_heads: attention heads.

    The embedding ``Linear(D, h*D)`` has about ``D^3 / factor`` weights: keep masked layers narrow (or raise
    ``hidden_dim_factor``).
    """

    def __init__(self, feat_dim: int, hidden_dim: int, num_heads: int = 3) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.hidden_dim = hidden_dim
        self.embed = nn.Linear(feat_dim, hidden_dim * feat_dim)
        self.mha = nn.MultiheadAttention(embed_dim=hidden_dim, num_heads=num_heads, batch_first=True)
        self.fc = nn.Linear(hidden_dim, 1)

    def tokens(self, x: Tensor) -> Tensor:
        """``[B, D]`` -> mask ``[B, D]`` in (0, 1)."""
        e = self.embed(x).reshape(x.shape[0], self.feat_dim, self.hidden_dim)
        a, _ = self.mha(e, e, e, need_weights=False)
        return self.fc(a).squeeze(-1).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return self.tokens(x.flatten(1))


class SpatialReduction(nn.Module):
    """``[B, C, H, W]`` -> ``[B, C]``: depthwise conv 3x3 stride 2, conv 1x1, BN, ReLU, global average pool."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.downsample = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.gap(self.downsample(x)).flatten(1)


class MaskNet2d(MaskNet1d):
    """Channel mask for feature maps ``[B, C, H, W]``: :class:`SpatialReduction` then :class:`MaskNet1d`'s tokens.

    Returns the mask ``[B, C]`` (broadcast over ``H, W`` by :func:`apply_mask`).
    """

    def __init__(self, feat_dim: int, hidden_dim: int, num_heads: int = 3) -> None:
        super().__init__(feat_dim, hidden_dim, num_heads)
        self.spatial_reduce = SpatialReduction(feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.tokens(self.spatial_reduce(x))


class GateNet(nn.Module):
    """Routing network on the student's logits: ``Linear(K, 2K) -> Linear(2K, E)`` (no activation, as in the code).

    Args:
        num_classes: K, the width of the student's logits.
        num_experts: E, the number of specialised teachers.
    """

    def __init__(self, num_classes: int, num_experts: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_classes, 2 * num_classes)
        self.fc2 = nn.Linear(2 * num_classes, num_experts)

    def forward(self, logits: Tensor) -> Tensor:
        return self.fc2(self.fc1(logits))


def build_masknet(shape: Sequence[int], hidden_dim_factor: int = 2, num_heads: int = 3) -> MaskNet1d:
    """The MaskNet for a layer whose output (without batch dimension) has ``shape``.

    ``[D]`` or ``[D, 1, 1]`` -> :class:`MaskNet1d`; ``[C, H, W]`` -> :class:`MaskNet2d` (as ``get_MSTmodules``).

    Raises:
        KDConfigError: any other shape (naming ``mask_layers``).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1 or (len(shape) == 3 and shape[1:] == (1, 1)):
        return MaskNet1d(shape[0], mask_hidden_dim(shape[0], hidden_dim_factor, num_heads), num_heads)
    if len(shape) == 3:
        return MaskNet2d(shape[0], mask_hidden_dim(shape[0], hidden_dim_factor, num_heads), num_heads)
    raise KDConfigError(
        "mask_layers",
        f"a masked layer outputs features of shape {list(shape)} per sample",
        "mask a layer with outputs [B, D] (MaskNet_1d) or [B, C, H, W] (MaskNet_2d)",
    )


def apply_mask(masknet: nn.Module, output: Tensor) -> Tensor:
    """``mask(output) * output`` with the mask ``[B, C]`` broadcast over any trailing dimensions (same shape out)."""
    mask = masknet(output)
    return output * mask.reshape(*mask.shape, *([1] * (output.dim() - mask.dim())))


def _mask_hook(masknet: nn.Module) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise KDConfigError(
                "mask_layers",
                f"a masked layer ({type(module).__name__}) returns a {type(output).__name__}, not a tensor",
                "mask a module that outputs one tensor",
            )
        return apply_mask(masknet, output)

    return hook


@contextlib.contextmanager
def masked(pairs: Sequence[tuple[nn.Module, nn.Module]]) -> Iterator[None]:
    """Within the block, each ``(module, masknet)`` pair replaces ``module``'s output by ``mask * output``.

    The hooks are removed when the block ends, also on an exception, so nothing stays on the network.
    """
    handles = []
    try:
        for module, masknet in pairs:
            handles.append(module.register_forward_hook(_mask_hook(masknet)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def masked_forward(model: nn.Module, inputs: Any, pairs: Sequence[tuple[nn.Module, nn.Module]]) -> Any:
    """``model(inputs)`` with the masks of ``pairs`` installed for this forward only (see :func:`masked`)."""
    with masked(pairs):
        return model(inputs)
