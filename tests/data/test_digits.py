"""Digits data module (scikit-learn's bundled 8x8 digits; offline)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from kd_lightning.data import DigitsDataModule
from kd_lightning.data.transforms import translate
from kd_lightning.errors import KDConfigError


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    raw = load_digits()
    return torch.as_tensor(raw.images, dtype=torch.float32) / 16, torch.as_tensor(raw.target)


def _module(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_defaults() -> None:
    dm = DigitsDataModule()
    assert dm.num_workers == 0 and dm.batch_size == 64
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    assert DigitsDataModule(as_cifar=True).input_shape == (3, 32, 32)


def test_split_sizes_partition_and_stratification(digits) -> None:
    _, targets = digits
    dm = _module()
    train, val, test = dm.split_indices(targets)
    assert len(train) + len(val) + len(test) == 1797
    assert torch.equal(torch.cat([train, val, test]).sort().values, torch.arange(1797))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (len(train), len(val), len(test))
    assert abs(len(val) - 0.2 * 1797) <= 10 and abs(len(test) - 0.2 * 1797) <= 10
    per_class = torch.bincount(targets, minlength=10).float()
    for part in (val, test):
        counts = torch.bincount(targets[part], minlength=10).float()
        assert torch.all((counts - 0.2 * per_class).abs() <= 1.5)
    dm = _module(val_fraction=0.1, test_fraction=0.3)
    assert abs(len(dm.val_set) - 180) <= 10 and abs(len(dm.test_set) - 539) <= 10


def test_split_is_deterministic_and_seeded() -> None:
    a, b, c = _module(), _module(), _module(split_seed=1)
    assert torch.equal(a.test_set.images, b.test_set.images)
    assert torch.equal(a.val_set.targets, b.val_set.targets)
    assert not torch.equal(a.test_set.images, c.test_set.images)


def test_normalisation_uses_train_statistics(digits) -> None:
    images, targets = digits
    dm = _module()
    train, _, test = dm.split_indices(targets)
    assert dm.mean == pytest.approx(float(images[train].mean()), abs=1e-6)
    assert dm.std == pytest.approx(float(images[train].std()), abs=1e-6)
    assert float(dm.train_set.images.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(dm.train_set.images.std()) == pytest.approx(1.0, abs=1e-5)
    # test images: the same pixels, normalised with the train statistics
    assert torch.allclose(dm.test_set.images[:, 0], (images[test] - dm.mean) / dm.std, atol=1e-5)
    assert torch.equal(dm.test_set.targets, targets[test])
    image, target = dm.test_set[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and isinstance(target, int)


def test_as_cifar() -> None:
    dm = _module(as_cifar=True)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and labels.dtype == torch.long
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert float(dm.train_set.images.mean()) == pytest.approx(0.0, abs=1e-5)
    # same split as the 8x8 version
    small = _module()
    assert torch.equal(small.test_set.targets, dm.test_set.targets)
    # 4x downsampling by averaging recovers the 8x8 images up to the upsampling blur
    pooled = nn.functional.avg_pool2d(dm.test_set.images[:, :1] * dm.std + dm.mean, 4)
    raw = small.test_set.images * small.std + small.mean
    assert (pooled - raw).abs().mean() < 0.1


@pytest.mark.parametrize(("as_cifar", "shift"), [(False, 1), (True, 4)])
def test_augment_shifts_training_images_only(as_cifar: bool, shift: int) -> None:
    dm = _module(augment=True, as_cifar=as_cifar)
    torch.manual_seed(0)
    stored = dm.train_set.images[3]
    background = (0 - dm.mean) / dm.std  # the normalised value of a blank pixel
    views = [
        translate(stored, dy, dx, background) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
    ]
    outputs = [dm.train_set[3][0] for _ in range(20)]
    for out in outputs:
        assert any(torch.allclose(out, v) for v in views)
    assert any(not torch.equal(out, stored) for out in outputs)
    assert torch.equal(dm.val_set[3][0], dm.val_set.images[3])
    plain = _module(as_cifar=as_cifar)  # augment=False: training images are served as stored
    assert torch.equal(plain.train_set[3][0], plain.train_set.images[3])


def test_return_index() -> None:
    dm = _module(return_index=True, batch_size=10)
    _x, y, idx = next(iter(dm.train_dataloader()))
    assert idx.shape == (10,) and torch.equal(dm.train_set.targets[idx], y)
    assert len(dm.val_set[0]) == 2


def test_invalid_arguments() -> None:
    with pytest.raises(TypeError, match="val_split"):  # no such option here (val_fraction is); the CLI says so
        DigitsDataModule(val_split=0.1)
    for kwargs, field in (
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
    ):
        with pytest.raises(KDConfigError, match=rf"^data\.init_args\.{field}: ") as info:
            DigitsDataModule(**kwargs)
        assert "test_fraction" in str(info.value) or field == "val_fraction"


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_fits_with_lightning(tmp_path) -> None:
    dm = DigitsDataModule(batch_size=128)
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_Linear(), datamodule=dm)
    assert trainer.callback_metrics["val_acc"] > 0.8
