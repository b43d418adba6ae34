"""A generated, shifted "web" set for the digits task: distillation data unlike the teacher's (offline KD³).

KD³ (Tang et al., ICCV 2023) distils with images collected from the web for the task's class names: some look
like the task's data, many are shifted in style (cartoons, sketches) and some show other things entirely.
:func:`render_web` makes such a set from scikit-learn's digits, deterministically (one seeded generator):

- ``inverted``: white background, dark strokes (``1 - x``);
- ``sketch``: stroke outlines only (gradient magnitude of the image);
- ``noisy``: the digit under heavy Gaussian pixel noise;
- ``rotated``: turned by 90°, 180° or 270° or mirrored (a digit seen in another pose);
- ``blend``: two digits of different classes averaged (an image of no single class);
- ``clutter``: random strokes and blobs, no digit at all (out of distribution).

:class:`DigitsWebDataModule` serves them labelled by **kind** (``classes`` are the kind names), so analyses can
ask which kinds a method keeps; :class:`~kd_lightning.data.transfer.TransferSetDataModule` drops those labels.
The renderings are made from the digits task's *training* split only (never its validation or test images) and
are normalised with that split's mean and std, like the task's own inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kd_lightning.data.base import KDDataModule, TensorImageDataset
from kd_lightning.data.digits import DigitsDataModule, load_sklearn_digits
from kd_lightning.errors import KDConfigError

__all__ = ["WEB_KINDS", "DigitsWebDataModule", "render_web"]

#: The kinds of web image, in label order.
WEB_KINDS = ("inverted", "sketch", "noisy", "rotated", "blend", "clutter")


def _sketch(images: torch.Tensor) -> torch.Tensor:
    gy = images[..., 1:, :] - images[..., :-1, :]
    gx = images[..., :, 1:] - images[..., :, :-1]
    magnitude = F.pad(gy.abs(), (0, 0, 0, 1)) + F.pad(gx.abs(), (0, 1, 0, 0))
    return (magnitude / magnitude.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-6)).clamp(0, 1)


def _rotated(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    pose = torch.randint(0, 4, (len(images),), generator=generator)  # 90, 180, 270 degrees, mirror
    out = images.clone()
    for p in range(4):
        chosen = pose == p
        if chosen.any():
            block = images[chosen]
            out[chosen] = block.flip(-1) if p == 3 else torch.rot90(block, p + 1, dims=(-2, -1))
    return out


def _clutter(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random strokes (lines between random points) and blobs on a dark background."""
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.zeros(n, 1, size, size)
    for _ in range(3):
        p0 = torch.rand(n, 2, generator=generator) * (size - 1)
        p1 = torch.rand(n, 2, generator=generator) * (size - 1)
        d = p1 - p0
        length2 = (d**2).sum(-1).clamp(min=1e-6)
        # Distance of every pixel to the segment p0-p1.
        t = (
            ((xs[None] - p0[:, 0, None, None]) * d[:, 0, None, None])
            + ((ys[None] - p0[:, 1, None, None]) * d[:, 1, None, None])
        ) / length2[:, None, None]
        t = t.clamp(0, 1)
        px = p0[:, 0, None, None] + t * d[:, 0, None, None]
        py = p0[:, 1, None, None] + t * d[:, 1, None, None]
        dist = ((xs[None] - px) ** 2 + (ys[None] - py) ** 2).sqrt()
        out = torch.maximum(out, (1 - dist / 0.9).clamp(0, 1)[:, None])
    centre = torch.rand(n, 2, generator=generator) * (size - 1)
    radius = 0.5 + torch.rand(n, generator=generator) * size / 4
    blob = ((xs[None] - centre[:, 0, None, None]) ** 2 + (ys[None] - centre[:, 1, None, None]) ** 2).sqrt()
    out = torch.maximum(out, (radius[:, None, None] - blob).clamp(0, 1)[:, None])
    return out


