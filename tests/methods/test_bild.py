"""BiLD and DBiLD methods: frozen teacher through a fit, class-count checks, logged parts, CLI fits."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.bild import DBiLDLoss
from kd_lightning.methods.bild import BiLD
from kd_lightning.methods.dbild import DBiLD
from kd_lightning.models.checkpoints import load_weights
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet
from tests.helpers.tiny import tiny_trainer as tiny_trainer_base


def tiny_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return tiny_trainer_base(tmp_path, **{"max_epochs": 2, **kwargs})


@pytest.mark.parametrize(
    ("method", "kwargs"), [(BiLD, {"top_k": 4}), (DBiLD, {"loss": DBiLDLoss(k_min=3, k_max=4, ce_weight=1.0)})]
)
def test_fit_keeps_teacher_frozen_and_logs_parts(method, kwargs, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = method(student=TinyNet(), teacher=TinyNet(hidden=32), **kwargs)
    before = copy.deepcopy(module.teacher.state_dict())
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, datamodule=BlobsDataModule())
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not module.teacher.training
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/t_ld", "train/s_ld", "train/ce", "val/acc"):
        assert name in metrics and math.isfinite(float(metrics[name])), name
    if method is DBiLD:
        assert 3 <= float(metrics["train/k_teacher"]) <= 4 and 3 <= float(metrics["train/k_student"]) <= 4


def test_top_k_above_class_count_named_at_setup() -> None:
    module = BiLD(student=TinyNet(), teacher=TinyNet(), top_k=8, num_classes=4)
    with pytest.raises(KDConfigError, match=r"model.init_args.top_k=8 exceeds the 4 classes"):
        module.setup("fit")
    BiLD(student=TinyNet(), teacher=TinyNet(), top_k=4, num_classes=4).setup("fit")  # k = C: every pair


def test_dbild_k_min_above_class_count_and_bad_arguments_named() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.loss.init_args.k_min: is 5 but there are only 4 classes"):
        DBiLD(student=TinyNet(), teacher=TinyNet(), loss=DBiLDLoss(k_min=5, k_max=8), num_classes=4).setup("fit")
    DBiLD(student=TinyNet(), teacher=TinyNet(), loss=DBiLDLoss(k_min=3, k_max=16), num_classes=4).setup("fit")
    with pytest.raises(KDConfigError, match=r"reverse_weight must be in \[0, 1\]"):
        DBiLDLoss(reverse_weight=2.0)
    with pytest.raises(KDConfigError, match=r"model.init_args.top_k must be >= 2"):
        BiLD(student=TinyNet(), teacher=TinyNet(), top_k=1)


def test_ce_weight_zero_is_the_papers_objective() -> None:
    torch.manual_seed(0)
    module = BiLD(student=TinyNet(), teacher=TinyNet(), top_k=3, ce_weight=0.0)
    parts, _ = module.training_loss((torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,))))
    assert set(parts) == {"loss", "t_ld", "s_ld"}


@pytest.mark.parametrize(("config", "method"), [("digits_bild.yaml", BiLD), ("digits_dbild.yaml", DBiLD)])
def test_cli_fit_digits(config: str, method: type, in_tmp: Path) -> None:
    cli = fit_config(config)
    model = cli.model
    assert isinstance(model, method)
    metrics = cli.trainer.callback_metrics
    for name in ("train/loss", "train/t_ld", "train/s_ld", "train/ce"):
        assert name in metrics and math.isfinite(float(metrics[name])), name
    assert float(metrics["train/t_ld"]) > 0
    cached = load_weights(copy.deepcopy(model.teacher), model.teacher_ckpt)  # the teacher did not move
    for key, value in cached.state_dict().items():
        assert torch.equal(value, model.teacher.state_dict()[key]), key
    last = next((in_tmp / "runs").rglob("last.ckpt"))
    restored = method.load_from_checkpoint(last)  # networks rebuilt from the stored config
    assert restored.criterion.temperature == model.criterion.temperature == 3.0
    for key, value in restored.student.state_dict().items():
        assert torch.equal(value, model.student.state_dict()[key]), key
