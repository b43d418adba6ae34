"""Numbered augmentation views: ``RandomCrop(size, padding)`` + horizontal flip as one integer per sample.

The CIFAR augmentation has a finite view space: the crop window's top row ``dy`` and left column
``dx`` in the zero-padded image (each ``0 .. 2·padding``) and a flip bit. With ``padding = 4`` that is
``9 · 9 · 2 = 162`` views per image, numbered

    ``view = (dy · (2·padding + 1) + dx) · 2 + flip``          (0 .. 161 for padding 4)

so ``dy = view // 2 // 9``, ``dx = view // 2 % 9``, ``flip = view % 2``. The crop takes rows
``dy .. dy + H - 1`` and columns ``dx .. dx + W - 1`` of the padded image (the content moves down by
``padding - dy`` and right by ``padding - dx``), and the flip mirrors the crop left-right. The
un-augmented image is the view ``dy = dx = padding``, no flip: :data:`IDENTITY_VIEW` (80 for
padding 4), which is also the one view of the evaluation path. The padding fill is ``0`` in the
``uint8`` image, before normalisation (torchvision's ``RandomCrop(fill=0)`` on ``ToTensor``-ed data).

A teacher in eval mode is a deterministic function of the pixels, so its logits per
``(image index, view)`` are exact for every epoch: :mod:`kd_lightning.teachers.logit_cache` stores them.
Everything here is pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kd_lightning.data.base import TensorImageDataset
from kd_lightning.data.transforms import translate
from kd_lightning.errors import KDConfigError

__all__ = [
    "CROP_PADDING",
    "IDENTITY_VIEW",
    "NUM_CROP_FLIP_VIEWS",
    "VIEW_ENCODING_VERSION",
    "RandomCropFlipView",
    "TensorImageViewDataset",
    "ViewSpace",
    "apply_view",
    "crop_flip_batch",
    "decode_view",
    "encode_view",
    "num_views",
    "pad_images",
]

#: Version of the numbering above; part of every cache key, so a change of numbering never reuses a cache.
VIEW_ENCODING_VERSION = 1
#: Padding of the CIFAR crop.
CROP_PADDING = 4


def num_views(padding: int = CROP_PADDING) -> int:
    """Number of crop+flip views for ``padding``: ``(2·padding + 1)² · 2``."""
    return (2 * padding + 1) ** 2 * 2


def encode_view(dy: Any, dx: Any, flip: Any, padding: int = CROP_PADDING) -> Any:
    """View id of the crop at ``(dy, dx)`` of the padded image, flipped when ``flip`` (ints or tensors)."""
    side = 2 * padding + 1
    if isinstance(flip, Tensor):
        flip = flip.long()
    return (dy * side + dx) * 2 + flip


def decode_view(view: Any, padding: int = CROP_PADDING) -> tuple[Any, Any, Any]:
    """``(dy, dx, flip)`` of a view id (ints or tensors); ``flip`` is 0/1 (a bool tensor for tensors)."""
    side = 2 * padding + 1
    cell = view // 2
    flip = view % 2
    return cell // side, cell % side, (flip.bool() if isinstance(flip, Tensor) else int(flip))


NUM_CROP_FLIP_VIEWS = num_views(CROP_PADDING)
IDENTITY_VIEW = encode_view(CROP_PADDING, CROP_PADDING, 0)


def apply_view(image: Tensor, view: int, padding: int = CROP_PADDING, fill: float = 0.0) -> Tensor:
    """The view ``view`` of one ``[..., H, W]`` image (per-sample reference implementation)."""
    dy, dx, flip = decode_view(int(view), padding)
    out = translate(image, padding - dy, padding - dx, fill) if padding else image
    return out.flip(-1) if flip else out


class RandomCropFlipView:
    """Draw a crop+flip view per sample and apply it; returns ``(image, view_id)``.

    Same randomness as ``RandomTranslate(padding)`` followed by ``RandomHorizontalFlip(p)`` of
    :mod:`kd_lightning.data.transforms` (it consumes torch's global generator identically), so
    numbering the views does not change which images a seed produces.

    Args:
        padding: crop padding (4 for CIFAR).
        p: flip probability.
        enabled: ``False`` always returns the identity view (no augmentation).
        fill: border value, in the image's own scale (0 for ``uint8`` CIFAR).
    """

    def __init__(self, padding: int = CROP_PADDING, p: float = 0.5, enabled: bool = True, fill: float = 0.0) -> None:
        if padding < 0:
            raise KDConfigError(f"padding must be >= 0, got {padding}.")
        self.padding = padding
        self.p = p
        self.enabled = enabled
        self.fill = fill

    def draw(self) -> int:
        """A random view id (the identity view when disabled)."""
        p = self.padding
        if not self.enabled:
            return encode_view(p, p, 0, p)
        dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist() if p else (0, 0)
        flip = int(torch.rand(()).item() < self.p)
        return encode_view(dy, dx, flip, p)

    def __call__(self, image: Tensor) -> tuple[Tensor, int]:
        view = self.draw()
        return apply_view(image, view, self.padding, self.fill), view

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, p={self.p}, enabled={self.enabled}, fill={self.fill})"


class TensorImageViewDataset(TensorImageDataset):
    """:class:`TensorImageDataset` whose items are ``(image, target, index, view)``.

    Args:
        images: ``[N, C, H, W]`` (``uint8`` for CIFAR).
        targets: ``[N]`` class indices.
        view_transform: draws and applies the view, returning ``(image, view)``.
        transform: applied after the view (normalisation).
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor | Sequence[int],
        view_transform: RandomCropFlipView,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(images, targets, transform, return_index=True)
        self.view_transform = view_transform

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image, view = self.view_transform(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index, view


def pad_images(images: Tensor, padding: int = CROP_PADDING, fill: int = 0, channels_last: bool = True) -> Tensor:
    """Pad ``[N, C, H, W]`` images once on both spatial sides; ``[N, H+2p, W+2p, C]`` when ``channels_last``."""
    padded = torch.nn.functional.pad(images, (padding,) * 4, value=fill)
    return padded.permute(0, 2, 3, 1).contiguous() if channels_last else padded


def crop_flip_batch(
    padded: Tensor,
    indices: Tensor,
    dy: Tensor,
    dx: Tensor,
    flip: Tensor,
    size: tuple[int, int],
    channels_last: bool = True,
) -> Tensor:
    """Crop and flip many images of a padded stack in one gather (no per-image Python).

    Args:
        padded: images padded once by :func:`pad_images`: ``[N, H+2p, W+2p, C]`` when
            ``channels_last`` else ``[N, C, H+2p, W+2p]``.
        indices: ``[B]`` rows of ``padded``.
        dy, dx: ``[B]`` crop offsets (top row, left column of the window in the padded image).
        flip: ``[B]`` bool, mirror the crop left-right.
        size: ``(H, W)`` of the crop.
        channels_last: layout of ``padded``; the result is then a channels-last ``[B, C, H, W]``.

    Returns:
        ``[B, C, H, W]`` of ``padded``'s dtype, equal to :func:`apply_view` of each image.
    """
    h, w = size
    device = padded.device
    rows = dy.to(device).long()[:, None] + torch.arange(h, device=device)  # [B, H]
    cols = dx.to(device).long()[:, None] + torch.arange(w, device=device)  # [B, W]
    cols = torch.where(flip.to(device).bool()[:, None], cols.flip(1), cols)
    idx = indices.to(device).long()
    if channels_last:
        channels = torch.arange(padded.shape[-1], device=device)
        out = padded[idx[:, None, None, None], rows[:, :, None, None], cols[:, None, :, None], channels]
        return out.permute(0, 3, 1, 2)  # [B, C, H, W] view with channels-last strides
    channels = torch.arange(padded.shape[1], device=device)
    return padded[
        idx[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]
    ]


@dataclass
class ViewSpace:
    """What a data module tells a logit cache about its enumerated training views.

    Attributes:
        num_samples: rows of the cache (positions ``index`` of the training images).
        num_views: views per image (162 for CIFAR crop+flip).
        views: the view ids the training data can produce (all of them, or the identity view
            without augmentation); a full build computes these.
        identity: JSON-able description of the data and transform for the cache key (data
            module class, a digest of the images and targets, padding, fill, mean/std, encoding
            version).
        render: ``render(indices, views, device) -> float images``: the exact normalised inputs
            of those ``(index, view)`` pairs, as the training loader produces them.
    """

    num_samples: int
    num_views: int
    views: Tensor
    identity: dict[str, Any] = field(default_factory=dict)
    render: Callable[[Tensor, Tensor, torch.device], Tensor] | None = None
