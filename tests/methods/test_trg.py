"""TRG: CNN and timm ViT token paths, projector and pooling, shared sampled indices, gradients, CLI fits."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.token_graph import edge_loss, gather_tokens, node_loss
from kd_lightning.methods.trg import TRG, default_token_layer
from kd_lightning.models import ResNet8x4, SmallCNN, TimmModel
from kd_lightning.models.checkpoints import load_weights
from tests.data_generators import write_fake_cifar100
from tests.helpers.cli import CONFIGS_DIR, TINY, fit, fit_config
from tests.helpers.tiny import TinyNet

RELATION_PARTS = ("node", "edge", "context")


def tiny_vit(dim: int, num_classes: int = 4) -> TimmModel:
    """A 2-block timm ViT on 3x16x16 inputs: 4x4 = 16 patch tokens + CLS."""
    return TimmModel(
        "vit_tiny_patch16_224", num_classes=num_classes, img_size=16, patch_size=4, depth=2, embed_dim=dim, num_heads=2
    )


def digits_pair(**kwargs) -> TRG:
    torch.manual_seed(0)
    student, teacher = SmallCNN(widths=[8, 16], num_classes=4), SmallCNN(widths=[32, 64, 128], num_classes=4)
    return TRG(student, teacher, input_shape=[1, 8, 8], num_classes=4, **kwargs)


def batch(shape: tuple[int, ...] = (1, 8, 8), n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 4, (n,), generator=g)


# ---------------------------------------------------------------------------------------------- CNN path
def test_cnn_defaults_conv_projector_and_pooling_to_common_grid() -> None:
    module = digits_pair()
    assert module.student_layers == ["blocks.1"] and module.teacher_layers == ["blocks.2"]  # last stage before pooling
    assert default_token_layer(ResNet8x4(), "student_layers") == "layer3"
    (proj,) = module.projectors
    assert isinstance(proj, nn.Conv2d) and (proj.in_channels, proj.out_channels, proj.kernel_size) == (16, 128, (1, 1))
    assert module.pair_grids == [{"common": (2, 2), "student": (4, 4), "teacher": (2, 2)}]  # 4x4 pooled to 2x2
    parts, logits = module.training_loss(batch())
    assert set(parts) == {"loss", "ce", "kd", *RELATION_PARTS}
    assert logits.shape == (6, 4) and all(torch.isfinite(v) for v in parts.values())
    s_feats = module.forward_features(batch()[0])[1]
    s_tok, t_tok = module.tokens(s_feats, module.forward_features(batch()[0])[3])
    assert s_tok[0].shape == t_tok[0].shape == (6, 4, 128)
    assert torch.equal(module.tokens(s_feats, [torch.zeros(6, 128, 2, 2)])[0][0], s_tok[0])


def test_identity_projector_and_equal_networks_give_zero_relation_losses() -> None:
    torch.manual_seed(0)
    net = SmallCNN(widths=[8, 16], num_classes=4)
    for projector in (False, True):
        module = TRG(net, copy.deepcopy(net), input_shape=[1, 8, 8], num_classes=4, projector=projector)
        if projector:  # 1x1 conv set to the identity
            with torch.no_grad():
                module.projectors[0].weight.copy_(torch.eye(16).reshape(16, 16, 1, 1))
                module.projectors[0].bias.zero_()
        module.eval()  # BatchNorm of student and teacher both on running statistics
        parts, _ = module.training_loss(batch())
        for name in (*RELATION_PARTS, "kd"):
            assert abs(parts[name].item()) < 1e-5, (projector, name)
    with torch.no_grad():
        module.student.blocks[1][0].weight.add_(0.5 * torch.randn_like(module.student.blocks[1][0].weight))
    parts, _ = module.training_loss(batch())
    assert all(parts[name].item() > 1e-4 for name in RELATION_PARTS)


def test_gradients_reach_student_and_projector_only() -> None:
    module = digits_pair()
    module.training_loss(batch())[0]["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.projectors[0].weight.grad.abs().sum() > 0
    assert module.student.blocks[0][0].weight.grad.abs().sum() > 0
    trainable = {id(p) for p in module.trainable_parameters()}
    assert all(id(p) in trainable for p in module.projectors.parameters())
    assert not any(id(p) in trainable for p in module.teacher.parameters())


def test_same_indices_for_both_networks_seeded_per_step() -> None:
    module = digits_pair(num_sampled_tokens=5, student_layers=["blocks.1"], teacher_layers=["blocks.1"])  # 16 tokens
    x, y = batch()
    s_logits, s_feats, t_logits, t_feats = module.forward_features(x)
    (s_tok,), (t_tok,) = module.tokens(s_feats, t_feats)
    parts = module.feature_loss(s_feats, t_feats, s_logits, t_logits, y, (x, y))
    (idx,) = module.criterion.last_indices
    assert idx.shape == (6, 5)
    assert parts["edge"].item() == pytest.approx(edge_loss(gather_tokens(s_tok, idx), gather_tokens(t_tok, idx)).item())
    assert parts["node"].item() == pytest.approx(node_loss(gather_tokens(s_tok, idx), gather_tokens(t_tok, idx)).item())
    module.feature_loss(s_feats, t_feats, s_logits, t_logits, y, (x, y))
    assert torch.equal(module.criterion.last_indices[0], idx)  # same step, same seed: same indices
    other = digits_pair(num_sampled_tokens=5, student_layers=["blocks.1"], teacher_layers=["blocks.1"], sample_seed=1)
    other.feature_loss(s_feats, t_feats, s_logits, t_logits, y, (x, y))
    assert not torch.equal(other.criterion.last_indices[0], idx)


# ---------------------------------------------------------------------------------------------- ViT path
def test_tiny_timm_vit_pair_drops_cls_and_projects_tokens() -> None:
    torch.manual_seed(0)
    module = TRG(tiny_vit(32), tiny_vit(48), input_shape=[3, 16, 16], num_classes=4, num_sampled_tokens=4)
    assert module.student_layers == ["model.blocks.1"] and module.teacher_layers == ["model.blocks.1"]
    assert module.prefix_tokens == {"student": 1, "teacher": 1}
    (proj,) = module.projectors
    assert isinstance(proj, nn.Linear) and (proj.in_features, proj.out_features) == (32, 48)
    assert module.pair_grids == [{"common": None, "student": (4, 4), "teacher": (4, 4)}]
    x, y = batch((3, 16, 16), n=4)
    parts, _ = module.training_loss((x, y))
    assert set(parts) == {"loss", "ce", "kd", *RELATION_PARTS} and torch.isfinite(parts["loss"])
    _, s_feats, _, t_feats = module.forward_features(x)
    assert s_feats[0].shape == (4, 17, 32)
    (s_tok,), (t_tok,) = module.tokens(s_feats, t_feats)
    assert s_tok.shape == t_tok.shape == (4, 16, 48)
    assert torch.equal(t_tok, t_feats[0][:, 1:])  # CLS dropped, patches in order
    parts["loss"].backward()
    assert proj.weight.grad.abs().sum() > 0 and all(p.grad is None for p in module.teacher.parameters())


def test_vit_student_cnn_teacher_are_pooled_to_a_common_grid() -> None:
    torch.manual_seed(0)
    teacher = SmallCNN(in_channels=3, widths=[8, 16, 32, 64], num_classes=4)  # blocks.3: 64 x 2 x 2
    module = TRG(tiny_vit(32), teacher, input_shape=[3, 16, 16], num_classes=4)
    assert module.teacher_layers == ["blocks.3"]
    assert module.pair_grids == [{"common": (2, 2), "student": (4, 4), "teacher": (2, 2)}]
    assert (module.projectors[0].in_features, module.projectors[0].out_features) == (32, 64)
    parts, _ = module.training_loss(batch((3, 16, 16), n=4))
    assert torch.isfinite(parts["loss"])


def test_prefix_tokens_argument_overrides_detection_and_is_checked() -> None:
    with pytest.raises(KDConfigError, match=r"16 student tokens .* 17 teacher tokens"):
        TRG(tiny_vit(32), tiny_vit(48), input_shape=[3, 16, 16], num_classes=4, teacher_prefix_tokens=0)
    module = TRG(tiny_vit(32), tiny_vit(48), input_shape=[3, 16, 16], num_classes=4, grid=2, student_prefix_tokens=1)
    assert module.pair_grids[0]["common"] == (2, 2)
    feats = module.forward_features(batch((3, 16, 16), n=2)[0])
    assert module.tokens(feats[1], feats[3])[0][0].shape == (2, 4, 48)


# ---------------------------------------------------------------------------------------------- errors
def test_configuration_errors_name_the_argument() -> None:
    with pytest.raises(KDConfigError, match=r"student_layers \(2\) and teacher_layers \(1\) must pair up"):
        digits_pair(student_layers=["blocks.0", "blocks.1"], teacher_layers=["blocks.1"])
    with pytest.raises(KDConfigError, match=r"projector=false needs equal widths.*16.*128"):
        digits_pair(projector=False)
    with pytest.raises(KDConfigError, match=r"student_layers: 'flatten' gives features of shape \[16\]"):
        digits_pair(student_layers=["flatten"], teacher_layers=["blocks.2"])
    with pytest.raises(KDConfigError, match=r"model.init_args.grid must be"):
        digits_pair(grid=[2, 0])
    with pytest.raises(KDConfigError, match=r"model.init_args.student_layers is required"):
        TRG(TinyNet(), SmallCNN(widths=[8], num_classes=4))
    with pytest.raises(KDConfigError, match=r"model.init_args: edge_temperature: must be a finite number > 0"):
        digits_pair(edge_temperature=0.0)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_fit_on_digits_and_checkpoint_round_trip(in_tmp: Path) -> None:
    cli = fit_config("digits_trg.yaml")
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    for name in ("train/ce", "train/kd", "train/node", "train/edge", "train/context", "val/acc"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    assert not cli.model.teacher.training
    stored = load_weights(
        SmallCNN(in_channels=1, widths=[32, 64, 128], num_classes=10, dropout=0.2), cli.model.teacher_ckpt
    )
    for key, value in cli.model.teacher.state_dict().items():  # teacher unchanged by the student run
        assert torch.equal(stored.state_dict()[key], value), key
    restored = TRG.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path)
    assert torch.equal(restored.projectors[0].weight, cli.model.projectors[0].weight.cpu())


#: Shrinks the config's ViTs to 2 blocks; the tapped layers fall back to the detected last block (model.blocks.1).
SHALLOW = [
    "--model.init_args.student.dict_kwargs.depth=2",
    "--model.init_args.teacher.dict_kwargs.depth=2",
    "--model.init_args.student_layers=null",
    "--model.init_args.teacher_layers=null",
]


@pytest.mark.parametrize(
    "depth", [pytest.param(2, id="2-blocks"), pytest.param(12, id="as-configured", marks=pytest.mark.slow)]
)
def test_cli_fit_of_the_cifar_vit_config_with_a_random_vit_teacher(in_tmp: Path, depth: int) -> None:
    root = in_tmp / "cifar"
    write_fake_cifar100(root, n_train=16, n_test=16)
    torch.manual_seed(0)
    teacher = TimmModel("vit_small_patch16_224", num_classes=100, img_size=32, patch_size=4, depth=depth)
    torch.save(teacher.state_dict(), in_tmp / "vit_s.pt")
    cli = fit(
        [
            "--config",
            str(CONFIGS_DIR / "cifar100vit_trg.yaml"),
            *TINY,
            "--trainer.num_sanity_val_steps=0",
            f"--data.init_args.root={root}",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            f"--model.init_args.teacher_ckpt={in_tmp / 'vit_s.pt'}",
            *(SHALLOW if depth == 2 else []),
        ]
    )
    assert cli.trainer.state.finished and isinstance(cli.model, TRG)
    assert cli.model.student_layers == cli.model.teacher_layers == [f"model.blocks.{depth - 1}"]
    assert cli.model.prefix_tokens == {"student": 1, "teacher": 1}
    assert cli.model.pair_grids == [{"common": None, "student": (8, 8), "teacher": (8, 8)}]
    assert isinstance(cli.model.projectors[0], nn.Linear)
    assert (cli.model.projectors[0].in_features, cli.model.projectors[0].out_features) == (192, 384)
    for name in ("train/loss", *(f"train/{part}" for part in RELATION_PARTS)):
        assert torch.isfinite(cli.trainer.callback_metrics[name]), name
    assert not cli.model.teacher.training
