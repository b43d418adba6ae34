"""SODA: static snapshot (teacher text chosen, base-student rejected), black-box teacher, frozen reference, DPO."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from kd_lightning.data.reasoning import ReasoningDataModule, collate_reasoning
from kd_lightning.errors import KDConfigError
from kd_lightning.methods.soda import SODA
from kd_lightning.methods.tasks.reasoning import rollout
from kd_lightning.models.lm import TinyGPT
from tests.methods.lm_standins import sgd, trainer

VOCAB = 264  # ByteTokenizer


def gpt(seed: int, d_model: int = 16) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=VOCAB, d_model=d_model, n_layers=1, n_heads=2, max_seq_len=96)


def data(num_train: int = 8, batch_size: int = 4) -> ReasoningDataModule:
    return ReasoningDataModule(
        num_train=num_train,
        num_val=4,
        num_test=4,
        batch_size=batch_size,
        families=["modular"],
        train_difficulties=[1],
        eval_difficulties=[1],
    )


class RuleTeacher(nn.Module):
    """Black-box rule-based teacher: answers with the reversed last 6 prompt tokens + EOS; its forward raises."""

    def __init__(self, eos: int = 257) -> None:
        super().__init__()
        self.eos = eos
        self.dummy = nn.Parameter(torch.zeros(1))
        self.forward_calls = 0
        self.generate_calls = 0

    def forward(self, *args, **kwargs):
        self.forward_calls += 1
        raise RuntimeError("black-box teacher: no logits")

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, pad_token_id=0, **kwargs):
        self.generate_calls += 1
        answer = input_ids[:, -6:].flip(-1)[:, : max_new_tokens - 1]
        eos = torch.full((input_ids.shape[0], 1), self.eos, dtype=input_ids.dtype)
        return torch.cat([input_ids, answer, eos], dim=1)[:, : input_ids.shape[1] + max_new_tokens]


class Spy(nn.Module):
    """A student that records the fingerprint of its weights at every generate call."""

    def __init__(self, model: TinyGPT) -> None:
        super().__init__()
        self.model = model
        self.generate_weights: list[float] = []

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask=attention_mask)

    @torch.no_grad()
    def fingerprint(self) -> float:
        return float(sum(p.double().sum() for p in self.model.parameters()))

    def generate(self, *args, **kwargs):
        self.generate_weights.append(self.fingerprint())
        return self.model.generate(*args, **kwargs)


def soda(student=None, teacher=None, **kwargs) -> SODA:
    kwargs.setdefault("max_new_tokens", 8)
    kwargs.setdefault("eval_max_new_tokens", 4)
    kwargs.setdefault("optimizer", sgd(0.5))
    return SODA(student if student is not None else gpt(1), teacher if teacher is not None else RuleTeacher(), **kwargs)


def attach(module: SODA, dm: ReasoningDataModule) -> SODA:
    """What setup gives the module from the data (for tests that skip the Trainer)."""
    module.verifier, module.tokenizer = dm.verifier, dm.tokenizer
    module.eos_token_id, module.pad_token_id, module.num_classes = dm.eos_token_id, dm.pad_token_id, VOCAB
    return module


def fit(module: SODA, tmp_path: Path, dm=None, **kwargs) -> L.Trainer:
    kwargs.setdefault("limit_val_batches", 0)
    ckpt_path = kwargs.pop("ckpt_path", None)
    run = trainer(tmp_path, **kwargs)
    run.fit(module, datamodule=dm or data(), ckpt_path=ckpt_path)
    return run


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- snapshot
def test_fit_snapshot_once_base_rejected_black_box_teacher_frozen_reference_and_resume(tmp_path: Path) -> None:
    student, teacher = Spy(gpt(1)), RuleTeacher()
    base, base_weights = student.fingerprint(), params(student)
    module = soda(student, teacher, snapshot_batch_size=3)
    run = fit(module, tmp_path, max_epochs=2, limit_val_batches=1)  # 2 batches × 2 epochs, validation included
    assert run.global_step == 4
    assert teacher.generate_calls == 3  # ceil(8 / 3): once, not per step
    assert teacher.forward_calls == 0  # never its logits: not the setup probe, not training, not evaluation
    assert student.generate_weights[:3] == [base] * 3  # every rejected sample comes from the BASE student
    assert student.fingerprint() != base  # ... which then trained
    assert int(module.snapshot["present"].sum()) == 8
    for name in ("dpo", "margin", "chosen_reward", "rejected_reward", "accuracy", "pairs"):
        assert torch.isfinite(run.callback_metrics[f"train/{name}"]), name
    assert "val/pass@1" in run.callback_metrics
    # the reference is π_0, frozen, in eval mode, not optimised, not a teacher
    assert same(params(module.reference), base_weights)
    assert not module.reference.training and all(not p.requires_grad for p in module.reference.parameters())
    optimised = {id(p) for g in run.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in module.reference.parameters()}
    assert list(module.teachers) == ["teacher"]
    # resume: the snapshot and reference come from the checkpoint; nothing is generated again
    path = tmp_path / "last.ckpt"
    run.save_checkpoint(path)
    snapshot, reference = copy.deepcopy(module.snapshot), params(module.reference)
    student2, teacher2 = Spy(gpt(7)), RuleTeacher()
    module2 = soda(student2, teacher2)
    run2 = fit(module2, tmp_path, max_epochs=3, ckpt_path=str(path))
    assert run2.global_step == 6
    assert teacher2.generate_calls == 0 and student2.generate_weights == []
    assert all(torch.equal(snapshot[k], module2.snapshot[k]) for k in snapshot)
    assert same(params(module2.reference), reference)


def test_rejected_is_the_base_students_greedy_answer_and_chosen_the_teachers() -> None:
    dm = data()
    dm.setup()
    batch = collate_reasoning([dm.train_set[i] for i in range(8)], dm.pad_token_id)
    student = gpt(3)
    module = attach(soda(copy.deepcopy(student), student_temperature=0.0, filter_equal=False, snapshot_seed=0), dm)
    snap = module.build_snapshot([{k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}])
    expected = rollout(
        student,
        batch["prompt_ids"],
        batch["prompt_mask"],
        8,
        temperature=0,
        eos_token_id=257,
        pad_token_id=dm.pad_token_id,
    )
    for i in range(8):
        want = expected.response_ids[i][expected.response_mask[i]]
        assert torch.equal(snap["rejected_ids"][i][snap["rejected_mask"][i]], want)
        prompt = batch["prompt_ids"][i]
        chosen = snap["chosen_ids"][i][snap["chosen_mask"][i]]
        assert torch.equal(chosen, torch.cat([prompt[-6:].flip(0)[:7], torch.tensor([257])]))


def test_snapshot_is_deterministic_per_seed_and_leaves_the_rng_alone() -> None:
    dm = data()
    dm.setup()
    loader = [collate_reasoning([dm.train_set[i] for i in range(j, j + 4)], dm.pad_token_id) for j in (0, 4)]

    modules = {seed: attach(soda(gpt(1), snapshot_seed=seed), dm) for seed in (5, 5, 6)}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = modules[5].build_snapshot(loader)
    assert torch.equal(torch.get_rng_state(), state)  # forked RNG: the training stream is untouched
    b = attach(soda(gpt(1), snapshot_seed=5), dm).build_snapshot(loader)
    c = modules[6].build_snapshot(loader)
    assert torch.equal(a["rejected_ids"], b["rejected_ids"])
    assert not torch.equal(a["rejected_ids"], c["rejected_ids"])


def test_filter_drops_equal_and_already_correct_pairs() -> None:
    dm = data()
    dm.setup()
    loader = [collate_reasoning([dm.train_set[i] for i in range(4)], dm.pad_token_id)]
    base = gpt(4)

    def build(verifier, teacher, **kwargs) -> tuple[SODA, dict]:
        module = soda(copy.deepcopy(base), teacher, student_temperature=0.0, **kwargs)
        attach(module, dm).verifier = verifier
        return module, module.select_pairs(module.build_snapshot(loader))

    never, always = (lambda text, answer: False), (lambda text, answer: True)
    _, snap = build(never, RuleTeacher())
    assert snap["keep"].all()
    module, snap = build(always, RuleTeacher())  # rejected already correct -> dropped
    assert not snap["keep"].any() and module.snapshot_stats["base_pass"] == 1.0
    _, snap = build(always, RuleTeacher(), filter_equal=False)
    assert snap["keep"].all()
    _, snap = build(never, copy.deepcopy(base))  # the teacher answers exactly like the student -> equal
    assert not snap["keep"].any()


# ---------------------------------------------------------------------------------------------- reference
def test_sft_warmup_then_reference_and_rejected_from_the_warmed_up_student(tmp_path: Path) -> None:
    student = Spy(gpt(1))
    base = params(student)
    after_warmup = {}

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                after_warmup.update(params(pl_module.student), fingerprint=student.fingerprint())

    module = soda(student, sft_warmup_epochs=1, rejected_policy="after_warmup", snapshot_batch_size=8)
    run = fit(module, tmp_path, max_epochs=2, limit_train_batches=1, callbacks=[Record()])
    assert "train/sft_epoch" in run.callback_metrics and "train/dpo_epoch" in run.callback_metrics
    fingerprint = after_warmup.pop("fingerprint")
    assert same(params(module.reference), after_warmup) and not same(after_warmup, base)
    assert student.generate_weights == [fingerprint]  # one snapshot call, by π_sft at the warm-up's end
    assert "rejected_ids" in module.snapshot and int(module.snapshot["present"].sum()) == 8


def test_reference_choice_at_fit_start() -> None:
    """With a warm-up, π_ref waits for its end ("after_warmup") or is π_0 at once ("base")."""
    for reference, warmup, ready in (("after_warmup", 1, False), ("base", 1, True), ("after_warmup", 0, True)):
        module = soda(gpt(1), sft_warmup_epochs=warmup, reference=reference)
        module.snapshot = {}  # as if restored: on_train_start builds nothing
        with torch.no_grad():
            for p in module.student.parameters():
                p.add_(1.0)
        module.on_train_start()
        assert module._reference_ready is ready
        assert same(params(module.reference), params(module.student)) is ready


def test_sft_warmup_loss_is_the_chosen_token_nll() -> None:
    module, batch = prepared(gpt(1))
    pairs = module.pairs_of(batch)
    terms = module.sft_step(batch, pairs)
    with torch.no_grad():
        total = sum(logp(module.student, batch, pairs["chosen_ids"], pairs["chosen_mask"], i)[0] for i in range(8))
    assert terms["sft"].item() == pytest.approx(-total.item() / int(pairs["chosen_mask"].sum()), rel=1e-5)


# ---------------------------------------------------------------------------------------------- loss
def prepared(student: nn.Module, **kwargs) -> tuple[SODA, dict]:
    dm = data()
    dm.setup()
    batch = collate_reasoning([dm.train_set[i] for i in range(8)], dm.pad_token_id)
    module = soda(student, **kwargs)
    attach(module, dm)
    module.snapshot = module.select_pairs(module.build_snapshot([batch]))
    module.set_reference()
    return module, batch


def logp(model: nn.Module, batch: dict, ids: torch.Tensor, mask: torch.Tensor, i: int) -> tuple[torch.Tensor, int]:
    """Σ log p of row i's response after its unpadded prompt, from a single-sequence forward."""
    seq = torch.cat([batch["prompt_ids"][i][batch["prompt_mask"][i]], ids[i][mask[i]]])
    logits = model(seq.unsqueeze(0))[0].log_softmax(-1)
    start = int(batch["prompt_mask"][i].sum())
    return logits[start - 1 : -1].gather(-1, seq[start:].unsqueeze(-1)).sum(), int(mask[i].sum())


