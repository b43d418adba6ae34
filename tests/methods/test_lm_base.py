"""The language-model bases: token normalisation under accumulation, metrics, vocabulary checks, helpers."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.divergences import reverse_kl
from kd_lightning.losses.lm import forward_kl
from kd_lightning.methods.tasks.language_model import (
    LanguageModelDistillation,
    LMSupervised,
    prompt_lengths,
    sample_continuations,
    sampled_token_reverse_kl,
)
from tests.methods.lm_standins import (
    VOCAB,
    TokenBatches,
    fit_lm_config,
    make_batch,
    one_step_params,
    sgd,
    tiny_gpt,
    trainer,
)


class ForwardKLDistill(LanguageModelDistillation):
    """The smallest concrete LM distillation method: Σ forward KL + Σ CE over the valid tokens."""

    def distillation_sums(self, student, teacher, targets, mask):
        kd = forward_kl(student, teacher, mask=mask, reduction="sum")
        ce = F.cross_entropy(student[mask], targets[mask], reduction="sum")
        return {"loss": kd + ce, "kd": kd, "ce": ce}


def two_micro_batches() -> list[dict]:
    # 3 + 1 and 5 + 7 valid (predicted) tokens: very different counts, so a mean of means is wrong.
    return [make_batch([4, 2], 8, seed=1), make_batch([6, 8], 8, seed=2)]


def one_batch(batches: list[dict]) -> list[dict]:
    return [{k: torch.cat([b[k] for b in batches]) for k in batches[0]}]


@pytest.mark.parametrize("kind", ["supervised", "distill"])
def test_gradient_accumulation_equals_one_batch_with_global_token_normalisation(kind: str, tmp_path: Path) -> None:
    def build():
        if kind == "supervised":
            return LMSupervised(tiny_gpt(1), optimizer=sgd())
        return ForwardKLDistill(tiny_gpt(1), tiny_gpt(2, d_model=24), optimizer=sgd())

    micro = two_micro_batches()
    accumulated = one_step_params(build(), TokenBatches(micro), tmp_path / "a", accumulate=2)
    single = one_step_params(build(), TokenBatches(one_batch(micro)), tmp_path / "b", accumulate=1)
    with pytest.warns(UserWarning, match="normalised per micro-batch"):
        per_batch_mean = one_step_params(build(), TokenBatches(micro, count=False), tmp_path / "c", accumulate=2)
    initial = build().network.state_dict()
    for key, value in single.items():
        assert not torch.equal(value, initial[key]) or "position" in key  # the step did move the weights
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-7, msg=key)
    moved = [not torch.allclose(per_batch_mean[k], single[k], rtol=1e-4, atol=1e-6) for k in single]
    assert any(moved)  # without the group count: mean of micro-batch means, a different update


def test_setup_tells_the_data_module_the_accumulation_factor(tmp_path: Path) -> None:
    data = TokenBatches(two_micro_batches())
    module = LMSupervised(tiny_gpt(), optimizer=sgd())
    trainer(tmp_path, max_steps=1, accumulate_grad_batches=2, limit_val_batches=0).fit(module, datamodule=data)
    assert data.accumulate_grad_batches == 2


def _by_hand(model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1]
    y = batch["labels"][:, 1:]
    mask = y != -100
    ce = F.cross_entropy(logits[mask], y[mask], reduction="none")
    return logits, y, mask, ce


def test_validation_metrics_equal_hand_computed_values(tmp_path: Path) -> None:
    val = [make_batch([8, 5, 3], 8, seed=3), make_batch([7, 8], 8, seed=4)]
    module = ForwardKLDistill(tiny_gpt(1), tiny_gpt(2, d_model=24))
    metrics = trainer(tmp_path).validate(module, datamodule=TokenBatches(val, val), verbose=False)[0]
    s_ce, t_ce, acc, t_acc, agree, kls = [], [], [], [], [], []
    with torch.no_grad():
        for batch in val:
            s, y, mask, ce = _by_hand(module.student, batch)
            t, _, _, tce = _by_hand(module.teacher, batch)
            s_ce.append(ce)
            t_ce.append(tce)
            acc.append((s.argmax(-1) == y)[mask].float())
            t_acc.append((t.argmax(-1) == y)[mask].float())
            agree.append((s.argmax(-1) == t.argmax(-1))[mask].float())
            log_p, log_q = t.log_softmax(-1)[mask], s.log_softmax(-1)[mask]
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
    cat = torch.cat
    expected = {
        "val/loss": cat(s_ce).mean(),
        "val/ppl": cat(s_ce).mean().exp(),
        "val/acc": cat(acc).mean(),
        "val/teacher_ppl": cat(t_ce).mean().exp(),
        "val/teacher_acc": cat(t_acc).mean(),
        "val/agreement": cat(agree).mean(),
        "val/kl_to_teacher": cat(kls).mean(),
    }
    for name, value in expected.items():  # token-weighted over the split, not a mean of batch means
        assert metrics[name] == pytest.approx(float(value), rel=1e-5), name
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-6)
    assert metrics["val/ppl"] > 10  # random 24-token models: perplexity near the vocabulary size


def test_identical_teacher_has_full_agreement_and_zero_kl(tmp_path: Path) -> None:
    student = tiny_gpt(1)
    module = ForwardKLDistill(student, copy.deepcopy(student))
    val = [make_batch([8, 6], 8, seed=5)]
    metrics = trainer(tmp_path).validate(module, datamodule=TokenBatches(val, val), verbose=False)[0]
    assert metrics["val/agreement"] == 1.0
    assert metrics["val/kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["val/ppl"] == pytest.approx(metrics["val/teacher_ppl"], rel=1e-6)


class TeacherSpy(Callback):
    def __init__(self) -> None:
        self.modes: list[bool] = []
        self.grads: list[bool] = []

    def _record(self, pl_module: L.LightningModule) -> None:
        self.modes.extend(m.training for m in pl_module.teacher.modules())
        self.grads.extend(p.requires_grad for p in pl_module.teacher.parameters())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._record(pl_module)


def test_teacher_frozen_in_eval_mode_and_only_the_student_learns(tmp_path: Path) -> None:
    module = ForwardKLDistill(tiny_gpt(1, dropout=0.1), tiny_gpt(2, d_model=24, dropout=0.1), optimizer=sgd())
    teacher_before = copy.deepcopy(module.teacher.state_dict())
    student_before = copy.deepcopy(module.student.state_dict())
    spy = TeacherSpy()
    run = trainer(tmp_path, max_epochs=2, callbacks=[spy])
    run.fit(module, datamodule=TokenBatches(two_micro_batches()))
    assert spy.modes and not any(spy.modes) and spy.grads and not any(spy.grads)
    for key, value in teacher_before.items():
        assert torch.equal(value, module.teacher.state_dict()[key]), key
    assert any(not torch.equal(v, module.student.state_dict()[k]) for k, v in student_before.items())
    metrics = run.callback_metrics
    assert {"train/loss", "train/kd", "train/ce", "val/ppl", "val/agreement"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss"])


def test_vocabulary_checks_at_setup(tmp_path: Path) -> None:
    data = TokenBatches(two_micro_batches())
    too_small = ForwardKLDistill(tiny_gpt(vocab_size=VOCAB - 4), tiny_gpt())
    with pytest.raises(KDConfigError, match=rf"model.init_args.student: TinyGPT predicts {VOCAB - 4} tokens.*{VOCAB}"):
        trainer(tmp_path).validate(too_small, datamodule=data, verbose=False)
    other_tokenizer = ForwardKLDistill(tiny_gpt(), tiny_gpt(vocab_size=VOCAB + 600))
    with pytest.raises(KDConfigError, match=rf"student vocabulary {VOCAB}, teacher vocabulary {VOCAB + 600}"):
        trainer(tmp_path).validate(other_tokenizer, datamodule=data, verbose=False)
    declared = ForwardKLDistill(tiny_gpt(), tiny_gpt(vocab_size=VOCAB + 8), tokenizer_ids_match=False)
    with pytest.raises(KDConfigError, match="different tokenizers"):
        trainer(tmp_path).validate(declared, datamodule=data, verbose=False)
    padded = ForwardKLDistill(tiny_gpt(), tiny_gpt(vocab_size=VOCAB + 8), optimizer=sgd())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = trainer(tmp_path, max_steps=2)
        run.fit(padded, datamodule=data)
    assert torch.isfinite(run.callback_metrics["train/loss"]) and "val/agreement" in run.callback_metrics
    assert any(f"teacher vocabulary {VOCAB + 8}" in str(w.message) for w in caught)


def test_non_dict_batches_are_a_clear_error() -> None:
    module = LMSupervised(tiny_gpt())
    with pytest.raises(KDConfigError, match="dict batches with 'input_ids'"):
        module.token_loss_sums((torch.zeros(2, 4), torch.zeros(2)))


def test_export_student_loads_without_kd_lightning(tmp_path: Path) -> None:
    module = ForwardKLDistill(tiny_gpt(3), tiny_gpt(4))
    path = module.export_student(tmp_path / "student.pt")
    payload = torch.load(path, weights_only=True)
    fresh = tiny_gpt(9)
    fresh.load_state_dict(payload["state_dict"])
    ids = torch.randint(0, VOCAB, (1, 6))
    torch.testing.assert_close(fresh(ids), module.student(ids))
    assert payload["class_name"] == "TinyGPT"


def test_prompt_lengths_from_masked_labels_or_the_configured_prefix() -> None:
    prompt_response = make_batch([8, 6], 8, seed=0, prompt=3)  # labels -100 on the 3 prompt tokens
    packed = make_batch([8, 5], 8, seed=0)
    p, n = prompt_lengths(prompt_response["labels"], prompt_response["attention_mask"], prompt_length=5)
    assert p.tolist() == [3, 3] and n.tolist() == [8, 6]
    p, n = prompt_lengths(packed["labels"], packed["attention_mask"], prompt_length=5)
    assert p.tolist() == [5, 4] and n.tolist() == [8, 5]  # capped to leave one token to continue


class Scripted(torch.nn.Module):
    """A 'model' whose generate appends a fixed script of tokens (and records its calls)."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.script = torch.tensor(script)
        self.calls: list[tuple[int, int, bool]] = []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, **kwargs):
        self.calls.append((input_ids.shape[1], max_new_tokens, self.training))
        new = self.script[:max_new_tokens].expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def test_sample_continuations_masks_prompt_and_after_eos() -> None:
    model = Scripted([5, 6, 2, 7])  # EOS = 2 at the third new token
    ids = torch.arange(1, 13).reshape(2, 6)
    out = sample_continuations(model, ids, torch.tensor([2, 3]), torch.tensor([4, 2]), eos_token_id=2)
    assert model.calls == [(2, 4, False), (3, 2, False)]  # grouped by prompt length, in eval mode
    assert model.training  # mode restored
    assert out["input_ids"].tolist() == [[1, 2, 5, 6, 2, 0], [7, 8, 9, 5, 6, 0]]
    assert out["labels"].tolist() == [[-100, -100, 5, 6, 2, -100], [-100, -100, -100, 5, 6, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]


def test_sampled_token_estimator_has_the_reverse_kl_gradient_in_expectation() -> None:
    torch.manual_seed(0)
    vocab = 5
    s = torch.randn(1, 1, vocab, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 1, vocab, dtype=torch.float64)
    q = s.detach().softmax(-1).reshape(-1)
    mask = torch.ones(1, 1, dtype=torch.bool)
    expected_value = 0.0
    expectation = torch.zeros((), dtype=torch.float64)
    for y in range(vocab):  # E_{y~q}[ℓ(y)], weights q(y) held constant: the estimator's expected gradient
        loss, reward = sampled_token_reverse_kl(s, t, torch.tensor([[y]]), mask)
        expectation = expectation + q[y] * loss
        expected_value -= q[y].item() * reward.item()
    (grad,) = torch.autograd.grad(expectation, s)
    (exact,) = torch.autograd.grad(reverse_kl(s, t), s)
    torch.testing.assert_close(grad, exact)
    assert expected_value == pytest.approx(reverse_kl(s, t).item())  # −E[r] is the reverse KL


@pytest.mark.parametrize("config", ["lm_stdlib_teacher.yaml", "lm_stdlib_student.yaml"])
def test_cli_fit_of_the_supervised_lm_configs(config: str, in_tmp: Path) -> None:
    cli = fit_lm_config(config, in_tmp, distill=False)
    assert isinstance(cli.model, LMSupervised)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and cli.trainer.global_step == 2
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert 1.0 < metrics["val/ppl"] < 2 * 264  # a random byte-level GPT is near uniform over 264 ids
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    assert last.is_file() and last.parent == in_tmp / "runs" / Path(config).stem / "checkpoints"


def test_a_missing_lm_teacher_is_trained_with_lm_supervised(in_tmp: Path) -> None:
    """``kd fit`` without ``teacher_ckpt`` trains the LM teacher with its own task (next-token CE) and caches it."""
    from kd_lightning.teachers import TeacherTraining

    cli = fit_lm_config(
        "lm_stdlib_fkl.yaml",
        in_tmp,
        "--model.init_args.teacher_ckpt=null",
        f"--teacher_training.cache_dir={in_tmp / 'teachers'}",
    )
    ckpt = Path(cli.model.teacher_ckpt)
    assert ckpt.is_file() and ckpt.parent.parent == in_tmp / "teachers"
    meta = TeacherTraining.read_meta(ckpt)
    assert meta["task_module"] == "LMSupervised" and 0.0 < meta["val_acc"] < 1.0
    assert meta["task"] == "LMSupervised" and meta["teacher"]["class_path"].endswith("TinyGPT")
    assert torch.isfinite(cli.trainer.callback_metrics["val/teacher_ppl"])
