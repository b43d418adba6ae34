"""DMAE: shared masks, the truncated teacher, student-only gradients, MAE checkpoints, the CLI fit of its config."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer

from kd_lightning.errors import KDConfigError, TeacherCheckpointError
from kd_lightning.methods.dmae import DMAE
from kd_lightning.models import TimmModel
from kd_lightning.optim import WarmupCosineLR
from tests.data_generators import write_fake_cifar100
from tests.helpers.cli import CONFIGS_DIR, TINY, fit


def teacher_vit(**kwargs) -> VisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    return VisionTransformer(**{**args, **kwargs})


def student_vit(**kwargs) -> VisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    return VisionTransformer(**{**args, **kwargs})


def make(student: nn.Module | None = None, teacher: nn.Module | None = None, **kwargs) -> DMAE:
    torch.manual_seed(0)
    args = dict(student_blocks=[1], teacher_blocks=[2], decoder_dim=32, decoder_depth=1, decoder_num_heads=4)
    return DMAE(student or student_vit(), teacher or teacher_vit(), **{**args, **kwargs})


def test_teacher_and_student_see_the_same_visible_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    module = make(mask_ratio=0.75)
    seen = []
    original = DMAE.embed_visible

    def spy(vit, x, ids_keep):
        seen.append(ids_keep)
        return original(vit, x, ids_keep)

    monkeypatch.setattr(DMAE, "embed_visible", staticmethod(spy))
    tokens_in = {}
    for name, vit in (("teacher", module.teacher), ("student", module.student)):
        vit.blocks[0].register_forward_pre_hook(lambda _m, args, name=name: tokens_in.__setitem__(name, args[0].shape))
    module.mae_loss(torch.randn(3, 3, 32, 32))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert seen[0].shape == (3, int(16 * (1 - 0.75)))  # 4 of the 16 patches
    assert tokens_in == {"teacher": (3, 1 + 4, 64), "student": (3, 1 + 4, 32)}  # CLS + visible patches


def test_identical_networks_with_identity_projection_give_zero_distillation() -> None:
    """A student equal to the teacher, tapped at the same block, projected by I: same mask => same features => 0."""
    teacher = teacher_vit()
    student = copy.deepcopy(teacher)
    module = make(student, teacher, student_blocks=[2], teacher_blocks=[2], fixed_student_pos_embed=False)
    with torch.no_grad():
        module.projections[0].weight.copy_(torch.eye(64))
        module.projections[0].bias.zero_()
    parts = module.mae_loss(torch.randn(4, 3, 32, 32))
    assert parts["distill"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["rec"].item() > 0


def test_the_teachers_later_blocks_never_run() -> None:
    module = make(teacher_blocks=[2])  # teacher depth 4: blocks 3, norm and head are not needed
    calls: list[str] = []
    t = module.teacher
    for name, sub in [*((f"blocks.{i}", t.blocks[i]) for i in range(4)), ("norm", t.norm), ("head", t.head)]:
        sub.register_forward_hook(lambda *_a, name=name: calls.append(name))
    module.mae_loss(torch.randn(2, 3, 32, 32))
    assert calls == ["blocks.0", "blocks.1", "blocks.2"]


def test_gradients_reach_student_decoder_and_projection_only() -> None:
    module = make()
    module.mae_loss(torch.randn(2, 3, 32, 32))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    for part in (module.decoder, module.projections, module.student.blocks, module.student.patch_embed):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert module.student.cls_token.grad is not None
    # MAE's fixed sin-cos position embedding and the unused classifier are not trained.
    assert not module.student.pos_embed.requires_grad and module.student.head.weight.grad is None
    trained = {id(p) for p in module.trainable_parameters()}
    assert not trained & {id(p) for p in module.teacher.parameters()}
    assert all(id(p) in trained for p in module.decoder.parameters())


def test_twenty_steps_reduce_the_reconstruction_loss() -> None:
    module = make()
    torch.manual_seed(1)
    images = torch.randn(8, 3, 32, 32)
    fixed = module.mask(8, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-3)
    with torch.no_grad():
        before = module.mae_loss(images, fixed)["rec"].item()
    for _ in range(20):
        loss = module.mae_loss(images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = module.mae_loss(images, fixed)["rec"].item()
    assert after < 0.9 * before


def test_timm_model_wrapper_prefix_tokens_and_fixed_eval_masks() -> None:
    student = TimmModel("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, embed_dim=32, depth=2,
                        num_heads=2, reg_tokens=2)  # fmt: skip
    module = make(student, TimmModel("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=4))
    assert module.decoder.num_prefix_tokens == 3  # CLS + 2 registers pass through the decoder
    x = torch.randn(2, 3, 32, 32)
    module.eval()
    first = module.mae_loss(x, module.mask(2, torch.Generator().manual_seed(5)))
    again = module.mae_loss(x, module.mask(2, torch.Generator().manual_seed(5)))
    assert torch.equal(first["loss"], again["loss"])
    feats = module.teacher_features(x, module.mask(2).ids_keep)
    assert feats[0].shape == (2, 1 + 4, 192)
    assert module(x).shape == (2, 10)  # forward is still the student's classifier


def test_configuration_errors_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.student .*same patches"):
        make(student_vit(patch_size=4))
    with pytest.raises(KDConfigError, match=r"model.init_args.teacher_blocks: block 17 does not exist .* depth 4"):
        make(teacher_blocks=[17])
    with pytest.raises(KDConfigError, match="same length"):
        make(student_blocks=[0, 1], teacher_blocks=[2])
    with pytest.raises(KDConfigError, match=r"model.init_args.student \(Sequential\) is not a timm VisionTransformer"):
        make(nn.Sequential(nn.Flatten()))
    with pytest.raises(KDConfigError, match="mask_ratio"):
        make(mask_ratio=1.0)


def test_mae_checkpoint_loads_into_the_timm_teacher(tmp_path: Path) -> None:
    source = teacher_vit(num_classes=0)
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith("head")}
    extras = {"decoder_embed.weight": torch.zeros(8, 64), "mask_token": torch.zeros(1, 1, 8)}
    path = tmp_path / "mae_visualize.pth"
    torch.save({"model": {**encoder, **extras}}, path)  # MAE's layout: encoder + decoder, no head
    module = make(teacher_ckpt=str(path))
    for key, value in encoder.items():
        assert torch.equal(module.teacher.state_dict()[key], value), key

    later_only = {k: v for k, v in encoder.items() if not k.startswith(("blocks.3", "norm."))}
    torch.save({"model": later_only}, path)
    make(teacher_ckpt=str(path))  # block 3 and the final norm are never used: fine
    needed_missing = {k: v for k, v in encoder.items() if not k.startswith("blocks.1.")}
    torch.save({"model": needed_missing}, path)
    with pytest.raises(TeacherCheckpointError, match=r"lacks teacher weights that DMAE uses .*blocks\.1\."):
        make(teacher_ckpt=str(path))
    torch.save({"model": teacher_vit(img_size=64, num_classes=0).state_dict()}, path)
    with pytest.raises(TeacherCheckpointError, match="pos_embed"):
        make(teacher_ckpt=str(path))


def test_no_weight_decay_on_one_dimensional_parameters_and_warmup_cosine() -> None:
    module = make(optimizer=lambda params: torch.optim.AdamW(params, lr=1.0, weight_decay=0.05))
    decay, no_decay = module.configure_optimizers().param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in no_decay["params"])

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = WarmupCosineLR(optimizer, warmup_epochs=2, max_epochs=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [2.0 * 0.5 / 2, 2.0 * 1.5 / 2] + [
        2.0 * 0.5 * (1 + math.cos(math.pi * (e + 0.5 - 2) / 4)) for e in (2, 3, 4, 5)
    ]
    assert lrs == pytest.approx(expected)


def test_cli_fit_of_the_cifar100vit_config(in_tmp: Path) -> None:
    root = in_tmp / "cifar"
    write_fake_cifar100(root, n_train=32, n_test=16)
    torch.manual_seed(0)
    teacher = TimmModel("vit_small_patch16_224", num_classes=100, img_size=32, patch_size=4)
    teacher_path = in_tmp / "teacher.pth"
    torch.save(teacher.state_dict(), teacher_path)
    cli = fit(
        [
            "--config",
            str(CONFIGS_DIR / "cifar100vit_dmae.yaml"),
            *TINY,
            f"--data.init_args.root={root}",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            f"--model.init_args.teacher_ckpt={teacher_path}",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.state.finished and isinstance(cli.model, DMAE)
    for name in ("train/loss", "train/rec", "train/distill", "val/loss", "val/rec", "val/distill"):
        assert torch.isfinite(metrics[name]), name
    assert "val/acc" not in metrics
    assert not cli.model.teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(cli.model.teacher.state_dict()[key], value), key
    assert (in_tmp / "runs" / "cifar100vit_dmae").is_dir()
