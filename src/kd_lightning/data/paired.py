"""Paired multimodal data: batches ``{"m1": x1, "m2": x2, ..., "y": labels}``.

The contract (:class:`PairedDataModule`): every item is a dict of named modality tensors plus its class ``"y"``;
the data module says which modalities it serves (``modalities``), the shape of one sample of each
(``input_shape = {modality: shape}``) and ``num_classes``. Networks read the modalities they need through
:class:`~kd_lightning.models.multimodal.ModalityNet`; a unimodal student sees one named modality, a multimodal
teacher several. The classification task understands these batches (inputs = the modality dict, target = ``y``),
so every classification method runs on them.

- :class:`AVDigitsDataModule` ("audio-visual digits"): offline, built from scikit-learn's digits, deterministic
  from a seed. ``m1`` is a degraded rendering of the digit image (an occluded square and pixel noise), ``m2`` a
  1-D signal generated from the class (a sinusoid whose frequency encodes the class, with its own frequency
  jitter, random phase and noise). The two corruptions are independent given the class, so each modality alone
  is clearly weaker than both together (measured numbers: README).
- :class:`AVMNISTDataModule`: a reader for AV-MNIST in the MFAS / MultiBench ``.npy`` layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kd_lightning.data.base import KDDataModule, stratified_split
from kd_lightning.data.digits import load_sklearn_digits
from kd_lightning.errors import KDConfigError

__all__ = [
    "TARGET_KEY",
    "AVDigitsDataModule",
    "AVMNISTDataModule",
    "PairedDataModule",
    "PairedTensorDataset",
    "make_av_digits",
]

#: The key of the class labels in a paired batch.
TARGET_KEY = "y"


class PairedTensorDataset(Dataset):
    """Items ``{modality: tensor[i], ..., "y": target[i]}`` from per-modality tensors (or numpy arrays).

    Args:
        modalities: ``{name: [N, ...] tensor or array}``; numpy arrays (memory-mapped files) are converted per item.
        targets: ``[N]`` class indices.
        scales: optional ``{name: factor}`` multiplied into a numpy modality when read (e.g. ``1/255``).
    """

    def __init__(
        self,
        modalities: Mapping[str, Any],
        targets: torch.Tensor | Sequence[int],
        scales: Mapping[str, float] | None = None,
    ) -> None:
        self.modalities = dict(modalities)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        self.scales = dict(scales or {})
        if TARGET_KEY in self.modalities:
            raise KDConfigError("modalities", f"{TARGET_KEY!r} is the label key and cannot name a modality")
        for name, values in self.modalities.items():
            if len(values) != len(self.targets):
                raise KDConfigError(
                    "data", f"modality {name!r} has {len(values)} samples but there are {len(self.targets)} labels"
                )

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for name, values in self.modalities.items():
            value = values[index]
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(np.array(value, dtype=np.float32))
                if name in self.scales:
                    value = value * self.scales[name]
            item[name] = value
        item[TARGET_KEY] = int(self.targets[index])
        return item


class PairedDataModule(KDDataModule):
    """Base of paired multimodal data modules (batches ``{modality: x, ..., "y": y}``).

    Subclasses set ``all_modalities`` (what the data holds, in order), ``num_classes`` and ``input_shape``
    (``{modality: shape of one sample}`` for the served modalities) and build :class:`PairedTensorDataset` s.

    Args:
        modalities: the modalities the batches carry (default: all); e.g. ``[m1]`` serves the image alone.
        **kwargs: the arguments of :class:`~kd_lightning.data.base.KDDataModule`.
    """

    all_modalities: tuple[str, ...] = ()

    def __init__(self, modalities: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        served = tuple(self.all_modalities) if modalities is None else tuple(modalities)
        unknown = [m for m in served if m not in self.all_modalities]
        if unknown or not served:
            raise KDConfigError(
                "modalities",
                f"{type(self).__name__} holds the modalities {list(self.all_modalities)}, got {list(served)}",
                "name some of them (or leave modalities empty for all)",
            )
        self.modalities = served

    def served_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """``input_shape`` restricted to the served modalities."""
        return {m: tuple(int(s) for s in shapes[m]) for m in self.modalities}


def make_av_digits(
    images: torch.Tensor,
    targets: torch.Tensor,
    seed: int = 0,
    image_noise: float = 0.25,
    occlusion: int = 4,
    signal_length: int = 64,
    signal_noise: float = 1.0,
    base_frequency: float = 3.0,
    frequency_step: float = 1.0,
    frequency_jitter: float = 0.45,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two modalities of audio-visual digits, deterministic from ``seed``.

    ``m1`` = the image ``[N, 1, H, W]`` (values in [0, 1]) with a zeroed ``occlusion x occlusion`` square at a
    uniformly random position and additive Gaussian noise of std ``image_noise``.
    ``m2`` = ``sin(2 pi f t + phi) + signal_noise * eps`` ``[N, 1, signal_length]``, ``t = i / signal_length``,
    ``f = base_frequency + frequency_step * y + frequency_jitter * N(0, 1)`` cycles per window, ``phi`` uniform:
    neighbouring classes overlap in frequency, so the signal alone confuses them.
    """
    generator = torch.Generator().manual_seed(seed)
    n, _, height, width = images.shape
    m1 = images.clone().float()
    if occlusion > 0:
        rows = torch.randint(0, height - occlusion + 1, (n,), generator=generator)
        cols = torch.randint(0, width - occlusion + 1, (n,), generator=generator)
        r = torch.arange(height).view(1, height, 1)
        c = torch.arange(width).view(1, 1, width)
        box = (r >= rows.view(n, 1, 1)) & (r < rows.view(n, 1, 1) + occlusion)
        box = box & (c >= cols.view(n, 1, 1)) & (c < cols.view(n, 1, 1) + occlusion)
        m1 = m1.masked_fill(box.unsqueeze(1), 0.0)
    m1 = m1 + image_noise * torch.randn(m1.shape, generator=generator)
    t = torch.arange(signal_length, dtype=torch.float32) / signal_length
    freq = base_frequency + frequency_step * targets.float() + frequency_jitter * torch.randn(n, generator=generator)
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    m2 = torch.sin(2 * math.pi * freq.view(n, 1) * t.view(1, -1) + phase.view(n, 1))
    m2 = m2 + signal_noise * torch.randn(m2.shape, generator=generator)
    return m1, m2.unsqueeze(1)


