"""Writers of tiny fake datasets in the real on-disk formats (no download, deterministic).

Importable helpers, not tests: ``from tests.data_generators import write_fake_cifar100`` (``tests``
is a package, so pytest puts the repository root on ``sys.path``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "FakeCIFAR",
    "FakeImageNet",
    "write_fake_cifar10",
    "write_fake_cifar100",
    "write_fake_imagenet",
]


@dataclass
class FakeCIFAR:
    """What a CIFAR writer produced (tensors in the layout the data modules return).

    Attributes:
        folder: the dataset folder (``root/cifar-100-python`` or ``root/cifar-10-batches-py``).
        train_images: ``uint8 [N, 3, 32, 32]``, in file order.
        train_targets: ``int64 [N]``.
        test_images: ``uint8 [M, 3, 32, 32]``.
        test_targets: ``int64 [M]``.
    """

    folder: Path
    train_images: torch.Tensor
    train_targets: torch.Tensor
    test_images: torch.Tensor
    test_targets: torch.Tensor


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    # Every class appears floor(n / num_classes) or one more times; order shuffled.
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    # Noise around a per-class colour, so tiny models can learn something. [N, 3072] uint8.
    base = np.linspace(40, 215, num_classes)[labels]
    channel_offset = np.array([0.0, 30.0, -30.0])[None, :, None]
    noise = rng.normal(0, 25, size=(len(labels), 3, 1024))
    data = base[:, None, None] + channel_offset * (labels % 2 * 2 - 1)[:, None, None] + noise
    return np.clip(data, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def _dump(path: Path, entry: dict[bytes, object]) -> None:
    with path.open("wb") as f:
        pickle.dump(entry, f)


def _as_tensors(data: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.copy())


def write_fake_cifar100(root: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> FakeCIFAR:
    """Write ``root/cifar-100-python/{train, test, meta}`` with random images.

    Same pickle layout as the official release (dicts with ``b"data"`` ``uint8 [N, 3072]``,
    ``b"fine_labels"``, ``b"coarse_labels"``, ``b"filenames"``, ``b"batch_label"``; ``meta`` with
    ``b"fine_label_names"`` and ``b"coarse_label_names"``), readable with
    ``pickle.load(f, encoding="latin1")``. Fine labels are balanced over the 100 classes; coarse
    labels differ from them (``fine // 5``), so a reader using the wrong key is caught.

    Args:
        root: folder that receives ``cifar-100-python/``.
        n_train: number of training images.
        n_test: number of test images.
        seed: seed of images and label order.

    Returns:
        The written data as tensors.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = _balanced_labels(n, 100, rng)
        data = _images(fine, 100, rng)
        _dump(
            folder / split,
            {
                b"filenames": [f"fake_{split}_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": fine.tolist(),
                b"coarse_labels": (fine // 5).tolist(),
                b"data": data,
            },
        )
        out[split] = _as_tensors(data, fine)
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
        },
    )
    return FakeCIFAR(folder, *out["train"], *out["test"])


def write_fake_cifar10(root: str | Path, n_train: int = 100, n_test: int = 50, seed: int = 0) -> FakeCIFAR:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    Same pickle layout as the official release (``b"data"`` ``uint8 [N, 3072]``, ``b"labels"``,
    ``b"filenames"``, ``b"batch_label"``; ``batches.meta`` with ``b"label_names"``). The
    ``n_train`` images are spread over the five batch files in order.

    Args:
        root: folder that receives ``cifar-10-batches-py/``.
        n_train: number of training images (over all five batches).
        n_test: number of test images.
        seed: seed of images and label order.

    Returns:
        The written data as tensors (training images concatenated in batch order).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = _balanced_labels(n, 10, rng)
        data = _images(labels, 10, rng)
        out[split] = _as_tensors(data, labels)
        if split == "test":
            chunks = {"test_batch": np.arange(n)}
        else:
            chunks = {f"data_batch_{i + 1}": part for i, part in enumerate(np.array_split(np.arange(n), 5))}
        for i, (filename, idx) in enumerate(chunks.items()):
            _dump(
                folder / filename,
                {
                    b"batch_label": f"{split}ing batch {i + 1} of {len(chunks)}".encode(),
                    b"labels": labels[idx].tolist(),
                    b"data": data[idx],
                    b"filenames": [f"fake_{split}_{j}.png".encode() for j in idx],
                },
            )
    _dump(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": max(1, n_train // 5),
            b"label_names": [f"class_{i}".encode() for i in range(10)],
            b"num_vis": 3072,
        },
    )
    return FakeCIFAR(folder, *out["train"], *out["test"])


@dataclass
class FakeImageNet:
    """What :func:`write_fake_imagenet` produced.

    Attributes:
        root: the dataset root (holds ``train/``, ``val/`` and, for the torchvision layout,
            ``meta.bin``).
        wnids: class folder names, sorted (class ``i`` is ``wnids[i]``).
        n_train: number of training images.
        n_val: number of validation images.
    """

    root: Path
    wnids: list[str]
    n_train: int
    n_val: int


def write_fake_imagenet(
    root: str | Path,
    num_classes: int = 3,
    per_class: int = 4,
    layout: str = "imagefolder",
    val_per_class: int | None = None,
    seed: int = 0,
) -> FakeImageNet:
    """Write a tiny ImageNet-style tree of small JPEGs.

    ``root/train/<wnid>/<wnid>_<k>.JPEG`` and ``root/val/<wnid>/ILSVRC2012_val_<k>.JPEG``,
    images of varied sizes (between 20 and 48 pixels a side) whose colour depends on the class.
    With ``layout="torchvision"`` also ``root/meta.bin`` = ``torch.save((wnid_to_classes,
    val_wnids))``, which is what ``torchvision.datasets.ImageNet`` reads once the archives are
    parsed.

    Args:
        root: dataset root.
        num_classes: number of class folders.
        per_class: training images per class.
        layout: ``"imagefolder"`` or ``"torchvision"``.
        val_per_class: validation images per class; ``None`` means ``per_class``.
        seed: seed of sizes and pixels.

    Returns:
        Paths and counts of what was written.
    """
    if layout not in ("imagefolder", "torchvision"):
        raise ValueError(f"layout must be 'imagefolder' or 'torchvision', got {layout!r}.")
    val_per_class = per_class if val_per_class is None else val_per_class
    rng = np.random.default_rng(seed)
    root = Path(root)
    wnids = [f"n{1440764 + 1000 * i:08d}" for i in range(num_classes)]
    val_wnids: list[str] = []
    val_counter = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                h, w = (int(v) for v in rng.integers(20, 49, size=2))
                colour = np.array([(37 * c) % 256, (91 * c + 60) % 256, (53 * c + 120) % 256])
                pixels = np.clip(colour + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
                if split == "train":
                    name = f"{wnid}_{k}.JPEG"
                else:
                    val_counter += 1
                    name = f"ILSVRC2012_val_{val_counter:08d}.JPEG"
                    val_wnids.append(wnid)
                Image.fromarray(pixels).save(folder / name, format="JPEG", quality=90)
    if layout == "torchvision":
        wnid_to_classes = {wnid: (f"class {i}", f"alias {i}") for i, wnid in enumerate(wnids)}
        torch.save((wnid_to_classes, val_wnids), root / "meta.bin")
    return FakeImageNet(root, wnids, num_classes * per_class, num_classes * val_per_class)
