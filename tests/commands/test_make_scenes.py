"""``kd make-scenes``: writes both formats, says where and how to point the configs at them, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kd_lightning.commands import COMMANDS, main


def test_writes_both_formats_and_prints_how_to_use_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "make-scenes" in COMMANDS
    out = tmp_path / "scenes"
    main(
        [
            "make-scenes",
            str(out),
            "--seed",
            "3",
            "--train",
            "4",
            "--val",
            "2",
            "--size",
            "48",
            "--digit-size",
            "10",
            "20",
        ]
    )
    printed = capsys.readouterr().out
    assert (out / "coco" / "annotations" / "instances_train.json").is_file()
    assert len(list((out / "cityscapes" / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))) == 2
    meta = json.loads((out / "scenes.json").read_text())
    assert meta["seed"] == 3 and meta["config"]["size"] == 48 and meta["config"]["digit_size"] == [10, 20]
    root = out.resolve()
    assert f"--data.init_args.root {root / 'coco'}" in printed
    assert "--data.init_args.train_split train --data.init_args.val_split val" in printed
    assert f"--data CityscapesDataModule --data.init_args.root {root / 'cityscapes'}" in printed
    assert "train 4 images" in printed and "val 2 images" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train", "0"], "kd: error: train: must be >= 1 image, got 0"),
        (["--size", "8"], "kd: error: size: must be >= 16 pixels, got 8"),
        (["--clutter", "3"], "kd: error: --clutter: expected 2 arguments. see kd make-scenes --help"),
        ([], "kd: error: out: .* already exists. choose another folder or pass --overwrite"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    (tmp_path / "coco").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["make-scenes", str(tmp_path), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert re.match(message, err), err
