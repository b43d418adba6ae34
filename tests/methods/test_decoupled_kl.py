"""DecoupledKLDistill: the 2×2 objectives, KL mixing, the entropy-gated length curriculum; CLI fit on tiny text."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.divergences import entropy, forward_kl, reverse_kl
from kd_lightning.methods.decoupled_kl import DecoupledKLDistill, EntropyGatedCurriculum
from tests.methods.lm_standins import TokenBatches, fit_lm_config, make_batch, sgd, tiny_gpt, trainer


def method(**kwargs) -> DecoupledKLDistill:
    kwargs.setdefault("prompt_length", 3)
    kwargs.setdefault("max_new_tokens", 4)
    return DecoupledKLDistill(tiny_gpt(1), tiny_gpt(2, d_model=24), optimizer=sgd(), **kwargs)


# ---------------------------------------------------------------------------------------------- curriculum
def test_curriculum_advances_while_entropy_stays_above_the_gate_and_then_holds() -> None:
    gate = EntropyGatedCurriculum([4, 8, 16, 32], entropy_min=1.0)
    assert gate.length == 4
    assert gate.observe(1.5) and gate.length == 8
    assert gate.observe(1.0) and gate.length == 16  # ≥ H_min passes
    assert not gate.observe(0.9) and gate.length == 16 and bool(gate.stopped)  # drop: stop at the last stable length
    assert not gate.observe(3.0) and gate.length == 16  # for good
    assert int(gate.num_observations) == 4 and gate.last_entropy.item() == 3.0


def test_curriculum_patience_relative_gate_and_last_rung() -> None:
    gate = EntropyGatedCurriculum([4, 8, 16], entropy_min_ratio=0.8, patience=2, stop_on_fail=False)
    assert not gate.observe(2.0) and gate.reference.item() == 2.0 and gate.threshold == pytest.approx(1.6)
    assert gate.observe(1.7) and gate.length == 8  # second consecutive pass
    assert not gate.observe(1.5) and not bool(gate.stopped) and int(gate.passes) == 0  # fail: count reset, no stop
    assert not gate.observe(1.6) and gate.observe(1.9) and gate.length == 16
    assert gate.finished and not gate.observe(5.0) and not gate.observe(5.0) and gate.length == 16


def test_curriculum_state_survives_a_state_dict_round_trip() -> None:
    module = method(length_ladder=[2, 4, 6], entropy_min=0.5)
    module.curriculum.observe(1.0)
    module.curriculum.observe(0.1)
    fresh = method(length_ladder=[2, 4, 6], entropy_min=0.5)
    assert fresh.train_length == 2
    fresh.load_state_dict(module.state_dict())
    assert fresh.train_length == 4 and fresh.curriculum.finished and bool(fresh.curriculum.stopped)
    assert fresh.curriculum.last_entropy.item() == pytest.approx(0.1)


def test_bad_ladders_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.length_ladder must be strictly increasing"):
        method(length_ladder=[8, 4])
    with pytest.raises(KDConfigError, match=r"model.init_args.gate_patience"):
        method(length_ladder=[4, 8], gate_patience=0)


# ---------------------------------------------------------------------------------------------- objectives
class Spy(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask)

    def generate(self, input_ids, **kwargs):
        self.calls += 1
        return self.model.generate(input_ids, **kwargs)


@pytest.mark.parametrize("prefix", ["student", "teacher"])
def test_prefix_source_decides_who_writes_the_continuation(prefix: str) -> None:
    student, teacher = Spy(tiny_gpt(1)), Spy(tiny_gpt(2))
    module = DecoupledKLDistill(student, teacher, prefix_source=prefix, prompt_length=3, max_new_tokens=4)
    batch = make_batch([8, 8], 8, seed=0)
    seqs = module.training_sequences(batch)
    assert (student.calls, teacher.calls) == ((1, 0) if prefix == "student" else (0, 1))
    assert seqs["input_ids"].shape == (2, 7) and torch.equal(seqs["input_ids"][:, :3], batch["input_ids"][:, :3])
    assert (seqs["labels"][:, :3] == -100).all() and (seqs["labels"][:, 3:] >= 0).all()


def test_dataset_teacher_prefix_truncates_the_data_to_the_training_length() -> None:
    module = method(prefix_source="teacher", teacher_prefix="dataset", max_new_tokens=3)
    batch = make_batch([8, 5], 8, seed=0)
    seqs = module.training_sequences(batch)
    assert torch.equal(seqs["input_ids"], batch["input_ids"][:, :6])
    assert seqs["labels"].tolist()[0] == [-100] * 3 + batch["labels"][0, 3:6].tolist()
    assert seqs["labels"].tolist()[1] == [-100] * 3 + batch["labels"][1, 3:5].tolist() + [-100]
    assert seqs["attention_mask"].sum(1).tolist() == [6, 5]


@pytest.mark.parametrize("token_kl", ["forward", "reverse", "mixed"])
def test_token_kl_direction_and_mixing_on_fixed_prefixes(token_kl: str) -> None:
    module = method(prefix_source="teacher", teacher_prefix="dataset", token_kl=token_kl, reverse_weight=0.3)
    batch = make_batch([8, 7], 8, seed=1)
    sums, count = module.token_loss_sums(batch)
    seqs = module.training_sequences(batch)
    with torch.no_grad():
        s = module.student(seqs["input_ids"], seqs["attention_mask"])[:, :-1]
        t = module.teacher(seqs["input_ids"], seqs["attention_mask"])[:, :-1]
    mask = seqs["labels"][:, 1:] != -100
    fkl = forward_kl(s, t, mask=mask, reduction="none").sum()
    rkl = reverse_kl(s, t, mask=mask, reduction="none").sum()
    expected = {"forward": fkl, "reverse": rkl, "mixed": 0.3 * rkl + 0.7 * fkl}[token_kl]
    assert int(count) == 4 + 4  # only the continuation after the 3-token prompt
    assert sums["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_sampled_token_estimator_needs_student_prefixes() -> None:
    with pytest.raises(KDConfigError, match="reverse_estimator=sampled_token needs the student's own samples"):
        method(prefix_source="teacher", token_kl="reverse", reverse_estimator="sampled_token")
    module = method(token_kl="reverse", reverse_estimator="sampled_token")
    sums, count = module.token_loss_sums(make_batch([8, 8], 8, seed=2))
    assert "sampled_token" in sums and int(count) == 8 and torch.isfinite(sums["loss"])


def test_lengths_beyond_the_models_max_seq_len_are_an_error(tmp_path: Path) -> None:
    module = method(prompt_length=40, length_ladder=[8, 32])
    with pytest.raises(KDConfigError, match=r"prompt_length \+ the longest training length \(40 \+ 32\)"):
        trainer(tmp_path).validate(module, datamodule=TokenBatches([make_batch([8], 8, seed=0)]), verbose=False)


# ---------------------------------------------------------------------------------------------- in training
class LengthSpy(Callback):
    def __init__(self) -> None:
        self.lengths: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lengths.append(pl_module.train_length)


def test_validation_gates_the_length_and_resume_continues_it(tmp_path: Path) -> None:
    data = TokenBatches([make_batch([8, 8], 8, seed=s) for s in range(2)])
    module = method(length_ladder=[2, 3, 4], entropy_min=0.0, gate_batches=1)  # every evaluation passes
    teacher = copy.deepcopy(module.teacher.state_dict())
    spy = LengthSpy()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run = trainer(tmp_path, max_epochs=1, num_sanity_val_steps=1, enable_checkpointing=True, callbacks=[spy, ckpt])
    run.fit(module, datamodule=data)
    assert spy.lengths == [2, 2] and module.train_length == 3  # one evaluation (sanity check not counted)
    assert int(module.curriculum.num_observations) == 1
    assert run.callback_metrics["val/entropy"].item() > 0 and "train/length" in run.callback_metrics
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in teacher.items())
    trainer(tmp_path).validate(module, datamodule=data, verbose=False)  # outside fit: no gate
    assert module.train_length == 3 and int(module.curriculum.num_observations) == 1
    stored = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert stored["curriculum.stage"].item() == 1

    resumed = method(length_ladder=[2, 3, 4], entropy_min=0.0, gate_batches=1)
    spy2 = LengthSpy()
    run2 = trainer(
        tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[spy2, ModelCheckpoint(tmp_path / "c2")]
    )
    run2.fit(resumed, datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert spy2.lengths == [3, 3] and resumed.train_length == 4


def test_gate_entropy_is_the_students_on_its_own_continuations() -> None:
    module = method(length_ladder=[3, 6])
    batch = make_batch([8, 8], 8, seed=4)
    torch.manual_seed(5)
    values = module.continuation_entropy(batch)
    torch.manual_seed(5)
    seqs = module.continuations(batch, 3, module.student)
    with torch.no_grad():
        logits = module.student(seqs["input_ids"], seqs["attention_mask"])[:, :-1]
    mask = seqs["labels"][:, 1:] != -100
    torch.testing.assert_close(values, entropy(logits, mask=mask, reduction="none")[mask])
    assert values.numel() == 2 * 3


@pytest.mark.parametrize("cell", [("student", "forward"), ("teacher", "reverse")])
def test_cli_fit_with_the_builtin_gpt_and_byte_tokenizer(cell: tuple[str, str], in_tmp: Path) -> None:
    prefix, token_kl = cell
    cli = fit_lm_config(
        "lm_stdlib_decoupled.yaml",
        in_tmp,
        "--model.init_args.prompt_length=8",
        "--model.init_args.length_ladder=[4, 8]",
        f"--model.init_args.prefix_source={prefix}",
        f"--model.init_args.token_kl={token_kl}",
    )
    model = cli.model
    assert isinstance(model, DecoupledKLDistill)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and cli.trainer.global_step == 2
    assert {"val/entropy", "val/ppl", "val/agreement", f"train/{token_kl}_kl"} <= set(metrics)
    assert int(model.curriculum.num_observations) == 1  # one validation after the sanity check
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
