"""MAE's lightweight pixel decoder (He et al. 2022; as used by DMAE, Bai et al. CVPR 2023), pure torch.

The encoder's output (prefix tokens + visible patch tokens) is embedded to the decoder width, the removed patches
are filled with a shared learned mask token, the sequence is unshuffled with ``ids_restore``, a fixed 2-D sin-cos
position embedding is added, and pre-norm transformer blocks, a LayerNorm and a linear head predict each patch's
pixels. Prefix tokens are dropped from the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.models.positional import sincos_pos_embed_2d

__all__ = ["MAEDecoder", "MAEDecoderBlock"]


class MAEDecoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` (GELU MLP, qkv with bias).

    Args:
        dim: token width.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        norm_eps: LayerNorm epsilon (1e-6 in MAE).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise KDConfigError(f"the decoder width {dim} must be a multiple of its number of heads {num_heads}.")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attention(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAEDecoder(nn.Module):
    """MAE decoder: visible tokens + mask tokens, unshuffled, through a small transformer, to pixels per patch.

    Args:
        encoder_dim: width of the encoder's output tokens.
        grid_size: patch grid ``(gh, gw)`` (or one int for a square grid); ``L = gh·gw``.
        patch_dim: values predicted per patch, ``ph·pw·C``.
        dim: decoder width (512 in MAE/DMAE).
        depth: decoder blocks (8 in MAE/DMAE).
        num_heads: attention heads (16 in MAE/DMAE).
        mlp_ratio: MLP width multiple.
        num_prefix_tokens: tokens before the patches in the encoder output (1 for a CLS token); they pass through
            the decoder with a zero position embedding and are dropped from the prediction.
        norm_eps: LayerNorm epsilon.

    ``forward(latent, ids_restore)``: ``latent [B, num_prefix_tokens + K, encoder_dim]`` (the encoder's output on
    the ``K`` visible patches, in ``ids_keep`` order), ``ids_restore [B, L]``; returns ``[B, L, patch_dim]``.
    Initialisation follows MAE: xavier-uniform linear weights, zero biases, mask token ~ N(0, 0.02²).
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: int | Sequence[int],
        patch_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 1,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if depth < 0 or dim < 1 or patch_dim < 1:
            raise KDConfigError(
                f"MAEDecoder needs dim >= 1, depth >= 0 and patch_dim >= 1; got {dim}, {depth}, {patch_dim}."
            )
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_pos_embed_2d(dim, grid_size, num_prefix_tokens)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # fixed: rebuilt from the arguments
        self.blocks = nn.ModuleList(MAEDecoderBlock(dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pred = nn.Linear(dim, patch_dim)
        self.reset_parameters()

    @property
    def num_patches(self) -> int:
        return self.pos_embed.shape[1] - self.num_prefix_tokens

    def reset_parameters(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        p, length = self.num_prefix_tokens, self.num_patches
        if ids_restore.shape[-1] != length:
            raise KDConfigError(
                f"ids_restore covers {ids_restore.shape[-1]} patches but the decoder was built for {length}."
            )
        x = self.embed(latent)
        prefix, visible = x[:, :p], x[:, p:]
        fill = self.mask_token.to(x.dtype).expand(x.shape[0], length - visible.shape[1], -1)
        patches = torch.cat([visible, fill], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, patches], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, p:]
