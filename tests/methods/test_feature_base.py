"""FeatureDistillationModule: taps, named errors, lazily built parts and their checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.feature_base import FeatureDistillationModule, default_layers
from kd_lightning.models import ResNet8, ResNet14
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


class HintMSE(FeatureDistillationModule):
    """A minimal feature method: a linear regressor from each student feature to the teacher's, MSE."""

    def build_parts(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        self.regressors = nn.ModuleList(
            nn.Linear(s.numel(), t.numel()) for s, t in zip(student_shapes, teacher_shapes, strict=True)
        )

    def feature_loss(self, student_feats, teacher_feats, student_logits, teacher_logits, target, batch):
        hint = sum(
            F.mse_loss(reg(s.flatten(1)), t.flatten(1))
            for reg, s, t in zip(self.regressors, student_feats, teacher_feats)
        )
        ce = F.cross_entropy(student_logits, target)
        return {"loss": ce + hint, "ce": ce, "hint": hint}


def make(**kwargs) -> HintMSE:
    return HintMSE(TinyNet(), TinyNet(hidden=32), student_layers=["body.3"], teacher_layers=["body.3"], **kwargs)


def test_parts_built_at_setup_trained_with_student_and_restored(tmp_path: Path) -> None:
    module = make()
    assert module.feature_shapes is None
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=BlobsDataModule())
    assert module.feature_shapes == {"input_shape": [1, 4, 4], "student": [[16]], "teacher": [[32]]}
    assert "train/hint" in trainer.callback_metrics
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in module.regressors.parameters())
    assert not any(id(p) in optimised for p in module.teacher.parameters())
    ckpt = tmp_path / "hint.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = HintMSE.load_from_checkpoint(ckpt, student=TinyNet(), teacher=TinyNet(hidden=32))
    assert torch.equal(restored.regressors[0].weight, module.regressors[0].weight)


def test_input_shape_argument_builds_at_construction_and_must_match_data(tmp_path: Path) -> None:
    module = make(input_shape=[1, 4, 4])
    assert module.regressors[0].in_features == 16
    wrong = make(input_shape=[1, 8, 2])
    with pytest.raises(KDConfigError, match=r"built for inputs of shape \(1, 8, 2\) but the data gives \(1, 4, 4\)"):
        tiny_trainer(tmp_path).fit(wrong, datamodule=BlobsDataModule())


def test_unknown_layer_is_named_with_close_matches() -> None:
    with pytest.raises(
        KDConfigError,
        match=r"model.init_args.student_layers: ResNet8 has no submodule 'layer_2'.*close matches: 'layer2'",
    ):
        HintMSE(ResNet8(num_classes=4), ResNet14(num_classes=4), student_layers=["layer_2"], teacher_layers=["layer2"])


def test_default_layers_from_feature_stages() -> None:
    assert default_layers(ResNet8(), "student_layers") == ["layer1", "layer2", "layer3"]
    with pytest.raises(KDConfigError, match=r"model.init_args.student_layers is required"):
        default_layers(TinyNet(), "student_layers")
