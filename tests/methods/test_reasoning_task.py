"""Reasoning task sibling: rollouts, response logits across prompt lengths, verifier metrics, student_init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from kd_lightning.data.reasoning import ReasoningDataModule
from kd_lightning.errors import KDConfigError, TeacherCheckpointError
from kd_lightning.methods import ReasoningSupervised, VanillaKD
from kd_lightning.methods.tasks.reasoning import response_logits, rollout, sequence_logprob
from kd_lightning.models.lm import TinyGPT
from kd_lightning.models.small import SmallCNN
from tests.helpers.cli import CONFIGS_DIR, TINY_REASONING, fit_config

EOS, PAD = 9, 0


class Scripted(nn.Module):
    """``generate`` appends fixed tokens to every prompt; no forward needed."""

    def __init__(self, tokens: list[list[int]]) -> None:
        super().__init__()
        self.tokens = torch.tensor(tokens)
        self.weight = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        assert not self.training
        return torch.cat([input_ids, self.tokens[:, :max_new_tokens]], dim=1)


def test_rollout_masks_after_the_first_eos_and_restores_the_mode() -> None:
    model = Scripted([[5, EOS, 7, 7], [5, 6, 7, 8], [EOS, EOS, 3, 3]]).train()
    prompts = torch.ones(3, 2, dtype=torch.long)
    out = rollout(model, prompts, torch.ones_like(prompts, dtype=torch.bool), 4, eos_token_id=EOS, pad_token_id=PAD)
    assert model.training
    assert out.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert out.response_ids.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]]
    assert out.lengths.tolist() == [2, 4, 1]
    with pytest.raises(KDConfigError, match="max_new_tokens"):
        rollout(model, prompts, torch.ones_like(prompts, dtype=torch.bool), 0)


def _left_pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return ids, mask


def test_response_logits_align_prompts_of_different_lengths() -> None:
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=32).eval()
    short, long = [[3, 4], [5]], [[3, 4, 6, 7, 8], [5, 6, 7]]  # the privileged prompts are longer
    response = torch.tensor([[1, 2, EOS], [2, EOS, PAD]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    for prompts in (short, long):
        ids, prompt_mask = _left_pad(prompts)
        with torch.no_grad():
            got = response_logits(model, ids, prompt_mask, response, mask)
        for row, prompt in enumerate(prompts):
            n = int(mask[row].sum())
            alone = torch.tensor([prompt + response[row, :n].tolist()])
            with torch.no_grad():
                expected = model(alone)[0, len(prompt) - 1 : len(prompt) - 1 + n]
            torch.testing.assert_close(got[row, :n], expected, atol=1e-5, rtol=1e-5)


def test_sequence_logprob_by_hand() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]]))
    ids, mask = torch.tensor([[0, 1]]), torch.tensor([[True, True]])
    assert math.isclose(float(sequence_logprob(logits, ids, mask)), math.log(0.5) + math.log(0.6), rel_tol=1e-6)
    assert math.isclose(
        float(sequence_logprob(logits, ids, ~torch.tensor([[False, True]]))), math.log(0.5), rel_tol=1e-6
    )


class Oracle(nn.Module):
    """Answers every problem of a data module right (``correct``) or wrong, in a known number of tokens."""

    def __init__(self, dm: ReasoningDataModule, correct: bool) -> None:
        super().__init__()
        self.dm, self.correct = dm, correct
        self.answers = {tuple(item["prompt"]): item["answer"] for item in dm.val_set.items}
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return torch.zeros(*input_ids.shape, self.dm.vocab_size) + self.weight

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs) -> Tensor:
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            answer = self.answers[tuple(ids[mask].tolist())]
            text = f" Answer: {answer if self.correct else answer + '1'}"
            rows.append([*self.dm.tokenizer.encode(text)[:max_new_tokens], self.dm.eos_token_id])
        width = max(map(len, rows))
        new = torch.tensor([r + [self.dm.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("correct", [True, False])
def test_evaluation_metrics_from_the_verifier(correct: bool) -> None:
    dm = ReasoningDataModule(num_train=8, num_val=6, num_test=2, eval_batch_size=6)
    dm.setup()
    module = ReasoningSupervised(model=Oracle(dm, correct), eval_max_new_tokens=40, eval_samples=2)
    module.check_data(dm)
    module.log = lambda *args, **kwargs: None
    batch = next(iter(dm.val_dataloader()))
    module.evaluate(batch, 0, "val")
    expected_tokens = [len(dm.tokenizer.encode(f" Answer: {a}{'' if correct else '1'}")) + 1 for a in batch["answers"]]
    assert float(module.metrics["val_pass@1"].compute()) == float(correct)
    assert float(module.metrics["val_avg@2"].compute()) == float(correct)
    assert math.isclose(float(module.metrics["val_response_tokens"].compute()), sum(expected_tokens) / 6, rel_tol=1e-6)
    per_solved = float(module.metrics["val_tokens_per_solved"].compute())
    assert math.isclose(per_solved, sum(expected_tokens) / 6, rel_tol=1e-6) if correct else math.isnan(per_solved)
    for family in ("arith", "modular", "symbolic"):
        assert float(module.metrics[f"val_pass@1/{family}"].compute()) == float(correct)


def test_student_init_copies_the_teacher_or_refuses_another_architecture() -> None:
    teacher = TinyGPT(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    student = TinyGPT(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    module = ReasoningSupervised.__mro__[3](student=student, teacher=teacher, student_init="teacher")
    module.initialise_student()
    for (name, s), t in zip(student.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(s, t), name
    assert not any(p.requires_grad for p in teacher.parameters()) and all(p.requires_grad for p in student.parameters())
    other = ReasoningSupervised.__mro__[3](
        student=TinyGPT(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8),
        teacher=teacher,
        student_init="teacher",
    )
    with pytest.raises(KDConfigError, match=r"student_init.*architecture"):
        other.initialise_student()
    named = ReasoningSupervised.__mro__[3](
        student=TinyGPT(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8),
        teachers={"teacher": teacher, "base": TinyGPT(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8)},
        student_init="teacher:base",
    )
    named.initialise_student()
    for s, t in zip(named.student.state_dict().values(), named.teachers["base"].state_dict().values()):
        assert torch.equal(s, t)
    with pytest.raises(KDConfigError, match=r"student_init.*'other'"):
        ReasoningSupervised.__mro__[3](student=student, teachers={"teacher": teacher}, student_init="teacher:other")
    with pytest.raises(TeacherCheckpointError, match="student_init"):
        VanillaKD(student=SmallCNN(num_classes=10), teacher=SmallCNN(num_classes=10), student_init="missing.ckpt")


def test_student_init_from_a_checkpoint(tmp_path) -> None:
    source = SmallCNN(num_classes=10, widths=[4, 8])
    torch.save(source.state_dict(), tmp_path / "s.pt")
    student = SmallCNN(num_classes=10, widths=[4, 8])
    module = VanillaKD(
        student=student, teacher=SmallCNN(num_classes=10, widths=[4, 8]), student_init=str(tmp_path / "s.pt")
    )
    module.initialise_student()
    for s, t in zip(student.state_dict().values(), source.state_dict().values()):
        assert torch.equal(s, t)


def test_sft_baseline_fits_through_the_cli() -> None:
    cli = fit_config("reasoning_student.yaml", *TINY_REASONING)
    results = cli.results
    for key in ("val/pass@1", "val/response_tokens", "val/pass@1/symbolic", "val/ppl"):
        assert key in results, sorted(results)
    assert 0.0 <= results["val/pass@1"] <= 1.0 and results["val/response_tokens"] > 0


def test_student_init_teacher_fills_a_lora_students_base_weights() -> None:
    pytest.importorskip("peft")
    torch.manual_seed(0)
    teacher = TinyGPT(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    lora = {"r": 2, "alpha": 4, "target_modules": ["qkv"]}
    student = TinyGPT(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=8, lora=lora)
    module = ReasoningSupervised.__mro__[3](student=student, teacher=teacher, student_init="teacher")
    module.initialise_student()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # LoRA's B starts at 0: the adapted student computes exactly the teacher
        torch.testing.assert_close(student(ids), teacher(ids))
    assert all(("lora_" in n) == p.requires_grad for n, p in student.named_parameters())


def test_default_evaluation_length_covers_the_longest_reference_answer() -> None:
    dm = ReasoningDataModule(num_train=30, num_val=6, num_test=6, families=["symbolic"], train_difficulties=[3])
    module = ReasoningSupervised(model=TinyGPT(vocab_size=264, d_model=16, n_layers=1, n_heads=2, max_seq_len=256))
    module.check_data(dm)
    longest = max(len(dm.encode(p, 0)["response"]) for split in dm.problems.values() for p in split)
    assert longest == dm.longest_response_tokens() and module.eval_max_new_tokens == int(longest * 1.25) + 4


def test_kd_test_evaluates_start_weights_given_by_student_init(tmp_path) -> None:
    from kd_lightning.cli import run

    net = TinyGPT(vocab_size=264, d_model=48, n_layers=2, n_heads=4, max_seq_len=192)
    torch.save(net.state_dict(), tmp_path / "start.pt")
    tiny = [a for a in TINY_REASONING if "num_train" not in a]
    cli = run(
        [
            "test",
            "--config",
            str(CONFIGS_DIR / "reasoning_student.yaml"),
            f"--model.init_args.student_init={tmp_path / 'start.pt'}",
            "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false",
            *tiny,
        ]
    )
    for got, want in zip(cli.model.student.state_dict().values(), net.state_dict().values()):
        assert torch.equal(got, want)
    assert "test/pass@1" in cli.trainer.callback_metrics


def test_student_init_applies_once_so_a_test_after_fit_keeps_the_trained_student() -> None:
    teacher = TinyGPT(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8)
    student = TinyGPT(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8)
    module = ReasoningSupervised.__mro__[3](student=student, teacher=teacher, student_init="teacher")
    module.check_data = lambda datamodule: None
    module.setup("fit")
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)  # "training"
    trained = student.lm_head.weight.clone()
    module.setup("test")  # e.g. test_after_fit without a best checkpoint
    assert torch.equal(student.lm_head.weight, trained)
