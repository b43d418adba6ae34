"""OPSD: position alignment of the privileged teacher, teacher modes (fixed / EMA / current / adapters disabled),
the loss through the method, bad settings, and a CLI fit of configs/reasoning_opsd.yaml on tiny data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from kd_lightning.data.reasoning import ReasoningDataModule, collate_reasoning
from kd_lightning.errors import KDConfigError
from kd_lightning.losses.opsd import opsd_jsd, opsd_sampled_token
from kd_lightning.methods.opsd import OPSD
from kd_lightning.methods.tasks.reasoning import Rollout
from kd_lightning.models.lm import TinyGPT
from tests.helpers.cli import fit_config
from tests.methods.lm_standins import sgd, trainer

VOCAB = 264
LORA = {"r": 2, "alpha": 4, "target_modules": ["qkv", "proj"]}


def gpt(seed: int, d_model: int = 16) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=VOCAB, d_model=d_model, n_layers=1, n_heads=2, max_seq_len=256)


@pytest.fixture(scope="module")
def dm() -> ReasoningDataModule:
    data = ReasoningDataModule(
        families=["arith", "symbolic"],
        num_train=8,
        num_val=4,
        num_test=4,
        train_difficulties=[1, 2],
        eval_difficulties=[1],
        batch_size=4,
        eval_batch_size=4,
        max_length=160,
        privileged_template="Problem: {problem}\nReference: {solution}\nSolution:",
    )
    data.setup("fit")
    return data


def batch_of(dm: ReasoningDataModule, rows: range = range(4)) -> dict:
    return collate_reasoning([dm.train_set[i] for i in rows], dm.pad_token_id)


def method(teacher: nn.Module | None = None, student: nn.Module | None = None, **kwargs) -> OPSD:
    kwargs.setdefault("max_new_tokens", 12)
    kwargs.setdefault("eval_max_new_tokens", 8)
    kwargs.setdefault("optimizer", sgd(0.5))
    return OPSD(student if student is not None else gpt(1), teacher, **kwargs)


def attach(module: OPSD, dm: ReasoningDataModule) -> None:
    """What setup does for the data-dependent attributes, without a Trainer."""
    module.tokenizer, module.verifier = dm.tokenizer, dm.verifier
    module.eos_token_id, module.pad_token_id = dm.eos_token_id, int(dm.pad_token_id)


def fixed_rollout(batch: dict, lengths: list[int], width: int = 7, seed: int = 0) -> Rollout:
    """Random response tokens, ``lengths[b]`` real ones per row, padding after them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (len(lengths), width), generator=g)
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return Rollout(batch["prompt_ids"], batch["prompt_mask"].bool(), ids.masked_fill(~mask, 256), mask)


def use_rollout(module: OPSD, result: Rollout, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "sample", lambda *args, **kwargs: result)


def row_by_row(model: nn.Module, prompts: Tensor, prompt_mask: Tensor, result: Rollout) -> list[Tensor]:
    """For each row, the model on the UNPADDED concatenation prompt + response: the logits predicting the response."""
    out = []
    with torch.no_grad():
        for b in range(prompts.shape[0]):
            prompt = prompts[b][prompt_mask[b].bool()]
            response = result.response_ids[b][result.response_mask[b]]
            logits = model(torch.cat([prompt, response]).unsqueeze(0))[0]
            out.append(logits[len(prompt) - 1 : len(prompt) - 1 + len(response)])
    return out


# ------------------------------------------------------------------------------ position alignment
def test_teacher_logits_align_with_the_response_despite_a_longer_privileged_prompt(dm, monkeypatch) -> None:
    teacher, student = gpt(2), gpt(1)
    module = method(teacher, student)
    attach(module, dm)
    batch = batch_of(dm)
    priv_len, prompt_len = batch["privileged_mask"].sum(-1), batch["prompt_mask"].sum(-1)
    # the premise: privileged prompts are longer than the student's and of different lengths (left padding)
    assert bool((priv_len > prompt_len).all()) and len(set(priv_len.tolist())) > 1
    assert batch["privileged_ids"].shape[1] > batch["prompt_ids"].shape[1]
    result = fixed_rollout(batch, [7, 3, 5, 1])
    got = module.teacher_response_logits(batch, result)
    want = row_by_row(teacher, batch["privileged_ids"], batch["privileged_mask"], result)
    for b, ref in enumerate(want):
        n = len(ref)
        assert torch.allclose(got[b, :n], ref, atol=1e-5), b
        # the student's prompt width would be the wrong slice: the test tells them apart
        wrong_start = batch["prompt_ids"].shape[1] - 1 - (batch["privileged_ids"].shape[1] - priv_len[b].item())
        assert wrong_start != priv_len[b].item() - 1

    # the whole loss path: the JSD summed in token_loss_sums equals the row-by-row reference
    use_rollout(module, result, monkeypatch)
    sums, count = module.token_loss_sums(batch)
    students = row_by_row(student, batch["prompt_ids"], batch["prompt_mask"], result)
    reference = sum(
        opsd_jsd(s, t, beta=0.5, temperature=1.1, reduction="sum") for s, t in zip(students, want, strict=True)
    )
    assert int(count) == 7 + 3 + 5 + 1
    assert sums["jsd"].item() == pytest.approx(reference.item(), rel=1e-5)
    assert sums["loss"].item() == pytest.approx(sums["jsd"].item())


