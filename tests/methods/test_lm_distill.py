"""LMDistill: every objective by name, the chunked path, schedules, normalisation; CLI fit on tiny text."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.errors import KDConfigError
from kd_lightning.losses import lm as token_losses
from kd_lightning.losses.lm import TOKEN_OBJECTIVES, shift_for_next_token
from kd_lightning.methods.lm_distill import LMDistill
from tests.methods.lm_standins import (
    VOCAB,
    TokenBatches,
    fit_lm_config,
    make_batch,
    one_step_params,
    sgd,
    tiny_gpt,
    trainer,
    write_documents,
)

OBJECTIVES = [*sorted(TOKEN_OBJECTIVES), "taid", "adakd", "bild", "dbild"]


def method(objective: str = "forward_kl", **kwargs) -> LMDistill:
    return LMDistill(tiny_gpt(1), tiny_gpt(2, d_model=24), objective=objective, optimizer=sgd(), **kwargs)


def micro_batches() -> list[dict]:
    return [make_batch([5, 2, 8], 8, seed=1), make_batch([8, 7], 8, seed=2)]


def test_registry_objective_value_is_the_token_mean_of_the_loss_function() -> None:
    batch = make_batch([8, 5, 3], 8, seed=0)
    module = method("jsd", objective_args={"beta": 0.3}, temperature=2.0, ce_weight=0.5)
    module.num_classes = VOCAB
    sums, count = module.token_loss_sums(batch)
    with torch.no_grad():
        s, y, mask = shift_for_next_token(module.student(batch["input_ids"]), batch["labels"])
        t = module.teacher(batch["input_ids"])[:, :-1]
    expected_kd = token_losses.generalized_jsd(s, t, beta=0.3, temperature=2.0, mask=mask)
    expected_ce = token_losses.token_cross_entropy(s, y, mask=mask)
    assert count == mask.sum() == 7 + 4 + 2
    assert (sums["jsd"] / count).item() == pytest.approx(expected_kd.item(), rel=1e-5)
    assert (sums["ce"] / count).item() == pytest.approx(0.5 * expected_ce.item(), rel=1e-5)
    assert (sums["loss"] / count).item() == pytest.approx(expected_kd.item() + 0.5 * expected_ce.item(), rel=1e-5)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_the_student_only(objective: str, tmp_path: Path) -> None:
    module = method(objective)
    teacher = copy.deepcopy(module.teacher.state_dict())
    student = copy.deepcopy(module.student.state_dict())
    run = trainer(tmp_path, max_steps=2, limit_val_batches=1)
    run.fit(module, datamodule=TokenBatches(micro_batches()))
    assert torch.isfinite(run.callback_metrics["train/loss"])
    assert f"train/{objective}" in run.callback_metrics
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in teacher.items())
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in student.items())
    assert not module.teacher.training


@pytest.mark.parametrize("objective", ["forward_kl", "jsd", "adakd", "taid"])
def test_accumulated_micro_batches_equal_one_batch(objective: str, tmp_path: Path) -> None:
    micro = micro_batches()
    whole = [{k: torch.cat([b[k] for b in micro]) for k in micro[0]}]
    kwargs = {"ce_weight": 0.3} if objective in ("forward_kl", "jsd") else {}
    if objective == "adakd":
        # token selection (LATF) and the median of IDTS are per micro-batch by design: off here
        kwargs["objective_args"] = {"latf": False, "idts": False}
    accumulated = one_step_params(method(objective, **kwargs), TokenBatches(micro), tmp_path / "a", 2)
    single = one_step_params(method(objective, **kwargs), TokenBatches(whole), tmp_path / "b", 1)
    for key, value in single.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "jsd", "mixed_kl"])
def test_chunked_path_gives_the_same_update_as_the_logits_path(objective: str, tmp_path: Path) -> None:
    data = micro_batches()
    naive = one_step_params(method(objective, ce_weight=0.2), TokenBatches(data), tmp_path / "a", 2)
    chunked = one_step_params(
        method(objective, ce_weight=0.2, chunked=True, chunk_size=5), TokenBatches(data), tmp_path / "b", 2
    )
    for key, value in naive.items():
        torch.testing.assert_close(chunked[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_chunked_path_with_a_teacher_without_hidden_states_and_padding_rows(tmp_path: Path) -> None:
    class LogitsOnly(torch.nn.Module):  # no hidden_states/lm_head: the chunked loss takes its logits
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_gpt(2, d_model=24, vocab_size=VOCAB + 8)

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids, attention_mask)

    data = micro_batches()
    teacher = LogitsOnly()
    reference = LMDistill(tiny_gpt(1), copy.deepcopy(teacher), optimizer=sgd())
    chunked = LMDistill(tiny_gpt(1), copy.deepcopy(teacher), chunked=True, chunk_size=4, optimizer=sgd())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = one_step_params(reference, TokenBatches(data), tmp_path / "a", 1)
        got = one_step_params(chunked, TokenBatches(data), tmp_path / "b", 1)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_taid_and_adakd_schedules_step_once_per_optimizer_step(tmp_path: Path) -> None:
    data = TokenBatches(micro_batches() * 2)
    taid = method("taid", objective_args={"t_start": 0.2, "alpha": 0.5})
    run = trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, limit_val_batches=0)
    run.fit(taid, datamodule=data)
    assert run.global_step == 2 and int(taid.criterion.num_updates) == 2
    assert taid.criterion.t.item() > 0.2 and "train/taid_t" in run.callback_metrics
    adakd = method("adakd", objective_args={"warmup_fraction": 0.0})
    run = trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    run.fit(adakd, datamodule=data)
    assert int(adakd.criterion.num_updates) == 4
    assert {"train/adakd_ratio", "train/adakd_selected"} <= set(run.callback_metrics)


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.objective: must be one of .*'jsd'.*'taid'"):
        method("kl")
    with pytest.raises(KDConfigError, match=r"model.init_args.objective_args: for 'jsd'"):
        method("jsd", objective_args={"alpha": 0.1})
    with pytest.raises(KDConfigError, match=r"model.init_args.objective_args: distil_ratio is replaced"):
        method("taid", objective_args={"distil_ratio": 0.5})
    with pytest.raises(KDConfigError, match=r"chunked supports the objectives"):
        method("taid", chunked=True)
    with pytest.raises(KDConfigError, match=r"model.init_args.kd_weight and ce_weight: are both 0"):
        method(kd_weight=0.0, ce_weight=0.0)
    with pytest.raises(KDConfigError, match=r"model.init_args.objective_args: temperature is set here"):
        method(objective_args={"temperature": 2.0})

    class NoHead(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return torch.zeros(*input_ids.shape, VOCAB)

    with pytest.raises(KDConfigError, match=r"chunked needs a student with hidden_states"):
        LMDistill(NoHead(), tiny_gpt(), chunked=True)


@pytest.mark.parametrize("config", ["lm_stdlib_fkl.yaml", "lm_stdlib_jsd.yaml", "lm_stdlib_taid.yaml"])
def test_cli_fit_with_the_builtin_gpt_and_byte_tokenizer(config: str, in_tmp: Path) -> None:
    cli = fit_lm_config(config, in_tmp)
    model = cli.model
    assert isinstance(model, LMDistill) and model.num_classes == 264
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and cli.trainer.global_step == 2
    assert {f"train/{model.objective}", "val/ppl", "val/teacher_ppl", "val/agreement", "val/kl_to_teacher"} <= set(
        metrics
    )
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    reference = torch.load(in_tmp / "teacher.pt", weights_only=True)
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_cli_fit_with_chunked_loss_and_gradient_accumulation(in_tmp: Path) -> None:
    cli = fit_lm_config(
        "lm_stdlib_rkl.yaml",
        in_tmp,
        "--model.init_args.chunked=true",
        "--model.init_args.chunk_size=16",
        "--trainer.accumulate_grad_batches=2",
        "--trainer.limit_train_batches=4",
    )
    assert cli.trainer.global_step == 2 and cli.datamodule.accumulate_grad_batches == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/reverse_kl"])


# ---------------------------------------------------------------------------------------------- offline logits
def text_data(tmp_path: Path):
    from kd_lightning.data.text import TextDataModule

    data = TextDataModule(paths=str(write_documents(tmp_path / "docs")), block_size=16, batch_size=4, split_seed=0)
    data.setup("fit")
    return data


class TeacherCalls(Callback):
    """Teacher forwards during the training batches (not setup or validation)."""

    def __init__(self) -> None:
        self.calls = 0
        self.active = False

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.teacher.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + self.active))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.active = False


def test_stored_teacher_logits_replace_the_teacher(tmp_path: Path) -> None:
    from kd_lightning.data.teacher_logits import write_teacher_logits

    data = text_data(tmp_path)
    teacher = tiny_gpt(2, d_model=24, vocab_size=264)
    store = tmp_path / "store"
    write_teacher_logits(teacher, data.train_set, store, k=264, pad_token_id=data.pad_token_id)  # k = V: exact KL

    def fit_one(**kwargs) -> tuple[dict, TeacherCalls]:
        module = LMDistill(tiny_gpt(1, vocab_size=264), copy.deepcopy(teacher), optimizer=sgd(), **kwargs)
        calls = TeacherCalls()
        L.seed_everything(0)
        run = trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[calls])
        run.fit(module, datamodule=data)
        return {k: v.detach().clone() for k, v in module.student.state_dict().items()}, calls

    online, online_calls = fit_one(ce_weight=0.1)
    offline, offline_calls = fit_one(ce_weight=0.1, teacher_logits_path=str(store))
    assert online_calls.calls == 2 and offline_calls.calls == 0
    for key, value in online.items():  # fp16 storage of the log-probabilities: close, not bit-equal
        torch.testing.assert_close(offline[key], value, rtol=1e-3, atol=1e-5, msg=key)

    other = LMDistill(
        tiny_gpt(1, vocab_size=264), tiny_gpt(7, d_model=24, vocab_size=264), teacher_logits_path=str(store)
    )
    with pytest.raises(KDConfigError, match=r"teacher_logits_path: .*teacher fingerprint"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(other, datamodule=data)
    with pytest.raises(KDConfigError, match=r"sparse forward KL: set objective: forward_kl"):
        LMDistill(tiny_gpt(), tiny_gpt(), objective="reverse_kl", teacher_logits_path=str(store))
