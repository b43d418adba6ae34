"""TSDKD: responses (student samples or references), loss on response logits, frozen teacher, bad settings, CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kd_lightning.data.reasoning import ReasoningDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.losses.tsd_kd import tsd_kd_terms
from kd_lightning.methods.tasks.reasoning import response_logits
from kd_lightning.methods.tsd_kd import TSDKD, reference_responses
from kd_lightning.models.lm import TinyGPT
from tests.helpers.cli import TINY_REASONING, fit_config
from tests.methods.lm_standins import sgd, trainer


def gpt(seed: int, d_model: int = 16) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=264, d_model=d_model, n_layers=1, n_heads=2, max_seq_len=256)


def data(**kwargs) -> ReasoningDataModule:
    settings = dict(
        families=["arith"],
        num_train=8,
        num_val=4,
        num_test=4,
        train_difficulties=[1],
        eval_difficulties=[1],
        batch_size=4,
        eval_batch_size=4,
        max_length=160,
    )
    dm = ReasoningDataModule(**{**settings, **kwargs})
    dm.setup("fit")
    return dm


def method(**kwargs) -> TSDKD:
    kwargs.setdefault("max_new_tokens", 24)
    kwargs.setdefault("eval_max_new_tokens", 8)
    return TSDKD(gpt(1), gpt(2, d_model=32), optimizer=sgd(0.1), **kwargs)


def attach(module: TSDKD, dm: ReasoningDataModule) -> None:
    """What setup does for the data-dependent attributes (tokenizer, EOS, pad), without a Trainer."""
    module.tokenizer, module.verifier = dm.tokenizer, dm.verifier
    module.eos_token_id, module.pad_token_id = dm.eos_token_id, int(dm.pad_token_id)


def test_reference_responses_are_the_solutions_after_each_prompt() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 1, 2, 3, 4]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, -100], [-100, -100, 1, 2, 3, 4]])
    batch = {"input_ids": ids, "labels": labels, "prompt_lengths": torch.tensor([3, 2])}
    resp, mask = reference_responses(batch)
    assert resp.tolist() == [[8, 9, 0, 0], [1, 2, 3, 4]]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    dm = data()
    real = next(iter(dm.train_dataloader()))
    resp, mask = reference_responses(real)
    text = dm.tokenizer.decode(resp[0][mask[0]].tolist())
    assert "Answer: " + real["answers"][0] in text and int(resp[0][mask[0]][-1]) == dm.eos_token_id


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_loss_sums_are_tsd_kd_on_the_response_logits(fraction: float) -> None:
    dm = data()
    module = method(on_policy_fraction=fraction, pl_denominator="code", prefix_scope="batch")
    attach(module, dm)
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    sums, count = module.token_loss_sums(batch)
    torch.manual_seed(0)
    ids, mask, sampled = module.responses(batch)  # the same responses again (same seed)
    assert sampled == (fraction == 1.0)
    if sampled:
        assert ids.shape[1] <= 24 and bool((mask.sum(-1) >= 1).all())
    else:
        assert torch.equal(ids, reference_responses(batch)[0])
    prompt, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    s = response_logits(module.student, prompt, prompt_mask, ids, mask)
    with torch.no_grad():
        t = response_logits(module.teacher, prompt, prompt_mask, ids, mask)
    terms, _ = tsd_kd_terms(s, t, mask, pl_denominator="code", prefix_scope="batch")
    assert int(count) == int(mask.sum())
    for name in ("loss", "direct", "entropy", "indirect"):
        assert sums[name].item() == pytest.approx(terms[name].item() * int(count), rel=1e-5)
    sums["loss"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())


def test_ablation_weight_zero_drops_the_term() -> None:
    dm = data()
    module = method(indirect_weight=0.0)
    attach(module, dm)
    sums, _ = module.token_loss_sums(next(iter(dm.train_dataloader())))
    assert set(sums) == {"loss", "direct", "entropy"}
    assert sums["loss"].item() == pytest.approx((sums["direct"] + sums["entropy"]).item(), rel=1e-6)


def test_training_keeps_the_teacher_frozen_and_logs_the_terms(tmp_path: Path) -> None:
    module = method()
    teacher = copy.deepcopy(module.teacher.state_dict())
    run = trainer(tmp_path, max_steps=2, limit_val_batches=1)
    run.fit(module, datamodule=data())
    metrics = run.callback_metrics
    assert {"train/direct", "train/entropy", "train/indirect", "train/confidence_weight", "val/pass@1"} <= set(metrics)
    assert metrics["train/on_policy"].item() == 1.0 and torch.isfinite(metrics["train/loss"])
    assert 0.0 < metrics["train/confidence_weight"].item() < 1.0
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in teacher.items())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pl_denominator": "flip"}, "model.init_args.pl_denominator"),
        ({"prefix_scope": "token"}, "model.init_args.prefix_scope"),
        ({"entropy_mask": "pad"}, "model.init_args.entropy_mask"),
        ({"beta": 0.0}, "model.init_args.beta"),
        ({"top_k": 1}, "model.init_args.top_k"),
        ({"indirect_weight": -1.0}, "model.init_args.indirect_weight"),
        ({"on_policy_fraction": 1.5}, "model.init_args.on_policy_fraction"),
        ({"max_new_tokens": 0}, "model.init_args.max_new_tokens"),
        ({"sampling_temperature": 0.0}, "model.init_args.sampling_temperature"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=field.replace(".", r"\.")):
        method(**kwargs)


def test_cli_fit_of_the_config_on_tiny_reasoning_data(in_tmp: Path) -> None:
    tiny = {"d_model": 16, "n_layers": 1, "n_heads": 2}
    cli = fit_config(
        "reasoning_tsd_kd.yaml",
        *TINY_REASONING,
        "--data.init_args.num_train=8",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        "--model.init_args.max_new_tokens=16",
        "--trainer.num_sanity_val_steps=0",
        *[f"--model.init_args.student.init_args.{k}={v}" for k, v in tiny.items()],
        *[f"--model.init_args.teachers.teacher.init_args.{k}={v}" for k, v in {**tiny, "d_model": 32}.items()],
        *[f"--model.init_args.teachers.base.init_args.{k}={v}" for k, v in tiny.items()],
    )
    model = cli.model
    assert isinstance(model, TSDKD) and model.loss_fn.kwargs["pl_denominator"] == "listmle"
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2 and torch.isfinite(metrics["train/loss"])
    assert {"train/indirect", "train/prefix_fraction", "val/pass@1", "val/response_tokens"} <= set(metrics)
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