def test_toy_check_dpo_loss_decreases_and_margin_grows() -> None:
    """The spec's CPU check: rule-based teacher, tiny GPT; DPO loss falls and the margin grows."""
    module, batch = prepared(gpt(1), beta=0.5)
    opt = torch.optim.Adam(module.student.parameters(), lr=3e-3)
    losses, margins = [], []
    for _ in range(12):
        terms, stats = module.dpo_step(batch, module.pairs_of(batch))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
        margins.append(stats["margin"].item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the start
    assert margins[0] == pytest.approx(0.0, abs=1e-5)
    assert losses[-1] < losses[0] - 0.05
    assert margins[-1] > 0.1 and margins[-1] > margins[len(margins) // 2] > margins[0]


def test_gradients_reach_the_student_only_and_match_the_pair_log_probs() -> None:
    module, batch = prepared(gpt(1), beta=0.2, nll_weight=0.3)
    for p in module.student.parameters():  # move the policy away from the reference
        p.data.add_(0.05 * torch.randn_like(p))
    terms, _ = module.dpo_step(batch, module.pairs_of(batch))
    terms["loss"].backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for p in module.reference.parameters())
    # recompute the loss from an independent per-pair forward of each sequence
    pairs = module.pairs_of(batch)

    expected = []
    with torch.no_grad():
        for i in range(8):
            pc, nc = logp(module.student, batch, pairs["chosen_ids"], pairs["chosen_mask"], i)
            pr, _ = logp(module.student, batch, pairs["rejected_ids"], pairs["rejected_mask"], i)
            rc, _ = logp(module.reference, batch, pairs["chosen_ids"], pairs["chosen_mask"], i)
            rr, _ = logp(module.reference, batch, pairs["rejected_ids"], pairs["rejected_mask"], i)
            z = 0.2 * ((pc - rc) - (pr - rr))
            expected.append(math.log1p(math.exp(-z)) + 0.3 * (-pc / nc))
    assert terms["loss"].item() == pytest.approx(sum(expected) / 8, rel=1e-4)


def test_all_pairs_filtered_gives_a_zero_loss_with_zero_gradients() -> None:
    student = gpt(4)
    module, batch = prepared(student, teacher=copy.deepcopy(student), student_temperature=0.0)
    assert not module.snapshot["keep"].any()  # the teacher answers exactly like the base student
    loss = module.training_step(batch, 0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in module.student.parameters())


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": 0.0}, "beta"),
        ({"nll_weight": -1.0}, "nll_weight"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"teacher_temperature": -1.0}, "teacher_temperature"),
        ({"student_temperature": float("inf")}, "student_temperature"),
        ({"student_top_k": 0}, "student_top_k"),
        ({"sft_warmup_epochs": -1}, "sft_warmup_epochs"),
        ({"reference": "teacher"}, "reference"),
        ({"snapshot_batch_size": 0}, "snapshot_batch_size"),
        ({"fidelity": True}, "fidelity"),
        ({"teacher": nn.Linear(2, 2)}, "teacher"),
    ],
)
def test_bad_arguments(kwargs, field) -> None:
    with pytest.raises(KDConfigError, match=rf"model\.init_args\.{field}"):
        soda(**kwargs)


