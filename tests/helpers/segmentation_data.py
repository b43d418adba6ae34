"""In-memory synthetic segmentation data in the fixed batch convention: ``(images, masks)``.

Images ``[B, 3, H, W]`` float32 normalised with the ImageNet mean/std; masks ``[B, H, W]`` int64 trainIds
``0..C-1`` with 255 (ignore) on a one-pixel ring around every shape (like VOC boundaries). Class 0 is the
background; each image holds a few rectangles and discs of classes ``1..C-1``, each class with its own colour,
on a noisy background. Deterministic by seed; nothing is written to disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from kd_lightning.data.base import KDDataModule

IGNORE = 255
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
#: Class colours (RGB in [0, 1]); class 0 is the background.
PALETTE = torch.tensor(
    [
        [0.5, 0.5, 0.5],
        [0.9, 0.1, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.2, 0.9],
        [0.9, 0.9, 0.1],
        [0.8, 0.1, 0.8],
        [0.1, 0.9, 0.9],
        [1.0, 0.6, 0.2],
    ]
)


def make_scenes(
    n: int,
    num_classes: int = 4,
    size: int = 64,
    shapes: tuple[int, int] = (2, 4),
    noise: float = 0.15,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    ignore_ring: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes: ``(images [n, 3, size, size] normalised, masks [n, size, size] int64)``.

    Args:
        n: images.
        num_classes: classes including the background 0 (at most ``len(PALETTE)``).
        size: height and width.
        shapes: (min, max) shapes per image.
        noise: standard deviation of the pixel noise.
        seed: seed of everything.
        classes: foreground classes drawn (default ``1..num_classes-1``); others never appear.
        ignore_ring: label the one-pixel boundary of every shape 255.
    """
    if num_classes > len(PALETTE):
        raise ValueError(f"at most {len(PALETTE)} classes")
    g = torch.Generator().manual_seed(seed)
    drawn = list(classes) if classes is not None else list(range(1, num_classes))
    masks = torch.zeros(n, size, size, dtype=torch.long)
    rows = torch.arange(size).view(-1, 1)
    cols = torch.arange(size).view(1, -1)
    for i in range(n):
        count = int(torch.randint(shapes[0], shapes[1] + 1, (1,), generator=g))
        for _ in range(count):
            cls = drawn[int(torch.randint(len(drawn), (1,), generator=g))]
            extent = int(torch.randint(size // 8, size // 3, (1,), generator=g))
            cy, cx = torch.randint(extent // 2, size - extent // 2, (2,), generator=g).tolist()
            if bool(torch.rand(1, generator=g) < 0.5):
                inside = ((rows - cy).abs() <= extent // 2) & ((cols - cx).abs() <= extent // 2)
            else:
                inside = (rows - cy) ** 2 + (cols - cx) ** 2 <= (extent // 2) ** 2
            masks[i][inside] = cls
    colours = PALETTE[masks].permute(0, 3, 1, 2)
    images = (colours + noise * torch.randn(colours.shape, generator=g)).clamp(0, 1)
    images = (images - MEAN) / STD
    if ignore_ring:
        m = masks.unsqueeze(1).float()
        high = F.max_pool2d(m, 3, stride=1, padding=1)
        low = -F.max_pool2d(-m, 3, stride=1, padding=1)
        masks[(high != low).squeeze(1)] = IGNORE
    return images.float(), masks


class SyntheticSegmentationData(KDDataModule):
    """Shapes on a noisy background (see :func:`make_scenes`): a segmentation data module without files.

    Exposes ``num_classes``, ``ignore_index = 255``, ``class_names``, ``task = "segmentation"`` and
    ``input_shape = (3, size, size)``.
    """

    task = "segmentation"
    ignore_index = IGNORE

    def __init__(
        self,
        num_classes: int = 4,
        size: int = 64,
        train_size: int = 64,
        val_size: int = 16,
        test_size: int = 16,
        noise: float = 0.15,
        seed: int = 0,
        classes: Sequence[int] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=False, **kwargs)
        self.num_classes = num_classes
        self.size = size
        self.sizes = (train_size, val_size, test_size)
        self.noise = noise
        self.seed = seed
        self.classes = classes
        self.input_shape = (3, size, size)
        self.class_names = ["background", *(f"shape {c}" for c in range(1, num_classes))]

    def setup(self, stage: str) -> None:
        sets = []
        for offset, n in enumerate(self.sizes):
            images, masks = make_scenes(
                n, self.num_classes, self.size, noise=self.noise, seed=self.seed + offset, classes=self.classes
            )
            sets.append(TensorDataset(images, masks))
        self.train_set, self.val_set, self.test_set = sets