def render_web(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_images: int,
    mix: dict[str, float],
    generator: torch.Generator,
    noise: float = 0.45,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` web images ``[N, 1, h, w]`` in ``[0, 1]`` and their kind index (position in :data:`WEB_KINDS`).

    Args:
        images: source digits ``[M, 1, h, w]`` in ``[0, 1]``.
        targets: their classes ``[M]`` (only used to blend two digits of *different* classes).
        num_images: images to make.
        mix: share of each kind (normalised to sum 1; kinds left out get none).
        generator: all randomness comes from it.
        noise: standard deviation of the ``noisy`` kind's pixel noise.
    """
    unknown = sorted(set(mix) - set(WEB_KINDS))
    if unknown:
        raise KDConfigError("data.init_args.mix", f"unknown kinds {unknown}", f"kinds: {', '.join(WEB_KINDS)}")
    if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise KDConfigError("data.init_args.mix", "shares must be >= 0 and not all 0", "e.g. {inverted: 1, clutter: 1}")
    total = sum(mix.values())
    counts = [math.floor(num_images * mix.get(k, 0.0) / total) for k in WEB_KINDS]
    for i in sorted(range(len(WEB_KINDS)), key=lambda i: -mix.get(WEB_KINDS[i], 0.0))[: num_images - sum(counts)]:
        counts[i] += 1
    size = images.shape[-1]
    parts, kinds = [], []
    for kind_index, (kind, n) in enumerate(zip(WEB_KINDS, counts, strict=True)):
        if n == 0:
            continue
        pick = torch.randint(0, len(images), (n,), generator=generator)
        base = images[pick]
        if kind == "inverted":
            out = 1 - base
        elif kind == "sketch":
            out = _sketch(base)
        elif kind == "noisy":
            out = (base + noise * torch.randn(base.shape, generator=generator)).clamp(0, 1)
        elif kind == "rotated":
            out = _rotated(base, generator)
        elif kind == "blend":
            other = torch.randint(0, len(images), (n,), generator=generator)
            same = targets[other] == targets[pick]
            other[same] = torch.randint(0, len(images), (int(same.sum()),), generator=generator)  # mostly differs
            out = 0.5 * (base + images[other])
        else:
            out = _clutter(n, size, generator)
        parts.append(out)
        kinds.append(torch.full((n,), kind_index, dtype=torch.long))
    order = torch.randperm(num_images, generator=generator)
    return torch.cat(parts)[order].contiguous(), torch.cat(kinds)[order]


class DigitsWebDataModule(KDDataModule):
    """A shifted "web" set rendered from the digits task's training split, labelled by kind (see module doc).

    Args:
        num_images: training images to render (validation: a quarter of that, from another generator stream).
        mix: share of each kind (:data:`WEB_KINDS`).
        web_seed: seed of the rendering.
        noise: pixel-noise level of the ``noisy`` kind.
        val_fraction, test_fraction: the digits task's split (must equal the task's, so the renderings come
            from its training images only).
        **kwargs: the shared arguments (``batch_size``, ``split_seed`` of the digits split, ...).
    """

    def __init__(
        self,
        num_images: int = 3000,
        mix: dict[str, float] | None = None,
        web_seed: int = 0,
        noise: float = 0.45,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_workers=num_workers, **kwargs)
        if num_images < 1:
            raise KDConfigError("data.init_args.num_images", f"must be >= 1, got {num_images}")
        self.num_images = num_images
        self.mix = dict(mix) if mix is not None else {k: 1.0 for k in WEB_KINDS}
        self.web_seed = web_seed
        self.noise = noise
        self.digits = DigitsDataModule(
            val_fraction=val_fraction, test_fraction=test_fraction, split_seed=self.split_seed
        )
        self.classes = list(WEB_KINDS)
        self.num_classes = len(WEB_KINDS)
        self.input_shape = (1, 8, 8)

    def prepare_data(self) -> None:
        """Nothing to fetch: rendered from scikit-learn's digits."""

    def data_identity(self) -> dict[str, Any]:
        return {"web": [self.num_images, sorted(self.mix.items()), self.web_seed, self.noise]}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, targets = load_sklearn_digits()
        train_idx, _, _ = self.digits.split_indices(targets)
        source, source_targets = images[train_idx], targets[train_idx]
        mean, std = float(source.mean()), float(source.std())  # the task's normalisation (DigitsDataModule's)
        generator = torch.Generator().manual_seed(self.web_seed)
        train, train_kinds = render_web(source, source_targets, self.num_images, self.mix, generator, self.noise)
        val, val_kinds = render_web(
            source, source_targets, max(1, self.num_images // 4), self.mix, generator, self.noise
        )
        self.train_set = TensorImageDataset((train - mean) / std, train_kinds)
        self.val_set = TensorImageDataset((val - mean) / std, val_kinds)
        self.test_set = self.val_set
