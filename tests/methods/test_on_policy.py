"""OnPolicyDistill: mixing fraction, sampled rows, reverse-KL losses, normalisation; CLI fit on tiny text."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.divergences import reverse_kl
from kd_lightning.methods.lm_distill import LMDistill
from kd_lightning.methods.on_policy import OnPolicyDistill
from tests.methods.lm_standins import TokenBatches, fit_lm_config, make_batch, one_step_params, sgd, tiny_gpt, trainer


def method(**kwargs) -> OnPolicyDistill:
    kwargs.setdefault("prompt_length", 3)
    return OnPolicyDistill(tiny_gpt(1), tiny_gpt(2, d_model=24), optimizer=sgd(), **kwargs)


def test_rows_mixing_replaces_exactly_lambda_b_rows_and_lambda_on_average() -> None:
    module = method(on_policy_fraction=0.5)
    torch.manual_seed(0)
    for _ in range(20):
        assert int(module.choose_on_policy_rows(6, torch.device("cpu")).sum()) == 3
    module = method(on_policy_fraction=0.3)
    draws = torch.stack([module.choose_on_policy_rows(10, torch.device("cpu")) for _ in range(2000)]).float()
    assert set(draws.sum(1).tolist()) == {3.0}  # 0.3 × 10 is an integer: every batch has 3 rows
    assert draws.mean().item() == pytest.approx(0.3)
    module = method(on_policy_fraction=0.25)  # 0.25 × 6 = 1.5: 1 or 2 rows, 1.5 on average
    counts = torch.tensor([float(module.choose_on_policy_rows(6, torch.device("cpu")).sum()) for _ in range(4000)])
    assert set(counts.tolist()) == {1.0, 2.0} and counts.mean().item() == pytest.approx(1.5, abs=0.05)
    assert draws.mean(0).min() > 0.25 and draws.mean(0).max() < 0.35  # every row is chosen about equally


def test_batch_mixing_flips_one_coin_per_batch() -> None:
    module = method(on_policy_fraction=0.3, mixing="batch")
    torch.manual_seed(0)
    draws = torch.stack([module.choose_on_policy_rows(4, torch.device("cpu")) for _ in range(4000)]).float()
    assert set(draws.mean(1).tolist()) == {0.0, 1.0}
    assert draws.mean().item() == pytest.approx(0.3, abs=0.03)


class Spy(torch.nn.Module):
    """Wrap a model and record the prompts it is asked to continue."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.prompts: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask)

    def generate(self, input_ids, **kwargs):
        self.prompts.append(input_ids.clone())
        return self.model.generate(input_ids, **kwargs)


def test_on_policy_rows_continue_the_prompt_with_the_students_samples() -> None:
    student = Spy(tiny_gpt(1))
    module = OnPolicyDistill(student, tiny_gpt(2), on_policy_fraction=0.5, prompt_length=3)
    batch = make_batch([8, 8, 6, 8], 8, seed=0)
    torch.manual_seed(0)
    mixed, flags = module.build_batch(batch)
    rows = module.last_on_policy_rows
    assert int(rows.sum()) == 2 and flags.tolist() == [False, False, True, True]
    for key in ("input_ids", "labels", "attention_mask"):  # dataset rows first, unchanged
        assert torch.equal(mixed[key][:2], batch[key][~rows])
    torch.testing.assert_close(torch.cat(student.prompts), batch["input_ids"][rows][:, :3])
    lengths = batch["attention_mask"][rows].sum(1)
    for i, n in enumerate(lengths.tolist()):  # prompt kept, not predicted; as many new tokens as the row had
        row = mixed["labels"][2 + i]
        assert torch.equal(mixed["input_ids"][2 + i, :3], batch["input_ids"][rows][i, :3])
        assert (row[:3] == -100).all() and (row[3:n] >= 0).all() and (row[n:] == -100).all()
        assert torch.equal(row[3:n], mixed["input_ids"][2 + i, 3:n])


def test_without_on_policy_rows_it_is_off_policy_reverse_kl(tmp_path: Path) -> None:
    data = [make_batch([8, 5, 3], 8, seed=1)]
    on_policy = OnPolicyDistill(tiny_gpt(1), tiny_gpt(2, d_model=24), on_policy_fraction=0.0, optimizer=sgd())
    off_policy = LMDistill(tiny_gpt(1), tiny_gpt(2, d_model=24), objective="reverse_kl", optimizer=sgd())
    a = one_step_params(on_policy, TokenBatches(data), tmp_path / "a", 1)
    b = one_step_params(off_policy, TokenBatches(data), tmp_path / "b", 1)
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-6, atol=1e-8, msg=key)


