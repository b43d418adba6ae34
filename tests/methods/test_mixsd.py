"""MixSD: targets from the frozen base's expert/naive conditionals, no fact in the student's input, caching,
target_model current, soft KL, frozen teacher, bad arguments and the end-to-end CLI runs (base -> SFT / MixSD)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.data.facts import FactInjectionDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.methods.mixsd import MixSD
from kd_lightning.models.lm import TinyGPT
from tests.helpers.cli import CONFIGS_DIR, TINY, fit

FACT_MARK = list(b" is a city in ")
TINY_DATA = [
    "--data.init_args.num_old=24",
    "--data.init_args.num_inject=4",
    "--data.init_args.num_context_train=8",
    "--data.init_args.num_context_eval=4",
    "--data.init_args.num_retained_val=4",
    "--data.init_args.num_retained=4",
    "--data.init_args.batch_size=4",
    "--data.init_args.eval_batch_size=8",
]


def tiny_gpt(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab_size=264, d_model=16, n_layers=1, n_heads=2, max_seq_len=128)


def tiny_data(**kwargs) -> FactInjectionDataModule:
    args = {
        "num_old": 24,
        "num_inject": 4,
        "num_context_train": 8,
        "num_context_eval": 4,
        "num_retained_val": 4,
        "num_retained": 4,
        "batch_size": 4,
        **kwargs,
    }
    dm = FactInjectionDataModule(**args)
    dm.setup("fit")
    return dm


def make_method(**kwargs) -> MixSD:
    student, teacher = tiny_gpt(1), tiny_gpt(2)
    method = MixSD(student=student, teacher=teacher, max_new_tokens=6, **kwargs)
    method.initialise_student()  # student_init: teacher (what setup("fit") does)
    method.eos_token_id, method.pad_token_id = 258, 256
    return method


def contains(row: list[int], pattern: list[int]) -> bool:
    return any(row[i : i + len(pattern)] == pattern for i in range(len(row) - len(pattern) + 1))


def record_inputs(module: torch.nn.Module, calls: list[tuple[torch.Tensor, bool]]) -> torch.utils.hooks.RemovableHandle:
    def hook(_: torch.nn.Module, args: tuple) -> None:
        calls.append((args[0].clone(), torch.is_grad_enabled()))

    return module.register_forward_pre_hook(hook)


# ------------------------------------------------------------------------------------------ targets and loss
@pytest.mark.parametrize("loss", ["sft", "soft_kl"])
def test_the_fact_reaches_only_the_expert_conditional_never_the_trained_student_input(loss: str) -> None:
    method = make_method(loss=loss)
    batch = next(iter(tiny_data().train_dataloader()))
    assert all(contains(row.tolist(), FACT_MARK) for row in batch["privileged_ids"])
    student_calls: list = []
    teacher_calls: list = []
    handles = [record_inputs(method.student, student_calls), record_inputs(method.teacher, teacher_calls)]
    sums, count = method.token_loss_sums(batch)
    for handle in handles:
        handle.remove()
    trained = [ids for ids, grad in student_calls if grad]
    assert len(trained) == 1 and not any(contains(row.tolist(), FACT_MARK) for row in trained[0])
    with_fact = [contains(row.tolist(), FACT_MARK) for ids, _ in teacher_calls for row in ids]
    assert any(with_fact) and not all(with_fact)  # expert and naive conditionals both ran on the base
    assert not any(grad for _, grad in teacher_calls)
    assert sums["loss"].requires_grad and int(count) > 0
    assert set(sums) == {"loss", "expert_share", "nll" if loss == "sft" else "soft_kl"}


def test_sft_loss_is_the_nll_of_the_mixed_targets_after_the_plain_prompt() -> None:
    method = make_method()
    batch = next(iter(tiny_data().train_dataloader()))
    ids, mask, _ = method.build_targets(batch)
    sums, count = method.token_loss_sums(batch)
    # by hand: the student reads each left-padded question + target row, position by position
    total = torch.zeros(())
    for b in range(ids.shape[0]):
        prompt = batch["prompt_ids"][b][batch["prompt_mask"][b]]
        target = ids[b][mask[b]]
        logits = method.student(torch.cat([prompt, target]).unsqueeze(0))[0]
        log_p = logits[len(prompt) - 1 : -1].log_softmax(-1)
        total = total - log_p.gather(-1, target.unsqueeze(-1)).sum()
    assert int(count) == int(mask.sum()) and torch.allclose(sums["loss"], total, atol=1e-4)


def test_targets_are_cached_per_epoch_or_rebuilt_every_step() -> None:
    batch = next(iter(tiny_data().train_dataloader()))
    for regenerate, expected_second in (("every_epoch", 0), ("every_step", None)):
        method = make_method(regenerate=regenerate)
        calls: list = []
        handle = record_inputs(method.teacher, calls)
        first = method.build_targets(batch)
        n_first = len(calls)
        second = method.build_targets(batch)
        handle.remove()
        assert torch.equal(first[0], second[0])  # greedy targets of a fixed base do not change
        assert (len(calls) - n_first) == (expected_second if expected_second is not None else n_first)
    method.on_train_epoch_start()
    assert method.target_cache == {}


def test_target_model_current_builds_targets_with_the_student_without_gradients() -> None:
    method = make_method(target_model="current")
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.5 * torch.randn_like(p))  # the student has moved away from the base
    batch = next(iter(tiny_data().train_dataloader()))
    student_calls: list = []
    teacher_calls: list = []
    handles = [record_inputs(method.student, student_calls), record_inputs(method.teacher, teacher_calls)]
    method.student.train()
    method.token_loss_sums(batch)
    for handle in handles:
        handle.remove()
    assert not teacher_calls and method.student.training
    assert sum(not grad for _, grad in student_calls) >= 2 and sum(grad for _, grad in student_calls) == 1


def test_soft_kl_is_zero_when_rho_is_zero_and_the_student_is_the_base() -> None:
    method = make_method(loss="soft_kl", rho=0.0)  # target = the naive conditional = the student itself
    batch = next(iter(tiny_data().train_dataloader()))
    sums, _ = method.token_loss_sums(batch)
    assert sums["soft_kl"].abs().item() < 1e-5
    moved = make_method(loss="soft_kl", rho=0.5)
    assert moved.token_loss_sums(batch)[0]["soft_kl"].item() > 1e-4  # the expert pulls the target away


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rho": -0.1}, "model.init_args.rho"),
        ({"kappa": -1.0}, "model.init_args.kappa"),
        ({"target_mode": "blend"}, "model.init_args.target_mode"),
        ({"target_model": "ema"}, "model.init_args.target_model"),
        ({"loss": "mse"}, "model.init_args.loss"),
        ({"regenerate": "never"}, "model.init_args.regenerate"),
        ({"max_new_tokens": 0}, "model.init_args.max_new_tokens"),
        ({"target_temperature": 0.0}, "model.init_args.target_temperature"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=field.replace(".", r"\.")):
        MixSD(student=tiny_gpt(), teacher=tiny_gpt(), **kwargs)


def test_batches_without_a_privileged_prompt_are_refused() -> None:
    method = make_method()
    batch = {k: v for k, v in next(iter(tiny_data().train_dataloader())).items() if k != "privileged_ids"}
    with pytest.raises(KDConfigError, match="privileged_ids"):
        method.token_loss_sums(batch)


# ------------------------------------------------------------------------------------------ end to end (CLI)
def tiny_model(*fields: str) -> list[str]:
    sizes = (("d_model", 16), ("n_layers", 1), ("n_heads", 2))
    return [f"--model.init_args.{f}.init_args.{k}={v}" for f in fields for k, v in sizes]


def test_cli_mixsd_trains_its_base_on_the_pretrain_stage_then_sft_starts_from_it(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages: list[str] = []
    original = FactInjectionDataModule.full_training_set

    def spy(self: FactInjectionDataModule):  # kd fit trains the missing base through it: the pretrain stage
        stages.append(self.stage)
        return original(self)

    monkeypatch.setattr(FactInjectionDataModule, "full_training_set", spy)
    mixsd = fit(
        [
            "--config", str(CONFIGS_DIR / "facts_mixsd.yaml"), *TINY, *TINY_DATA, *tiny_model("student", "teacher"),
            "--model.init_args.teacher_ckpt=null", "--teacher_training.max_epochs=1",
            f"--teacher_training.cache_dir={in_tmp / 'teachers'}", "--model.init_args.target_mode=switch",
        ]
    )  # fmt: skip
    assert stages == ["inject"]
    model = mixsd.model
    base_path = Path(model.teacher_ckpt)
    base = torch.load(base_path, weights_only=True)
    base = base.get("state_dict", base)
    base = {k.removeprefix("student."): v for k, v in base.items()}
    teacher = {
        k.removeprefix("teachers.teacher."): v for k, v in model.state_dict().items() if k.startswith("teachers.")
    }
    assert teacher and set(teacher) == set(base)
    assert all(torch.equal(teacher[k], base[k]) for k in teacher)  # the trained base: loaded, never updated
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    student = {k.removeprefix("student."): v for k, v in model.state_dict().items() if k.startswith("student.")}
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # started from the base, then trained
    sft = fit(
        [
            "--config", str(CONFIGS_DIR / "facts_sft.yaml"), *TINY, *TINY_DATA, *tiny_model("model"),
            f"--model.init_args.student_init={base_path}",
        ]
    )  # fmt: skip
    for cli in (mixsd, sft):
        assert {"val/pass@1/injected", "val/pass@1/retained"} <= set(cli.results)


def test_cli_base_config_trains_on_the_pretrain_stage(in_tmp: Path) -> None:
    one_batch = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
    cli = fit(["--config", str(CONFIGS_DIR / "facts_base.yaml"), *TINY, *TINY_DATA, *tiny_model("model"), *one_batch])
    assert {"val/pass@1/closed_book", "val/pass@1/in_context"} <= set(cli.results)
    assert (in_tmp / "runs/facts_base/checkpoints/last.ckpt").is_file()  # what facts_sft / facts_mixsd read
