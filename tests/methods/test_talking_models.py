"""TalkingModels as a LightningModule: parts from probed shapes, the conversation by hand, gradient routes, switches,
warm-up, frozen teacher, named errors, checkpoint parts and a CLI fit on digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.logit import kd_kl_div
from kd_lightning.methods import TalkingModels
from kd_lightning.models import SmallCNN
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, tiny_trainer


def pair() -> tuple[SmallCNN, SmallCNN]:
    """CNNs for 1x4x4 blobs (student 4-8, teacher 8-16): blocks.0 4x4, blocks.1 2x2, fc:input a vector."""
    torch.manual_seed(0)
    return SmallCNN(1, (4, 8), num_classes=4), SmallCNN(1, (8, 16), num_classes=4)


def method(**kwargs: Any) -> TalkingModels:
    student, teacher = pair()
    args = {"input_shape": (1, 4, 4), "num_classes": 4, "message_dim": 6, **kwargs}
    return TalkingModels(student, teacher, optimizer=lambda p: torch.optim.Adam(p, lr=0.05), **args)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)


def grads(module: nn.Module) -> dict[str, bool]:
    """Which parameters received a non-zero gradient."""
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


# ------------------------------------------------------------------------------------------- parts
def test_parts_are_built_from_the_probed_taps() -> None:
    m = method()
    assert m.student_coder.shape == (8,) and m.teacher_coder.shape == (16,)
    assert m.student_coder.encoder.net[-1].out_features == 6 == m.teacher_coder.encoder.net[-1].out_features
    assert m.response_encoder is None and m.teacher_task_head is None
    new = method(teacher_head="new", teacher_response_layer="fc:input", teacher_layer="blocks.1")
    assert isinstance(new.teacher_task_head, nn.Linear)
    assert (new.teacher_task_head.in_features, new.teacher_task_head.out_features) == (16, 4)
    assert new.teacher_coder.shape == (16, 2, 2) and new.response_encoder.net[0].in_features == 16
    teacher_ids = {id(p) for p in new.teacher.parameters()}
    trainable = {id(p) for p in new.trainable_parameters()}
    part_ids = {
        id(p) for part in (new.student_coder, new.teacher_coder, new.teacher_task_head) for p in part.parameters()
    }
    assert part_ids <= trainable and not (teacher_ids & trainable)


def test_non_vector_hidden_states_are_flattened_and_reshaped_back() -> None:
    m = method(student_layer="blocks.0", teacher_layer="blocks.1")
    assert m.student_coder.shape == (4, 4, 4) and m.student_coder.dim == 64 and m.teacher_coder.shape == (16, 2, 2)
    terms, logits = m.training_loss(batch())
    assert {"ce", "ae", "t2s", "t2s_task", "int_ce", "int_kd"} == set(terms) - {"loss"}
    assert all(torch.isfinite(v) for v in terms.values()) and logits.shape == (8, 4)


# ------------------------------------------------------------------------------------------- the conversation
def test_loss_terms_follow_the_protocol_by_hand() -> None:
    m = method(temperature=3.0)
    m.train()
    x, y = batch()
    terms, _ = m.training_loss((x, y))
    s, t, cs, ct = m.student, m.teacher, m.student_coder, m.teacher_coder
    with torch.no_grad():
        h_s = s.flatten(s.avgpool(s.blocks[1](s.pools[0](s.blocks[0](x)))))
        h_t = t.flatten(t.avgpool(t.blocks[1](t.pools[0](t.blocks[0](x)))))
        z_t = t(x)
        mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
        ae = mse(cs(h_s), h_s) + mse(ct(h_t), h_t)
        translated = cs.decode(ct.encode(h_t))
        t2s = mse(translated, h_s)
        t2s_task = nn.functional.cross_entropy(s.fc(translated), y)
        z = s.fc(cs.decode(ct.encode(ct.decode(cs.encode(h_s)))))  # ask, interpret, answer, decode
        int_ce = nn.functional.cross_entropy(z, y)
        int_kd = kd_kl_div(z, z_t, 3.0)
        ce = nn.functional.cross_entropy(s(x), y)
    expected = {"ce": ce, "ae": ae, "t2s": t2s, "t2s_task": t2s_task, "int_ce": int_ce, "int_kd": int_kd}
    for name, value in expected.items():
        torch.testing.assert_close(terms[name].detach(), value, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(terms["loss"].detach(), sum(expected.values()), rtol=1e-4, atol=1e-6)


def test_inference_is_the_student_alone() -> None:
    m = method().eval()
    x, _ = batch()
    torch.testing.assert_close(m(x), m.student(x))


# ------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_student_coders_and_new_head_never_the_teacher() -> None:
    m = method(teacher_head="new", variance_weight=0.1)
    terms, _ = m.training_loss(batch())
    assert "head" in terms and "var" in terms
    terms["loss"].backward()
    for part in (m.student, m.student_coder, m.teacher_coder, m.teacher_task_head):
        got = grads(part)
        assert all(got.values()), [n for n, ok in got.items() if not ok]
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())


def test_teacher_coder_can_stay_fixed() -> None:
    m = method(teacher_coder_trainable=False)
    terms, _ = m.training_loss(batch())
    terms["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher_coder.parameters())
    assert all(grads(m.student_coder).values())
    trainable = {id(p) for p in m.trainable_parameters()}
    assert not any(id(p) in trainable for p in m.teacher_coder.parameters())


def test_interactive_round_runs_through_the_frozen_teacher_to_the_student_backbone() -> None:
    # only the interactive KL: the student's backbone and Dec_T learn only through the teacher's frozen layers
    m = method(teacher_layer="blocks.1", teacher_response_layer="fc:input", task_weight=0, ae_weight=0, t2s_weight=0)
    m.train()
    terms, _ = m.training_loss(batch())
    assert set(terms) == {"loss", "int_ce", "int_kd"}
    terms["loss"].backward()
    assert all(grads(m.teacher_coder.decoder).values()) and all(grads(m.response_encoder).values())
    assert grads(m.student)["blocks.0.0.weight"] and all(grads(m.student_coder).values())
    assert not any(grads(m.teacher_coder.encoder).values())  # Enc_T is not on this path (Enc_R answers)
    assert all(p.grad is None for p in m.teacher.parameters())


def test_translation_terms_stop_at_the_student_tap() -> None:
    m = method(task_weight=0, ae_weight=0, int_weight=0)
    terms, _ = m.training_loss(batch())
    assert set(terms) == {"loss", "t2s", "t2s_task"}
    terms["loss"].backward()
    student = grads(m.student)
    assert student["fc.weight"] and not student["blocks.0.0.weight"]  # sg(h_S); S_{>l} is fc only
    assert all(grads(m.teacher_coder.encoder).values()) and all(grads(m.student_coder.decoder).values())
    pulled = method(task_weight=0, ae_weight=0, int_weight=0, t2s_task_weight=0, t2s_detach_student=False)
    pulled.training_loss(batch())[0]["loss"].backward()
    assert grads(pulled.student)["blocks.0.0.weight"]


def test_decoded_runs_can_leave_the_student_head_alone() -> None:
    m = method(task_weight=0, ae_weight=0, student_rest_grad=False)
    terms, _ = m.training_loss(batch())
    terms["loss"].backward()
    student = grads(m.student)
    assert not student["fc.weight"] and not student["fc.bias"]  # S_{>l} is a fixed read-out of decoded states
    assert student["blocks.0.0.weight"]  # the interactive round still reaches the backbone through Enc_S
    assert all(grads(m.student_coder.decoder).values()) and all(grads(m.teacher_coder).values())


def test_autoencoding_reaches_the_student_backbone_only_when_asked() -> None:
    for flag in (False, True):
        m = method(task_weight=0, t2s_weight=0, int_weight=0, ae_student_grad=flag)
        m.training_loss(batch())[0]["loss"].backward()
        assert grads(m.student)["blocks.0.0.weight"] is flag


# ------------------------------------------------------------------------------------------- switches
@pytest.mark.parametrize(
    ("weight", "removed", "rest_runs"),
    [
        ("task_weight", {"ce"}, 2),
        ("ae_weight", {"ae"}, 2),
        ("t2s_weight", {"t2s", "t2s_task"}, 1),
        ("t2s_task_weight", {"t2s_task"}, 1),
        ("int_weight", {"int_ce", "int_kd"}, 1),
        ("int_kd_weight", {"int_kd"}, 2),
    ],
)
def test_each_zero_weight_removes_its_term(
    monkeypatch: pytest.MonkeyPatch, weight: str, removed: set[str], rest_runs: int
) -> None:
    every = {"ce", "ae", "t2s", "t2s_task", "int_ce", "int_kd"}
    m = method(**{weight: 0.0})
    calls: list[int] = []
    original = m.student_rest
    monkeypatch.setattr(m, "student_rest", lambda x, h: calls.append(1) or original(x, h))
    terms, _ = m.training_loss(batch())
    assert set(terms) - {"loss"} == every - removed
    assert len(calls) == rest_runs  # a switched-off term is not computed


def test_weights_scale_the_terms() -> None:
    x, y = batch()
    plain = method().training_loss((x, y))[0]
    scaled = method(ae_weight=2.0, int_weight=0.5, int_ce_weight=3.0).training_loss((x, y))[0]
    torch.testing.assert_close(scaled["ae"], 2.0 * plain["ae"])
    torch.testing.assert_close(scaled["int_ce"], 1.5 * plain["int_ce"])
    torch.testing.assert_close(scaled["int_kd"], 0.5 * plain["int_kd"])


# ------------------------------------------------------------------------------------------- training
def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_fit_keeps_the_teacher_frozen_in_eval_and_trains_the_rest(tmp_path: Path) -> None:
    m = method(teacher_layer="blocks.1", teacher_response_layer="fc:input", teacher_head="new")
    teacher, student, coders = snapshot(m.teacher), snapshot(m.student), snapshot(m.teacher_coder)
    tiny_trainer(tmp_path, limit_val_batches=1).fit(m, datamodule=BlobsDataModule())
    assert not changed(teacher, m.teacher) and not m.teacher.training
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert changed(student, m.student) and changed(coders, m.teacher_coder)


def test_teacher_warmup_trains_only_the_teacher_side(tmp_path: Path) -> None:
    m = method(teacher_head="new", teacher_warmup_epochs=1)
    student, coder, head = snapshot(m.student), snapshot(m.teacher_coder), snapshot(m.teacher_task_head)
    s_coder = snapshot(m.student_coder)
    tiny_trainer(tmp_path, limit_val_batches=1).fit(m, datamodule=BlobsDataModule())
    assert not changed(student, m.student) and not changed(s_coder, m.student_coder)  # BN statistics included
    assert changed(coder, m.teacher_coder) and changed(head, m.teacher_task_head)
    tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=1).fit(m, datamodule=BlobsDataModule())
    assert changed(student, m.student)


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"student_layer": "fc:inptu"}, r"^model\.init_args\.student_layer: .*'input' or 'output'"),
        ({"teacher_layer": "blockz.1"}, r"^model\.init_args\.teacher_layer: SmallCNN has no submodule .*'blocks\.1'"),
        ({"teacher_response_layer": "nope"}, r"^model\.init_args\.teacher_response_layer: SmallCNN has no"),
        ({"teacher_head": "new", "teacher_head_layer": "head"}, r"^model\.init_args\.teacher_head_layer: "),
        ({"teacher_head": "mine"}, r"^model\.init_args\.teacher_head: must be 'own' or 'new'"),
        ({"ae_weight": -1.0}, r"^model\.init_args\.ae_weight: must be a finite number >= 0"),
        ({"temperature": 0.0}, r"^model\.init_args\.temperature: must be a finite number > 0"),
        ({"message_dim": 0}, r"^model\.init_args\.message_dim: must be an integer >= 1"),
        ({"teacher_warmup_epochs": -1}, r"^model\.init_args\.teacher_warmup_epochs: must be an integer >= 0"),
        ({"teacher_warmup_epochs": 2, "ae_weight": 0}, r"^model\.init_args\.teacher_warmup_epochs: .*nothing trains"),
        (
            {"task_weight": 0, "ae_weight": 0, "t2s_weight": 0, "int_weight": 0},
            r"^model\.init_args\.task_weight: every loss weight is 0",
        ),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(KDConfigError, match=message):
        method(**kwargs)


def test_response_layer_before_the_tap_is_refused_when_run() -> None:
    m = method(teacher_layer="blocks.1", teacher_response_layer="blocks.0")
    with pytest.raises(KDConfigError, match="runs before"):
        m.training_loss(batch())
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.teacher.modules())


# ------------------------------------------------------------------------------------------- CLI
def test_cli_fit_on_digits(in_tmp: Path) -> None:
    cli = fit_config("digits_talking_models.yaml")
    model = cli.model
    assert isinstance(model, TalkingModels)
    metrics = cli.trainer.callback_metrics
    assert {f"train/{n}" for n in ("loss", "ce", "ae", "t2s", "t2s_task", "int_ce", "int_kd")} <= set(metrics)
    assert all(torch.isfinite(metrics[k]) for k in metrics if k.startswith("train/"))
    assert "val/acc" in metrics and "val/teacher_acc" in metrics
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    assert model.student_coder.shape == (16,) and model.teacher_coder.shape == (128,)
    # the coders travel with the checkpoint and are rebuilt from it before their weights load
    ckpt = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=False)
    fresh = TalkingModels(SmallCNN(1, (8, 16), 10), SmallCNN(1, (32, 64, 128), 10, dropout=0.2))
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(
        fresh.student_coder.decode(torch.ones(1, 128)), model.student_coder.decode(torch.ones(1, 128))
    )
