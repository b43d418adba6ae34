"""Generated digits variants: shapes, determinism, the split by source image, the rendering knobs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from kd_lightning.data import DigitsVariantsDataModule
from kd_lightning.data.digits_variants import render_variants
from kd_lightning.errors import KDConfigError

SMALL = {"train_variants": 2, "eval_variants": 1, "size": 12}


def _module(**kwargs) -> DigitsVariantsDataModule:
    dm = DigitsVariantsDataModule(**{**SMALL, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def module() -> DigitsVariantsDataModule:
    return _module()


def test_shapes_sizes_and_normalisation(module) -> None:
    targets = torch.as_tensor(load_digits().target)
    train, val, test = module.split_sources(targets)
    assert len(train) + len(val) + len(test) == 1797
    assert (
        len(module.train_set) == 2 * len(train)
        and len(module.val_set) == len(val)
        and len(module.test_set) == len(test)
    )
    images, labels = module.train_set[0]
    assert tuple(images.shape) == module.input_shape == (1, 12, 12) and isinstance(labels, int)
    batch, batch_targets = next(iter(module.train_dataloader()))
    assert tuple(batch.shape) == (64, 1, 12, 12) and tuple(batch_targets.shape) == (64,)
    stored = module.train_set.images
    assert abs(float(stored.mean())) < 1e-4 and abs(float(stored.std()) - 1) < 1e-3  # training statistics
    assert module.num_classes == 10


def test_split_by_source_image(module) -> None:
    sources = {split: set(module.sources[split].tolist()) for split in ("train", "val", "test")}
    assert not sources["train"] & sources["test"]
    assert not sources["train"] & sources["val"]
    assert not sources["val"] & sources["test"]
    # every split keeps every class, and each variant's label is its source's label
    digits = torch.as_tensor(load_digits().target)
    for split, dataset in (("train", module.train_set), ("val", module.val_set), ("test", module.test_set)):
        assert set(dataset.targets.tolist()) == set(range(10))
        assert torch.equal(dataset.targets, digits[module.sources[split]])


def test_deterministic_and_seeded(module) -> None:
    again = _module()
    for split in ("train_set", "val_set", "test_set"):
        assert torch.equal(getattr(module, split).images, getattr(again, split).images)
    other = _module(variant_seed=1)
    assert not torch.equal(module.test_set.images, other.test_set.images)
    assert torch.equal(module.test_set.targets, other.test_set.targets)  # same split: split_seed is unchanged
    # the variants of one source differ from each other
    n = len(module.train_set) // 2
    assert not torch.equal(module.train_set.images[:n], module.train_set.images[n:])


def test_train_fraction_and_return_index() -> None:
    full = DigitsVariantsDataModule(**SMALL)
    small = DigitsVariantsDataModule(**SMALL, train_fraction=0.25)
    targets = torch.as_tensor(load_digits().target)
    train_full, val_full, test_full = full.split_sources(targets)
    train_small, val_small, test_small = small.split_sources(targets)
    assert torch.equal(val_full, val_small) and torch.equal(test_full, test_small)
    assert set(train_small.tolist()) < set(train_full.tolist())
    assert abs(len(train_small) - 0.25 * len(train_full)) <= 10
    dm = _module(return_index=True, train_fraction=0.1)
    image, _target, index = dm.train_set[5]
    assert int(index) == 5 and image.shape == (1, 12, 12)


def test_identity_rendering_is_the_upsampled_source() -> None:
    """With every knob off, a variant is the source, bicubic-upsampled to the canvas and clamped to [0, 1]."""
    images = torch.as_tensor(load_digits().images[:6], dtype=torch.float32).unsqueeze(1) / 16
    off = {
        "rotation": 0.0, "scale": (1.0, 1.0), "shear": 0.0, "shift": 0.0, "elastic": 0.0, "thickness": 0.0,
        "contrast": (1.0, 1.0), "occlusion": 0.0, "noise": 0.0,
    }  # fmt: skip
    out = render_variants(images, torch.Generator().manual_seed(0), size=32, **off)
    expected = F.interpolate(images, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_knobs_change_the_images() -> None:
    images = torch.as_tensor(load_digits().images[:64], dtype=torch.float32).unsqueeze(1) / 16
    base = render_variants(images, torch.Generator().manual_seed(0), size=16, noise=0.0, occlusion=0.0)
    assert base.shape == (64, 1, 16, 16) and float(base.min()) >= 0 and float(base.max()) <= 1
    noisy = render_variants(images, torch.Generator().manual_seed(0), size=16, noise=0.3, occlusion=0.0)
    assert float((noisy - base).abs().mean()) > 0.1
    bars = render_variants(images, torch.Generator().manual_seed(0), size=16, noise=0.0, occlusion=1.0)
    rows_or_columns_constant = [
        bool((img[0] == img[0, :, :1]).all(1).any() or (img[0] == img[0, :1, :]).all(0).any()) for img in bars
    ]
    assert all(rows_or_columns_constant)  # every image is crossed by a bar of constant value


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "data.init_args.val_fraction"),
        ({"train_fraction": 0.0}, "data.init_args.train_fraction"),
        ({"train_variants": 0}, "data.init_args.train_variants"),
        ({"size": 4}, "data.init_args.size"),
        ({"scale": (0.9, 0.5)}, "data.init_args.scale"),
        ({"contrast": (0.5, 1.5)}, "data.init_args.contrast"),
        ({"occlusion": 2.0}, "data.init_args.occlusion"),
        ({"noise": -0.1}, "data.init_args.noise"),
    ],
)
def test_config_errors_name_the_field(kwargs, field) -> None:
    with pytest.raises(KDConfigError, match=field.replace(".", r"\.")):
        DigitsVariantsDataModule(**kwargs)
