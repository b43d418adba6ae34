"""`kd model-stats`: parameter counts and MACs (hand-counted for KD-CNN and a linear layer)."""

from __future__ import annotations

import json

import pytest
from torch import nn

from kd_lightning.commands import main as kd_main
from kd_lightning.commands.model_stats import build_model, main, model_stats, parse_model_spec


def test_linear_layer_macs_and_params() -> None:
    stats = model_stats(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 4))
    assert stats == {"params": 65, "trainable_params": 65, "macs": 60, "flops": 120}


def test_kdcnn_macs_by_hand() -> None:
    # Conv MACs = L_out * C_out * C_in * k; each block halves L by max-pooling; fc 64 x 11.
    expected = 128 * 32 * 2 * 3 + 64 * 32 * 32 * 3 + 32 * 64 * 32 * 3 + 16 * 64 * 64 * 3 + 64 * 11
    stats = model_stats(build_model("KDCNN", {}, (2, 128), 11), (2, 128))
    assert stats["macs"] == expected == 615_104
    assert stats["params"] == 22_987


def test_frozen_parameters_are_not_trainable_and_mode_is_restored() -> None:
    model = build_model("KDMobileNet", {}, (2, 128), 11)
    model.fc.requires_grad_(False)
    model.train()
    stats = model_stats(model, (2, 128))
    assert stats["trainable_params"] == stats["params"] - (128 * 11 + 11)
    assert model.training


def test_cli_table_for_the_three_radioml_models(capsys: pytest.CaptureFixture[str]) -> None:
    args = "model-stats --model ClST --model KDCNN --model KDMobileNet --input-shape 2 128 --num-classes 11"
    kd_main(args.split())
    out = capsys.readouterr().out
    assert "| ClST | 570,483" in out and "| KDCNN | 22,987" in out and "| KDMobileNet | 35,131" in out
    assert "MACs (input 1x2x128)" in out


def test_json_init_args_dotted_path_and_length(capsys: pytest.CaptureFixture[str]) -> None:
    rows = main(
        [
            "--model",
            'kd_lightning.models.radioml.ClST {"embed_dims": [8, 16, 32], "depths": [1, 1, 1]}',
            "--model",
            "KDCNN",
            "--input-shape",
            "2",
            "1024",
            "--num-classes",
            "24",
            "--json",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["models"] == rows and printed["input_shape"] == [2, 1024]
    assert rows[0]["class"] == "ClST" and rows[0]["params"] < 100_000
    # KD-CNN MACs grow 8x with the frame length (all convolutions), the fc stays.
    small = model_stats(build_model("KDCNN", {}, (2, 128), 24), (2, 128))["macs"]
    assert rows[1]["macs"] - 64 * 24 == 8 * (small - 64 * 24)


def test_bad_specs_are_reported() -> None:
    assert parse_model_spec('ClST {"channel_branch": "xcit"}') == ("ClST", {"channel_branch": "xcit"})
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_model_spec("ClST {bad")
    with pytest.raises(SystemExit):
        main(["--model", "NoSuchModel", "--input-shape", "2", "128"])
    with pytest.raises(SystemExit):
        main(["--model", "ClST", "--input-shape", "2", "0"])
