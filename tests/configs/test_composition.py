"""The CIFAR-100 configs are composed from configs/fragments/: short files that still resolve to the full recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kd_lightning.cli import run
from tests.helpers.cli import CONFIGS_DIR

CIFAR100 = sorted(CONFIGS_DIR.glob("cifar100_*.yaml"))
#: The fragments every RepDistiller/mdistiller-recipe config must use (instead of restating them).
RECIPE_FRAGMENTS = [
    "fragments/cifar100_resnet8x4.yaml",
    "fragments/cifar100_resnet32x4.yaml",
    "fragments/cifar100_teacher_training.yaml",
    "fragments/checkpoint_best_acc.yaml",
    "fragments/lr_monitor_epoch.yaml",
]
#: Configs whose recipe is not the RepDistiller one (their own optimiser, schedule and epochs).
OWN_RECIPE = {"cifar100_pld_paper.yaml"}
#: model.init_args keys that belong to the recipe (networks, teacher weights, optimisation), not to the method.
RECIPE_KEYS = {"student", "teacher", "teacher_ckpt", "optimizer", "lr_scheduler", "teacher_optimizer",
               "teacher_lr_scheduler"}  # fmt: skip
#: At most this many YAML lines for everything but the method's own arguments: run folder, logger, fragment references
#: and what differs from the recipe (20 for a plain recipe config; the uncomposed files had about 60).
MAX_RECIPE_LINES = 32


def yaml_lines(path: Path) -> list[str]:
    """The lines of a YAML file that carry content (no blank or comment-only lines)."""
    return [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def recipe_lines(path: Path) -> list[str]:
    """The content lines that are not the method's own arguments (keys of model.init_args outside RECIPE_KEYS)."""
    kept: list[str] = []
    section, in_model_args, method_arg = "", False, False
    for line in yaml_lines(path):
        indent = len(line) - len(line.lstrip())
        key = line.strip().split(":", 1)[0]
        if indent == 0:
            section, in_model_args, method_arg = key, False, False
        elif section == "model" and indent == 2:
            in_model_args, method_arg = key == "init_args", False
        elif in_model_args and indent == 4:
            method_arg = key not in RECIPE_KEYS
        if not (in_model_args and indent >= 4 and method_arg):
            kept.append(line)
    return kept


def resolved(config: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """``kd fit --config <config> --print_config``, parsed."""
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_recipe_lines_counts_only_the_recipe(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "# header\nseed_everything: 0\nmodel:\n  class_path: X\n  init_args:\n"
        "    student: s.yaml\n    temperature: 4.0   # method\n    loss:\n      alpha: 1\n"
        "    optimizer: o.yaml\ndata: d.yaml\n"
    )
    assert len(yaml_lines(config)) == 10
    assert recipe_lines(config) == [
        "seed_everything: 0", "model:", "  class_path: X", "  init_args:", "    student: s.yaml",
        "    optimizer: o.yaml", "data: d.yaml",
    ]  # fmt: skip


@pytest.mark.parametrize("config", CIFAR100, ids=lambda p: p.name)
def test_cifar100_config_states_only_what_differs(config: Path) -> None:
    text = config.read_text()
    assert text.startswith("# ") and "Expected" in text.split("\nseed_everything", 1)[0], "header: source + number"
    lines = recipe_lines(config)
    assert len(lines) <= MAX_RECIPE_LINES, f"{config.name}: {len(lines)} recipe lines, restate less:\n" + "\n".join(
        lines
    )
    for fragment in RECIPE_FRAGMENTS:
        assert fragment in text, f"{config.name} does not use {fragment}"
    if config.name not in OWN_RECIPE:
        for restated in ("torch.optim.SGD", "MultiStepLR", "ModelCheckpoint", "LearningRateMonitor", "ResNet8x4:"):
            assert restated not in text, f"{config.name} restates {restated} instead of using its fragment"


@pytest.mark.parametrize("config", CIFAR100, ids=lambda p: p.name)
def test_cifar100_config_resolves_to_the_recipe(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = resolved(config, capsys)
    trainer, args = cfg["trainer"], cfg["model"]["init_args"]
    assert trainer["default_root_dir"] == f"runs/{config.stem}"
    assert trainer["logger"]["init_args"]["save_dir"] == f"runs/{config.stem}"
    callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in trainer["callbacks"]]
    assert callbacks[:2] == ["ModelCheckpoint", "LearningRateMonitor"]
    assert trainer["callbacks"][0]["init_args"]["monitor"] == "val/acc"
    assert args["student"] == {"class_path": "kd_lightning.models.ResNet8x4", "init_args": {"num_classes": 100}}
    assert args["teacher"] == {"class_path": "kd_lightning.models.ResNet32x4", "init_args": {"num_classes": 100}}
    data = cfg["data"]
    assert data["class_path"] == "kd_lightning.data.CIFAR100DataModule"
    assert data["init_args"]["val_split"] == 0.0 and data["init_args"]["root"] == "data"
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005}}
    multistep = {"milestones": [150, 180, 210], "gamma": 0.1}
    teacher_training = cfg["teacher_training"]
    assert teacher_training["max_epochs"] == 240 and teacher_training["cache_dir"] == "runs/teachers"
    assert _subset(sgd, teacher_training["optimizer"])
    assert _subset(multistep, teacher_training["lr_scheduler"]["init_args"])
    if config.name in OWN_RECIPE:
        return
    assert trainer["max_epochs"] == 240
    assert data["init_args"]["batch_size"] == 64
    assert _subset(sgd, args["optimizer"])
    assert args["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.MultiStepLR"
    assert _subset(multistep, args["lr_scheduler"]["init_args"])


def _subset(expected: dict, actual: dict) -> bool:
    """Every key of ``expected`` has the same value in ``actual`` (nested dicts compared the same way)."""
    return all(
        _subset(value, actual.get(key, {})) if isinstance(value, dict) else actual.get(key) == value
        for key, value in expected.items()
    )
