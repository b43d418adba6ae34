"""FitNet, AT and RKD as LightningModules: default layers, named errors, regressors, gradients, CLI fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.attention_transfer import AT
from kd_lightning.methods.fitnet import FitNet, HintRegressor
from kd_lightning.methods.rkd import RKD
from kd_lightning.models import ResNet8, ResNet14, SmallCNN
from kd_lightning.models.checkpoints import load_weights
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


def small_pair() -> tuple[SmallCNN, SmallCNN]:
    """CNNs for 1x4x4 blobs: blocks.0 is 4x4, blocks.1 is 2x2 (after a max-pool), flatten a vector."""
    torch.manual_seed(0)
    return SmallCNN(1, (4, 8), num_classes=4), SmallCNN(1, (8, 16), num_classes=4)


def blobs_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)


# ------------------------------------------------------------------------------------------- layers
def test_default_layers_follow_repdistiller() -> None:
    student, teacher = ResNet8(num_classes=4), ResNet14(num_classes=4)
    assert FitNet(student, teacher).student_layers == ["layer2"]  # hint_layer 2, post-activation
    assert AT(student, teacher).teacher_layers == ["layer1", "layer2", "layer3"]  # feat[1:-1]
    assert RKD(student, teacher).student_layers == ["flatten"]  # the pooled penultimate embedding
    preact = FitNet(student, teacher, preact=True)
    assert preact.student_layers == ["layer2.0.relu2:input"] and preact.teacher_layers == ["layer2.1.relu2:input"]


def test_unknown_layer_names_the_argument_with_close_matches() -> None:
    with pytest.raises(
        KDConfigError,
        match=r"model.init_args.student_layers: ResNet8 has no submodule 'layer_2'.*close matches: 'layer2'",
    ):
        FitNet(ResNet8(num_classes=4), ResNet14(num_classes=4), student_layers=["layer_2"], teacher_layers=["layer2"])
    with pytest.raises(KDConfigError, match=r"model.init_args.teacher_layers: .*'layer3'"):
        AT(ResNet8(num_classes=4), ResNet14(num_classes=4), teacher_layers=["layer1", "layer2", "layr3"])


def test_layer_counts_must_pair() -> None:
    with pytest.raises(KDConfigError, match=r"student_layers \(2: .*teacher_layers \(1: .*same number"):
        RKD(*small_pair(), student_layers=["blocks.1", "flatten"], teacher_layers=["flatten"])


def test_networks_without_stages_need_explicit_layers() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.student_layers is required: TinyNet"):
        FitNet(TinyNet(), TinyNet())
    with pytest.raises(KDConfigError, match=r"model.init_args.preact is true but SmallCNN has no preact_stages"):
        AT(*small_pair(), preact=True)


# ---------------------------------------------------------------------------------------- regressors
@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "kind", "kernel"),
    [
        ((4, 8, 8), (6, 8, 8), nn.Conv2d, (1, 1)),
        ((4, 8, 8), (6, 4, 4), nn.Conv2d, (3, 3)),
        ((4, 4, 4), (6, 8, 8), nn.ConvTranspose2d, (4, 4)),
        ((4, 8, 8), (6, 6, 5), nn.Conv2d, (3, 4)),
        ((16,), (32,), nn.Linear, None),
    ],
)
def test_regressor_follows_the_convreg_rule(student_shape, teacher_shape, kind, kernel) -> None:
    reg = HintRegressor(student_shape, teacher_shape).eval()
    assert type(reg.proj) is kind
    if kernel is not None:
        assert reg.proj.kernel_size == kernel
    assert reg(torch.randn(2, *student_shape)).shape == (2, *teacher_shape)
    assert (reg(torch.randn(2, *student_shape)) >= 0).all()  # ReLU at the end, as RepDistiller's ConvReg


def test_regressor_rejects_shapes_it_cannot_map() -> None:
    with pytest.raises(ValueError, match="half, twice, or at least"):
        HintRegressor((4, 3, 3), (6, 8, 8))
    with pytest.raises(ValueError, match=r"both must be \[C, H, W\] maps or both \[D\] vectors"):
        HintRegressor((4, 2, 2), (16,))


def test_incompatible_pairs_name_the_layers_at_build() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.student_layers\[0\] \('flatten', shape \(8,\)\)"):
        FitNet(*small_pair(), student_layers=["flatten"], teacher_layers=["blocks.0"], input_shape=[1, 4, 4])
    with pytest.raises(KDConfigError, match=r"teacher_layers\[0\] \('flatten'.*attention transfer needs \[C, H, W\]"):
        AT(*small_pair(), student_layers=["blocks.1"], teacher_layers=["flatten"], input_shape=[1, 4, 4])


# ----------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    ("cls", "layers", "part"),
    [
        (FitNet, {"student_layers": ["blocks.1"], "teacher_layers": ["blocks.0"]}, "hint"),
        (AT, {"student_layers": ["blocks.0", "blocks.1"], "teacher_layers": ["blocks.0", "blocks.1"]}, "at"),
        (RKD, {"student_layers": ["flatten"], "teacher_layers": ["flatten"]}, "rkd_angle"),
    ],
)
def test_gradients_reach_student_and_adapters_only(cls, layers, part) -> None:
    module = cls(*small_pair(), input_shape=[1, 4, 4], **layers)
    module.train()
    parts, _ = module.training_loss(blobs_batch())
    assert parts[part].item() > 0
    assert parts["loss"].item() == pytest.approx(sum(v.item() for k, v in parts.items() if k != "loss"), rel=1e-6)
    parts["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.blocks.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    trainable = {id(p) for p in module.trainable_parameters()}
    assert not trainable & {id(p) for p in module.teacher.parameters()}
    if cls is FitNet:
        assert isinstance(module.regressors[0].proj, nn.ConvTranspose2d)  # 2x2 student map -> 4x4 teacher map
        assert all(p.grad is not None and id(p) in trainable for p in module.regressors.parameters())


def test_weights_scale_the_parts() -> None:
    base = RKD(*small_pair(), input_shape=[1, 4, 4])
    heavy = RKD(*small_pair(), input_shape=[1, 4, 4], ce_weight=0.5, rkd_weight=2.0, angle_weight=0.0)
    a, _ = base.training_loss(blobs_batch())
    b, _ = heavy.training_loss(blobs_batch())
    assert b["ce"].item() == pytest.approx(0.5 * a["ce"].item(), rel=1e-6)
    assert b["rkd_distance"].item() == pytest.approx(2 * a["rkd_distance"].item(), rel=1e-6)
    assert "rkd_angle" not in b  # weight 0: neither computed nor returned
    assert b["loss"].item() == pytest.approx(b["ce"].item() + b["rkd_distance"].item(), rel=1e-6)


@pytest.mark.parametrize(
    ("cls", "field"), [(AT, "at_weight"), (FitNet, "hint_weight"), (RKD, "rkd_weight"), (RKD, "angle_weight")]
)
def test_negative_weights_name_the_field(cls: type, field: str) -> None:
    with pytest.raises(KDConfigError, match=rf"^model.init_args.{field}: must be a finite number >= 0, got -1.0"):
        cls(*small_pair(), student_layers=["blocks.1"], teacher_layers=["blocks.1"], **{field: -1.0})


# ----------------------------------------------------------------------------------------- checkpoints
def test_fitnet_checkpoint_round_trip_restores_the_regressor(tmp_path: Path) -> None:
    module = FitNet(
        *small_pair(),
        student_layers=["blocks.1"],
        teacher_layers=["blocks.1"],
        optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
    )
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=1)
    trainer.fit(module, datamodule=BlobsDataModule())
    assert module.feature_shapes["student"] == [[8, 2, 2]] and module.feature_shapes["teacher"] == [[16, 2, 2]]
    assert "train/hint" in trainer.callback_metrics
    ckpt = tmp_path / "fitnet.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = FitNet.load_from_checkpoint(ckpt, student=SmallCNN(1, (4, 8), 4), teacher=SmallCNN(1, (8, 16), 4))
    saved, loaded = module.regressors.state_dict(), restored.regressors.state_dict()
    assert set(saved) == set(loaded) and "0.norm.running_mean" in saved
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert restored.student_layers == ["blocks.1"] and restored.hint_weight == 100.0


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    ("config", "cls", "parts"),
    [
        ("digits_fitnet.yaml", FitNet, {"train/hint", "train/ce"}),
        ("digits_at.yaml", AT, {"train/at", "train/ce"}),
        ("digits_rkd.yaml", RKD, {"train/rkd_distance", "train/rkd_angle", "train/ce"}),
    ],
)
def test_digits_config_fits_through_the_cli(in_tmp: Path, config: str, cls: type, parts: set[str]) -> None:
    cli = fit_config(config)
    model = cli.model
    assert isinstance(model, cls)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and parts <= set(metrics)
    assert all(metrics[name] > 0 for name in parts)
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    reference = type(model.teacher)(1, (32, 64, 128), 10, 0.2)
    load_weights(reference, model.teacher_ckpt, field="teacher_ckpt")
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.teacher.state_dict().values()))
