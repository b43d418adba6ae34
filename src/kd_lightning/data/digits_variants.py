"""Harder, generated variants of scikit-learn's digits: an offline benchmark that does not saturate.

The 1,797 sklearn digits (8x8) saturate at convergence (a 1.4 K-parameter CNN reaches ~98 %, the teacher 99.4 %,
a few errors on the test split), so they cannot rank distillation methods. :class:`DigitsVariantsDataModule`
renders each source image several times on a larger canvas with random rotation, scale, shear, shift, an elastic
warp, stroke-width changes, contrast and brightness, an occluding bar and pixel noise, all drawn from a generator
seeded by ``variant_seed`` (the same seed gives the same images, bit for bit). The split is by *source image*:
the test variants come from images never seen, in any variant, in training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from kd_lightning.data.base import KDDataModule, TensorImageDataset, stratified_split
from kd_lightning.data.digits import load_sklearn_digits
from kd_lightning.errors import KDConfigError

__all__ = ["DigitsVariantsDataModule", "render_variants"]


def _smooth_field(n: int, size: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """A smooth random 2-D displacement field ``[n, size, size, 2]`` in ``[-1, 1]`` units (max-normalised)."""
    coarse = torch.rand(n, 2, grid, grid, generator=generator) * 2 - 1
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


def render_variants(
    images: torch.Tensor,
    generator: torch.Generator,
    size: int = 12,
    rotation: float = 20.0,
    scale: tuple[float, float] = (0.6, 0.9),
    shear: float = 0.2,
    shift: float = 0.15,
    elastic: float = 0.05,
    thickness: float = 0.3,
    contrast: tuple[float, float] = (0.5, 1.0),
    occlusion: float = 0.3,
    noise: float = 0.08,
) -> torch.Tensor:
    """One random variant of each image: ``[N, 1, h, w]`` in ``[0, 1]`` -> ``[N, 1, size, size]`` in ``[0, 1]``.

    Args:
        images: source images, values in ``[0, 1]`` (background 0).
        generator: the random generator (all randomness comes from it, in a fixed order).
        size: side of the output canvas in pixels.
        rotation: maximum rotation in degrees (uniform in ``[-rotation, rotation]``).
        scale: range of the digit's size as a fraction of the canvas.
        shear: maximum shear factor (uniform in ``[-shear, shear]``).
        shift: maximum shift of the digit's centre, as a fraction of the canvas half-width.
        elastic: amplitude of the smooth elastic displacement, as a fraction of the canvas half-width.
        thickness: maximum stroke-width change: a random power ``γ ∈ [1 - thickness, 1 + thickness]`` of the
            blurred-up image (< 1 thickens, > 1 thins).
        contrast: range of the digit's contrast (ink intensity) over a random background level.
        occlusion: probability that a random bar (background-coloured or ink-coloured) crosses the image.
        noise: standard deviation of the Gaussian pixel noise (values clipped to ``[0, 1]`` afterwards).
    """
    n = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    angle = uniform(-rotation, rotation) * math.pi / 180
    zoom = uniform(*scale)
    sx, sy = uniform(-shear, shear), uniform(-shear, shear)
    tx, ty = uniform(-shift, shift), uniform(-shift, shift)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output coordinates -> source coordinates (normalised [-1, 1]): inverse of zoom·rotate·shear, then shift.
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n, 2, 2]
    shear_m = torch.stack([torch.stack([torch.ones(n), sx], -1), torch.stack([sy, torch.ones(n)], -1)], -2)  # [n, 2, 2]
    linear = torch.linalg.inv(rot @ shear_m) / zoom[:, None, None]
    translation = -(linear @ torch.stack([tx, ty], -1)[:, :, None])[:, :, 0]
    theta = torch.cat([linear, translation[:, :, None]], -1)  # [n, 2, 3]
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    grid = grid + elastic * _smooth_field(n, size, 4, generator) / zoom[:, None, None, None]
    # Sample a smooth 4x upsampled source (bilinear on 8x8 would show the pixel grid).
    source = F.interpolate(images.float(), scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = uniform(1 - thickness, 1 + thickness)[:, None, None, None]
    out = out.clamp(0, 1) ** gamma
    # Contrast and background level.
    ink = uniform(*contrast)[:, None, None, None]
    background = uniform(0.0, 1.0 - contrast[0])[:, None, None, None] * (1 - ink).clamp(min=0)
    out = background + ink * out
    # An occluding bar: horizontal or vertical, 2..size/4 pixels thick, background- or ink-coloured.
    occluded = torch.rand(n, generator=generator) < occlusion
    vertical = torch.rand(n, generator=generator) < 0.5
    width = 2 + (torch.rand(n, generator=generator) * max(1, size // 4 - 1)).long()
    start = (torch.rand(n, generator=generator) * (size - width)).long()
    inked = torch.rand(n, generator=generator) < 0.5
    lines = torch.arange(size)
    band = (lines[None, :] >= start[:, None]) & (lines[None, :] < (start + width)[:, None])  # [n, size]
    mask = torch.where(vertical[:, None, None], band[:, None, :], band[:, :, None]) & occluded[:, None, None]
    fill = torch.where(inked[:, None, None, None], background + ink, background).expand_as(out)
    out = torch.where(mask[:, None], fill, out)
    out = out + noise * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1).contiguous()


class DigitsVariantsDataModule(KDDataModule):
    """Generated variants of the sklearn digits, split by source image; offline and deterministic.

    The 1,797 source images are split once into train / validation / test *sources*, stratified by class
    (``val_fraction``, ``test_fraction`` of all sources; ``train_fraction`` keeps only that share of the
    training sources). Each source is rendered ``train_variants`` (training) or ``eval_variants`` (validation,
    test) times by :func:`render_variants` with a generator seeded by ``variant_seed`` and the split, so the
    training variants of a source never appear in evaluation and no test variant comes from a training source.
    Images are ``1 x size x size``, normalised with the mean and std of the training part.

    Args:
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``batch_size``,
            ``split_seed``, ``meta_split``, ...).
        num_workers: DataLoader worker processes (0: the images are in memory).
        val_fraction: share of the sources used for validation, in ``(0, 1)``.
        test_fraction: share of the sources used for testing, in ``(0, 1)``.
        train_fraction: share of the remaining training sources that is kept, in ``(0, 1]``.
        train_variants: rendered variants of each training source.
        eval_variants: rendered variants of each validation and test source.
        variant_seed: seed of the rendering (independent of ``split_seed`` and of the training seed).
        size: side of the rendered images in pixels.
        rotation, scale, shear, shift, elastic, thickness, contrast, occlusion, noise: the difficulty knobs of
            :func:`render_variants`.
        return_index: training samples become ``(image, target, index)`` (CRD's memory bank).
    """

    num_classes = 10

    def __init__(
        self,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        train_fraction: float = 1.0,
        train_variants: int = 8,
        eval_variants: int = 4,
        variant_seed: int = 0,
        size: int = 12,
        rotation: float = 20.0,
        scale: tuple[float, float] = (0.6, 0.9),
        shear: float = 0.2,
        shift: float = 0.15,
        elastic: float = 0.05,
        thickness: float = 0.3,
        contrast: tuple[float, float] = (0.5, 1.0),
        occlusion: float = 0.3,
        noise: float = 0.08,
        return_index: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_workers=num_workers, **kwargs)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise KDConfigError(
                "val_fraction",
                f"val_fraction and test_fraction must each be in (0, 1) and sum to less than 1, got {val_fraction} "
                f"and {test_fraction}",
                "e.g. 0.2 and 0.2",
            )
        if not 0 < train_fraction <= 1:
            raise KDConfigError("train_fraction", f"must be in (0, 1], got {train_fraction}", "e.g. 1.0 or 0.25")
        for name, value in (("train_variants", train_variants), ("eval_variants", eval_variants)):
            if value < 1:
                raise KDConfigError(name, f"must be >= 1, got {value}", "render each source at least once")
        if size < 8:
            raise KDConfigError("size", f"must be >= 8 pixels, got {size}", "e.g. 12")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise KDConfigError(
                "scale", f"must be [low, high] with 0 < low <= high, got {list(scale)}", "e.g. [0.6, 0.9]"
            )
        if len(contrast) != 2 or not 0 < contrast[0] <= contrast[1] <= 1:
            raise KDConfigError(
                "contrast", f"must be [low, high] with 0 < low <= high <= 1, got {list(contrast)}", "e.g. [0.5, 1.0]"
            )
        if not 0 <= thickness < 1:
            raise KDConfigError("thickness", f"must be in [0, 1), got {thickness}", "e.g. 0.5")
        if not 0 <= occlusion <= 1:
            raise KDConfigError("occlusion", f"is a probability, got {occlusion}", "use a value in [0, 1]")
        for name, value in (("rotation", rotation), ("shear", shear), ("shift", shift), ("elastic", elastic),
                            ("noise", noise)):  # fmt: skip
            if value < 0:
                raise KDConfigError(name, f"must be >= 0, got {value}", "use 0 to switch it off")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_fraction = train_fraction
        self.train_variants = train_variants
        self.eval_variants = eval_variants
        self.variant_seed = variant_seed
        self.size = size
        self.render_args: dict[str, Any] = {
            "size": size,
            "rotation": rotation,
            "scale": (float(scale[0]), float(scale[1])),
            "shear": shear,
            "shift": shift,
            "elastic": elastic,
            "thickness": thickness,
            "contrast": (float(contrast[0]), float(contrast[1])),
            "occlusion": occlusion,
            "noise": noise,
        }
        self.return_index = return_index
        self.input_shape = (1, size, size)
        self.classes = [str(i) for i in range(10)]
        self.mean: float | None = None
        self.std: float | None = None
        #: source-image index (into ``load_digits()``) of every sample of each split, after :meth:`setup`
        self.sources: dict[str, torch.Tensor] = {}

    def prepare_data(self) -> None:
        """Nothing to do: the sources ship with scikit-learn and the variants are generated."""

    def split_sources(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Source indices of the train, validation and test parts (stratified, fixed by ``split_seed``)."""
        rest, test = stratified_split(targets, self.test_fraction, self.split_seed)
        train_pos, val_pos = stratified_split(
            targets[rest], self.val_fraction / (1 - self.test_fraction), self.split_seed + 1
        )
        train = rest[train_pos]
        if self.train_fraction < 1:
            _dropped, kept = stratified_split(targets[train], self.train_fraction, self.split_seed + 2)
            train = train[kept]
        return train, rest[val_pos], test

    def render(self, images: torch.Tensor, variants: int, stream: int) -> torch.Tensor:
        """``variants`` renderings of ``images`` (``[variants * N, 1, size, size]``, variant-major), deterministic."""
        generator = torch.Generator().manual_seed(self.variant_seed * 1000 + stream)
        return torch.cat([render_variants(images, generator, **self.render_args) for _ in range(variants)])

    def setup(self, stage: str | None = None) -> None:
        """Load the sources, split them, render the variants and build the (normalised) datasets."""
        if self.train_set is not None:
            return
        images, targets = load_sklearn_digits()
        parts = dict(zip(("train", "val", "test"), self.split_sources(targets), strict=True))
        rendered: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for stream, (split, idx) in enumerate(parts.items()):
            variants = self.train_variants if split == "train" else self.eval_variants
            rendered[split] = (self.render(images[idx], variants, stream), targets[idx].repeat(variants))
            self.sources[split] = idx.repeat(variants)
        train_images = rendered["train"][0]
        self.mean = float(train_images.mean())
        self.std = float(train_images.std())

        def normalise(x: torch.Tensor) -> torch.Tensor:
            return ((x - self.mean) / self.std).contiguous()

        self.train_set = TensorImageDataset(
            normalise(train_images), rendered["train"][1], return_index=self.return_index
        )
        self.val_set = TensorImageDataset(normalise(rendered["val"][0]), rendered["val"][1])
        self.test_set = TensorImageDataset(normalise(rendered["test"][0]), rendered["test"][1])
