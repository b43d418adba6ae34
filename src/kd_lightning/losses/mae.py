"""Masked-autoencoder pieces (pure torch) for DMAE (Bai et al., CVPR 2023; arXiv 2208.12256) and MAE (He et al. 2022).

- :func:`random_masking`: per-sample random masks by argsort of uniform noise (the MAE recipe), as indices that
  teacher and student share: ``ids_keep`` (visible patches, in the order they are fed), ``ids_restore`` (undoes the
  shuffle) and a binary ``mask`` (1 = removed).
- :func:`gather_tokens`: keep the visible tokens of a ``[B, L, D]`` sequence.
- :func:`patchify` / :func:`unpatchify`: images to flattened patches in MAE's ``(ph, pw, C)`` order and back.
- :func:`masked_reconstruction_loss`: per-patch mean squared error averaged over the masked patches only.
- :func:`normalized_l1_loss`: ``mean |normalize(F_T) - normalize(F_S)|`` (DMAE's feature distillation).
- :class:`DMAELoss`: ``L = L_rec + w · Σ_pairs L_distill``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import upcast
from kd_lightning.losses.terms import check_weights, weighted_terms

__all__ = [
    "DMAELoss",
    "MaskIndices",
    "masked_reconstruction_loss",
    "normalized_l1_loss",
    "patchify",
    "random_masking",
    "unpatchify",
]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise KDConfigError(f"{name} must be a positive int or a pair of positive ints, got {value!r}.")
    return pair  # type: ignore[return-value]


class MaskIndices(NamedTuple):
    """One random mask per sample, shared by every network that sees the batch.

    Attributes:
        ids_keep: ``long [B, K]``, the visible patches (``K = int(L·(1 - mask_ratio))``).
        ids_restore: ``long [B, L]``; ``gather(cat(visible, masked), ids_restore)`` puts tokens back in place.
        mask: ``float [B, L]``, 1 on removed patches and 0 on visible ones.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> MaskIndices:
    """Per-sample random masking by sorting uniform noise (MAE): small noise is kept, large noise removed.

    Args:
        batch_size: ``B``.
        num_patches: ``L``, the patches per image.
        mask_ratio: share of patches removed, in ``[0, 1)``; ``int(L·(1 - mask_ratio))`` patches stay visible.
        device: where the indices live.
        generator: optional RNG for reproducible masks (the noise is drawn on the generator's device and moved).

    Returns:
        :class:`MaskIndices`.

    Raises:
        ValueError: ``mask_ratio`` outside ``[0, 1)`` or leaving no visible patch.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise KDConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    len_keep = int(num_patches * (1 - mask_ratio))
    if len_keep < 1:
        raise KDConfigError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}: lower it.")
    if generator is not None:
        noise = torch.rand(batch_size, num_patches, generator=generator, device=generator.device).to(device)
    else:
        noise = torch.rand(batch_size, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return MaskIndices(ids_keep, ids_restore, mask)


def patchify(images: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """``[B, C, H, W]`` to ``[B, (H/ph)·(W/pw), ph·pw·C]``, patches row-major, pixels in ``(ph, pw, C)`` order (MAE's).

    Raises:
        ValueError: the image size is not a multiple of the patch size.
    """
    ph, pw = _pair(patch_size, "patch_size")
    if images.dim() != 4:
        raise KDConfigError(f"patchify needs images [B, C, H, W], got {tuple(images.shape)}.")
    b, c, h, w = images.shape
    if h % ph or w % pw:
        raise KDConfigError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}.")
    gh, gw = h // ph, w // pw
    x = images.reshape(b, c, gh, ph, gw, pw)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, ph * pw * c)


def unpatchify(patches: Tensor, patch_size: int | Sequence[int], grid_size: int | Sequence[int]) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, gh·gw, ph·pw·C]`` to ``[B, C, gh·ph, gw·pw]``.

    Raises:
        ValueError: the shapes do not fit ``patch_size`` and ``grid_size``.
    """
    ph, pw = _pair(patch_size, "patch_size")
    gh, gw = _pair(grid_size, "grid_size")
    b, length, dim = patches.shape
    if length != gh * gw or dim % (ph * pw):
        raise KDConfigError(f"unpatchify: {tuple(patches.shape)} does not fit a {gh}x{gw} grid of {ph}x{pw} patches.")
    c = dim // (ph * pw)
    x = patches.reshape(b, gh, gw, ph, pw, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, gh * ph, gw * pw)


def masked_reconstruction_loss(
    pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False, eps: float = 1e-6
) -> Tensor:
    """MAE's loss: ``Σ_{b,l} m_{b,l} · mean_c (pred - target)² / Σ_{b,l} m_{b,l}``.

    Args:
        pred: ``[B, L, P]`` predicted patches.
        target: ``[B, L, P]`` true patches (:func:`patchify` of the input).
        mask: ``[B, L]``, 1 where the patch was removed (only those count).
        norm_pix: normalise each target patch by its own mean and (unbiased) variance first (MAE's
            ``norm_pix_loss``): ``(t - mean) / sqrt(var + eps)``.
        eps: added to the variance with ``norm_pix``.

    Raises:
        ValueError: shapes differ, or the mask removes nothing.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise KDConfigError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [B, L, P].")
    if mask.shape != pred.shape[:2]:
        raise KDConfigError(f"mask must have shape {tuple(pred.shape[:2])} ([B, L]), got {tuple(mask.shape)}.")
    pred, target, mask = upcast(pred), upcast(target), upcast(mask)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    removed = mask.sum()
    if removed <= 0:
        raise KDConfigError("masked_reconstruction_loss: the mask removes no patch (mask is all zeros).")
    return (per_patch * mask).sum() / removed


def normalized_l1_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """DMAE's feature loss: ``mean | normalize(F_T) - normalize(F_S) |`` with L2 normalisation over the last dim.

    ``student`` is the *projected* student feature (same shape as the teacher's); the teacher feature is detached.
    The mean runs over every element (``nn.L1Loss``), i.e. over batch, tokens and channels.

    Raises:
        ValueError: the shapes differ.
    """
    if student.shape != teacher.shape:
        raise KDConfigError(
            f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} must match: "
            "project the student's to the teacher's width and feed both the same tokens."
        )
    s = F.normalize(upcast(student), dim=-1)
    t = F.normalize(upcast(teacher.detach()), dim=-1)
    return (t - s).abs().mean()


class DMAELoss(nn.Module):
    """DMAE's objective: ``L = L_rec + w · Σ_k mean|normalize(F_T^k) - normalize(W_k F_S^k)|``.

    Args:
        distill_weight: ``w`` (1 in the official code).
        norm_pix_loss: per-patch normalised pixel targets (see :func:`masked_reconstruction_loss`).

    ``forward(pred, target, mask, student_feats, teacher_feats)`` takes the student decoder's prediction, the
    patchified images, the mask and lists of projected student / teacher features (one per aligned pair) and
    returns ``{"loss", "rec", "distill"}`` (``distill`` is the weighted sum over pairs, absent without pairs or
    with weight 0; with several pairs also ``distill_0``, ``distill_1``, ... unweighted).
    """

    def __init__(self, distill_weight: float = 1.0, norm_pix_loss: bool = False) -> None:
        super().__init__()
        check_weights(distill_weight=distill_weight)
        self.distill_weight = distill_weight
        self.norm_pix_loss = norm_pix_loss

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        mask: Tensor,
        student_feats: Sequence[Tensor],
        teacher_feats: Sequence[Tensor],
    ) -> dict[str, Tensor]:
        if len(student_feats) != len(teacher_feats):
            raise KDConfigError(f"{len(student_feats)} student features but {len(teacher_feats)} teacher features.")
        rec = masked_reconstruction_loss(pred, target, mask, norm_pix=self.norm_pix_loss)
        pairs = [normalized_l1_loss(s, t) for s, t in zip(student_feats, teacher_feats, strict=True)]
        terms = {"rec": rec, "distill": torch.stack(pairs).sum()} if pairs else {"rec": rec}
        parts = weighted_terms(terms, {"distill": self.distill_weight})
        if len(pairs) > 1:
            parts.update({f"distill_{k}": value for k, value in enumerate(pairs)})
        return parts
