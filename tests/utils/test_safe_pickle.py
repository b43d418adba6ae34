"""The restricted unpickler of the dataset pickles: real CIFAR/RadioML layouts load, code-carrying pickles never run."""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import CIFAR10DataModule, CIFAR100DataModule
from kd_lightning.data.radioml import CLASSES, FILE_NAMES, RadioMLDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.utils.safe_pickle import UnsafePickleError, restricted_load
from tests.data.test_radioml import _frames, write_py2_pickle
from tests.data_generators import write_fake_cifar10, write_fake_cifar100


class _ShellPayload:
    """Pickles to ``os.system("touch <marker>")``: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


class _ExecPayload:
    """Pickles to ``builtins.exec(<write marker>)``: unpickling it runs Python code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


PAYLOADS = {"os.system": (_ShellPayload, f"{os.system.__module__}.system"), "builtins.exec": (_ExecPayload, "exec")}


def _malicious(path: Path, marker: Path, kind: str, protocol: int) -> Path:
    """A pickle that looks like a CIFAR batch but carries a payload among its entries."""
    payload_class, _ = PAYLOADS[kind]
    entry = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": payload_class(marker)}
    path.write_bytes(pickle.dumps(entry, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_data_round_trips(protocol: int) -> None:
    value = {
        b"data": np.arange(24, dtype=np.uint8).reshape(2, 12),
        "floats": np.linspace(0, 1, 5, dtype=np.float32),
        ("QPSK", -4): np.ones((3, 2, 8), np.float32),
        "scalar": np.float32(2.5),
        "nested": [1, 2.0, "three", b"four", (None, True), {"k": -1}],
    }
    loaded = restricted_load(pickle.dumps(value, protocol=protocol))
    assert set(loaded) == set(value)
    for key in (b"data", "floats", ("QPSK", -4)):
        np.testing.assert_array_equal(loaded[key], value[key])
        assert loaded[key].dtype == value[key].dtype
    assert loaded["scalar"] == np.float32(2.5) and loaded["nested"] == value["nested"]


def test_fake_cifar_batches_load(tmp_path: Path) -> None:
    fake = write_fake_cifar100(tmp_path, n_train=20, n_test=10)
    train = restricted_load(fake.folder / "train")
    assert torch.equal(torch.from_numpy(train[b"data"].reshape(-1, 3, 32, 32)), fake.train_images)
    assert train[b"fine_labels"] == fake.train_targets.tolist()
    meta = restricted_load(fake.folder / "meta")
    assert len(meta[b"fine_label_names"]) == 100
    fake10 = write_fake_cifar10(tmp_path, n_train=10, n_test=5)
    with (fake10.folder / "test_batch").open("rb") as handle:  # an open file works too
        assert restricted_load(handle)[b"labels"] == fake10.test_targets.tolist()


def test_python2_radioml_pickle_loads(tmp_path: Path) -> None:
    frames = _frames(["QPSK", "FM"], snrs=(-2, 4), per_key=3)
    path = write_py2_pickle(tmp_path / "rml.pkl", frames)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())  # Python 2 str opcodes: needs latin1, which restricted_load uses
    loaded = restricted_load(path)
    assert set(loaded) == set(frames)  # Python 2 str keys come back as str
    np.testing.assert_array_equal(loaded[("QPSK", 4)], frames[("QPSK", 4)])


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_code_payload_is_refused_and_never_runs(tmp_path: Path, kind: str, protocol: int) -> None:
    marker = tmp_path / "marker"
    path = _malicious(tmp_path / "batch", marker, kind, protocol)
    with pytest.raises(UnsafePickleError) as info:
        restricted_load(path)
    message = str(info.value)
    assert PAYLOADS[kind][1] in message and str(path) in message and "refused to load" in message
    assert not marker.exists()
    # The file is live: plain pickle runs the payload (so the refusal above is what kept it from running).
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_other_globals_are_refused(tmp_path: Path) -> None:
    for value in (Path("x"), torch.zeros(1), {1, 2}, np.dtype("O").type):
        with pytest.raises(UnsafePickleError, match="refused to load"):
            restricted_load(pickle.dumps(value, protocol=2))


@pytest.mark.parametrize("dataset", ["cifar100", "cifar10"])
def test_malicious_cifar_batch_fails_the_data_module(tmp_path: Path, dataset: str) -> None:
    writer, module, batch = {
        "cifar100": (write_fake_cifar100, CIFAR100DataModule, "train"),
        "cifar10": (write_fake_cifar10, CIFAR10DataModule, "data_batch_2"),
    }[dataset]
    fake = writer(tmp_path, n_train=20, n_test=10)
    marker = tmp_path / "marker"
    _malicious(fake.folder / batch, marker, "os.system", 2)
    dm = module(root=str(tmp_path), num_workers=0)
    with pytest.raises(KDConfigError) as info:
        dm.prepare_data()
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith("data.init_args.root: ") and "\n" not in message
    assert str(fake.folder / batch) in message and "system" in message
    assert not marker.exists()


def test_malicious_radioml_file_fails_the_data_module(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    frames = _frames(CLASSES["2016.10a"], snrs=(0,), per_key=4)
    raw = {(mod, snr): x for (mod, snr), x in frames.items()}
    raw[("QPSK", 2)] = _ExecPayload(marker)
    (tmp_path / FILE_NAMES["2016.10a"]).write_bytes(pickle.dumps(raw, protocol=2))
    dm = RadioMLDataModule(root=str(tmp_path), version="2016.10a", num_workers=0)
    with pytest.raises(KDConfigError) as info:
        dm.prepare_data()
        dm.setup("fit")
    message = str(info.value)
    assert message.startswith("data.init_args.root: ") and "\n" not in message
    assert FILE_NAMES["2016.10a"] in message and "refused to load" in message and ".exec" in message
    assert not marker.exists()


def test_truncated_data_pickle_is_one_config_error(tmp_path: Path) -> None:
    frames = _frames(CLASSES["2016.10a"], snrs=(0,), per_key=4)
    path = write_py2_pickle(tmp_path / FILE_NAMES["2016.10a"], frames)
    path.write_bytes(path.read_bytes()[:1000])
    dm = RadioMLDataModule(root=str(tmp_path), version="2016.10a", num_workers=0)
    with pytest.raises(KDConfigError, match=r"^data\.init_args\.root: .*not a readable RadioML 2016 pickle"):
        dm.prepare_data()
        dm.setup("fit")
