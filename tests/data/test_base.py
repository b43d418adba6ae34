"""Tests of the shared data helpers: the base module, the stratified split, datasets, transforms."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data import KDDataModule, stratified_split
from kd_lightning.data.base import TensorImageDataset, TransformedSubset
from kd_lightning.data.transforms import Compose, RandomHorizontalFlip, RandomTranslate, ToFloatNormalize, translate

# ------------------------------------------------------------------ stratified_split


def test_stratified_split_is_a_partition_with_per_class_fractions() -> None:
    targets = torch.arange(100) % 4  # 25 per class
    kept, held = stratified_split(targets, 0.2, seed=0)
    assert torch.equal(torch.sort(torch.cat([kept, held])).values, torch.arange(100))
    assert kept.dtype == held.dtype == torch.long
    assert torch.all(kept[1:] > kept[:-1]) and torch.all(held[1:] > held[:-1])  # sorted, unique
    assert torch.bincount(targets[held], minlength=4).tolist() == [5, 5, 5, 5]


def test_stratified_split_is_deterministic_and_seeded() -> None:
    targets = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(1))
    a = stratified_split(targets, 0.3, seed=7)
    b = stratified_split(targets.tolist(), 0.3, seed=7)  # a list works too
    c = stratified_split(targets, 0.3, seed=8)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    targets = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    kept, held = stratified_split(targets, 0.05, seed=0)  # round(0.05 * n) == 0 for every class
    assert set(targets[held].tolist()) == {0, 1, 3}  # class 2 has a single item: stays in kept
    kept, held = stratified_split(targets, 0.9, seed=0)  # round(0.9 * 2) == 2 would empty class 0
    assert set(targets[kept].tolist()) == {0, 1, 2, 3}


def test_stratified_split_fraction_zero_and_invalid() -> None:
    kept, held = stratified_split([0, 1, 0, 1], 0.0, seed=0)
    assert kept.tolist() == [0, 1, 2, 3] and held.numel() == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="fraction"):
            stratified_split([0, 1], bad, seed=0)


# ------------------------------------------------------------------ KDDataModule


class _Tiny(KDDataModule):
    num_classes = 2
    input_shape = (1, 2, 2)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorImageDataset(torch.zeros(5, 1, 2, 2), [0, 1, 0, 1, 0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"meta_split": 1.0}, "meta_split"),
        ({"meta_split": -0.1}, "meta_split"),
        ({"meta_batch_size": 0}, "meta_batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_base_validates_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _Tiny(**kwargs)


def test_base_loaders() -> None:
    dm = _Tiny(batch_size=2, num_workers=0)
    assert dm.eval_batch_size == 2
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 3
    with pytest.raises(RuntimeError, match="validation set"):
        dm.val_dataloader()
    dm = _Tiny(batch_size=2, num_workers=0, drop_last=True)
    dm.setup()
    assert len(dm.train_dataloader()) == 2


# ------------------------------------------------------------------ datasets


def test_tensor_image_dataset() -> None:
    images = torch.arange(6 * 4, dtype=torch.uint8).reshape(6, 1, 2, 2)
    ds = TensorImageDataset(images, torch.tensor([0, 1, 2, 0, 1, 2]), transform=lambda x: x.float() + 1)
    image, target = ds[4]
    assert torch.equal(image, images[4].float() + 1) and target == 1 and isinstance(target, int)
    ds = TensorImageDataset(images, [0, 1, 2, 0, 1, 2], return_index=True)
    assert ds[3][2] == 3 and len(ds) == 6
    _x, y, idx = next(iter(torch.utils.data.DataLoader(ds, batch_size=6)))
    assert idx.tolist() == list(range(6)) and y.dtype == torch.long
    with pytest.raises(ValueError, match="N targets"):
        TensorImageDataset(images, [0, 1])


def test_transformed_subset() -> None:
    base = TensorImageDataset(torch.arange(5, dtype=torch.float32).reshape(5, 1, 1, 1), [0, 1, 0, 1, 0])
    sub = TransformedSubset(base, [4, 1], transform=lambda x: x * 10, return_index=True)
    assert len(sub) == 2
    assert sub.targets.tolist() == [0, 1]
    image, target, index = sub[1]
    assert image.item() == 10.0 and target == 1 and index == 1
    assert len(TransformedSubset(base)) == 5


# ------------------------------------------------------------------ transforms


def test_translate_by_hand() -> None:
    x = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]).unsqueeze(0)
    assert translate(x, 1, 0).tolist() == [[[0, 0, 0], [1, 2, 3], [4, 5, 6]]]
    assert translate(x, 0, -1, fill=-1).tolist() == [[[2, 3, -1], [5, 6, -1], [8, 9, -1]]]
    assert translate(x, -1, 2).tolist() == [[[0, 0, 4], [0, 0, 7], [0, 0, 0]]]
    assert translate(x, 3, 0).eq(0).all()


def test_random_translate_matches_random_crop_distribution() -> None:
    torch.manual_seed(0)
    x = torch.randint(1, 255, (3, 6, 6), dtype=torch.uint8)
    views = {(dy, dx): translate(x, dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    seen = set()
    transform = RandomTranslate(padding=2)
    for _ in range(400):
        out = transform(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        match = [k for k, v in views.items() if torch.equal(v, out)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 25  # every offset in -2..2 on both axes shows up
    assert RandomTranslate(0)(x) is x
    with pytest.raises(ValueError):
        RandomTranslate(-1)


def test_flip_normalize_compose() -> None:
    x = torch.arange(4.0).reshape(1, 1, 4)
    assert torch.equal(RandomHorizontalFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)
    constant = torch.full((3, 2, 2), 51, dtype=torch.uint8)
    out = ToFloatNormalize((0.1, 0.2, 0.3), (0.5, 0.25, 0.1))(constant)
    assert out.dtype == torch.float32
    expected = [(0.2 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (0.2 - 0.3) / 0.1]  # 51 / 255 = 0.2
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(ToFloatNormalize(0.5, 0.5)(torch.ones(1, 2, 2)), torch.ones(1, 2, 2))
    with pytest.raises(ValueError):
        ToFloatNormalize(0.0, 0.0)
    pipeline = Compose([RandomHorizontalFlip(p=1.0), ToFloatNormalize(0.0, 1.0)])
    assert torch.equal(pipeline(x), x.flip(-1))
    assert "RandomHorizontalFlip" in repr(pipeline)


# ------------------------------------------------------------------ hold_out
def test_hold_out_is_stratified_disjoint_and_stable() -> None:
    from kd_lightning.data import DigitsDataModule
    from kd_lightning.data.base import targets_of

    dm = DigitsDataModule()
    dm.setup("fit")
    n_train = len(dm.train_set)
    full_targets = targets_of(dm.train_set)
    held = dm.hold_out(0.1)
    assert len(held) + len(dm.train_set) == n_train
    assert set(held.indices).isdisjoint(dm.train_set.indices)
    held_counts = torch.bincount(targets_of(held), minlength=10)
    full_counts = torch.bincount(full_targets, minlength=10)
    assert torch.all((held_counts - 0.1 * full_counts).abs() <= 1)
    assert dm.hold_out(0.1) is held  # idempotent
    with pytest.raises(ValueError, match="fraction: must be in"):
        dm.hold_out(1.0)
