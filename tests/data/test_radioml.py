"""RadioML data module on tiny files in the three published layouts (Python-2 pickles, HDF5)."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kd_lightning.data.base import targets_of
from kd_lightning.data.radioml import (
    CLASSES,
    CLASSES_2018,
    FILE_NAMES,
    RadioMLDataModule,
    RadioMLHDF5Dataset,
    RadioMLTensorDataset,
    load_radioml_pickle,
    normalize_frames,
    split_by_group,
)
from kd_lightning.errors import DatasetNotFoundError, KDConfigError

SNRS = (-10, 0, 10)
PER_KEY = 10  # frames per (modulation, SNR): 6 / 2 / 2 with the default 0.6 / 0.2 / 0.2 split


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` opcodes, as the published Python-2 pickles hold them.

    Keys and numpy buffers then load only with ``encoding="latin1"`` (the default ASCII fails).
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _frames(mods, snrs=SNRS, per_key=PER_KEY, length=128, seed=0) -> dict[tuple[str, int], np.ndarray]:
    """Random frames whose sample [0, 0] is a unique id (> 0): ``id -> (mod, snr)`` is recoverable."""
    rng = np.random.default_rng(seed)
    out, next_id = {}, 1
    for mod in mods:
        for snr in snrs:
            x = rng.normal(0, 0.01, (per_key, 2, length)).astype(np.float32)
            x[:, 0, 0] = np.arange(next_id, next_id + per_key)
            next_id += per_key
            out[(mod, snr)] = x
    return out


def _ids(frames: dict[tuple[str, int], np.ndarray]) -> dict[int, tuple[str, int]]:
    return {int(v): key for key, x in frames.items() for v in x[:, 0, 0]}


def write_py2_pickle(path: Path, frames: dict[tuple[str, int], np.ndarray]) -> Path:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump({(mod.encode("latin1"), snr): x for (mod, snr), x in frames.items()})
    path.write_bytes(buf.getvalue())
    return path


def write_h5(path: Path, frames: dict[tuple[str, int], np.ndarray]) -> Path:
    """RML2018.01A layout: X [N, L, 2], one-hot Y in the classes-fixed order, Z [N, 1]."""
    keys = sorted(frames, key=lambda k: (CLASSES_2018.index(k[0]), k[1]))
    x = np.concatenate([frames[k].transpose(0, 2, 1) for k in keys])
    labels = np.concatenate([[CLASSES_2018.index(k[0])] * len(frames[k]) for k in keys])
    z = np.concatenate([[k[1]] * len(frames[k]) for k in keys]).reshape(-1, 1).astype(np.int64)
    with h5py.File(path, "w") as f:
        f["X"] = x
        f["Y"] = np.eye(len(CLASSES_2018), dtype=np.int64)[labels]
        f["Z"] = z
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("radioml")
    a = _frames(CLASSES["2016.10a"])
    b = _frames(CLASSES["2016.10b"], seed=1)
    c = _frames(["FM", "BPSK", "OOK", "64QAM"], length=1024, per_key=5, seed=2)
    write_py2_pickle(root / FILE_NAMES["2016.10a"], a)
    write_py2_pickle(root / FILE_NAMES["2016.10b"], b)
    write_h5(root / FILE_NAMES["2018.01A"], c)
    return {"root": root, "2016.10a": a, "2016.10b": b, "2018.01A": c}


def _module(root: Path, **kwargs) -> RadioMLDataModule:
    kwargs.setdefault("normalize", "none")
    dm = RadioMLDataModule(root=str(root), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _all(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, ss = zip(*loader)
    return torch.cat(xs), torch.cat(ys), torch.cat(ss)


def _check_ids(dm: RadioMLDataModule, frames: dict, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, snr = _all(loader)
    ids = _ids(frames)
    for frame_id, label, s in zip(x[:, 0, 0].round().long().tolist(), y.tolist(), snr.tolist()):
        assert ids[frame_id] == (dm.classes[label], s)
    return x, y, snr


def test_python2_pickle_needs_latin1(files) -> None:
    path = files["root"] / FILE_NAMES["2016.10a"]
    with pytest.raises(UnicodeDecodeError), path.open("rb") as f:
        pickle.load(f)  # what a loader without encoding="latin1" would do
    data = load_radioml_pickle(path)
    assert set(data) == set(files["2016.10a"]) and all(isinstance(mod, str) for mod, _ in data)
    np.testing.assert_array_equal(data[("QPSK", 0)], files["2016.10a"][("QPSK", 0)])


@pytest.mark.parametrize("version", ["2016.10a", "2016.10b"])
def test_pickle_versions(files, version: str) -> None:
    dm = _module(files["root"], version=version, batch_size=32)
    assert dm.classes == sorted(dm.classes) == list(CLASSES[version])
    assert dm.num_classes == (11 if version == "2016.10a" else 10)
    assert ("AM-SSB" in dm.classes) == (version == "2016.10a")
    assert dm.input_shape == (2, 128) and dm.snrs == list(SNRS) and dm.train_snrs == list(SNRS)
    x, y, snr = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and tuple(x.shape) == (32, 2, 128)
    assert y.dtype == torch.int64 and snr.dtype == torch.int64 and y.shape == snr.shape == (32,)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        _check_ids(dm, files[version], loader)
    # Raw values survive unchanged with normalize="none" (test set: no shuffling).
    x, y, snr = _all(dm.test_dataloader())
    first = files[version][(dm.classes[int(y[0])], int(snr[0]))]
    np.testing.assert_array_equal(x[0].numpy(), first[first[:, 0, 0] == x[0, 0, 0].item()][0])


def test_hdf5_2018_class_order_and_transpose(files) -> None:
    frames = files["2018.01A"]
    dm = _module(files["root"], version="2018.01A", modulations=["FM", "BPSK", "OOK", "64QAM"], batch_size=8)
    assert dm.classes == ["OOK", "BPSK", "64QAM", "FM"]  # Y's column order, not the order asked for
    assert dm.num_classes == 4 and dm.input_shape == (2, 1024)
    x, _, _ = _check_ids(dm, frames, dm.val_dataloader())
    assert tuple(x.shape[1:]) == (2, 1024)
    mod, snr = _ids(frames)[int(x[0, 0, 0])]
    stored = frames[(mod, snr)]  # [n, 2, L]; the file holds its transpose [n, L, 2]
    np.testing.assert_array_equal(x[0].numpy(), stored[stored[:, 0, 0] == x[0, 0, 0].item()][0])
    _check_ids(dm, frames, dm.train_dataloader())
    # All 24 classes, in the classes-fixed order, when no subset is given and the file has them all.
    full = _frames(CLASSES_2018, snrs=(0,), per_key=3, length=16)
    root = files["root"] / "full2018"
    root.mkdir(exist_ok=True)
    write_h5(root / FILE_NAMES["2018.01A"], full)
    dm = _module(root, version="2018.01A", splits=(0.4, 0.3, 0.3))
    assert dm.classes == list(CLASSES_2018) and dm.num_classes == 24 and dm.input_shape == (2, 16)
    _check_ids(dm, full, dm.train_dataloader())


def test_hdf5_is_read_lazily(files, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _module(files["root"], version="2018.01A", modulations=["FM", "BPSK", "OOK", "64QAM"], batch_size=4)
    n_frames, length = 4 * len(SNRS) * 5, 1024
    datasets = [dm.train_set, dm.val_set, dm.test_set]
    assert all(isinstance(d, RadioMLHDF5Dataset) for d in datasets)
    assert all(d._file is None for d in datasets)  # setup read Y and Z only, and closed the file
    for obj in [dm, *datasets]:
        for name, value in vars(obj).items():
            if isinstance(value, (np.ndarray, torch.Tensor)):
                numel = value.size if isinstance(value, np.ndarray) else value.numel()
                assert numel < n_frames * length, name  # no copy of X: labels, SNRs and row numbers only
    reads: list[int] = []
    original = RadioMLHDF5Dataset.read_rows

    def counting(self, rows):
        assert np.all(np.diff(rows) > 0)  # sorted, distinct: what h5py fancy indexing needs
        reads.append(len(rows))
        return original(self, rows)

    monkeypatch.setattr(RadioMLHDF5Dataset, "read_rows", counting)
    x, _, _ = next(iter(dm.train_dataloader()))
    assert reads == [4] and x.shape == (4, 2, length)  # one read of exactly the batch's rows
    assert dm.train_set[0][0].shape == (2, length) and reads[-1] == 1
    assert isinstance(dm.train_set._file, h5py.File)
    dm.teardown("fit")
    assert dm.train_set._file is None


def test_hdf5_with_worker_processes(files) -> None:
    dm = _module(files["root"], version="2018.01A", modulations=["BPSK", "OOK"], num_workers=1, batch_size=8)
    _ = dm.val_set[0]  # a handle opened in the parent must not leak into the worker
    x, y, snr = _all(dm.val_dataloader())
    assert len(x) == len(dm.val_set) == 2 * len(SNRS) * 1 and torch.all(y < 2)
    assert sorted(set(snr.tolist())) == list(SNRS)


def test_split_is_stratified_partition_and_deterministic(files) -> None:
    dm = _module(files["root"], splits=(0.6, 0.2, 0.2))
    sets = [dm.train_set, dm.val_set, dm.test_set]
    assert all(isinstance(d, RadioMLTensorDataset) for d in sets)
    rows = torch.cat([d.indices for d in sets])
    assert torch.equal(rows.sort().values, torch.arange(11 * len(SNRS) * PER_KEY))  # disjoint and complete
    for d, expected in zip(sets, (6, 2, 2)):  # every (modulation, SNR) group split 6 / 2 / 2
        groups = torch.stack([d.targets, d.snrs], 1)
        _, counts = torch.unique(groups, dim=0, return_counts=True)
        assert len(counts) == 11 * len(SNRS) and torch.all(counts == expected)
    again, other = _module(files["root"]), _module(files["root"], split_seed=1)
    assert torch.equal(again.test_set.indices, dm.test_set.indices)
    assert not torch.equal(other.test_set.indices, dm.test_set.indices)
    # A group's split does not depend on the other groups loaded.
    subset = _module(files["root"], modulations=["QPSK", "BPSK"])
    ids = lambda d: set(_all(torch.utils.data.DataLoader(d, batch_size=64))[0][:, 0, 0].long().tolist())  # noqa: E731
    kept = {i for i, (mod, _) in _ids(files["2016.10a"]).items() if mod in ("QPSK", "BPSK")}
    assert ids(subset.test_set) == ids(dm.test_set) & kept
    # hold_out (base class) works on these datasets.
    held = dm.hold_out(0.5)
    assert len(held) + len(dm.train_set) == 6 * 11 * len(SNRS) and len(targets_of(held)) == len(held)


def test_split_by_group_small_groups() -> None:
    targets = np.array([0, 0, 1, 1, 1, 2])
    snrs = np.array([0, 0, 0, 0, 0, 4])
    train, val, test = split_by_group(targets, snrs, ["a", "b", "c"], (0.2, 0.4, 0.4), seed=0)
    assert sorted([*train, *val, *test]) == list(range(6))
    assert 5 in train  # a lone frame stays in training
    assert len(set(train) & {0, 1}) >= 1 and len(set(train) & {2, 3, 4}) >= 1


def test_snr_filter(files) -> None:
    train_only = _module(files["root"], min_snr=0)
    assert train_only.snr_filter_on == "train"
    assert set(train_only.train_set.snrs.tolist()) == {0, 10} and train_only.train_snrs == [0, 10]
    assert set(train_only.val_set.snrs.tolist()) == set(train_only.test_set.snrs.tolist()) == set(SNRS)
    assert train_only.snrs == list(SNRS)
    everywhere = _module(files["root"], min_snr=-10, max_snr=0, snr_filter_on="all")
    for d in (everywhere.train_set, everywhere.val_set, everywhere.test_set):
        assert set(d.snrs.tolist()) == {-10, 0}
    assert everywhere.snrs == [-10, 0]
    # Filtering never moves a frame to another split: same test frames at the kept SNRs.
    full = _module(files["root"])
    keep = full.test_set.snrs <= 0
    assert torch.equal(everywhere.test_set.indices, full.test_set.indices[keep])
    assert torch.equal(train_only.test_set.indices, full.test_set.indices)
    with pytest.raises(KDConfigError, match="min_snr=20"):
        _module(files["root"], min_snr=20)
    with pytest.raises(KDConfigError, match="max_snr"):
        RadioMLDataModule(root=str(files["root"]), min_snr=5, max_snr=0)


@pytest.mark.parametrize("mode", ["none", "rms", "max"])
def test_normalisation(files, mode: str) -> None:
    dm = _module(files["root"], normalize=mode)
    x, _, _ = _all(dm.test_dataloader())
    if mode == "rms":
        torch.testing.assert_close(x.square().sum(1).mean(-1), torch.ones(len(x)))
    elif mode == "max":
        torch.testing.assert_close(x.abs().amax(dim=(1, 2)), torch.ones(len(x)))
    else:
        assert x[:, 0, 0].min() >= 1  # the raw ids
    raw = normalize_frames(torch.tensor([[[3.0, 0.0], [4.0, 0.0]]]), mode)  # one frame, |s|^2 = 25, 0
    expected = {
        "none": [[3.0, 0.0], [4.0, 0.0]],
        "rms": [[3 / 12.5**0.5, 0], [4 / 12.5**0.5, 0]],
        "max": [[0.75, 0], [1, 0]],
    }
    torch.testing.assert_close(raw[0], torch.tensor(expected[mode]))
    assert torch.equal(normalize_frames(torch.zeros(1, 2, 4), mode), torch.zeros(1, 2, 4))
    h5 = _module(files["root"], version="2018.01A", modulations=["BPSK", "OOK"], normalize=mode)
    x, _, _ = _all(h5.val_dataloader())
    if mode == "rms":
        torch.testing.assert_close(x.square().sum(1).mean(-1), torch.ones(len(x)))


def test_modulation_subset(files) -> None:
    dm = _module(files["root"], modulations=["WBFM", "BPSK", "QAM16"])
    assert dm.classes == ["BPSK", "QAM16", "WBFM"] and dm.num_classes == 3
    _, y, _ = _check_ids(dm, files["2016.10a"], dm.train_dataloader())
    assert set(y.tolist()) == {0, 1, 2}
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 3 * len(SNRS) * PER_KEY
    # num_classes is known before setup (the CLI links it into the model at instantiation).
    assert RadioMLDataModule(root="nowhere", modulations=["BPSK", "QPSK"]).num_classes == 2
    assert RadioMLDataModule(root="nowhere", version="2018.01A").num_classes == 24
    with pytest.raises(KDConfigError, match="unknown: \\['16QAM'\\]"):
        RadioMLDataModule(root="nowhere", modulations=["BPSK", "16QAM"])
    with pytest.raises(KDConfigError, match="AM-SSB"):
        RadioMLDataModule(root="nowhere", version="2016.10b", modulations=["AM-SSB"])
    # The file lacks modulations the data module was told to use.
    with pytest.raises(KDConfigError, match=r"no frames of \['4ASK'.*modulations"):
        _module(files["root"], version="2018.01A", modulations=["OOK", "4ASK"])
    with pytest.raises(KDConfigError, match=r"Set data\.init_args\.modulations"):
        _module(files["root"], version="2018.01A")


def test_missing_file_error(tmp_path: Path) -> None:
    for version in ("2016.10a", "2018.01A"):
        dm = RadioMLDataModule(root=str(tmp_path / "absent"), version=version)
        with pytest.raises(DatasetNotFoundError) as err:
            dm.prepare_data()
        text = str(err.value)
        assert FILE_NAMES[version] in text and str((tmp_path / "absent").resolve()) in text
        assert "deepsig.ai/datasets" in text and "kd radioml-synth" in text and f"--format {version}" in text
    with pytest.raises(DatasetNotFoundError, match=r"other\.pkl"):
        RadioMLDataModule(root=str(tmp_path), file="other.pkl").setup("fit")


def test_file_argument_and_2018_subfolder(files, tmp_path: Path) -> None:
    src = files["root"] / FILE_NAMES["2016.10a"]
    (tmp_path / "custom.pkl").write_bytes(src.read_bytes())
    assert len(_module(tmp_path, file="custom.pkl").train_set) == 6 * 11 * len(SNRS)
    assert len(_module(files["root"], file=str(src.resolve())).train_set) == 6 * 11 * len(SNRS)
    (tmp_path / "2018.01").mkdir()
    (tmp_path / "2018.01" / FILE_NAMES["2018.01A"]).write_bytes((files["root"] / FILE_NAMES["2018.01A"]).read_bytes())
    dm = _module(tmp_path, version="2018.01A", modulations=["OOK"])
    assert dm.path.parent.name == "2018.01" and len(dm.val_set) == len(SNRS)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"splits": (0.5, 0.5, 0.5)}, "sum of 1"),
        ({"splits": (0.8, 0.0, 0.2)}, "val > 0"),
        ({"normalize": "zscore"}, "normalize"),
        ({"snr_filter_on": "val"}, "snr_filter_on"),
        ({"version": "2018.01B"}, "version"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(KDConfigError, match=match):
        RadioMLDataModule(root="nowhere", **kwargs)


def test_fits_with_a_lightning_module(files, tmp_path: Path) -> None:
    """Batches of three (x, y, snr) feed the method base classes unchanged."""
    from kd_lightning.methods import Supervised
    from tests.helpers.tiny import TinyNet, tiny_trainer

    torch.manual_seed(0)
    dm = RadioMLDataModule(root=str(files["root"]), modulations=["BPSK", "QPSK"], batch_size=16)
    model = Supervised(TinyNet(num_classes=2, in_features=2 * 128))
    trainer = tiny_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["val/acc"])
