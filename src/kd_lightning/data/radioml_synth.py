"""Synthetic RadioML-like frames: an offline APPROXIMATION of DeepSig's RML2016 / RML2018 datasets.

This is not a copy of the published datasets (they were made with GNU Radio, real audio for the
analog modulations and an over-the-air channel for 2018.01A) and no accuracy measured on it is
comparable with published numbers. It gives frames with the same layouts, class names, SNR grid and
the same kinds of impairments, for tests, smoke runs and demos without the real files:

* :func:`generate` returns ``{(modulation, snr): float32 [n, 2, L]}`` (the RML2016.10a structure);
* :func:`write_pickle` writes it as a protocol-2 pickle (``RML2016.10a_dict.pkl`` /
  ``RML2016.10b.dat``), so the ``encoding="latin1"`` loader path runs;
* :func:`write_hdf5` writes the RML2018.01A layout: ``X float32 [N, L, 2]``, one-hot ``Y int64 [N, 24]``
  in the "classes-fixed" order, ``Z int64 [N, 1]``, rows in contiguous (modulation, SNR) blocks;
* ``kd radioml-synth`` (:func:`main`) does both from the command line.

Recipe per frame (all vectorised over the frames of one (modulation, SNR) key):

1. Source. Linear digital modulations draw i.i.d. symbols (BPSK ±1; M-PSK ``exp(j(2πk/M + π/M))``;
   square 16/64/256-QAM and cross 32/128-QAM; PAM4 ``{-3,-1,1,3}/√5``; OOK / 4ASK / 8ASK unipolar
   amplitudes; 16/32/64/128-APSK on DVB-S2-like rings, an approximation), every constellation scaled to
   unit average power, upsampled by ``sps`` and shaped by a root-raised-cosine filter (``rolloff``,
   ``span`` symbols); OQPSK delays Q by half a symbol. CPFSK / GFSK / GMSK are binary continuous-phase
   FSK with modulation index ``fsk_index`` (phase change ``π h a`` per symbol, the usual convention;
   GNU Radio's ``cpfsk_bc`` uses the same), GFSK/GMSK with a Gaussian frequency pulse of
   bandwidth-time product ``gfsk_bt`` / ``gmsk_bt``. Analog: a message ``m`` = Gaussian noise low-passed
   at ``analog_cutoff`` (fraction of the sample rate) and scaled to ``[-1, 1]``; AM-DSB(-WC)
   ``1 + am_index m``; AM-DSB-SC ``m``; AM-SSB(-SC) ``m + j H(m)``; AM-SSB-WC ``1 + am_index (m + j H(m))``;
   WBFM / FM ``exp(j 2π fm_deviation Σ m)``.
2. Channel. Sample-rate offset: resampling by ``1 + N(0, sro_std²)`` with linear interpolation at a
   random start (the random window crop); multipath: an FIR of complex Gaussian taps one sample apart
   with mean powers ``multipath_profile``, the first tap Rician with K-factor ``rician_k`` (``0``: all
   Rayleigh); phase offset ``U(0, 2π)``; carrier-frequency offset ``exp(j 2π f n)``,
   ``f ~ N(0, cfo_std²)`` cycles/sample clipped to ``±cfo_max``. Fading and offsets are constant within
   a frame.
3. AWGN at the stated SNR: complex noise of variance ``P / 10^(snr/10)``, ``P`` = the mean ``|s|²`` of
   that frame's clean (post-channel) signal, so the SNR of each frame is exact in expectation;
   ``generate(..., return_clean=True)`` also returns the clean frames, from which the realised SNR can be
   measured.
4. Scale: every frame (clean and noisy alike) is multiplied by ``frame_rms / rms(noisy frame)``
   (``None`` keeps unit signal power), then stacked as ``[Re, Im]`` rows.

Choices that differ from docs/methods 01 §6 (the spec's recipe):

* CPFSK uses the usual phase change ``π h`` per symbol (the spec's ``2π h Σ a / sps`` is ``h = 1`` in
  this convention).
* Carrier-frequency offset: ``cfo_std = 1e-3`` cycles/sample clipped at ``cfo_max = 2.5e-3``, not the
  spec's ``N(0, 0.01)``. DeepSig's public RML2016 generator calls GNU Radio's
  ``dynamic_channel_model(200e3, 0.01, 50, 0.01, 500, 8, 1, True, 4, [0, 0.9, 1.7], [1, 0.8, 0.3], ...)``:
  the 0.01 there is the step (Hz per sample) of a random walk bounded at 500 Hz of a 200 kHz rate, i.e.
  at most 0.0025 cycles/sample. Read as 0.01 cycles/sample, a 128-sample frame turns by more than a
  full cycle and a small CNN could no longer separate QPSK from 8PSK (71 % instead of 88 % on
  BPSK/QPSK/8PSK/PAM4/CPFSK at 10-18 dB in our check).
* The first multipath tap is Rician with ``K = 4`` (the generator's line-of-sight model) on the spec's
  power profile ``(1, 0.3, 0.1)``; ``rician_k = 0`` gives the spec's Rayleigh taps.
* SNR here is the ratio of signal to noise power of each frame. The published generator passes
  ``noise_amp = 10^(-snr/10)`` (a noise voltage) to the channel, whatever the transmitter's output power,
  so the published nominal SNR need not equal that power ratio; compare accuracy-vs-SNR curves across
  the two with care.

Each (modulation, SNR) key has its own random stream seeded by ``(seed, modulation, snr)``, so a key's
frames do not depend on which other keys are generated.
"""