@pytest.mark.parametrize("estimator", ["full", "sampled_token"])
def test_loss_on_the_mixed_batch(estimator: str) -> None:
    module = method(on_policy_fraction=0.5, estimator=estimator)
    module.num_classes = 24
    batch = make_batch([8, 8, 7, 8], 8, seed=3)
    torch.manual_seed(1)
    sums, count = module.token_loss_sums(batch)
    torch.manual_seed(1)
    mixed, flags = module.build_batch(batch)  # the same draws
    with torch.no_grad():
        s = module.student(mixed["input_ids"], mixed["attention_mask"])[:, :-1]
        t = module.teacher(mixed["input_ids"], mixed["attention_mask"])[:, :-1]
    mask = mixed["labels"][:, 1:] != -100
    rkl = reverse_kl(s, t, mask=mask, reduction="none")
    assert int(count) == int(mask.sum()) == (7 + 7) + (5 + 4)  # dataset rows + continuations after 3 prompt tokens
    assert sums["reverse_kl"].item() == pytest.approx(rkl.sum().item(), rel=1e-5)
    if estimator == "full":
        assert sums["loss"].item() == pytest.approx(rkl.sum().item(), rel=1e-5)
    else:  # dataset rows: full reverse KL; sampled rows: −r·log q(y) with r = log p_T(y) − log q(y)
        y = mixed["labels"][:, 1:].clamp_min(0).unsqueeze(-1)
        log_q, log_p = s.log_softmax(-1).gather(-1, y).squeeze(-1), t.log_softmax(-1).gather(-1, y).squeeze(-1)
        sampled = mask & flags.unsqueeze(-1)
        expected = rkl[~flags].sum() - ((log_p - log_q) * log_q)[sampled].sum()
        assert sums["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_group_count_is_rescaled_by_the_sampled_rows() -> None:
    module = method(on_policy_fraction=1.0)
    batch = {**make_batch([8, 8], 8, seed=0), "num_items_in_batch": torch.tensor(28)}  # two such micro-batches
    loaded = 14  # 7 + 7 predicted tokens as loaded; on-policy rows predict 5 + 5 after the 3-token prompts
    assert module.group_token_count(batch, torch.tensor(loaded)).item() == 28
    assert module.group_token_count(batch, torch.tensor(10)).item() == 20


def test_training_logs_fraction_and_reward_and_keeps_the_teacher(tmp_path: Path) -> None:
    module = method(on_policy_fraction=0.5, estimator="sampled_token")
    teacher = copy.deepcopy(module.teacher.state_dict())
    run = trainer(tmp_path, max_steps=2, limit_val_batches=1)
    run.fit(module, datamodule=TokenBatches([make_batch([8, 8, 6, 8], 8, seed=s) for s in range(2)]))
    metrics = run.callback_metrics
    assert metrics["train/on_policy_fraction"].item() == 0.5
    assert {"train/reward", "train/sampled_token", "train/reverse_kl", "val/ppl"} <= set(metrics)
    assert torch.isfinite(metrics["train/loss"])
    assert all(torch.equal(v, module.teacher.state_dict()[k]) for k, v in teacher.items())


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.on_policy_fraction must be in \[0, 1\]"):
        method(on_policy_fraction=1.5)
    with pytest.raises(KDConfigError, match=r"model.init_args.estimator"):
        method(estimator="vocab")

    class NoGenerate(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return torch.zeros(*input_ids.shape, 24)

    with pytest.raises(KDConfigError, match=r"model.init_args.student \(NoGenerate\) has no generate"):
        OnPolicyDistill(NoGenerate(), tiny_gpt())


def test_cli_fit_with_the_builtin_gpt_and_byte_tokenizer(in_tmp: Path) -> None:
    cli = fit_lm_config("lm_stdlib_onpolicy.yaml", in_tmp, "--model.init_args.prompt_length=8")
    model = cli.model
    assert isinstance(model, OnPolicyDistill)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and cli.trainer.global_step == 2
    assert metrics["train/on_policy_fraction"].item() == 0.5  # 2 of the 4 rows of every batch
    assert {"train/reward", "val/ppl", "val/agreement"} <= set(metrics)
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
