"""Every detection and segmentation config fits through the CLI on a tiny digit-scenes set written by
``make_scenes`` in the real COCO and Cityscapes layouts; the published COCO/Cityscapes recipes run with their
networks swapped for tiny ones (the recipe's method, data module, optimiser and schedule stay)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.data.digit_scenes import make_scenes
from kd_lightning.methods import DistillationModule
from tests.helpers.cli import CONFIGS_DIR, SHARED_TEACHERS, TINY_DIGITS, fit

SCENES = sorted(CONFIGS_DIR.glob("digitscenes_*.yaml"))
COCO = sorted(CONFIGS_DIR.glob("coco_*.yaml"))
CITYSCAPES = sorted(CONFIGS_DIR.glob("cityscapes_*.yaml"))
#: Flags that turn a multi-GPU recipe into a one-process CPU run.
ONE_PROCESS = [
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.sync_batchnorm=false",
    "--trainer.val_check_interval=1.0",
    "--trainer.check_val_every_n_epoch=1",
    "--data.init_args.num_workers=0",
    "--model.init_args.teacher_ckpt=null",
]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "digit_scenes"
    make_scenes(root, seed=0, train=8, val=4)
    return root


def _tiny_networks(config: Path, family: str) -> list[str]:
    """Overrides that replace the recipe's networks (and the supervised model) by tiny ones of 10 or 19 classes."""
    fields = ["model"] if "student" in config.stem or "teacher" in config.stem else ["student", "teacher"]
    args: list[str] = []
    for name in fields:
        prefix = f"--model.init_args.{name}.init_args"
        if family == "detection":
            args += [
                f"{prefix}.backbone=tiny",
                f"{prefix}.num_classes=10",
                f"{prefix}.min_size=96",
                f"{prefix}.max_size=96",
            ]
        else:
            args += [f"{prefix}.backbone=tiny"]
    return args


def _check(cli: object) -> None:
    model = cli.model  # type: ignore[attr-defined]
    assert cli.trainer.state.finished  # type: ignore[attr-defined]
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])  # type: ignore[attr-defined]
    if isinstance(model, DistillationModule) and len(model.teachers):
        assert all(not m.training for m in model.teacher.modules())


@pytest.mark.parametrize("config", SCENES, ids=lambda p: p.name)
def test_digit_scenes_configs_fit(config: Path, scenes: Path, in_tmp: Path) -> None:
    layout = "coco" if config.stem.split("_")[1] in ("det", "detr") else "cityscapes"
    cli = fit(
        [
            "--config",
            str(config),
            *TINY_DIGITS,
            f"--teacher_training.cache_dir={SHARED_TEACHERS}",
            f"--data.init_args.root={scenes / layout}",
        ]
    )
    _check(cli)
    metric = "val/map" if layout == "coco" else "val/miou"
    assert metric in cli.trainer.callback_metrics


@pytest.mark.parametrize("config", COCO, ids=lambda p: p.name)
def test_coco_recipes_fit_with_tiny_networks(config: Path, scenes: Path, in_tmp: Path) -> None:
    cli = fit(
        [
            "--config",
            str(config),
            *TINY_DIGITS,
            *ONE_PROCESS,
            f"--teacher_training.cache_dir={SHARED_TEACHERS}",
            f"--data.init_args.root={scenes / 'coco'}",
            "--data.init_args.train_split=train",
            "--data.init_args.val_split=val",
            *_tiny_networks(config, "detection"),
        ]
    )
    _check(cli)


@pytest.mark.parametrize("config", CITYSCAPES, ids=lambda p: p.name)
def test_cityscapes_recipes_fit_with_tiny_networks(config: Path, scenes: Path, in_tmp: Path) -> None:
    cli = fit(
        [
            "--config",
            str(config),
            *TINY_DIGITS,
            *ONE_PROCESS,
            f"--teacher_training.cache_dir={SHARED_TEACHERS}",
            f"--data.init_args.root={scenes / 'cityscapes'}",
            "--data.init_args.crop_size=[64,64]",
            "--data.init_args.eval_batch_size=2",
            *_tiny_networks(config, "segmentation"),
            *(
                ["--model.init_args.memory_pixel_size=64", "--model.init_args.memory_region_size=8"]
                if "cirkd" in config.stem
                else []
            ),
        ]
    )
    _check(cli)


@pytest.mark.parametrize(
    ("config", "layout"),
    [
        ("digitscenes_det_pkd.yaml", "coco"),
        ("digitscenes_seg_cirkd.yaml", "cityscapes"),
        ("digitscenes_detr_clockdistill.yaml", "coco"),
    ],
)
def test_bf16_mixed_on_cpu(config: str, layout: str, scenes: Path, in_tmp: Path) -> None:
    cli = fit(
        [
            "--config",
            str(CONFIGS_DIR / config),
            *TINY_DIGITS,
            f"--teacher_training.cache_dir={SHARED_TEACHERS}",
            f"--data.init_args.root={scenes / layout}",
            "--trainer.precision=bf16-mixed",
            "--trainer.accelerator=cpu",
        ]
    )
    assert cli.trainer.precision == "bf16-mixed"
    _check(cli)


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("config", "layout", "metric"),
    [
        ("digitscenes_det_cwd.yaml", "coco", "val/map"),
        # Segmentation under DDP: the mIoU sync is tests/metrics/test_segmentation_metrics.py's two-process case and
        # the launch path is the det_cwd case's; ~15 s, so slow.
        pytest.param("digitscenes_seg_pixel_kd.yaml", "cityscapes", "val/miou", marks=pytest.mark.slow),
        # A second detection case (DETR, set prediction): the mAP sync is the det_cwd case's; ~20 s, so slow.
        pytest.param("digitscenes_detr_clockdistill.yaml", "coco", "val/map", marks=pytest.mark.slow),
    ],
)
def test_ddp_two_processes_on_cpu(config: str, layout: str, metric: str, scenes: Path, in_tmp: Path) -> None:
    exe = Path(sys.executable).parent / "kd-fit"
    result = subprocess.run(
        [
            str(exe),
            "--config",
            str(CONFIGS_DIR / config),
            *TINY_DIGITS,
            f"--data.init_args.root={scenes / layout}",
            "--trainer.accelerator=cpu",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=in_tmp,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1" in output or "MEMBER: 2/2" in output
    assert output.count("kd: fit finished") == 1
    assert metric.split("/")[1] in output  # the summary names the task metric