# ---------------------------------------------------------------------------------------------- CLI
def test_config_fits_through_the_cli() -> None:
    from tests.helpers.cli import TINY_REASONING, fit_config

    tiny = {"d_model": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 192}
    cli = fit_config(
        "reasoning_soda.yaml",
        *TINY_REASONING,
        "--data.init_args.num_train=8",
        "--data.init_args.num_val=4",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--model.init_args.sft_warmup_epochs=1",
        "--model.init_args.rejected_policy=after_warmup",
        "--model.init_args.max_new_tokens=8",
        *[f"--model.init_args.student.init_args.{k}={v}" for k, v in tiny.items()],
        *[f"--model.init_args.teachers.teacher.init_args.{k}={v}" for k, v in tiny.items()],
        *[f"--model.init_args.teachers.base.init_args.{k}={v}" for k, v in tiny.items()],
    )
    model, results = cli.model, cli.results
    assert isinstance(model, SODA) and model.rejected_policy == "after_warmup"
    assert int(model.snapshot["present"].sum()) == 8 and "rejected_ids" in model.snapshot
    assert model._reference_ready and not model.reference.training
    assert 0.0 <= results["val/pass@1"] <= 1.0, sorted(results)
    metrics = cli.trainer.callback_metrics
    assert "train/sft_epoch" in metrics and "train/dpo_epoch" in metrics
