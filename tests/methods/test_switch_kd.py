"""SwitchKD: the switched forward, where its gradient goes, the frozen teacher, skipped forwards, errors, checkpoint
and a tiny CLI fit."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.bild import DBiLDLoss
from kd_lightning.methods.switch_kd import SwitchKD
from kd_lightning.models.lm import TinyGPT
from kd_lightning.models.vlm import DigitPatchEncoder, VisionLanguageModel


def tiny_vlm(seed: int, channels: tuple[int, ...], d_model: int) -> VisionLanguageModel:
    torch.manual_seed(seed)
    vision = DigitPatchEncoder(channels=channels, patch_size=(4, 4), image_size=(16, 64))
    language = TinyGPT(d_model=d_model, n_layers=1, n_heads=2, max_seq_len=32)
    return VisionLanguageModel(vision, language, projector="mlp")


def method(**kwargs: object) -> SwitchKD:
    student = tiny_vlm(0, (4, 8), 16)  # C_S = 8, d_S = 16
    teacher = tiny_vlm(1, (4, 12), 24)  # C_T = 12, d_T = 24
    return SwitchKD(student=student, teacher=teacher, **kwargs)  # type: ignore[arg-type]


def batch(size: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (size, 7), generator=g)
    mask = torch.ones(size, 7, dtype=torch.bool)
    mask[1, 6:] = False  # right padding
    labels = ids.masked_fill(~mask, -100)
    labels[:, :3] = -100  # the prompt
    return {
        "images": torch.randn(size, 3, 16, 64, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
    }


@pytest.mark.parametrize("point", ["projector", "encoder"])
def test_switched_forward_is_the_teacher_on_the_adapted_student_tokens(point: str) -> None:
    m = method(switch_point=point, align_projector="mlp")
    b = batch()
    features, tokens = m.student_visual(b["images"])
    got = m.switched_logits(b["input_ids"], b["attention_mask"], features, tokens)
    if point == "projector":
        visual = m.switch_adapter(m.student.visual_tokens(b["images"]))
    else:
        visual = m.teacher.projector(m.switch_adapter(m.student.encode_images(b["images"])))
    expected = m.teacher(b["input_ids"], attention_mask=b["attention_mask"], visual_embeds=visual)
    torch.testing.assert_close(got, expected)
    assert got.shape == (2, 7, 264)


@pytest.mark.parametrize("point", ["projector", "encoder"])
def test_switch_gradient_reaches_student_vision_and_adapter_but_no_teacher_parameter(point: str) -> None:
    m = method(switch_point=point, sft_weight=0.0, dbild_weight=0.0, dbild=DBiLDLoss(mass=1.0))
    m.train()
    sums, count = m.token_loss_sums(batch())
    assert sorted(sums) == ["loss", "switch"] and sums["switch"].item() > 0 and count.item() > 0
    sums["loss"].backward()
    grads = {name: p.grad for name, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("switch_adapter.") for n in grads)
    assert any(n.startswith("student.vision.") for n in grads)
    assert any(n.startswith("student.projector.") for n in grads) == (point == "projector")
    assert not any(n.startswith("student.language.") for n in grads)  # the switch term does not touch the student LM
    assert all(p.grad is None for p in m.teacher.parameters())
    assert not any(p.requires_grad for p in m.teacher.parameters())


def test_teacher_frozen_and_in_eval_after_steps() -> None:
    m = method()
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    adapter_before = m.switch_adapter.weight.detach().clone()
    optimizer = torch.optim.SGD(m.trainable_parameters(), lr=0.5)
    m.train()
    assert not m.teacher.training
    for _ in range(2):
        optimizer.zero_grad()
        sums, _ = m.token_loss_sums(batch())
        sums["loss"].backward()
        optimizer.step()
    assert not m.teacher.training
    assert all(torch.equal(before[k], v) for k, v in m.teacher.state_dict().items())
    assert all(p.grad is None for p in m.teacher.parameters())
    assert not torch.equal(adapter_before, m.switch_adapter.weight)


@pytest.mark.parametrize(
    ("kwargs", "calls", "terms"),
    [
        ({}, 2, ["dbild", "loss", "sft", "switch"]),
        ({"switch_weight": 0.0}, 1, ["dbild", "loss", "sft"]),  # no switched forward
        ({"dbild_weight": 0.0, "switch_weight": 0.0}, 0, ["loss", "sft"]),  # no teacher at all
    ],
)
def test_teacher_forwards_only_when_a_term_needs_them(kwargs: dict, calls: int, terms: list[str]) -> None:
    m = method(**kwargs)
    seen: list[bool] = []
    hook = m.teacher.register_forward_hook(
        lambda module, args, kw, out: seen.append(kw.get("visual_embeds") is None), with_kwargs=True
    )
    sums, _ = m.token_loss_sums(batch())
    hook.remove()
    assert len(seen) == calls and sorted(sums) == terms
    adapter = {id(p) for p in m.switch_adapter.parameters()}
    assert bool(adapter & {id(p) for p in m.trainable_parameters()}) == (calls == 2)  # unused adapter not optimised
    if calls == 2:
        assert sorted(seen) == [False, True]  # one normal forward (images), one switched (visual_embeds)


def test_switch_target_student_with_matching_widths() -> None:
    student, teacher = tiny_vlm(0, (4, 8), 24), tiny_vlm(1, (4, 12), 24)
    m = SwitchKD(
        student=student,
        teacher=teacher,
        switch_target="student",
        align_projector="none",
        sft_weight=0.0,
        dbild_weight=0.0,
    )
    assert isinstance(m.switch_adapter, nn.Identity)
    sums, _ = m.token_loss_sums(batch())
    sums["loss"].backward()
    assert any(p.grad is not None for p in m.student.language.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"switch_point": "lm"}, "model.init_args.switch_point"),
        ({"align_projector": "conv"}, "model.init_args.align_projector"),
        ({"align_projector": "none"}, "model.init_args.align_projector"),  # 16 != 24
        ({"switch_target": "student"}, "model.init_args.align_projector"),  # adapter nobody trains
        ({"switch_loss": "mse"}, "model.init_args.switch_loss"),
        ({"switch_target": "both"}, "model.init_args.switch_target"),
        ({"switch_weight": -1.0}, "switch_weight"),
        ({"switch_temperature": 0.0}, "switch_temperature"),
        ({"adapter_hidden": 0}, "model.init_args.adapter_hidden"),
        ({"sft_weight": 0.0, "dbild_weight": 0.0, "switch_weight": 0.0}, "sft_weight"),
    ],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=field.replace(".", r"\.")):
        method(**kwargs)


def test_cli_fit_trains_the_adapter_and_restores_it_from_the_checkpoint(tmp_path: Path) -> None:
    from tests.helpers.cli import TINY_VQA, fit_config

    cli = fit_config(
        "vqa_switch_kd.yaml",
        *TINY_VQA,
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )
    model = cli.model
    assert isinstance(model, SwitchKD) and not model.teacher.training
    metrics = cli.trainer.logged_metrics
    assert {"train/sft_epoch", "train/dbild_epoch", "train/switch_epoch", "val/pass@1"} <= set(metrics)
    assert torch.isfinite(metrics["train/switch_epoch"]) and metrics["train/switch_epoch"] > 0
    checkpoint = Path(cli.trainer.checkpoint_callback.last_model_path)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert {"switch_adapter.weight", "switch_adapter.bias"} <= set(state)
    torch.manual_seed(123)
    fresh = SwitchKD(student=copy.deepcopy(model.student).cpu(), teacher=copy.deepcopy(model.teacher).cpu())
    assert not torch.equal(fresh.switch_adapter.weight, model.switch_adapter.weight)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.switch_adapter.weight, model.switch_adapter.weight.cpu())