class AVDigitsDataModule(PairedDataModule):
    """Audio-visual digits: scikit-learn's 1,797 digits paired with a class-generated signal, offline.

    Items ``{"m1": image [1, 8, 8], "m2": signal [1, L], "y": class}``; the corruptions (see
    :func:`make_av_digits`) are drawn once from ``data_seed`` (the same for every run and epoch). Split like
    :class:`~kd_lightning.data.DigitsDataModule` (stratified, ``split_seed``); each modality is normalised with the
    scalar mean and std of its training part.

    Args:
        image_noise: std of the pixel noise (pixels in [0, 1]).
        occlusion: side of the zeroed square (0: none).
        signal_length: samples of the signal.
        signal_noise: std of the signal's noise (the sinusoid has amplitude 1).
        base_frequency: frequency of class 0, cycles per window.
        frequency_step: frequency step between consecutive classes.
        frequency_jitter: std of the per-sample frequency jitter (confuses neighbouring classes).
        data_seed: seed of the corruptions.
        val_fraction: share of all samples used for validation.
        test_fraction: share of all samples used for testing.
        modalities: served modalities (default ``["m1", "m2"]``).
        num_workers: DataLoader workers (0: in memory).
        **kwargs: the arguments of :class:`~kd_lightning.data.base.KDDataModule`.
    """

    all_modalities = ("m1", "m2")
    num_classes = 10

    def __init__(
        self,
        image_noise: float = 0.25,
        occlusion: int = 4,
        signal_length: int = 64,
        signal_noise: float = 1.0,
        base_frequency: float = 3.0,
        frequency_step: float = 1.0,
        frequency_jitter: float = 0.45,
        data_seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        modalities: Sequence[str] | None = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(modalities=modalities, num_workers=num_workers, **kwargs)
        for name, value in (("image_noise", image_noise), ("signal_noise", signal_noise)):
            if not (math.isfinite(value) and value >= 0):
                raise KDConfigError(name, f"must be a finite number >= 0, got {value}")
        if frequency_jitter < 0:
            raise KDConfigError("frequency_jitter", f"must be >= 0, got {frequency_jitter}")
        if not 0 <= occlusion <= 8:
            raise KDConfigError("occlusion", f"must be in [0, 8] (the images are 8x8), got {occlusion}")
        if signal_length < 4:
            raise KDConfigError("signal_length", f"must be >= 4, got {signal_length}")
        top = base_frequency + frequency_step * (self.num_classes - 1)
        if base_frequency <= 0 or frequency_step <= 0 or top >= signal_length / 2:
            raise KDConfigError(
                "base_frequency",
                f"the class frequencies {base_frequency}..{top} must be > 0, increasing and below the Nyquist "
                f"frequency {signal_length / 2}",
                "lower base_frequency / frequency_step or raise signal_length",
            )
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise KDConfigError(name, f"must be in (0, 1), got {value}")
        if val_fraction + test_fraction >= 1:
            raise KDConfigError("val_fraction", "val_fraction + test_fraction must sum to less than 1")
        self.image_noise = image_noise
        self.occlusion = occlusion
        self.signal_length = signal_length
        self.signal_noise = signal_noise
        self.base_frequency = base_frequency
        self.frequency_step = frequency_step
        self.frequency_jitter = frequency_jitter
        self.data_seed = data_seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.input_shape = self.served_shapes({"m1": (1, 8, 8), "m2": (1, signal_length)})  # type: ignore[assignment]
        self.classes = [str(i) for i in range(10)]

    def prepare_data(self) -> None:
        """Nothing to do: the images ship with scikit-learn and the signals are generated."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, targets = load_sklearn_digits()
        m1, m2 = make_av_digits(
            images,
            targets,
            seed=self.data_seed,
            image_noise=self.image_noise,
            occlusion=self.occlusion,
            signal_length=self.signal_length,
            signal_noise=self.signal_noise,
            base_frequency=self.base_frequency,
            frequency_step=self.frequency_step,
            frequency_jitter=self.frequency_jitter,
        )
        rest, test = stratified_split(targets, self.test_fraction, self.split_seed)
        train_pos, val_pos = stratified_split(
            targets[rest], self.val_fraction / (1 - self.test_fraction), self.split_seed + 1
        )
        parts = {"train": rest[train_pos], "val": rest[val_pos], "test": test}
        data = {"m1": m1, "m2": m2}
        stats = {m: (float(data[m][parts["train"]].mean()), float(data[m][parts["train"]].std())) for m in data}

        def split(idx: torch.Tensor) -> PairedTensorDataset:
            served = {m: ((data[m][idx] - stats[m][0]) / stats[m][1]).contiguous() for m in self.modalities}
            return PairedTensorDataset(served, targets[idx])

        self.train_set = split(parts["train"])
        self.val_set = split(parts["val"])
        self.test_set = split(parts["test"])


#: The files of AV-MNIST in the MFAS / MultiBench layout, relative to the ``avmnist`` folder.
AVMNIST_FILES = {
    "train": ("image/train_data.npy", "audio/train_data.npy", "train_labels.npy"),
    "test": ("image/test_data.npy", "audio/test_data.npy", "test_labels.npy"),
}


class AVMNISTDataModule(PairedDataModule):
    """AV-MNIST (image + audio digits, 10 classes) in the MFAS / MultiBench ``.npy`` layout.

    Layout (verified from MultiBench ``datasets/avmnist/get_data.py``; the files themselves are not redistributed):
    ``<root>/avmnist/image/{train,test}_data.npy`` (images, ``[N, 784]`` or ``[N, 28, 28]``, 0..255),
    ``<root>/avmnist/audio/{train,test}_data.npy`` (spectrograms ``[N, 112, 112]``, 0..255) and
    ``<root>/avmnist/{train,test}_labels.npy``; ``root`` may also be the ``avmnist`` folder itself. As in MultiBench,
    both modalities are divided by 255 and validation is the last ``val_size`` training samples (55,000 / 5,000 /
    10,000). The arrays are memory-mapped (``allow_pickle=False``: nothing is unpickled).

    Items ``{"m1": image [1, 28, 28], "m2": spectrogram [1, 112, 112], "y": class}``.

    Args:
        root: the folder holding ``avmnist/`` (or ``avmnist`` itself).
        val_size: training samples held out (from the end) for validation.
        modalities: served modalities (default ``["m1", "m2"]``).
        **kwargs: the arguments of :class:`~kd_lightning.data.base.KDDataModule`. ``download`` is not supported.
    """

    all_modalities = ("m1", "m2")
    num_classes = 10

    def __init__(
        self,
        root: str = "data",
        val_size: int = 5000,
        modalities: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(modalities=modalities, root=root, **kwargs)
        if val_size < 1:
            raise KDConfigError("val_size", f"must be >= 1, got {val_size}")
        if self.download:
            raise KDConfigError(
                "download", "AV-MNIST has no official download", "fetch the MFAS/MultiBench avmnist folder yourself"
            )
        self.val_size = val_size
        self.input_shape = self.served_shapes({"m1": (1, 28, 28), "m2": (1, 112, 112)})  # type: ignore[assignment]

    def folder(self) -> Path:
        """The ``avmnist`` folder under ``root`` (or ``root`` itself).

        Raises:
            KDConfigError: a file of the layout is missing, naming every expected file and the fix.
        """
        root = Path(self.root).expanduser()
        folder = root / "avmnist" if (root / "avmnist").is_dir() else root
        expected = [f for files in AVMNIST_FILES.values() for f in files]
        missing = [f for f in expected if not (folder / f).is_file()]
        if missing:
            raise KDConfigError(
                "data.init_args.root",
                f"AV-MNIST not found under {folder.resolve()}: missing {', '.join(missing)} "
                f"(expected avmnist/{{{', '.join(expected)}}})",
                "put the MFAS/MultiBench avmnist folder there (it is not downloaded) or point root at it",
            )
        return folder

    def data_identity(self) -> dict[str, Any]:
        folder = self.folder()
        return {f: (folder / f).stat().st_size for files in AVMNIST_FILES.values() for f in files}

    def prepare_data(self) -> None:
        self.folder()

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        folder = self.folder()
        image_file, audio_file, label_file = (folder / f for f in AVMNIST_FILES[split])
        try:
            image = np.load(image_file, mmap_mode="r", allow_pickle=False)
            audio = np.load(audio_file, mmap_mode="r", allow_pickle=False)
            labels = np.asarray(np.load(label_file, allow_pickle=False)).astype(np.int64).reshape(-1)
        except (ValueError, OSError) as err:
            raise KDConfigError(
                "data.init_args.root", f"cannot read AV-MNIST {split} arrays in {folder} ({err})", "check the files"
            ) from None
        n = len(labels)
        if len(image) != n or len(audio) != n:
            raise KDConfigError(
                "data.init_args.root",
                f"AV-MNIST {split}: {len(image)} images, {len(audio)} spectrograms and {n} labels differ in count",
                "the files do not belong together",
            )
        if image[0].size != 28 * 28 or audio[0].size != 112 * 112:
            raise KDConfigError(
                "data.init_args.root",
                f"AV-MNIST {split}: expected 784-pixel images and 112x112 spectrograms, got "
                f"{image.shape[1:]} and {audio.shape[1:]}",
                "use the MFAS/MultiBench avmnist arrays",
            )
        return image.reshape(n, 1, 28, 28), audio.reshape(n, 1, 112, 112), labels

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        image, audio, labels = self._load("train")
        if self.val_size >= len(labels):
            raise KDConfigError("val_size", f"must be below the {len(labels)} training samples, got {self.val_size}")
        cut = len(labels) - self.val_size
        scales = {"m1": 1 / 255.0, "m2": 1 / 255.0}

        def part(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], sl: slice) -> PairedTensorDataset:
            data = {"m1": arrays[0][sl], "m2": arrays[1][sl]}
            return PairedTensorDataset({m: data[m] for m in self.modalities}, arrays[2][sl], scales)

        train = (image, audio, labels)
        self.train_set = part(train, slice(0, cut))
        self.val_set = part(train, slice(cut, None))
        self.test_set = part(self._load("test"), slice(None))
