"""An in-memory synthetic detection set in the detection batch convention: coloured squares and discs of K classes
on noisy canvases, deterministic by seed, no files."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.base import KDDataModule

#: One colour per class (RGB in [0, 1]); even classes are squares, odd classes discs.
COLOURS = [(0.9, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.2, 0.9), (0.9, 0.9, 0.1), (0.8, 0.1, 0.8), (0.1, 0.9, 0.9)]


def detection_collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``[(image, target), ...]`` → ``(list of images, list of targets)``."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class ShapesDetection(Dataset):
    """``n`` canvases of ``size``x``size`` with 1..``max_objects`` non-overlapping shapes each.

    Targets: ``boxes`` float32 xyxy pixels, ``labels`` int64 1..K, ``image_id``, ``area`` (the shape's pixel count,
    like a COCO segmentation area), ``iscrowd`` (the first box of every ``crowd_every``-th image is a crowd region
    when ``crowd_every > 0``).
    """

    def __init__(
        self,
        n: int = 32,
        num_classes: int = 3,
        size: int = 64,
        max_objects: int = 3,
        sides: tuple[int, int] = (12, 28),
        noise: float = 0.08,
        seed: int = 0,
        crowd_every: int = 0,
    ) -> None:
        if num_classes > len(COLOURS):
            raise ValueError(f"at most {len(COLOURS)} classes")
        g = torch.Generator().manual_seed(seed)
        self.items: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        for index in range(n):
            image = (0.45 + noise * torch.randn(3, size, size, generator=g)).clamp(0, 1)
            boxes, labels, areas = [], [], []
            count = int(torch.randint(1, max_objects + 1, (1,), generator=g))
            for _ in range(count * 10):  # rejection sampling of non-overlapping boxes
                if len(boxes) == count:
                    break
                side = int(torch.randint(sides[0], sides[1] + 1, (1,), generator=g))
                x0, y0 = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
                box = (x0, y0, x0 + side, y0 + side)
                if any(not (box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]) for b in boxes):
                    continue
                cls = int(torch.randint(0, num_classes, (1,), generator=g))
                if cls % 2 == 0:
                    mask = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
                else:
                    r = side / 2
                    mask = (xx + 0.5 - x0 - r) ** 2 + (yy + 0.5 - y0 - r) ** 2 <= r**2
                colour = torch.tensor(COLOURS[cls]).view(3, 1, 1)
                image = torch.where(mask, (colour + 0.05 * torch.randn(3, 1, 1, generator=g)).clamp(0, 1), image)
                boxes.append(box)
                labels.append(cls + 1)
                areas.append(float(mask.sum()))
            crowd = torch.zeros(len(boxes), dtype=torch.int64)
            if crowd_every and index % crowd_every == 0:
                crowd[0] = 1
            self.items.append(
                (
                    image.float(),
                    {
                        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64),
                        "image_id": torch.tensor(index, dtype=torch.int64),
                        "area": torch.tensor(areas, dtype=torch.float32),
                        "iscrowd": crowd,
                    },
                )
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.items[index]


class ShapesDataModule(KDDataModule):
    """:class:`ShapesDetection` splits (train/val/test from different seeds) with the detection collate."""

    task = "detection"

    def __init__(
        self,
        num_classes: int = 3,
        train_size: int = 32,
        val_size: int = 16,
        size: int = 64,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        self.num_classes = num_classes
        self.class_names = ["square_red", "disc_green", "square_blue", "disc_yellow", "square_pink", "disc_cyan"][
            :num_classes
        ]
        self.category_ids = list(range(1, num_classes + 1))
        self.input_shape = (3, size, size)
        self.train_size, self.val_size, self.size, self.seed = train_size, val_size, size, seed

    def setup(self, stage: str | None = None) -> None:
        common = {"num_classes": self.num_classes, "size": self.size}
        self.train_set = ShapesDetection(self.train_size, seed=self.seed, **common)
        self.val_set = ShapesDetection(self.val_size, seed=self.seed + 1, crowd_every=4, **common)
        self.test_set = ShapesDetection(self.val_size, seed=self.seed + 2, **common)

    def _loader(self, dataset: Dataset | None, split: str, train: bool) -> DataLoader:
        assert dataset is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            collate_fn=detection_collate,
            generator=generator if train else None,
        )
