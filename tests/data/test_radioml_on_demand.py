"""RadioMLDataModule(synthesize_if_missing=True): a missing file is generated (once, atomically) and identified."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from kd_lightning.data.radioml import CLASSES, FILE_NAMES, RadioMLDataModule, load_radioml_pickle
from kd_lightning.data.radioml_synth import SynthConfig, generate, write_pickle
from kd_lightning.errors import DatasetNotFoundError, KDConfigError
from tests.helpers.cli import CONFIGS_DIR, TINY, fit

SMALL = {"synth_frames": 5, "synth_snrs": [0, 10]}  # 11 modulations x 2 SNRs x 5 frames = 110 frames (3/1/1)


def _module(root: Path, **kwargs) -> RadioMLDataModule:
    return RadioMLDataModule(root=str(root), normalize="none", synthesize_if_missing=True, **{**SMALL, **kwargs})


def test_missing_file_is_generated_once_and_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    dm = _module(root)
    before = dm.data_identity()
    dm.prepare_data()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "SYNTHETIC" in lines[0] and "not DeepSig's" in lines[0] and "110 frames" in lines[0]
    path = root / FILE_NAMES["2016.10a"]
    # The generator's frames, as written by the data module; no temporary file left behind.
    expected = generate(CLASSES["2016.10a"], [0, 10], 5, 128, 0, SynthConfig())
    loaded = load_radioml_pickle(path)
    assert loaded.keys() == expected.keys()
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [
        FILE_NAMES["2016.10a"],
        FILE_NAMES["2016.10a"] + ".synthetic.json",
    ]
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 110
    # Its identity is the generator settings, the same before and after the file was written.
    assert dm.data_identity() == before and before["synthetic"]["frames_per_key"] == 5
    assert json.loads((root / (FILE_NAMES["2016.10a"] + ".synthetic.json")).read_text()) == before["synthetic"]
    # Present now: nothing is generated again.
    _module(root).prepare_data()
    assert capsys.readouterr().out == ""


def test_same_file_as_the_kd_radioml_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kd_lightning.commands.radioml_synth import main as synth_main

    synth_main(["--out", str(tmp_path / "cmd"), "--format", "2016.10a", "--frames", "5", "--snrs", "0", "10"])
    _module(tmp_path / "dm").prepare_data()
    name = FILE_NAMES["2016.10a"]
    assert (tmp_path / "cmd" / name).read_bytes() == (tmp_path / "dm" / name).read_bytes()


def test_missing_file_without_the_option_is_the_one_line_error(tmp_path: Path) -> None:
    dm = RadioMLDataModule(root=str(tmp_path / "absent"))
    with pytest.raises(DatasetNotFoundError) as err:
        dm.prepare_data()
    text = str(err.value)
    assert "\n" not in text and FILE_NAMES["2016.10a"] in text
    assert "kd radioml-synth" in text and "--data.init_args.synthesize_if_missing true" in text
    assert not (tmp_path / "absent").exists()


def test_identity_tells_generated_data_from_the_real_file(tmp_path: Path) -> None:
    real = RadioMLDataModule(root=str(tmp_path / "real"))
    write_pickle(generate(snrs=[0], frames_per_key=1), tmp_path / "real" / FILE_NAMES["2016.10a"])
    real_identity = real.data_identity()
    assert "synthetic" not in real_identity and real_identity["size"] > 0
    # The same config with synthesize_if_missing finds the real file: it is used and identified as the real file.
    found = _module(tmp_path / "real")
    found.prepare_data()
    assert found.data_identity() == real_identity
    generated = _module(tmp_path / "gen")
    assert generated.data_identity()["synthetic"]["generator"] == "kd_lightning.data.radioml_synth"
    assert _module(tmp_path / "gen", synth_seed=1).data_identity() != generated.data_identity()


def test_concurrent_callers_generate_the_file_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    modules = [_module(tmp_path) for _ in range(3)]
    start = threading.Barrier(len(modules))
    errors: list[BaseException] = []

    def prepare(dm: RadioMLDataModule) -> None:
        start.wait()
        try:
            dm.prepare_data()
        except BaseException as err:  # re-raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=prepare, args=(dm,)) for dm in modules]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert capsys.readouterr().out.count("kd: generated SYNTHETIC") == 1
    for dm in modules:
        dm.setup("fit")
        assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 110


def test_2018_layout_is_generated_as_hdf5(tmp_path: Path) -> None:
    dm = _module(tmp_path, version="2018.01A", synth_frames=5, synth_snrs=[0])
    dm.prepare_data()
    dm.setup("fit")
    assert dm.path.name == FILE_NAMES["2018.01A"] and dm.input_shape == (2, 1024)
    assert len(dm.train_set) == 24 * 3 and len(dm.val_set) == 24


def test_generator_settings_are_checked_at_construction(tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match=r"^data\.init_args\.synth_config: .*Use SynthConfig fields: sps"):
        _module(tmp_path, synth_config={"rolloff": 2.0})
    with pytest.raises(KDConfigError, match=r"^data\.init_args\.synth_config: .*unexpected keyword"):
        _module(tmp_path, synth_config={"no_such_setting": 1})
    with pytest.raises(KDConfigError, match=r"^data\.init_args\.synth_frames: must be >= 1"):
        _module(tmp_path, synth_frames=0)


def test_existing_generated_file_with_other_settings_warns(tmp_path: Path) -> None:
    _module(tmp_path).prepare_data()
    with pytest.warns(UserWarning, match="generated with other settings"):
        _module(tmp_path, synth_seed=3).prepare_data()


def test_quick_config_is_one_command_from_an_empty_folder(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--config",
        str(CONFIGS_DIR / "radioml_synth_quick.yaml"),
        *TINY,
        "--data.init_args.synth_frames=4",
        "--data.init_args.synth_snrs=[-10, 10]",
        "--data.init_args.batch_size=32",
        "--teacher_training.max_epochs=1",
        f"--teacher_training.cache_dir={in_tmp / 'teachers'}",
    ]
    cli = fit(args)
    out = capsys.readouterr().out
    assert cli.trainer.state.finished and "kd: generated SYNTHETIC RadioML 2016.10a" in out
    assert (in_tmp / "data" / "radioml_synth" / FILE_NAMES["2016.10a"]).is_file()
    assert "kd: trained and cached teacher" in out
    # The teacher's cache key was computed before the file existed: the second run finds the same key.
    fit(args)
    out = capsys.readouterr().out
    assert "kd: reused cached teacher" in out and "generated SYNTHETIC" not in out