def test_a_misaligned_teacher_slice_would_be_caught(dm) -> None:
    """Sanity of the test above: slicing the teacher's output at the student prompt's width gives other logits."""
    teacher = gpt(2)
    batch = batch_of(dm)
    result = fixed_rollout(batch, [7, 3, 5, 1])
    ids = torch.cat([batch["privileged_ids"], result.response_ids], 1)
    mask = torch.cat([batch["privileged_mask"].bool(), result.response_mask], 1)
    with torch.no_grad():
        full = teacher(ids, attention_mask=mask)
    width = batch["prompt_ids"].shape[1]
    wrong = full[:, width - 1 : width - 1 + 7]
    want = row_by_row(teacher, batch["privileged_ids"], batch["privileged_mask"], result)
    assert not torch.allclose(wrong[0, :7], want[0], atol=1e-3)


# ------------------------------------------------------------------------------ teacher modes
def test_fixed_teacher_stays_frozen_and_the_student_learns(dm) -> None:
    teacher = gpt(2)
    module = method(teacher, gpt(1), student_init="teacher")
    attach(module, dm)
    module.initialise_student()
    module.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.5)
    assert {id(p) for p in module.trainable_parameters()}.isdisjoint({id(p) for p in teacher.parameters()})
    for _ in range(2):
        sums, count = module.token_loss_sums(batch_of(dm))
        optimizer.zero_grad()
        (sums["loss"] / count).backward()
        optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    changed = [k for k, v in module.student.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # started from the teacher's weights (student_init) and moved


def test_student_init_copies_the_base(dm) -> None:
    teacher = gpt(2)
    module = method(teacher, gpt(1), student_init="teacher")
    module.initialise_student()
    for k, v in module.student.state_dict().items():
        assert torch.equal(v, teacher.state_dict()[k])


class RecordStudent(L.Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.states):  # after an optimiser step
            self.states.append({k: v.detach().clone() for k, v in pl_module.student.named_parameters()})


def test_ema_teacher_follows_the_decay_formula(dm, tmp_path: Path) -> None:
    decay = 0.7
    module = method(None, gpt(1), teacher_mode="ema", ema_decay=decay)
    assert module.ema_teacher is not None and int(module.ema_updates) == 0
    record = RecordStudent()
    # 4 batches, 2 per optimiser step: the EMA updates once per optimiser step, not per batch
    run = trainer(tmp_path, max_epochs=2, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[record])
    run.fit(module, datamodule=dm)  # 2 batches per epoch
    assert run.global_step == 2 and len(record.states) == 2 and int(module.ema_updates) == 2
    first, second = record.states
    assert any(not torch.equal(first[k], second[k]) for k in first)
    for name, ema in module.ema_teacher.named_parameters():
        want = decay * first[name] + (1 - decay) * second[name]  # copy at the first step, then the decay
        assert torch.allclose(ema, want, atol=1e-6), name
        assert not ema.requires_grad
    assert not module.ema_teacher.training
    ema_ids = {id(p) for p in module.ema_teacher.parameters()}
    assert ema_ids.isdisjoint({id(p) for p in module.trainable_parameters()})


def test_ema_teacher_before_and_after_its_first_update(dm) -> None:
    module = method(None, gpt(1), teacher_mode="ema", ema_decay=0.5)
    attach(module, dm)
    batch = batch_of(dm)
    result = fixed_rollout(batch, [4, 4, 4, 4])
    want = row_by_row(module.student, batch["privileged_ids"], batch["privileged_mask"], result)
    before = module.teacher_response_logits(batch, result)  # no update yet: the current student teaches
    assert all(torch.allclose(before[b, : len(ref)], ref, atol=1e-5) for b, ref in enumerate(want))
    module.update_ema()  # copy
    theta_1 = {k: v.clone() for k, v in module.student.named_parameters()}
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(0.1)
    module.update_ema()
    for k, ema in module.ema_teacher.named_parameters():
        assert torch.allclose(ema, 0.5 * theta_1[k] + 0.5 * (theta_1[k] + 0.1), atol=1e-6)
    after = module.teacher_response_logits(batch, result)
    assert not torch.allclose(after, before, atol=1e-4)


def test_current_mode_uses_the_student_without_gradient_through_the_teacher(dm, monkeypatch) -> None:
    student = gpt(1)
    module = method(None, student, teacher_mode="current")
    attach(module, dm)
    batch = batch_of(dm)
    result = fixed_rollout(batch, [6, 2, 7, 3])
    teacher_logits = module.teacher_response_logits(batch, result)
    assert not teacher_logits.requires_grad
    use_rollout(module, result, monkeypatch)
    sums, _ = module.token_loss_sums(batch)
    params = [p for p in student.parameters()]
    got = torch.autograd.grad(sums["loss"], params)
    # reference: the student path with grad, the teacher path (same weights, privileged prompt) as a constant
    p_width, q_width = batch["prompt_ids"].shape[1], batch["privileged_ids"].shape[1]
    s = student(
        torch.cat([batch["prompt_ids"], result.response_ids], 1),
        attention_mask=torch.cat([batch["prompt_mask"].bool(), result.response_mask], 1),
    )[:, p_width - 1 : p_width - 1 + 7]
    t = student(
        torch.cat([batch["privileged_ids"], result.response_ids], 1),
        attention_mask=torch.cat([batch["privileged_mask"].bool(), result.response_mask], 1),
    )[:, q_width - 1 : q_width - 1 + 7]
    assert torch.allclose(t.detach(), teacher_logits, atol=1e-5)
    ref = opsd_jsd(s, t.detach(), mask=result.response_mask, beta=0.5, temperature=1.1, reduction="sum")
    want = torch.autograd.grad(ref, params, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-6)
    # with the teacher path differentiated too, the gradient would differ: the test can tell
    log_s, log_t = torch.log_softmax(s / 1.1, -1), torch.log_softmax(t / 1.1, -1)
    log_m = torch.logsumexp(
        torch.stack([log_t + torch.log(torch.tensor(0.5)), log_s + torch.log(torch.tensor(0.5))]), 0
    )
    both = 0.5 * (log_t.exp() * (log_t - log_m)).sum(-1) + 0.5 * (log_s.exp() * (log_s - log_m)).sum(-1)
    assert (both * result.response_mask).sum().item() == pytest.approx(ref.item(), rel=1e-5)
    through_teacher = torch.autograd.grad((both * result.response_mask).sum(), params)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(through_teacher, want, strict=True))


