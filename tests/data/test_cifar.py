"""CIFAR-10/100 data modules on tiny fake files in the real pickle layouts (no download)."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from kd_lightning.data import CIFAR10DataModule, CIFAR100DataModule
from kd_lightning.data.cifar import DatasetChecksumError, load_cifar_batches
from kd_lightning.data.transforms import translate
from kd_lightning.errors import DatasetNotFoundError
from tests.data_generators import FakeCIFAR, write_fake_cifar10, write_fake_cifar100

MODULES = {"cifar10": (CIFAR10DataModule, write_fake_cifar10), "cifar100": (CIFAR100DataModule, write_fake_cifar100)}


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, FakeCIFAR]]:
    root = tmp_path_factory.mktemp("cifar")
    return root, {"cifar10": write_fake_cifar10(root), "cifar100": write_fake_cifar100(root)}


@pytest.fixture(params=["cifar10", "cifar100"])
def case(request: pytest.FixtureRequest, fake_root: tuple[Path, dict[str, FakeCIFAR]]):
    root, fakes = fake_root
    cls, _ = MODULES[request.param]
    return cls, root, fakes[request.param]


def _module(cls, root, **kwargs):
    kwargs.setdefault("num_workers", 0)
    dm = cls(root=str(root), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _normalise(images: torch.Tensor, cls) -> torch.Tensor:
    mean = torch.tensor(cls.mean).view(3, 1, 1)
    std = torch.tensor(cls.std).view(3, 1, 1)
    return (images.float() / 255 - mean) / std


def test_class_attributes() -> None:
    assert CIFAR100DataModule.mean == (0.5071, 0.4867, 0.4408)
    assert CIFAR100DataModule.std == (0.2675, 0.2565, 0.2761)
    assert CIFAR10DataModule.mean == (0.4914, 0.4822, 0.4465)
    assert CIFAR10DataModule.std == (0.2470, 0.2435, 0.2616)
    assert CIFAR100DataModule.num_classes == 100 and CIFAR10DataModule.num_classes == 10
    assert CIFAR100DataModule.input_shape == CIFAR10DataModule.input_shape == (3, 32, 32)


def test_reads_images_and_labels_from_the_right_keys(case) -> None:
    cls, root, fake = case
    dm = _module(cls, root)
    assert dm.train_set.images.dtype == torch.uint8
    assert dm.train_set.images.shape == (len(fake.train_targets), 3, 32, 32)
    assert torch.equal(dm.train_set.images, fake.train_images)  # CIFAR-10: the 5 batches in order
    assert torch.equal(dm.train_set.targets, fake.train_targets)  # CIFAR-100: fine, not coarse, labels
    assert dm.train_set.targets.dtype == torch.long
    assert torch.equal(dm.test_set.images, fake.test_images)
    assert torch.equal(dm.test_set.targets, fake.test_targets)
    assert len(dm.classes) == dm.num_classes and dm.classes[1].endswith("_1")
    assert "b'" not in dm.classes[0]


def test_batches(case) -> None:
    cls, root, _ = case
    dm = _module(cls, root, batch_size=16, eval_batch_size=7)
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert targets.shape == (16,) and targets.dtype == torch.long
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (7, 3, 32, 32)


def test_eval_normalisation_by_hand(case) -> None:
    cls, root, fake = case
    dm = _module(cls, root)
    constant = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    out = dm.eval_transform()(constant)
    expected = [(128 / 255 - m) / s for m, s in zip(cls.mean, cls.std)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-6)
    image, _ = dm.test_set[3]
    assert torch.allclose(image, _normalise(fake.test_images[3], cls), atol=1e-6)


def test_train_augmentation_is_crop_and_flip(case) -> None:
    cls, root, fake = case
    dm = _module(cls, root)
    torch.manual_seed(0)
    original = fake.train_images[0]
    views = [translate(original, dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    views = torch.stack(views + [v.flip(-1) for v in views])  # the 162 crop/flip views
    normalised_views = _normalise(views, cls)
    outputs = torch.stack([dm.train_set[0][0] for _ in range(30)])
    for out in outputs:
        assert out.dtype == torch.float32
        assert (normalised_views - out).abs().amax(dim=(1, 2, 3)).min() < 1e-5  # one of the views
    assert not all(torch.equal(outputs[0], o) for o in outputs[1:])  # random
    # evaluation images are deterministic
    assert torch.equal(dm.test_set[0][0], dm.test_set[0][0])
    # no augmentation: training images are only normalised
    plain = _module(cls, root, augment=False)
    assert torch.allclose(plain.train_set[0][0], _normalise(original, cls), atol=1e-6)


def test_val_split_zero_validates_on_test(case) -> None:
    cls, root, fake = case
    dm = _module(cls, root)
    assert dm.val_set is dm.test_set
    assert len(dm.train_set) == len(fake.train_targets)


def test_val_split_is_stratified_deterministic_and_uses_eval_transform(case) -> None:
    cls, root, fake = case
    dm = _module(cls, root, val_split=0.2)
    n = len(fake.train_targets)
    assert len(dm.train_set) + len(dm.val_set) == n
    per_class = torch.bincount(fake.train_targets, minlength=cls.num_classes)
    val_counts = torch.bincount(dm.val_set.targets, minlength=cls.num_classes)
    assert torch.all((val_counts - 0.2 * per_class).abs() <= 1)
    assert torch.all(val_counts >= 1)
    # train + val images are exactly the original train images
    together = torch.cat([dm.train_set.images, dm.val_set.images]).flatten(1)
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, fake.train_images.flatten(1).numpy()))
    # evaluation transform on validation: deterministic, normalised only
    assert torch.allclose(dm.val_set[0][0], _normalise(dm.val_set.images[0], cls), atol=1e-6)
    # same seed, same split; other seed, other split; test set untouched
    again = _module(cls, root, val_split=0.2)
    other = _module(cls, root, val_split=0.2, split_seed=1)
    assert torch.equal(again.val_set.images, dm.val_set.images)
    assert not torch.equal(other.val_set.images, dm.val_set.images)
    assert len(dm.test_set) == len(fake.test_targets)


def test_return_index(case) -> None:
    cls, root, _ = case
    dm = _module(cls, root, return_index=True, val_split=0.2, batch_size=8)
    _image, target, index = dm.train_set[5]
    assert index == 5 and isinstance(target, int)
    _images, targets, indices = next(iter(dm.train_dataloader()))
    assert indices.shape == (8,) and indices.dtype == torch.long
    assert torch.equal(dm.train_set.targets[indices], targets)
    assert len(dm.val_set[0]) == 2 and len(dm.test_set[0]) == 2


def test_setup_is_idempotent(case) -> None:
    cls, root, _ = case
    dm = _module(cls, root)
    train = dm.train_set
    dm.setup("test")
    assert dm.train_set is train


def test_root_may_be_the_dataset_folder(case) -> None:
    cls, _, fake = case
    dm = _module(cls, fake.folder)
    assert torch.equal(dm.train_set.targets, fake.train_targets)


def test_loader_with_workers(fake_root) -> None:
    root, _ = fake_root
    dm = _module(CIFAR10DataModule, root, num_workers=2, batch_size=32)
    assert sum(len(y) for _, y in dm.train_dataloader()) == len(dm.train_set)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_data_error(tmp_path: Path, name: str) -> None:
    cls, _ = MODULES[name]
    dm = cls(root=str(tmp_path / "nowhere"))
    dm.prepare_data()  # download=False: nothing happens, no network
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str((tmp_path / "nowhere").resolve()) in message
    assert f"{cls.base_folder}/{cls.test_files[0]}" in message and f"{cls.base_folder}/{cls.meta_file}" in message
    assert "--data.init_args.download true" in message and "needs internet" in message
    assert f"--data.init_args.root to the folder that holds {cls.base_folder}/" in message
    assert isinstance(info.value, FileNotFoundError)


def test_partially_missing_files_are_named(tmp_path: Path) -> None:
    fake = write_fake_cifar100(tmp_path, n_train=100, n_test=100)
    (fake.folder / "meta").unlink()
    with pytest.raises(DatasetNotFoundError, match="Missing: meta"):
        CIFAR100DataModule(root=str(tmp_path)).setup()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    cls, writer = MODULES[name]
    fake = writer(tmp_path)
    # The fake files are not the official release: checksum=True must refuse them.
    with pytest.raises(DatasetChecksumError, match="md5") as info:
        _module(cls, tmp_path, checksum=True)
    assert str(fake.folder) in str(info.value) and "checksum false" in str(info.value)
    # With the published md5s patched to the fake files' md5s, the check passes.
    tv = getattr(torchvision.datasets, cls.torchvision_name)

    def md5(filename: str) -> str:
        return hashlib.md5((fake.folder / filename).read_bytes()).hexdigest()

    monkeypatch.setattr(tv, "train_list", [[f, md5(f)] for f, _ in tv.train_list])
    monkeypatch.setattr(tv, "test_list", [[f, md5(f)] for f, _ in tv.test_list])
    monkeypatch.setattr(tv, "meta", {**tv.meta, "md5": md5(tv.meta["filename"])})
    dm = _module(cls, tmp_path, checksum=True)
    assert len(dm.train_set) == len(fake.train_targets)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_prepare_data_downloads_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    cls, writer = MODULES[name]
    calls = []

    class FakeTorchvisionCIFAR:
        filename = getattr(torchvision.datasets, cls.torchvision_name).filename

        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, train, download))
            writer(root)  # what a real download would leave behind

    monkeypatch.setattr(torchvision.datasets, cls.torchvision_name, FakeTorchvisionCIFAR)
    cls(root=str(tmp_path)).prepare_data()
    assert calls == []
    dm = cls(root=str(tmp_path), download=True)
    dm.prepare_data()
    assert calls == [(str(tmp_path), True, True)]
    dm.prepare_data()  # files present now: no second download
    assert len(calls) == 1
    dm.setup()
    assert len(dm.train_set) > 0


def test_prepare_data_extracts_a_local_archive(tmp_path: Path) -> None:
    source = tmp_path / "source"
    fake = write_fake_cifar100(source, n_train=100, n_test=100)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(fake.folder, arcname="cifar-100-python")
    shutil.rmtree(source)
    dm = CIFAR100DataModule(root=str(root), num_workers=0)  # download=False: no network
    dm.prepare_data()
    dm.setup()
    assert torch.equal(dm.train_set.targets, fake.train_targets)


def test_load_cifar_batches_accepts_python2_style_str_keys(tmp_path: Path) -> None:
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 256
    path = tmp_path / "batch"
    with path.open("wb") as f:
        pickle.dump({"data": data.astype(np.uint8), "labels": [3, 1]}, f, protocol=2)
    images, targets = load_cifar_batches([path], "labels")
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert images[0, 1, 0, 0] == 1024 % 256 and targets.tolist() == [3, 1]
    with pytest.raises(ValueError, match="fine_labels"):
        load_cifar_batches([path], "fine_labels")
