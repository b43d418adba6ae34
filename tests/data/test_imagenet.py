"""ImageNet data module on tiny fake JPEG trees (ImageFolder and torchvision layouts)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from kd_lightning.data import ImageNetDataModule
from kd_lightning.errors import DatasetNotFoundError, KDConfigError
from tests.data_generators import FakeImageNet, write_fake_imagenet

SMALL = {"num_classes": 3, "image_size": 32, "resize_size": 36, "num_workers": 0}


@pytest.fixture(scope="module", params=["imagefolder", "torchvision"])
def fake(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FakeImageNet:
    return write_fake_imagenet(tmp_path_factory.mktemp(request.param), layout=request.param)


def _module(root: Path, **kwargs) -> ImageNetDataModule:
    dm = ImageNetDataModule(root=str(root), **{**SMALL, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_both_layouts(fake: FakeImageNet) -> None:
    dm = _module(fake.root, batch_size=5)
    assert dm.layout == ("torchvision" if (fake.root / "meta.bin").exists() else "imagefolder")
    base = dm.train_set.dataset
    if dm.layout == "torchvision":
        assert isinstance(base, torchvision.datasets.ImageNet)
    else:
        assert type(base) is torchvision.datasets.ImageFolder
    assert dm.classes == fake.wnids and dm.input_shape == (3, 32, 32)
    assert len(dm.train_set) == fake.n_train and len(dm.test_set) == fake.n_val
    assert dm.val_set is dm.test_set
    images, targets = next(iter(dm.train_dataloader()))
    assert type(images) is torch.Tensor and images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert targets.dtype == torch.long and set(targets.tolist()) <= {0, 1, 2}
    images, targets = next(iter(dm.test_dataloader()))
    assert images.shape == (5, 3, 32, 32)
    assert sorted(dm.test_set.targets.tolist()) == sorted(np.repeat([0, 1, 2], fake.n_val // 3).tolist())


def test_train_transform_is_random_eval_is_not(fake: FakeImageNet) -> None:
    dm = _module(fake.root)
    torch.manual_seed(0)
    train = [dm.train_set[0][0] for _ in range(5)]
    assert any(not torch.equal(train[0], t) for t in train[1:])
    assert torch.equal(dm.test_set[0][0], dm.test_set[0][0])


def test_val_split_carves_stratified_part_of_train(fake: FakeImageNet) -> None:
    dm = _module(fake.root, val_split=0.25)
    assert len(dm.train_set) + len(dm.val_set) == fake.n_train
    assert dm.val_set.dataset is dm.train_set.dataset  # one scan of train/
    assert torch.bincount(dm.val_set.targets, minlength=3).tolist() == [1, 1, 1]
    assert not set(dm.val_set.indices.tolist()) & set(dm.train_set.indices.tolist())
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])  # evaluation transform
    assert len(dm.test_set) == fake.n_val and dm.test_set.dataset is not dm.train_set.dataset
    again = _module(fake.root, val_split=0.25)
    assert torch.equal(again.val_set.indices, dm.val_set.indices)


def test_return_index(fake: FakeImageNet) -> None:
    dm = _module(fake.root, return_index=True, batch_size=4)
    _images, targets, indices = next(iter(dm.train_dataloader()))
    assert torch.equal(dm.train_set.targets[indices], targets)
    assert len(dm.test_set[0]) == 2


def test_eval_transform_normalises_by_hand(tmp_path: Path) -> None:
    fake = write_fake_imagenet(tmp_path, num_classes=2, per_class=1)
    colour = (200, 100, 50)
    Image.new("RGB", (50, 40), colour).save(next((tmp_path / "val" / fake.wnids[0]).iterdir()), format="JPEG")
    dm = _module(tmp_path, num_classes=2)
    image, target = dm.test_set[0]
    assert target == 0 and image.shape == (3, 32, 32)
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, dm.mean, dm.std)]
    assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor(expected), atol=0.03)


def test_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    dm = ImageNetDataModule(root=str(tmp_path))
    dm.prepare_data()  # no archives, no network: nothing happens
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert str(tmp_path.resolve()) in message
    assert "Missing: val/" in message and "train/<wnid>/*.JPEG" in message and "val/<wnid>/*.JPEG" in message
    assert "image-net.org" in message and "--data.init_args.root" in message


def test_empty_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"image-net\.org"):
        ImageNetDataModule(root=str(tmp_path)).setup()


def test_download_is_refused() -> None:
    with pytest.raises(KDConfigError, match=r"image-net\.org"):
        ImageNetDataModule(download=True)


def test_class_count_mismatch(fake: FakeImageNet) -> None:
    with pytest.raises(ValueError, match=r"data\.init_args\.num_classes") as info:
        _module(fake.root, num_classes=1000)
    assert "3 class folders" in str(info.value)


def test_train_and_val_classes_must_agree(tmp_path: Path) -> None:
    fake = write_fake_imagenet(tmp_path)
    shutil.rmtree(tmp_path / "val" / fake.wnids[1])
    with pytest.raises(ValueError, match=fake.wnids[1]):
        _module(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"interpolation": "cubic-ish"}, "interpolation"), ({"image_size": 300}, "resize_size")],
)
def test_invalid_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=field):
        ImageNetDataModule(**kwargs)


def test_interpolation_is_used() -> None:
    dm = ImageNetDataModule(interpolation="bicubic")
    assert "BICUBIC" in repr(dm.train_transform()) and "BICUBIC" in repr(dm.eval_transform())


def test_prepare_data_extracts_official_archives_only_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_imagenet(root: str, split: str = "train", **kwargs) -> None:
        calls.append(split)
        write_fake_imagenet(root, layout="torchvision")

    monkeypatch.setattr(torchvision.datasets, "ImageNet", fake_imagenet)
    ImageNetDataModule(root=str(tmp_path)).prepare_data()
    assert calls == []
    (tmp_path / "ILSVRC2012_img_train.tar").touch()
    ImageNetDataModule(root=str(tmp_path)).prepare_data()
    assert calls == ["train"]  # val/ exists now; no val archive anyway
    ImageNetDataModule(root=str(tmp_path)).prepare_data()
    assert calls == ["train"]