from __future__ import annotations

import math
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_lightning.data.radioml_layouts import CLASSES, CLASSES_2018, SNRS, import_h5py
from kd_lightning.errors import KDConfigError

__all__ = [
    "ALIASES_2018",
    "MODULATIONS",
    "SynthConfig",
    "generate",
    "rrc_taps",
    "write_hdf5",
    "write_pickle",
]

#: RML2016 names -> the RML2018.01A class generated by the same recipe (used by ``--format 2018.01A``).
ALIASES_2018 = {"QAM16": "16QAM", "QAM64": "64QAM", "AM-DSB": "AM-DSB-WC", "AM-SSB": "AM-SSB-SC", "WBFM": "FM"}


def _psk(m: int) -> np.ndarray:
    if m == 2:
        return np.array([1.0, -1.0], dtype=complex)
    k = np.arange(m)
    return np.exp(1j * (2 * np.pi * k / m + np.pi / m))


def _qam(m: int) -> np.ndarray:
    side = math.isqrt(m)
    if side * side == m:  # square grid
        levels = np.arange(-(side - 1), side, 2)
        points = (levels[:, None] + 1j * levels[None, :]).ravel()
    else:  # cross constellation: an even n x n grid without its four c x c corners (32-QAM, 128-QAM)
        n = 2 * math.ceil(math.sqrt(m) / 2)
        c = math.isqrt((n * n - m) // 4)
        if n * n - 4 * c * c != m:
            raise KDConfigError(f"no square or cross QAM with {m} points")
        levels = np.arange(-(n - 1), n, 2)
        grid = (levels[:, None] + 1j * levels[None, :]).ravel()
        edge = n - 1 - 2 * c
        points = grid[~((np.abs(grid.real) > edge) & (np.abs(grid.imag) > edge))]
    return points


def _apsk(rings: Sequence[int], radii: Sequence[float]) -> np.ndarray:
    points = [r * np.exp(1j * (2 * np.pi * np.arange(n) / n + np.pi / n)) for n, r in zip(rings, radii)]
    return np.concatenate(points)


def _unit_power(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=complex)
    return points / np.sqrt(np.mean(np.abs(points) ** 2))


#: Constellations of the linear modulations (unit average power). APSK rings approximate DVB-S2/S2X.
_CONSTELLATIONS: dict[str, np.ndarray] = {
    "BPSK": _psk(2),
    "QPSK": _psk(4),
    "8PSK": _psk(8),
    "16PSK": _psk(16),
    "32PSK": _psk(32),
    "QAM16": _qam(16),
    "QAM64": _qam(64),
    "16QAM": _qam(16),
    "32QAM": _qam(32),
    "64QAM": _qam(64),
    "128QAM": _qam(128),
    "256QAM": _qam(256),
    "PAM4": np.array([-3.0, -1.0, 1.0, 3.0], dtype=complex),
    "OOK": np.array([0.0, 1.0], dtype=complex),
    "4ASK": np.arange(4, dtype=complex),
    "8ASK": np.arange(8, dtype=complex),
    "16APSK": _apsk((4, 12), (1.0, 2.7)),
    "32APSK": _apsk((4, 12, 16), (1.0, 2.6, 4.2)),
    "64APSK": _apsk((4, 12, 20, 28), (1.0, 2.4, 3.9, 5.4)),
    "128APSK": _apsk((8, 16, 24, 32, 48), (1.0, 2.0, 3.0, 4.0, 5.0)),
}
_CONSTELLATIONS = {name: _unit_power(points) for name, points in _CONSTELLATIONS.items()}
_FSK = ("CPFSK", "GFSK", "GMSK")
_ANALOG = ("AM-DSB", "AM-DSB-WC", "AM-DSB-SC", "AM-SSB", "AM-SSB-SC", "AM-SSB-WC", "WBFM", "FM")
#: Every modulation name the generator knows (RML2016 and RML2018 names).
MODULATIONS: tuple[str, ...] = (*_CONSTELLATIONS, "OQPSK", *_FSK, *_ANALOG)


@dataclass(frozen=True)
class SynthConfig:
    """Pulse shaping and channel settings of :func:`generate` (see the module docstring for the recipe).

    Args:
        sps: samples per symbol of the digital modulations.
        rolloff: root-raised-cosine roll-off in ``[0, 1]``.
        span: root-raised-cosine length in symbols (each side of the peak: ``span / 2``).
        fsk_index: modulation index ``h`` of CPFSK / GFSK / GMSK (phase change ``π h`` per symbol).
        gfsk_bt: bandwidth-time product of GFSK's Gaussian filter.
        gmsk_bt: bandwidth-time product of GMSK's Gaussian filter.
        am_index: AM modulation index of the carrier-retaining AM variants.
        fm_deviation: FM peak frequency deviation in cycles/sample.
        analog_cutoff: bandwidth of the analog message, as a fraction of the sample rate, in ``(0, 0.5]``.
        phase_offset: random carrier phase ``U(0, 2π)`` per frame.
        cfo_std: standard deviation of the carrier-frequency offset, cycles/sample.
        cfo_max: largest carrier-frequency offset (clip), cycles/sample.
        sro_std: standard deviation of the relative sample-rate offset.
        multipath_profile: mean power of each multipath tap (one sample apart); ``()`` disables fading.
        rician_k: Rician K-factor of the first tap (``0``: Rayleigh; ``4`` as in DeepSig's RML2016 generator).
        frame_rms: RMS of each noisy frame after scaling (real RML2016 frames are ~1e-2); ``None``
            keeps the unscaled frames (unit clean-signal power).
    """

    sps: int = 8
    rolloff: float = 0.35
    span: int = 8
    fsk_index: float = 0.5
    gfsk_bt: float = 0.35
    gmsk_bt: float = 0.3
    am_index: float = 0.5
    fm_deviation: float = 0.25
    analog_cutoff: float = 0.05
    phase_offset: bool = True
    cfo_std: float = 1e-3
    cfo_max: float = 2.5e-3
    sro_std: float = 1e-3
    multipath_profile: tuple[float, ...] = (1.0, 0.3, 0.1)
    rician_k: float = 4.0
    frame_rms: float | None = 0.01

    def __post_init__(self) -> None:
        checks = {
            "sps": self.sps >= 2,
            "rolloff": 0.0 <= self.rolloff <= 1.0,
            "span": self.span >= 2,
            "fsk_index": self.fsk_index > 0,
            "gfsk_bt": self.gfsk_bt > 0,
            "gmsk_bt": self.gmsk_bt > 0,
            "am_index": self.am_index >= 0,
            "fm_deviation": self.fm_deviation >= 0,
            "analog_cutoff": 0.0 < self.analog_cutoff <= 0.5,
            "cfo_std": self.cfo_std >= 0,
            "cfo_max": self.cfo_max >= 0,
            "sro_std": 0.0 <= self.sro_std <= 0.02,
            "multipath_profile": all(p >= 0 for p in self.multipath_profile)
            and (not self.multipath_profile or self.multipath_profile[0] > 0),
            "rician_k": self.rician_k >= 0,
            "frame_rms": self.frame_rms is None or self.frame_rms > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise KDConfigError(f"SynthConfig: invalid {bad[0]}={getattr(self, bad[0])!r}.")


def rrc_taps(rolloff: float, span: int, sps: int) -> np.ndarray:
    """Root-raised-cosine filter of ``span * sps + 1`` taps, unit energy.

    Args:
        rolloff: roll-off factor β in ``[0, 1]``.
        span: filter length in symbols.
        sps: samples per symbol.
    """
    t = np.arange(-span * sps / 2, span * sps / 2 + 1) / sps  # in symbols
    beta = rolloff
    taps = np.empty_like(t)
    for i, ti in enumerate(t):
        if abs(ti) < 1e-9:
            taps[i] = 1.0 - beta + 4 * beta / np.pi
        elif beta > 0 and abs(abs(ti) - 1 / (4 * beta)) < 1e-9:
            taps[i] = (beta / np.sqrt(2)) * (
                (1 + 2 / np.pi) * np.sin(np.pi / (4 * beta)) + (1 - 2 / np.pi) * np.cos(np.pi / (4 * beta))
            )
        else:
            num = np.sin(np.pi * ti * (1 - beta)) + 4 * beta * ti * np.cos(np.pi * ti * (1 + beta))
            taps[i] = num / (np.pi * ti * (1 - (4 * beta * ti) ** 2))
    return taps / np.sqrt(np.sum(taps**2))


def _gaussian_taps(bt: float, span: int, sps: int) -> np.ndarray:
    t = np.arange(-span * sps / 2, span * sps / 2 + 1) / sps
    taps = np.exp(-2 * (np.pi * bt * t) ** 2 / np.log(2))
    return taps / taps.sum()


def _fft_convolve(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Full linear convolution of every row of ``x`` with ``taps``."""
    n = x.shape[-1] + len(taps) - 1
    size = 1 << (n - 1).bit_length()
    if np.iscomplexobj(x) or np.iscomplexobj(taps):
        out = np.fft.ifft(np.fft.fft(x, size) * np.fft.fft(taps, size), size)
    else:
        out = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(taps, size), size)
    return out[..., :n]


def _analytic(x: np.ndarray) -> np.ndarray:
    """``x + j H(x)`` row by row (FFT Hilbert transform)."""
    n = x.shape[-1]
    spectrum = np.fft.fft(x, axis=-1)
    weights = np.zeros(n)
    weights[0] = 1.0
    if n % 2 == 0:
        weights[n // 2] = 1.0
        weights[1 : n // 2] = 2.0
    else:
        weights[1 : (n + 1) // 2] = 2.0
    return np.fft.ifft(spectrum * weights, axis=-1)


def _message(n: int, length: int, cutoff: float, rng: np.random.Generator) -> np.ndarray:
    """Low-pass Gaussian noise scaled to ``[-1, 1]`` per row."""
    spectrum = np.fft.rfft(rng.standard_normal((n, length)), axis=-1)
    spectrum[:, np.fft.rfftfreq(length) > cutoff] = 0.0
    spectrum[:, 0] = 0.0  # zero mean
    m = np.fft.irfft(spectrum, length, axis=-1)
    return m / np.maximum(np.abs(m).max(axis=-1, keepdims=True), 1e-12)


def _baseband(mod: str, n: int, length: int, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Clean complex baseband ``[n, length]`` before the channel."""
    sps = cfg.sps
    if mod in _CONSTELLATIONS or mod == "OQPSK":
        taps = rrc_taps(cfg.rolloff, cfg.span, sps)
        skip = len(taps) - 1 + sps  # past the filter transient (and the OQPSK half-symbol delay)
        n_sym = math.ceil((length + skip) / sps) + 1
        points = _CONSTELLATIONS["QPSK" if mod == "OQPSK" else mod]
        symbols = points[rng.integers(len(points), size=(n, n_sym))]
        if mod == "OQPSK":
            i_part = _shape(symbols.real, taps, sps)[:, skip : skip + length]
            q_part = _shape(symbols.imag, taps, sps)[:, skip - sps // 2 : skip - sps // 2 + length]
            return i_part + 1j * q_part
        return _shape(symbols, taps, sps)[:, skip : skip + length]
    if mod in _FSK:
        n_sym = math.ceil(length / sps) + cfg.span + 2
        freq = np.repeat(rng.choice([-1.0, 1.0], size=(n, n_sym)), sps, axis=1)
        if mod != "CPFSK":
            gauss = _gaussian_taps(cfg.gfsk_bt if mod == "GFSK" else cfg.gmsk_bt, cfg.span, sps)
            freq = _fft_convolve(freq, gauss)[:, len(gauss) - 1 :]
        phase = np.pi * cfg.fsk_index * np.cumsum(freq, axis=1) / sps
        return np.exp(1j * phase[:, :length])
    if mod in _ANALOG:
        m = _message(n, length, cfg.analog_cutoff, rng)
        if mod in ("AM-DSB", "AM-DSB-WC"):
            return (1.0 + cfg.am_index * m).astype(complex)
        if mod == "AM-DSB-SC":
            return m.astype(complex)
        if mod in ("AM-SSB", "AM-SSB-SC"):
            return _analytic(m)
        if mod == "AM-SSB-WC":
            return 1.0 + cfg.am_index * _analytic(m)
        return np.exp(2j * np.pi * cfg.fm_deviation * np.cumsum(m, axis=1))
    raise KDConfigError(f"unknown modulation {mod!r}; known: {list(MODULATIONS)}")


def _shape(symbols: np.ndarray, taps: np.ndarray, sps: int) -> np.ndarray:
    up = np.zeros((symbols.shape[0], symbols.shape[1] * sps), dtype=symbols.dtype)
    up[:, ::sps] = symbols
    return _fft_convolve(up, taps)


def _channel(x: np.ndarray, length: int, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Sample-rate offset + random window, multipath, phase and frequency offset: ``[n, length]``."""
    n, total = x.shape
    n_taps = max(len(cfg.multipath_profile), 1)
    needed = length + n_taps - 1
    ratio = 1.0 + cfg.sro_std * rng.standard_normal(n)
    ratio = np.clip(ratio, 1 - 5 * cfg.sro_std, 1 + 5 * cfg.sro_std)
    room = total - 2 - (needed - 1) * ratio  # latest start that stays inside x
    if np.any(room < 0):
        raise KDConfigError("internal: baseband too short for the sample-rate offset")
    start = np.floor(rng.uniform(0, 1, n) * room)  # whole samples: fractional timing comes from the SRO alone
    t = start[:, None] + np.arange(needed)[None, :] * ratio[:, None]
    i0 = np.floor(t).astype(np.int64)
    frac = t - i0
    y = np.take_along_axis(x, i0, axis=1) * (1 - frac) + np.take_along_axis(x, i0 + 1, axis=1) * frac
    if cfg.multipath_profile:
        power = np.asarray(cfg.multipath_profile, dtype=float)
        taps = np.sqrt(power / 2) * (rng.standard_normal((n, n_taps)) + 1j * rng.standard_normal((n, n_taps)))
        if cfg.rician_k > 0:
            k = cfg.rician_k
            los = np.sqrt(power[0]) * np.exp(1j * rng.uniform(0, 2 * np.pi, n))
            taps[:, 0] = np.sqrt(k / (k + 1)) * los + np.sqrt(1 / (k + 1)) * taps[:, 0]
        y = sum(taps[:, k : k + 1] * y[:, n_taps - 1 - k : n_taps - 1 - k + length] for k in range(n_taps))
    else:
        y = y[:, :length]
    phase = rng.uniform(0, 2 * np.pi, n) if cfg.phase_offset else np.zeros(n)
    cfo = np.clip(cfg.cfo_std * rng.standard_normal(n), -cfg.cfo_max, cfg.cfo_max)
    return y * np.exp(1j * (phase[:, None] + 2 * np.pi * cfo[:, None] * np.arange(length)[None, :]))


def _key_rng(seed: int, mod: str, snr: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(mod.encode()), int(snr) + 10_000])


def _stack(s: np.ndarray) -> np.ndarray:
    return np.stack([s.real, s.imag], axis=1).astype(np.float32)


def generate(
    modulations: Sequence[str] | None = None,
    snrs: Sequence[int] | None = None,
    frames_per_key: int = 64,
    frame_length: int = 128,
    seed: int = 0,
    config: SynthConfig | None = None,
    return_clean: bool = False,
) -> dict[tuple[str, int], np.ndarray] | tuple[dict[tuple[str, int], np.ndarray], dict[tuple[str, int], np.ndarray]]:
    """Synthetic frames in the RML2016.10a structure ``{(modulation, snr): float32 [n, 2, L]}``.

    Args:
        modulations: names from :data:`MODULATIONS`; ``None`` is the 11 RML2016.10a modulations.
        snrs: SNRs in dB; ``None`` is the RML2016 grid ``-20, -18, ..., 18``.
        frames_per_key: frames per (modulation, SNR).
        frame_length: samples per frame ``L``.
        seed: base seed; each key's stream is seeded by ``(seed, modulation, snr)``.
        config: pulse shaping and channel settings (:class:`SynthConfig`; default settings if ``None``).
        return_clean: also return the frames before the noise was added (same channel, same scale), so
            that ``10 log10(P_clean / P_(noisy - clean))`` measures the realised SNR.

    Returns:
        The noisy frames, or ``(noisy, clean)`` with ``return_clean=True``.

    Raises:
        ValueError: on an unknown modulation or a non-positive count or length.
    """
    cfg = config or SynthConfig()
    modulations = list(CLASSES["2016.10a"] if modulations is None else modulations)
    snrs = list(SNRS["2016.10a"] if snrs is None else snrs)
    unknown = [m for m in modulations if m not in MODULATIONS]
    if unknown:
        raise KDConfigError(f"unknown modulations {unknown}; known: {list(MODULATIONS)}")
    if frames_per_key < 1 or frame_length < 2:
        raise KDConfigError(f"frames_per_key and frame_length must be positive, got {frames_per_key}, {frame_length}.")
    noisy: dict[tuple[str, int], np.ndarray] = {}
    clean: dict[tuple[str, int], np.ndarray] = {}
    n_taps = max(len(cfg.multipath_profile), 1)
    raw_length = math.ceil((frame_length + n_taps) * (1 + 5 * cfg.sro_std)) + 8
    for mod in modulations:
        for snr in snrs:
            rng = _key_rng(seed, mod, snr)
            s = _channel(_baseband(mod, frames_per_key, raw_length, cfg, rng), frame_length, cfg, rng)
            power = np.mean(np.abs(s) ** 2, axis=1, keepdims=True)
            sigma = np.sqrt(power / 10 ** (snr / 10) / 2)
            noise = sigma * (rng.standard_normal(s.shape) + 1j * rng.standard_normal(s.shape))
            r = s + noise
            if cfg.frame_rms is not None:
                scale = cfg.frame_rms / np.maximum(np.sqrt(np.mean(np.abs(r) ** 2, axis=1, keepdims=True)), 1e-30)
                r, s = r * scale, s * scale
            noisy[(mod, int(snr))] = _stack(r)
            if return_clean:
                clean[(mod, int(snr))] = _stack(s)
    return (noisy, clean) if return_clean else noisy


def write_pickle(frames: dict[tuple[str, int], np.ndarray], path: str | Path) -> Path:
    """Write frames as an RML2016-style pickle (protocol 2, readable with ``encoding="latin1"``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump({(str(m), int(s)): np.asarray(x, dtype=np.float32) for (m, s), x in frames.items()}, f, protocol=2)
    return path


def write_hdf5(frames: dict[tuple[str, int], np.ndarray], path: str | Path) -> Path:
    """Write frames in the RML2018.01A layout (``X [N, L, 2]``, one-hot ``Y [N, 24]``, ``Z [N, 1]``).

    Rows are in contiguous blocks ordered by the class order of :data:`CLASSES_2018`, then by SNR, as
    in the published file. Modulation names must be RML2018 names (see :data:`ALIASES_2018`).
    """
    h5py = import_h5py()
    bad = sorted({m for m, _ in frames if m not in CLASSES_2018})
    if bad:
        hint = {m: ALIASES_2018[m] for m in bad if m in ALIASES_2018}
        raise KDConfigError(
            f"modulations {bad} are not RML2018.01A classes {list(CLASSES_2018)}"
            + (f" (use {hint})" if hint else "")
            + "."
        )
    keys = sorted(frames, key=lambda k: (CLASSES_2018.index(k[0]), k[1]))
    lengths = {frames[k].shape[2] for k in keys}
    if len(lengths) != 1:
        raise KDConfigError(f"frames of different lengths {sorted(lengths)}")
    total = sum(len(frames[k]) for k in keys)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("X", shape=(total, lengths.pop(), 2), dtype="float32")
        y = np.zeros((total, len(CLASSES_2018)), dtype=np.int64)
        z = np.zeros((total, 1), dtype=np.int64)
        start = 0
        for mod, snr in keys:
            block = frames[(mod, snr)]
            stop = start + len(block)
            x[start:stop] = np.transpose(block, (0, 2, 1))
            y[start:stop, CLASSES_2018.index(mod)] = 1
            z[start:stop] = snr
            start = stop
        f.create_dataset("Y", data=y)
        f.create_dataset("Z", data=z)
    return path
