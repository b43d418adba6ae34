"""RadioML automatic-modulation-recognition datasets (DeepSig RML2016.10a, RML2016.10b, RML2018.01A).

One data module reads the three published files; each frame is served as ``float32 [2, L]`` (row 0 = I,
row 1 = Q) with its class index and its SNR in dB, so every batch is ``(x [B, 2, L], y [B], snr [B])``.

* RML2016.10a (``RML2016.10a_dict.pkl``) and RML2016.10b (``RML2016.10b.dat``): Python-2 pickles of a
  dict ``{(modulation, snr): float32 [n, 2, 128]}``, read with ``encoding="latin1"`` and held in memory.
  Labels follow the sorted modulation names (the order most public loaders use).
* RML2018.01A (``GOLD_XYZ_OSC.0001_1024.hdf5``, ~21 GB): HDF5 with ``X [N, 1024, 2]``, one-hot
  ``Y [N, 24]`` and ``Z [N, 1]`` (SNR). Frames are read lazily with h5py, a batch at a time; only the
  labels and SNRs are held in memory. Labels follow the column order of ``Y`` ("classes-fixed",
  :data:`CLASSES_2018`), NOT the ``classes.txt`` shipped in the archive, whose order does not match ``Y``.

The files are not downloaded: DeepSig publishes them at https://www.deepsig.ai/datasets (licence form,
CC BY-NC-SA). ``kd radioml-synth`` writes offline synthetic approximations in the same layouts
(:mod:`kd_lightning.data.radioml_synth`).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from kd_lightning.data.base import KDDataModule, read_data_pickle
from kd_lightning.errors import DatasetNotFoundError, KDConfigError

__all__ = [
    "CLASSES",
    "CLASSES_2018",
    "FILE_NAMES",
    "SNRS",
    "RadioMLDataModule",
    "RadioMLHDF5Dataset",
    "RadioMLTensorDataset",
    "load_radioml_pickle",
    "normalize_frames",
    "split_by_group",
]

Version = Literal["2016.10a", "2016.10b", "2018.01A"]
Normalization = Literal["none", "rms", "max"]

#: Modulations of RML2016.10a in label order (sorted names).
CLASSES_2016A = ("8PSK", "AM-DSB", "AM-SSB", "BPSK", "CPFSK", "GFSK", "PAM4", "QAM16", "QAM64", "QPSK", "WBFM")
#: Modulations of RML2016.10b in label order (2016.10a without AM-SSB).
CLASSES_2016B = tuple(c for c in CLASSES_2016A if c != "AM-SSB")
#: Modulations of RML2018.01A in the column order of ``Y`` ("classes-fixed"; NOT the shipped classes.txt).
CLASSES_2018 = (
    "OOK",
    "4ASK",
    "8ASK",
    "BPSK",
    "QPSK",
    "8PSK",
    "16PSK",
    "32PSK",
    "16APSK",
    "32APSK",
    "64APSK",
    "128APSK",
    "16QAM",
    "32QAM",
    "64QAM",
    "128QAM",
    "256QAM",
    "AM-SSB-WC",
    "AM-SSB-SC",
    "AM-DSB-WC",
    "AM-DSB-SC",
    "FM",
    "GMSK",
    "OQPSK",
)
CLASSES: dict[str, tuple[str, ...]] = {"2016.10a": CLASSES_2016A, "2016.10b": CLASSES_2016B, "2018.01A": CLASSES_2018}
#: SNR grids (dB) of the published files.
SNRS: dict[str, tuple[int, ...]] = {
    "2016.10a": tuple(range(-20, 19, 2)),
    "2016.10b": tuple(range(-20, 19, 2)),
    "2018.01A": tuple(range(-20, 31, 2)),
}
#: Official file names.
FILE_NAMES: dict[str, str] = {
    "2016.10a": "RML2016.10a_dict.pkl",
    "2016.10b": "RML2016.10b.dat",
    "2018.01A": "GOLD_XYZ_OSC.0001_1024.hdf5",
}
#: Frame length of the published files.
FRAME_LENGTHS: dict[str, int] = {"2016.10a": 128, "2016.10b": 128, "2018.01A": 1024}
#: Where DeepSig publishes the datasets.
DEEPSIG_URL = "https://www.deepsig.ai/datasets"

_EPS = 1e-12


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py is installed in the test environment
        raise ImportError('Reading RadioML 2018.01A (HDF5) needs h5py: pip install "kd-lightning[radioml]"') from err
    return h5py


def normalize_frames(frames: torch.Tensor, mode: Normalization) -> torch.Tensor:
    """Scale each frame ``[..., 2, L]`` on its own (returns a new tensor; all-zero frames stay zero).

    Args:
        frames: IQ frames, row 0 = I, row 1 = Q.
        mode: ``"rms"`` divides by ``sqrt(mean_t(I² + Q²))`` (unit average power); ``"max"`` divides
            by the largest ``|I|`` or ``|Q|`` of the frame (values in ``[-1, 1]``); ``"none"`` copies.
    """
    if mode == "none":
        return frames.clone()
    if mode == "rms":
        scale = frames.square().sum(dim=-2, keepdim=True).mean(dim=-1, keepdim=True).sqrt()
    elif mode == "max":
        scale = frames.abs().amax(dim=(-2, -1), keepdim=True)
    else:
        raise KDConfigError(f"data.init_args.normalize must be 'none', 'rms' or 'max', got {mode!r}.")
    return frames / scale.clamp_min(_EPS)


def _group_seed(seed: int, name: str, snr: int) -> np.random.Generator:
    # Independent of which other groups are present: a (modulation, SNR) group splits the same way
    # whatever modulation subset or SNR range is loaded.
    return np.random.default_rng([seed, zlib.crc32(name.encode()), int(snr) + 10_000])


def split_by_group(
    targets: np.ndarray | torch.Tensor,
    snrs: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    fractions: Sequence[float],
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split frame indices into train / val / test, stratified by (modulation, SNR).

    Each (modulation, SNR) group is shuffled by a generator seeded from ``(seed, modulation name, snr)``
    and cut into ``round(f_val * n)`` validation and ``round(f_test * n)`` test frames (the training part
    keeps at least one frame of a non-empty group). The split of a group therefore does not depend on the
    other groups loaded (modulation subset, SNR range) nor on the label order.

    Args:
        targets: class index of every frame.
        snrs: SNR of every frame.
        class_names: name of each class index (seeds the shuffle).
        fractions: ``(train, val, test)`` shares.
        seed: split seed.

    Returns:
        ``(train, val, test)`` sorted ``int64`` index arrays.
    """
    targets = np.asarray(targets, dtype=np.int64)
    snrs = np.asarray(snrs, dtype=np.int64)
    _, f_val, f_test = (float(f) for f in fractions)
    parts: list[list[np.ndarray]] = [[np.empty(0, np.int64)] for _ in range(3)]
    order = np.lexsort((np.arange(len(targets)), snrs, targets))  # grouped, file order inside a group
    keys = np.stack([targets[order], snrs[order]], axis=1)
    if len(order):
        starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
        for start, stop in zip(starts, [*starts[1:], len(order)]):
            idx = order[start:stop]
            n = len(idx)
            rng = _group_seed(seed, class_names[int(targets[idx[0]])], int(snrs[idx[0]]))
            idx = idx[rng.permutation(n)]
            n_val, n_test = round(f_val * n), round(f_test * n)
            while n_val + n_test > n - 1 and (n_val or n_test):  # keep one frame for training
                if n_test >= n_val and n_test:
                    n_test -= 1
                else:
                    n_val -= 1
            parts[2].append(idx[:n_test])
            parts[1].append(idx[n_test : n_test + n_val])
            parts[0].append(idx[n_test + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def load_radioml_pickle(path: str | Path) -> dict[tuple[str, int], np.ndarray]:
    """Read an RML2016-style pickle ``{(modulation, snr): float32 [n, 2, L]}`` (Python-2 pickles too).

    Keys written by Python 2 come back as ``str`` under ``encoding="latin1"``; ``bytes`` keys are decoded.

    Raises:
        ValueError: if the file is not a dict of ``(modulation, snr) -> [n, 2, L]`` arrays.
    """
    path = Path(path)
    raw = read_data_pickle(path, "RadioML 2016")
    if not isinstance(raw, dict):
        raise KDConfigError(f"{path} is not a RadioML pickle: expected a dict, got {type(raw).__name__}.")
    out: dict[tuple[str, int], np.ndarray] = {}
    for key in list(raw):
        if not (isinstance(key, tuple) and len(key) == 2):
            raise KDConfigError(f"{path}: expected (modulation, snr) keys, found {key!r}.")
        mod, snr = key
        mod = mod.decode("latin1") if isinstance(mod, bytes) else str(mod)
        frames = np.asarray(raw.pop(key))
        if frames.ndim != 3 or frames.shape[1] != 2:
            raise KDConfigError(f"{path}: frames of {(mod, snr)} have shape {frames.shape}, expected [n, 2, L].")
        out[(mod, int(snr))] = frames
    return out


class RadioMLTensorDataset(Dataset):
    """Frames held in one tensor (RML2016.x), exposed through an index list.

    Items are ``(frame float32 [2, L], label, snr)``. Several datasets (train / val / test) share the
    same ``frames`` tensor without copying it.

    Args:
        frames: ``[N, 2, L]`` frames (already normalised).
        targets: ``[N]`` class indices.
        snrs: ``[N]`` SNRs in dB.
        indices: rows exposed by this dataset, in order; ``None`` exposes all.
    """

    def __init__(
        self,
        frames: torch.Tensor,
        targets: torch.Tensor,
        snrs: torch.Tensor,
        indices: np.ndarray | torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        if frames.ndim != 3 or frames.shape[1] != 2 or not (len(frames) == len(targets) == len(snrs)):
            raise KDConfigError(
                f"RadioMLTensorDataset needs frames [N, 2, L] and N targets and SNRs, got "
                f"{tuple(frames.shape)}, {tuple(targets.shape)}, {tuple(snrs.shape)}."
            )
        self.frames = frames
        self.all_targets = torch.as_tensor(targets, dtype=torch.long)
        self.all_snrs = torch.as_tensor(snrs, dtype=torch.long)
        self.indices = (
            torch.arange(len(frames)) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long)
        )

    @property
    def targets(self) -> torch.Tensor:
        """Class index of every exposed frame."""
        return self.all_targets[self.indices]

    @property
    def snrs(self) -> torch.Tensor:
        """SNR (dB) of every exposed frame."""
        return self.all_snrs[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        row = int(self.indices[index])
        return self.frames[row], int(self.all_targets[row]), int(self.all_snrs[row])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        rows = self.indices[torch.as_tensor(list(indices), dtype=torch.long)]
        return list(zip(self.frames[rows].unbind(0), self.all_targets[rows].tolist(), self.all_snrs[rows].tolist()))


class RadioMLHDF5Dataset(Dataset):
    """Lazy view on rows of an RML2018-style HDF5 file (``X [N, L, 2]``).

    Only ``rows``, ``targets`` and ``snrs`` (one integer each per frame) live in memory. The file is
    opened on first access in each process (so DataLoader workers each get their own handle) and
    frames are read on demand: one row per ``__getitem__``, one sorted fancy-index read per batch
    (``__getitems__``, which the DataLoader uses). Frames are transposed to ``[2, L]`` and normalised.

    Args:
        path: the HDF5 file.
        rows: file rows exposed by this dataset, in order.
        targets: class index of each exposed row.
        snrs: SNR (dB) of each exposed row.
        normalize: per-frame scaling (:func:`normalize_frames`).
        key: name of the frame dataset in the file.
    """

    def __init__(
        self,
        path: str | Path,
        rows: np.ndarray | Sequence[int],
        targets: torch.Tensor | Sequence[int],
        snrs: torch.Tensor | Sequence[int],
        normalize: Normalization = "rms",
        key: str = "X",
    ) -> None:
        self.path = str(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.snrs = torch.as_tensor(snrs, dtype=torch.long)
        if not (len(self.rows) == len(self.targets) == len(self.snrs)):
            raise KDConfigError("RadioMLHDF5Dataset: rows, targets and snrs must have the same length.")
        self.normalize = normalize
        self.key = key
        self._file: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _frames_dataset(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            self._file = _import_h5py().File(self.path, "r")
            self._pid = os.getpid()
        return self._file[self.key]

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Read file rows (strictly increasing) of ``X``: ``float32 [k, L, 2]``. The only read of frames."""
        return np.asarray(self._frames_dataset()[rows], dtype=np.float32)

    def _batch(self, positions: Sequence[int]) -> torch.Tensor:
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing, distinct rows
        frames = torch.from_numpy(self.read_rows(unique))[torch.from_numpy(inverse.reshape(-1))]
        return normalize_frames(frames.transpose(1, 2).contiguous(), self.normalize)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self._batch([index])[0], int(self.targets[index]), int(self.snrs[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        positions = torch.as_tensor(list(indices), dtype=torch.long)
        frames = self._batch(positions.tolist())
        return list(zip(frames.unbind(0), self.targets[positions].tolist(), self.snrs[positions].tolist()))

    def close(self) -> None:
        """Close this process's file handle (reopened on the next access)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None  # h5py handles do not cross processes
        return state


class RadioMLDataModule(KDDataModule):
    """RadioML 2016.10a / 2016.10b / 2018.01A for automatic modulation recognition.

    Batches are ``(x float32 [B, 2, L], y int64 [B], snr int64 [B])`` in train, validation and test
    (the per-SNR evaluation reads ``batch[2]``); methods use ``batch[0]`` and ``batch[1]``.

    Split: every (modulation, SNR) group is cut into train / val / test by ``splits`` with a generator
    seeded by ``(split_seed, modulation, snr)`` (:func:`split_by_group`), so a frame's split does not
    change with the modulation subset or the SNR filter. The SNR filter (``min_snr`` / ``max_snr``) is
    applied after the split, to the training part only (``snr_filter_on="train"``, the default: validation
    and test keep every SNR, so overall accuracy and per-SNR curves stay comparable between runs) or to
    every part (``"all"``).

    Class order (``classes``): sorted modulation names for 2016.10a/b; for 2018.01A the column order of
    ``Y`` (:data:`CLASSES_2018`). A ``modulations`` subset keeps that order and relabels ``0..K-1``.

    Memory: 2016.x files are read into one float32 tensor (2016.10b: ~1.2 GB, about twice that while
    the pickle is being unpacked). 2018.01A is read lazily
    (labels and SNRs only: ~20 MB); use ``num_workers > 0`` to overlap HDF5 reads with training.

    Args:
        version: ``"2016.10a"``, ``"2016.10b"`` or ``"2018.01A"``.
        file: file name (relative to ``root``, the folder that holds it) or absolute path; ``None`` is the
            official name (:data:`FILE_NAMES`; for 2018.01A, ``root/2018.01/`` is searched too). Nothing is ever
            downloaded (DeepSig asks for a licence form); ``download: true`` only adds a note to the
            missing-file error.
        batch_size: training batch size.
        num_workers: DataLoader worker processes.
        splits: ``(train, val, test)`` shares of every (modulation, SNR) group; must sum to 1,
            ``train > 0``, ``val > 0``, ``test >= 0``.
        min_snr: drop frames below this SNR (dB); ``None`` keeps all.
        max_snr: drop frames above this SNR (dB); ``None`` keeps all.
        snr_filter_on: ``"train"`` (filter the training part only) or ``"all"`` (every part).
        normalize: per-frame scaling: ``"rms"`` (unit average power), ``"max"`` (peak ``|I|``/``|Q|``
            to 1) or ``"none"``.
        modulations: subset of the version's modulations (names as in :data:`CLASSES`); ``None``
            uses all of them.
        **kwargs: the shared arguments of :class:`~kd_lightning.data.base.KDDataModule` (``root``,
            ``download``, ``eval_batch_size``, ``split_seed`` (of the (modulation, SNR)-stratified split), ...).

    Attributes:
        num_classes: number of classes (known at construction; linked into the model).
        input_shape: ``(2, L)``; ``L`` is the official length until :meth:`setup` reads the file.
        classes: modulation names in label order.
        snrs: sorted SNRs of the validation/test parts (the official grid until :meth:`setup`).
        train_snrs: sorted SNRs of the training part (after :meth:`setup`).
        path: the resolved file.

    Example:
        >>> dm = RadioMLDataModule(root="data/radioml", version="2016.10a")  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> x, y, snr = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    def __init__(
        self,
        version: Version = "2016.10a",
        file: str | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
        min_snr: int | None = None,
        max_snr: int | None = None,
        snr_filter_on: Literal["train", "all"] = "train",
        normalize: Normalization = "rms",
        modulations: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        if version not in CLASSES:
            raise KDConfigError(f"data.init_args.version must be one of {sorted(CLASSES)}, got {version!r}.")
        splits = tuple(float(s) for s in splits)  # type: ignore[assignment]
        if len(splits) != 3 or splits[0] <= 0 or splits[1] <= 0 or splits[2] < 0 or abs(sum(splits) - 1) > 1e-6:
            raise KDConfigError(
                "data.init_args.splits must be (train, val, test) shares with train > 0, val > 0, test >= 0 "
                f"and a sum of 1, got {splits}."
            )
        if min_snr is not None and max_snr is not None and min_snr > max_snr:
            raise KDConfigError(f"data.init_args.min_snr ({min_snr}) is above data.init_args.max_snr ({max_snr}).")
        if snr_filter_on not in ("train", "all"):
            raise KDConfigError(f"data.init_args.snr_filter_on must be 'train' or 'all', got {snr_filter_on!r}.")
        if normalize not in ("none", "rms", "max"):
            raise KDConfigError(f"data.init_args.normalize must be 'none', 'rms' or 'max', got {normalize!r}.")
        official = CLASSES[version]
        if modulations is not None:
            unknown = [m for m in modulations if m not in official]
            if unknown or not modulations or len(set(modulations)) != len(modulations):
                raise KDConfigError(
                    f"data.init_args.modulations must be distinct names of RadioML {version}: {list(official)}; "
                    f"got {list(modulations)}" + (f" (unknown: {unknown})." if unknown else ".")
                )
        self.version = version
        self.file = file
        self.splits = splits
        self.min_snr = min_snr
        self.max_snr = max_snr
        self.snr_filter_on = snr_filter_on
        self.normalize = normalize
        self.modulations = list(modulations) if modulations is not None else None
        self.classes = [c for c in official if modulations is None or c in modulations]
        self.num_classes = len(self.classes)
        self.input_shape = (2, FRAME_LENGTHS[version])
        self.snrs = list(SNRS[version])
        self.train_snrs = list(SNRS[version])
        self.path = self._resolve()

    # ----------------------------------------------------------------------------- files
    def _resolve(self) -> Path:
        name = self.file or FILE_NAMES[self.version]
        path = Path(name).expanduser()
        if path.is_absolute():
            return path
        root = Path(self.root).expanduser()
        candidates = [root / path]
        if self.file is None and self.version == "2018.01A":
            candidates.append(root / "2018.01" / path)  # the folder the official archive extracts to
        return next((c for c in candidates if c.is_file()), candidates[0])

    def data_identity(self) -> dict[str, Any]:
        """The file's name, size and modification time: a generated file and the published one differ."""
        path = self._resolve()
        if not path.is_file():
            return {"file": str(path)}
        stat = path.stat()
        return {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def _check_ready(self) -> None:
        self.path = self._resolve()
        if self.path.is_file():
            return
        name = self.path.name
        fix = (
            f"Missing file {name} in folder {self.path.parent.resolve()}. RadioML is not downloaded automatically"
            + (" (download=True cannot fetch it)" if self.download else "")
            + f": get RadioML {self.version} from DeepSig's datasets page ({DEEPSIG_URL}), put {name} in "
            "--data.init_args.root or point --data.init_args.file at it. For an offline synthetic "
            f"approximation run `kd radioml-synth --out {self.root} --format {self.version}`."
        )
        raise DatasetNotFoundError(f"RadioML {self.version}", self.path.parent, [name], fix)

    def prepare_data(self) -> None:
        """Nothing is downloaded; fails early (with how to get the data) when the file is missing."""
        self._check_ready()

    # ----------------------------------------------------------------------------- setup
    def _check_classes(self, found: Sequence[str]) -> None:
        unknown = sorted(set(found) - set(CLASSES[self.version]))
        if unknown and self.modulations is None:
            raise KDConfigError(
                f"{self.path} holds modulations that RadioML {self.version} does not have: {unknown}. "
                "Check data.init_args.version."
            )
        missing = [c for c in self.classes if c not in set(found)]
        if missing:
            present = [c for c in CLASSES[self.version] if c in set(found)]
            raise KDConfigError(
                f"{self.path} has no frames of {missing} (it holds {present}). Set data.init_args.modulations "
                f"to the modulations it holds, e.g. {present}."
            )

    def _load_pickle(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        data = load_radioml_pickle(self.path)
        self._check_classes(sorted({mod for mod, _ in data}))
        label_of = {c: i for i, c in enumerate(self.classes)}
        keys = sorted((k for k in data if k[0] in label_of), key=lambda k: (label_of[k[0]], k[1]))
        lengths = {data[k].shape[2] for k in keys}
        if len(lengths) != 1:
            raise KDConfigError(f"{self.path}: frames of different lengths {sorted(lengths)}.")
        total = sum(len(data[k]) for k in keys)
        frames = torch.empty(total, 2, lengths.pop(), dtype=torch.float32)
        targets = np.empty(total, np.int64)
        snrs = np.empty(total, np.int64)
        start = 0
        for key in keys:
            block = torch.from_numpy(np.ascontiguousarray(data.pop(key), dtype=np.float32))
            stop = start + len(block)
            frames[start:stop] = normalize_frames(block, self.normalize) if self.normalize != "none" else block
            targets[start:stop], snrs[start:stop] = label_of[key[0]], key[1]
            start = stop
        return frames, targets, snrs

    def _read_hdf5_labels(self) -> tuple[np.ndarray, np.ndarray, int]:
        """File-row labels (index in :data:`CLASSES_2018`), SNRs and frame length; X itself is not read."""
        h5py = _import_h5py()
        with h5py.File(self.path, "r") as f:
            missing = [k for k in ("X", "Y", "Z") if k not in f]
            if missing:
                raise KDConfigError(f"{self.path} has no dataset {missing[0]!r} (keys: {sorted(f.keys())}).")
            x, y, z = f["X"], f["Y"], f["Z"]
            n = x.shape[0]
            if x.ndim != 3 or x.shape[2] != 2:
                raise KDConfigError(f"{self.path}: X has shape {x.shape}, expected [N, L, 2].")
            if y.shape != (n, len(CLASSES_2018)):
                raise KDConfigError(
                    f"{self.path}: Y has shape {y.shape}, expected one-hot [{n}, {len(CLASSES_2018)}] "
                    "(RadioML 2018.01A classes-fixed order)."
                )
            if z.shape[0] != n:
                raise KDConfigError(f"{self.path}: Z has {z.shape[0]} rows, X has {n}.")
            chunk = 1 << 16  # Y is ~500 MB in int64 for the full file: argmax it in chunks
            labels = np.concatenate(
                [np.argmax(y[i : i + chunk], axis=1) for i in range(0, n, chunk)] or [np.empty(0, np.int64)]
            ).astype(np.int64)
            snrs = np.asarray(z[:], dtype=np.int64).reshape(n)
            return labels, snrs, int(x.shape[1])

    def _snr_mask(self, snrs: np.ndarray) -> np.ndarray:
        keep = np.ones(len(snrs), dtype=bool)
        if self.min_snr is not None:
            keep &= snrs >= self.min_snr
        if self.max_snr is not None:
            keep &= snrs <= self.max_snr
        return keep

    def setup(self, stage: str | None = None) -> None:
        """Read the labels (and, for 2016.x, the frames), split them and build the datasets.

        Raises:
            DatasetNotFoundError: if the file is missing.
            KDConfigError: if the file lacks a requested modulation or the SNR filter leaves nothing.
        """
        if self.train_set is not None:
            return
        self._check_ready()
        frames: torch.Tensor | None = None
        if self.version == "2018.01A":
            file_labels, snrs, length = self._read_hdf5_labels()
            self._check_classes(sorted({CLASSES_2018[i] for i in np.unique(file_labels)}))
            remap = np.full(len(CLASSES_2018), -1, dtype=np.int64)
            remap[[CLASSES_2018.index(c) for c in self.classes]] = np.arange(self.num_classes)
            file_rows = np.flatnonzero(remap[file_labels] >= 0)
            targets, snrs = remap[file_labels[file_rows]], snrs[file_rows]
        else:
            frames, targets, snrs = self._load_pickle()
            length = frames.shape[2]
        self.input_shape = (2, length)
        parts = split_by_group(targets, snrs, self.classes, self.splits, self.split_seed)
        keep = self._snr_mask(snrs)
        filtered = (
            [p[keep[p]] for p in parts] if self.snr_filter_on == "all" else [parts[0][keep[parts[0]]], *parts[1:]]
        )
        if len(filtered[0]) == 0 or len(filtered[1]) == 0:
            raise KDConfigError(
                f"No training or validation frames left in {self.path} with min_snr={self.min_snr}, "
                f"max_snr={self.max_snr} (SNRs in the file: {sorted(set(snrs.tolist()))})."
            )
        self.train_snrs = sorted(set(snrs[filtered[0]].tolist()))
        self.snrs = sorted(set(snrs[np.concatenate(filtered[1:])].tolist()))
        targets_t, snrs_t = torch.from_numpy(targets), torch.from_numpy(snrs)
        datasets: list[Dataset] = []
        for idx in filtered:
            if frames is not None:
                datasets.append(RadioMLTensorDataset(frames, targets_t, snrs_t, idx))
            else:
                datasets.append(
                    RadioMLHDF5Dataset(self.path, file_rows[idx], targets_t[idx], snrs_t[idx], self.normalize)
                )
        self.train_set, self.val_set, self.test_set = datasets

    def teardown(self, stage: str | None = None) -> None:
        """Close HDF5 handles held by this process."""
        for dataset in (self.train_set, self.val_set, self.test_set):
            if isinstance(dataset, RadioMLHDF5Dataset):
                dataset.close()