def lora_gpt(seed: int = 1) -> TinyGPT:
    pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = TinyGPT(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=256, lora=LORA)
    with torch.no_grad():  # LoRA starts at B = 0 (the base model): move the adapters so that they matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return model


def test_adapters_disabled_teacher_is_the_lora_student_without_adapters(dm, monkeypatch) -> None:
    student = lora_gpt()
    assert student.has_adapters
    module = method(None, student, fixed_teacher_source="adapters_disabled")
    attach(module, dm)
    batch = batch_of(dm)
    result = fixed_rollout(batch, [5, 5, 2, 7])
    got = module.teacher_response_logits(batch, result)
    assert not got.requires_grad
    with student.adapters_disabled():
        want = row_by_row(student, batch["privileged_ids"], batch["privileged_mask"], result)
    with_adapters = row_by_row(student, batch["privileged_ids"], batch["privileged_mask"], result)
    for b, ref in enumerate(want):
        assert torch.allclose(got[b, : len(ref)], ref, atol=1e-5)
        assert not torch.allclose(got[b, : len(ref)], with_adapters[b], atol=1e-3)
    use_rollout(module, result, monkeypatch)
    sums, _ = module.token_loss_sums(batch)
    sums["loss"].backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)  # only the adapters train (and got their flags back)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


def test_sampled_token_variant(dm, monkeypatch) -> None:
    student, teacher = gpt(1), gpt(2)
    module = method(teacher, student, loss_type="sampled_token", loss_temperature=1.0)
    attach(module, dm)
    batch = batch_of(dm)
    result = fixed_rollout(batch, [3, 6, 1, 4])
    use_rollout(module, result, monkeypatch)
    sums, count = module.token_loss_sums(batch)
    assert set(sums) == {"loss", "sampled_token", "jsd"} and not sums["jsd"].requires_grad
    s = row_by_row(student, batch["prompt_ids"], batch["prompt_mask"], result)
    t = row_by_row(teacher, batch["privileged_ids"], batch["privileged_mask"], result)
    tokens = [result.response_ids[b][result.response_mask[b]] for b in range(4)]
    want = sum(opsd_sampled_token(a, c, y, reduction="sum")[0] for a, c, y in zip(s, t, tokens, strict=True))
    assert int(count) == 14 and sums["loss"].item() == pytest.approx(want.item(), rel=1e-5)


