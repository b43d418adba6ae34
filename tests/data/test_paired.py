"""Paired multimodal data: the batch contract, audio-visual digits (determinism, corruptions, each modality alone
weaker than both), the AV-MNIST reader on tiny files in the MFAS/MultiBench layout, the classification task on
paired batches."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from kd_lightning.data import AVDigitsDataModule, AVMNISTDataModule
from kd_lightning.data.paired import PairedTensorDataset, make_av_digits
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import Supervised
from kd_lightning.models import LateFusionNet, ModalityNet, SignalNet, SmallCNN


def test_av_digits_batches_follow_the_paired_contract() -> None:
    dm = AVDigitsDataModule(batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"m1", "m2", "y"}
    assert batch["m1"].shape == (16, 1, 8, 8) and batch["m2"].shape == (16, 1, 64)
    assert batch["y"].dtype == torch.long
    assert dm.input_shape == {"m1": (1, 8, 8), "m2": (1, 64)} and dm.num_classes == 10
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    train_m1 = dm.train_set.modalities["m1"]
    assert float(train_m1.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(train_m1.std()) == pytest.approx(1.0, abs=1e-3)


def test_av_digits_is_deterministic_from_its_seed() -> None:
    a, b, c = AVDigitsDataModule(), AVDigitsDataModule(), AVDigitsDataModule(data_seed=1)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.train_set.modalities["m2"], b.train_set.modalities["m2"])
    assert not torch.equal(a.train_set.modalities["m2"], c.train_set.modalities["m2"])
    assert torch.equal(a.test_set.targets, c.test_set.targets)  # same split


def test_corruptions_by_hand() -> None:
    images = torch.ones(3, 1, 8, 8)
    targets = torch.tensor([0, 4, 9])
    m1, m2 = make_av_digits(images, targets, image_noise=0.0, occlusion=3, signal_noise=0.0, frequency_jitter=0.0)
    assert (m1 == 0).flatten(1).sum(1).tolist() == [9, 9, 9]  # one 3x3 square zeroed per image
    peaks = torch.fft.rfft(m2.squeeze(1)).abs().argmax(-1)
    assert peaks.tolist() == [3, 7, 12]  # base frequency 3 + class, cycles per window


def test_served_modalities_and_bad_names() -> None:
    dm = AVDigitsDataModule(modalities=["m2"])
    dm.setup("fit")
    assert set(dm.train_set[0]) == {"m2", "y"} and dm.input_shape == {"m2": (1, 64)}
    with pytest.raises(KDConfigError, match=r"data.init_args.modalities: AVDigitsDataModule holds the modalities"):
        AVDigitsDataModule(modalities=["audio"])
    with pytest.raises(KDConfigError, match="label key"):
        PairedTensorDataset({"y": torch.zeros(2)}, [0, 1])


def features(dm: AVDigitsDataModule, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    data = getattr(dm, f"{split}_set")
    m1 = data.modalities["m1"].flatten(1).numpy()
    m2 = torch.fft.rfft(data.modalities["m2"].squeeze(1)).abs().numpy()  # frequency content of the signal
    return {"m1": m1, "m2": m2, "both": np.concatenate([m1, m2 / m2.std()], 1)}, data.targets.numpy()


def test_each_modality_alone_is_clearly_weaker_than_both() -> None:
    """A linear probe on the default audio-visual digits: both modalities beat each one by >= 10 points."""
    dm = AVDigitsDataModule()
    dm.setup("fit")
    (train, y_train), (test, y_test) = features(dm, "train"), features(dm, "test")
    acc = {
        k: LogisticRegression(max_iter=300).fit(train[k], y_train).score(test[k], y_test) for k in ("m1", "m2", "both")
    }
    assert acc["both"] >= max(acc["m1"], acc["m2"]) + 0.10, acc
    assert min(acc["m1"], acc["m2"]) > 0.3, acc  # neither modality is noise


def test_classification_task_unpacks_paired_batches_and_probes_with_dicts() -> None:
    net = ModalityNet(LateFusionNet({"m1": SmallCNN(1, [4], 8), "m2": SignalNet(1, [4], [8, 8], 8)}, 8), ["m1", "m2"])
    module = Supervised(model=net)
    batch = {"m1": torch.zeros(3, 1, 8, 8), "m2": torch.zeros(3, 1, 64), "y": torch.tensor([0, 1, 2])}
    x, y = module.unpack(batch)
    assert set(x) == {"m1", "m2"} and y.tolist() == [0, 1, 2]
    assert module.batch_size_of(batch) == 3
    assert set(module.inputs_of(batch)) == {"m1", "m2"}
    dm = AVDigitsDataModule()
    module.check_data(dm)  # probes with {m1: zeros, m2: zeros}
    assert module.num_classes == 10
    assert module(x).shape == (3, 10)


def test_student_reading_a_modality_the_data_does_not_serve_is_named() -> None:
    module = Supervised(model=ModalityNet(SmallCNN(1, [4], 10), ["m1"]))
    with pytest.raises(
        KDConfigError,
        match=r"^model.init_args.model.init_args.modalities: ModalityNet\(SmallCNN\) reads modality 'm1' but the batch "
        r"has \['m2'\]",
    ):
        module.check_data(AVDigitsDataModule(modalities=["m2"]))


# ------------------------------------------------------------------ AV-MNIST reader
def write_avmnist(folder: Path, n_train: int = 12, n_test: int = 6, flat_images: bool = True) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        (folder / "image").mkdir(parents=True, exist_ok=True)
        (folder / "audio").mkdir(parents=True, exist_ok=True)
        shape = (n, 784) if flat_images else (n, 28, 28)
        np.save(folder / "image" / f"{split}_data.npy", rng.uniform(0, 255, shape).astype(np.float32))
        np.save(folder / "audio" / f"{split}_data.npy", rng.uniform(0, 255, (n, 112, 112)).astype(np.float32))
        np.save(folder / f"{split}_labels.npy", np.arange(n) % 10)


@pytest.mark.parametrize("flat_images", [True, False])
def test_avmnist_reader_on_tiny_files(tmp_path: Path, flat_images: bool) -> None:
    write_avmnist(tmp_path / "avmnist", flat_images=flat_images)
    dm = AVMNISTDataModule(root=str(tmp_path), val_size=4, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 4, 6)
    item = dm.val_set[1]
    assert item["m1"].shape == (1, 28, 28) and item["m2"].shape == (1, 112, 112) and item["y"] == 9
    raw = np.load(tmp_path / "avmnist" / "image" / "train_data.npy")[9].reshape(1, 28, 28)
    assert torch.allclose(item["m1"], torch.from_numpy(raw) / 255.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["m2"].shape == (4, 1, 112, 112) and float(batch["m2"].max()) <= 1.0
    # root may also be the avmnist folder itself
    other = AVMNISTDataModule(root=str(tmp_path / "avmnist"), val_size=4, num_workers=0)
    other.setup("fit")
    assert len(other.test_set) == 6


def test_avmnist_missing_files_are_listed(tmp_path: Path) -> None:
    write_avmnist(tmp_path / "avmnist")
    (tmp_path / "avmnist" / "audio" / "test_data.npy").unlink()
    dm = AVMNISTDataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(KDConfigError, match=r"data.init_args.root: AV-MNIST not found .* missing audio/test_data.npy"):
        dm.setup("fit")


def test_avmnist_refuses_pickled_arrays_and_mismatched_counts(tmp_path: Path) -> None:
    write_avmnist(tmp_path / "avmnist")
    np.save(tmp_path / "avmnist" / "train_labels.npy", np.arange(5))
    with pytest.raises(KDConfigError, match="differ in count"):
        AVMNISTDataModule(root=str(tmp_path), val_size=2, num_workers=0).setup("fit")
    np.save(tmp_path / "avmnist" / "train_labels.npy", np.array([{"a": 1}] * 12, dtype=object), allow_pickle=True)
    with pytest.raises(KDConfigError, match="cannot read AV-MNIST train arrays"):
        AVMNISTDataModule(root=str(tmp_path), val_size=2, num_workers=0).setup("fit")
    with pytest.raises(KDConfigError, match=r"data.init_args.download"):
        AVMNISTDataModule(root=str(tmp_path), download=True)


def test_avdigits_argument_checks() -> None:
    with pytest.raises(KDConfigError, match=r"data.init_args.base_frequency"):
        AVDigitsDataModule(signal_length=16)  # class 9 at 12 cycles >= Nyquist 8
    with pytest.raises(KDConfigError, match=r"data.init_args.image_noise"):
        AVDigitsDataModule(image_noise=-1.0)
    with pytest.raises(KDConfigError, match=r"data.init_args.occlusion"):
        AVDigitsDataModule(occlusion=9)
    assert math.isclose(AVDigitsDataModule().frequency_jitter, 0.45)
