"""Fixed position embeddings (pure torch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kd_lightning.errors import KDConfigError

__all__ = ["sincos_pos_embed_2d"]


def _grid(value: int | Sequence[int]) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise KDConfigError("grid_size", f"must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | Sequence[int], num_prefix_tokens: int = 0) -> Tensor:
    """MAE's fixed 2-D sin-cos position embedding, ``float32 [num_prefix_tokens + gh·gw, embed_dim]``.

    The first half of the channels encodes the column of a patch and the second half its row, each as
    ``[sin(pos·ω_k), cos(pos·ω_k)]`` with ``ω_k = 10000^(-k/(D/4))``, ``k = 0..D/4-1`` (MAE's
    ``get_2d_sincos_pos_embed``); prefix tokens (CLS, registers) get zeros. Patches are row-major.

    Raises:
        KDConfigError: ``embed_dim`` is not a multiple of 4.
    """
    if embed_dim % 4:
        raise KDConfigError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos embedding, got {embed_dim}.")
    gh, gw = _grid(grid_size)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    prefix = torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype)
    return torch.cat([prefix, emb]).float()
