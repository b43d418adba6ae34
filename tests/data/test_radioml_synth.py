"""Synthetic RadioML generator: SNR, determinism, signal properties, writers and ``kd radioml-synth``."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kd_lightning.commands import main as kd_main
from kd_lightning.data.radioml import CLASSES, CLASSES_2018, FILE_NAMES, RadioMLDataModule
from kd_lightning.data.radioml_synth import (
    _CONSTELLATIONS,
    MODULATIONS,
    SynthConfig,
    generate,
    rrc_taps,
    write_hdf5,
    write_pickle,
)

#: Pulse shaping only: no channel impairments (for properties of the clean modulations).
NO_CHANNEL = SynthConfig(phase_offset=False, cfo_std=0.0, sro_std=0.0, multipath_profile=(), frame_rms=None)


def _complex(frames: np.ndarray) -> np.ndarray:
    return frames[:, 0].astype(np.float64) + 1j * frames[:, 1]


def test_shapes_defaults_and_scale() -> None:
    frames = generate(snrs=[0, 10], frames_per_key=3)
    assert set(frames) == {(m, s) for m in CLASSES["2016.10a"] for s in (0, 10)}
    for x in frames.values():
        assert x.dtype == np.float32 and x.shape == (3, 2, 128)
        rms = np.sqrt(np.mean(np.abs(_complex(x)) ** 2, axis=1))
        np.testing.assert_allclose(rms, 0.01, rtol=1e-4)  # frame_rms: the ~1e-2 scale of RML2016
    long = generate(["BPSK", "FM"], [5], 2, 1024, config=SynthConfig(frame_rms=None))
    assert long[("BPSK", 5)].shape == (2, 2, 1024)
    with pytest.raises(ValueError, match="unknown modulations"):
        generate(["BPSK", "QAM1024"], [0], 1)
    with pytest.raises(ValueError, match="rolloff"):
        SynthConfig(rolloff=1.5)


@pytest.mark.parametrize("snr", [-10, 0, 10, 20])
def test_snr_is_measured_back_within_half_a_db(snr: int) -> None:
    mods = ["BPSK", "QAM64", "GFSK", "AM-SSB", "WBFM", "16APSK", "OQPSK"]
    noisy, clean = generate(mods, [snr], frames_per_key=64, seed=3, return_clean=True)
    for mod in mods:
        s, r = _complex(clean[(mod, snr)]), _complex(noisy[(mod, snr)])
        signal, noise = np.mean(np.abs(s) ** 2), np.mean(np.abs(r - s) ** 2)
        measured = 10 * math.log10(signal / noise)
        per_frame = 10 * np.log10(np.mean(np.abs(s) ** 2, axis=1) / np.mean(np.abs(r - s) ** 2, axis=1))
        assert abs(measured - snr) < 0.5, (mod, measured)
        assert abs(per_frame.mean() - snr) < 0.5, (mod, per_frame.mean())
        assert per_frame.std() < 1.0  # each frame near its SNR (128 complex noise samples: ~0.4 dB)


def test_determinism_and_key_independence() -> None:
    a = generate(["BPSK", "FM"], [0, 10], 4, seed=7)
    b = generate(["FM"], [10], 4, seed=7)  # one key alone: same frames as inside the bigger call
    np.testing.assert_array_equal(a[("FM", 10)], b[("FM", 10)])
    np.testing.assert_array_equal(a[("BPSK", 0)], generate(["BPSK", "FM"], [0, 10], 4, seed=7)[("BPSK", 0)])
    assert not np.array_equal(a[("BPSK", 0)], generate(["BPSK"], [0], 4, seed=8)[("BPSK", 0)])
    noisy, clean = generate(["QPSK"], [10], 4, seed=7, return_clean=True)
    np.testing.assert_array_equal(noisy[("QPSK", 10)], generate(["QPSK"], [10], 4, seed=7)[("QPSK", 10)])
    assert not np.allclose(noisy[("QPSK", 10)], clean[("QPSK", 10)])


def test_constellations() -> None:
    sizes = {"BPSK": 2, "QPSK": 4, "8PSK": 8, "32PSK": 32, "QAM16": 16, "32QAM": 32, "128QAM": 128, "256QAM": 256}
    sizes |= {"PAM4": 4, "OOK": 2, "8ASK": 8, "16APSK": 16, "32APSK": 32, "64APSK": 64, "128APSK": 128}
    for name, size in sizes.items():
        points = _CONSTELLATIONS[name]
        assert len(points) == size == len(set(np.round(points, 9)))
        assert math.isclose(np.mean(np.abs(points) ** 2), 1.0, rel_tol=1e-12)
    # Cross 32-QAM: the 6x6 grid without its corners; PAM4 {-3,-1,1,3}/sqrt(5); QPSK at pi/4 + k pi/2.
    q32 = _CONSTELLATIONS["32QAM"] * math.sqrt(20)  # mean |p|^2 of the cross grid is 20
    assert np.max(np.abs(q32.real)) == pytest.approx(5) and np.max(np.abs(q32)) == pytest.approx(math.sqrt(34))
    np.testing.assert_allclose(_CONSTELLATIONS["PAM4"], np.array([-3, -1, 1, 3]) / math.sqrt(5))
    np.testing.assert_allclose(
        np.angle(_CONSTELLATIONS["QPSK"]), [np.pi / 4, 3 * np.pi / 4, -3 * np.pi / 4, -np.pi / 4]
    )


def test_rrc_taps() -> None:
    taps = rrc_taps(0.35, 8, 8)
    assert len(taps) == 65 and math.isclose(np.sum(taps**2), 1.0) and np.allclose(taps, taps[::-1])
    # Matched filtering gives a Nyquist pulse: zero at every non-zero multiple of the symbol time.
    pulse = np.convolve(taps, taps)
    centre = len(pulse) // 2
    assert np.all(np.abs(pulse[centre + 8 :: 8][:4]) < 0.02 * pulse[centre])
    # Roll-off 0 is a sinc; the special point t = 1 / (4 beta) is finite.
    sinc = rrc_taps(0.0, 4, 4)
    np.testing.assert_allclose(sinc / sinc[8], np.sinc(np.arange(-8, 9) / 4), atol=1e-12)
    assert np.all(np.isfinite(rrc_taps(0.25, 8, 4)))


def test_modulation_properties_without_channel() -> None:
    mods = ["BPSK", "PAM4", "OOK", "AM-DSB", "AM-DSB-SC", "CPFSK", "GFSK", "GMSK", "WBFM", "AM-SSB", "QPSK"]
    _, clean = generate(mods, [100], 16, 256, seed=1, config=NO_CHANNEL, return_clean=True)
    s = {m: _complex(clean[(m, 100)]) for m in mods}
    for real in ("BPSK", "PAM4", "OOK", "AM-DSB", "AM-DSB-SC"):
        assert np.max(np.abs(s[real].imag)) < 1e-6, real  # one-dimensional before the channel
    for constant_envelope in ("CPFSK", "GFSK", "GMSK", "WBFM"):
        np.testing.assert_allclose(np.abs(s[constant_envelope]), 1.0, atol=1e-6)
    assert np.min(s["AM-DSB"].real) >= 0.5 - 1e-9  # 1 + 0.5 m with |m| <= 1: carrier retained
    spectrum = np.abs(np.fft.fft(s["AM-SSB"] * np.hanning(256), axis=1)) ** 2  # m + j H(m): one sideband
    assert spectrum[:, 129:].sum() < 1e-3 * spectrum[:, 1:128].sum()
    dsb = np.abs(np.fft.fft(s["AM-DSB-SC"] * np.hanning(256), axis=1)) ** 2  # a real signal: both sidebands
    assert dsb[:, 129:].sum() > 0.5 * dsb[:, 1:128].sum()
    assert np.abs(s["QPSK"].imag).mean() > 0.3 * np.abs(s["QPSK"]).mean()  # two-dimensional
    # CPFSK with h = 0.5 and 8 samples per symbol: the phase moves by +-pi/16 per sample (pi/2 per symbol).
    steps = np.angle(s["CPFSK"][:, 1:] / s["CPFSK"][:, :-1])
    np.testing.assert_allclose(np.abs(steps), np.pi / 16, atol=1e-9)


def test_channel_changes_frames_and_low_snr_is_noise() -> None:
    plain = generate(["QPSK"], [100], 8, seed=2, config=NO_CHANNEL)[("QPSK", 100)]
    faded = generate(["QPSK"], [100], 8, seed=2, config=SynthConfig(frame_rms=None))[("QPSK", 100)]
    assert not np.allclose(plain, faded)
    noisy, clean = generate(["QPSK"], [-20], 32, seed=2, return_clean=True)
    assert np.mean(np.abs(_complex(clean[("QPSK", -20)])) ** 2) < 0.02 * np.mean(
        np.abs(_complex(noisy[("QPSK", -20)])) ** 2
    )


def test_writers_round_trip(tmp_path: Path) -> None:
    frames = generate(["BPSK", "16QAM"], [-2, 4], 3, 32)
    with write_pickle(frames, tmp_path / "f.pkl").open("rb") as f:
        loaded = pickle.load(f, encoding="latin1")
    assert set(loaded) == set(frames) and all(np.array_equal(loaded[k], frames[k]) for k in frames)
    assert (tmp_path / "f.pkl").read_bytes()[:2] == b"\x80\x02"  # protocol 2
    write_hdf5(frames, tmp_path / "f.hdf5")
    with h5py.File(tmp_path / "f.hdf5", "r") as f:
        x, y, z = f["X"][:], f["Y"][:], f["Z"][:]
    assert x.shape == (12, 32, 2) and y.shape == (12, 24) and z.shape == (12, 1) and y.dtype == z.dtype == np.int64
    assert np.all(y.sum(1) == 1)
    # Blocks in class order (BPSK column 3 before 16QAM column 12), then SNR ascending.
    assert y.argmax(1).tolist() == [3] * 6 + [12] * 6 and z[:, 0].tolist() == [-2] * 3 + [4] * 3 + [-2] * 3 + [4] * 3
    np.testing.assert_array_equal(x[:3], frames[("BPSK", -2)].transpose(0, 2, 1))
    with pytest.raises(ValueError, match=r"QAM16.*16QAM"):
        write_hdf5({("QAM16", 0): frames[("16QAM", 4)]}, tmp_path / "g.hdf5")


def test_cli_writes_files_the_data_module_reads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "synth"
    args = ["radioml-synth", "--out", str(out), "--format", "2016.10a", "2018.01A", "--frames", "10"]
    kd_main([*args, "--modulations", "BPSK", "QPSK", "QAM16", "WBFM", "--snrs", "-10", "10"])
    printed = capsys.readouterr().out
    assert FILE_NAMES["2016.10a"] in printed and "synthetic" in printed and "modulations=" in printed
    pkl = RadioMLDataModule(root=str(out), modulations=["BPSK", "QPSK", "QAM16", "WBFM"], batch_size=8)
    pkl.setup("fit")
    x, y, snr = next(iter(pkl.train_dataloader()))
    assert x.shape == (8, 2, 128) and pkl.snrs == [-10, 10] and set(snr.tolist()) <= {-10, 10}
    assert len(pkl.train_set) + len(pkl.val_set) + len(pkl.test_set) == 4 * 2 * 10
    torch.testing.assert_close(x.square().sum(1).mean(-1), torch.ones(8))  # rms normalisation
    # 2018.01A: RML2016 names mapped to the RML2018 classes, 1024 samples, classes-fixed order.
    h5 = RadioMLDataModule(root=str(out), version="2018.01A", modulations=["FM", "16QAM", "QPSK", "BPSK"])
    h5.setup("fit")
    assert h5.classes == ["BPSK", "QPSK", "16QAM", "FM"] and h5.input_shape == (2, 1024)
    x, y, _ = next(iter(h5.val_dataloader()))
    assert x.shape[1:] == (2, 1024) and set(y.tolist()) <= {0, 1, 2, 3}
    # Defaults: every RML2016.10b modulation on the full SNR grid; channel arguments reach the config.
    kd_main(["radioml-synth", "--out", str(out), "--format", "2016.10b", "--frames", "2", "--multipath-profile"])
    b = RadioMLDataModule(root=str(out), version="2016.10b", splits=(0.5, 0.5, 0.0))
    b.setup("fit")
    assert b.classes == list(CLASSES["2016.10b"]) and b.snrs == list(range(-20, 19, 2))
    with pytest.raises(SystemExit):
        kd_main(["radioml-synth", "--out", str(out), "--format", "2018.01A", "--modulations", "CPFSK"])
    with pytest.raises(SystemExit):
        kd_main(["radioml-synth", "--out", str(out), "--format", "2016.10a", "2018.01A", "--file", "x.pkl"])


def test_every_known_modulation_generates() -> None:
    frames = generate(list(MODULATIONS), [10], 2, 64)
    assert len(frames) == len(MODULATIONS) and set(CLASSES_2018) <= set(MODULATIONS)
    assert set(CLASSES["2016.10a"]) <= set(MODULATIONS)
    assert all(np.all(np.isfinite(x)) for x in frames.values())
