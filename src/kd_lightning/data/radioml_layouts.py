"""The published RadioML files' layouts: names, modulations (label order), SNR grids, frame lengths.

Shared by the data module (:mod:`kd_lightning.data.radioml`) and the synthetic generator
(:mod:`kd_lightning.data.radioml_synth`), which import it and not each other.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CLASSES",
    "CLASSES_2016A",
    "CLASSES_2016B",
    "CLASSES_2018",
    "DEEPSIG_URL",
    "FILE_NAMES",
    "FRAME_LENGTHS",
    "SNRS",
    "import_h5py",
]

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


def import_h5py() -> Any:
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py is installed in the test environment
        raise ImportError('Reading RadioML 2018.01A (HDF5) needs h5py: pip install "kd-lightning[radioml]"') from err
    return h5py