def test_rollouts_are_fresh_samples_of_the_student_prompt(dm) -> None:
    module = method(gpt(2), gpt(1), max_new_tokens=6)
    attach(module, dm)
    batch = batch_of(dm)
    torch.manual_seed(0)
    module.token_loss_sums(batch)
    first = module.last_rollout
    module.token_loss_sums(batch)
    second = module.last_rollout
    assert first is not second and torch.equal(first.prompt_ids, batch["prompt_ids"])
    assert first.response_ids.shape[1] <= 6 and not torch.equal(first.response_ids, second.response_ids)
    assert module.last_rewards is not None and module.last_rewards.shape == (4,)


# ------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": 1.5}, "model.init_args.beta"),
        ({"loss_type": "kl"}, "model.init_args.loss_type"),
        ({"top_k_loss": 0}, "model.init_args.top_k_loss"),
        ({"top_k_loss": 5, "loss_type": "sampled_token"}, "model.init_args.top_k_loss"),
        ({"loss_temperature": 0.0}, "model.init_args.loss_temperature"),
        ({"sampling_temperature": 0.0}, "model.init_args.sampling_temperature"),
        ({"teacher_mode": "online"}, "model.init_args.teacher_mode"),
        ({"fixed_teacher_source": "lora"}, "model.init_args.fixed_teacher_source"),
        ({"ema_decay": 1.5}, "model.init_args.ema_decay"),
        ({"max_new_tokens": 0}, "model.init_args.max_new_tokens"),
        ({"top_k": 0}, "model.init_args.top_k"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=field.replace(".", r"\.")):
        method(gpt(2), **kwargs)


def test_teacher_requirements_per_mode() -> None:
    with pytest.raises(KDConfigError, match=r"model\.init_args\.teacher"):
        method(None)  # fixed teacher from the teacher slot: none given
    with pytest.raises(KDConfigError, match=r"model\.init_args\.fixed_teacher_source.*no adapters"):
        method(None, gpt(1), fixed_teacher_source="adapters_disabled")  # a student without LoRA
    if importlib.util.find_spec("peft") is not None:
        with pytest.raises(KDConfigError, match=r"model\.init_args\.teacher.*unused"):
            method(gpt(2), lora_gpt(), fixed_teacher_source="adapters_disabled")
    with pytest.raises(KDConfigError, match=r"model\.init_args\.student"):
        method(gpt(2), nn.Linear(2, 2))  # no generate()
    method(None, teacher_mode="current")
    method(None, teacher_mode="ema")


def test_batches_without_privileged_prompts_are_refused(dm) -> None:
    module = method(gpt(2))
    attach(module, dm)
    batch = {k: v for k, v in batch_of(dm).items() if not k.startswith("privileged")}
    with pytest.raises(KDConfigError, match="privileged_ids"):
        module.token_loss_sums(batch)


# ------------------------------------------------------------------------------ CLI
def test_cli_fit_of_the_config_on_tiny_reasoning_data(in_tmp: Path) -> None:
    tiny = {"d_model": 16, "n_layers": 1, "n_heads": 2}
    cli = fit_config(
        "reasoning_opsd.yaml",
        "--data.init_args.num_train=8",
        "--data.init_args.num_val=4",
        "--data.init_args.num_test=4",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        "--model.init_args.max_new_tokens=8",
        "--model.init_args.eval_max_new_tokens=4",
        *[f"--model.init_args.student.init_args.{k}={v}" for k, v in tiny.items()],
        *[f"--model.init_args.teacher.init_args.{k}={v}" for k, v in tiny.items()],
    )
    model = cli.model
    assert isinstance(model, OPSD) and model.teacher_mode == "fixed" and model.student_init == "teacher"
    assert model.loss_temperature == pytest.approx(1.1) and model.top_k == 20
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2 and torch.isfinite(metrics["train/loss"])
    assert {"train/jsd", "train/reward", "train/response_tokens", "val/pass@1", "val/response_tokens"} <= set(metrics)
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    # the student started from the base: after two small AdamW steps it is still close to it, unlike a fresh init
    distance = sum((a - b).abs().sum() for a, b in zip(model.student.parameters(), model.teacher.parameters()))
    scale = sum(p.abs().sum() for p in model.teacher.parameters())
    assert float(distance.detach()) < 0.05 * float(scale.detach())
