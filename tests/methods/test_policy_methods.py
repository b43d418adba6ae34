"""Embodied policy methods through the CLI: HierarchicalMirroredKD (STEVE-2 reconstruction), PolicySupervised (BC,
DAgger, privileged teachers), PolicyGradient (reward only); frozen teachers, no privileged leakage, data checks."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("minigrid")

from kd_lightning.data.embodied import EnvRolloutDataModule
from kd_lightning.data.envs.babyai import BABYAI_HIERARCHY
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import HierarchicalMirroredKD, PolicyGradient, PolicySupervised
from kd_lightning.models.policy import HierarchicalPolicy
from tests.helpers.cli import CONFIGS_DIR, SHARED_TEACHERS, TINY_EMBODIED, fit

BABYAI_CONFIGS = sorted(p.name for p in CONFIGS_DIR.glob("babyai_*.yaml"))


def student(**kwargs: object) -> HierarchicalPolicy:
    return HierarchicalPolicy(BABYAI_HIERARCHY, vocab_size=40, width=8, hidden=16, **kwargs)  # type: ignore[arg-type]


def privileged(**kwargs: object) -> HierarchicalPolicy:
    args = dict(observation="privileged", input_shape=(15, 15, 3), input_categories=(11, 6, 4), vector_size=21)
    return HierarchicalPolicy(BABYAI_HIERARCHY, vocab_size=40, width=8, hidden=16, **{**args, **kwargs})  # type: ignore[arg-type]


def small_data(**kwargs: object) -> EnvRolloutDataModule:
    args = dict(num_envs=2, steps_per_iteration=128, batch_size=32, passes=1, eval_episodes=2)
    return EnvRolloutDataModule(**{**args, **kwargs})  # type: ignore[arg-type]


def trainer(epochs: int = 1) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip


@pytest.mark.parametrize("config", BABYAI_CONFIGS)
def test_babyai_configs_fit_and_keep_the_teacher_frozen(config: str, in_tmp: Path) -> None:
    cli = fit(
        ["--config", str(CONFIGS_DIR / config), *TINY_EMBODIED, f"--teacher_training.cache_dir={SHARED_TEACHERS}"]
    )
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.state.finished and torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/success"]) <= 1.0
    assert float(metrics["rollout/env_steps"]) == 2 * 128
    model = cli.model
    if len(model.teachers):
        assert not model.teacher.training and all(not p.requires_grad for p in model.teacher.parameters())


def test_test_stage_reports_student_teacher_and_expert(in_tmp: Path) -> None:
    args = ["--config", str(CONFIGS_DIR / "babyai_steve2.yaml"), *TINY_EMBODIED, "--trainer.max_epochs=1"]
    cli = fit([*args, f"--teacher_training.cache_dir={SHARED_TEACHERS}", "--test_after_fit=true"])
    metrics = cli.trainer.callback_metrics
    for key in ("test/success", "test/teacher_success", "test/expert_success", "test/efficiency", "test/length"):
        assert key in metrics, sorted(metrics)
    assert float(metrics["test/expert_success"]) == 1.0 and float(metrics["test/expert_efficiency"]) == 1.0


def test_teacher_weights_do_not_move_and_student_ignores_privileged_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = privileged()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = HierarchicalMirroredKD(student(), teacher, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    data = small_data(mirror_every=8, mirror_horizon=4, expert_advice=0.5)
    trainer(2).fit(module, data)
    assert all(torch.equal(before[k], v) for k, v in module.teacher.state_dict().items())
    assert not module.teacher.training
    # leakage: the student's outputs do not depend on privileged state, labels or anything but image + mission
    batch = next(iter(data.buffer.sample(torch.arange(8).numpy()) for _ in range(1)))
    module.student.eval()
    reference = module.student(batch)
    scrambled = {**batch, "privileged": torch.randint_like(batch["privileged"], 0, 3),
                 "privileged_vector": torch.rand_like(batch["privileged_vector"]),
                 "labels": torch.randint_like(batch["labels"], 0, 3)}  # fmt: skip
    assert all(torch.equal(reference[k], v) for k, v in module.student(scrambled).items())
    assert set(module.predict_step(batch, 0)) == set(reference)  # predict: the student's outputs on its own view
    exported = module.export_student(tmp_path / "student.pt")
    fresh = student()
    fresh.load_state_dict(torch.load(exported, weights_only=True)["state_dict"])
    assert torch.equal(fresh(batch)["actor/action"], reference["actor/action"])


def test_dagger_student_learns_the_expert_and_beats_a_random_policy() -> None:
    torch.manual_seed(0)
    model = HierarchicalPolicy({"actor": {"action": 7}}, vocab_size=40, width=16, hidden=64)
    module = PolicySupervised(model, optimizer=functools.partial(torch.optim.AdamW, lr=3e-3))
    data = small_data(num_envs=4, steps_per_iteration=1024, batch_size=64, passes=4, eval_episodes=16)
    random_policy = PolicySupervised(HierarchicalPolicy({"actor": {"action": 7}}, vocab_size=40, width=16, hidden=64))
    before = trainer(1)
    before.validate(random_policy, data)
    random_success = float(before.callback_metrics["val/success"])
    fitted = trainer(2)
    fitted.fit(module, data)
    metrics = fitted.callback_metrics
    assert float(metrics["train/expert_agreement"]) > 0.5  # chance is 1/7
    assert float(metrics["val/success"]) > random_success + 0.1, (float(metrics["val/success"]), random_success)


def test_data_checks_name_the_field_and_fix() -> None:
    data = small_data()
    wrong_shape = HierarchicalPolicy(BABYAI_HIERARCHY, input_shape=(9, 9, 3), vocab_size=40, width=8, hidden=16)
    with pytest.raises(
        KDConfigError,
        match=r"model\.init_args\.student\.init_args\.input_shape: is \[9, 9, 3\] .* set input_shape: \[7, 7, 3\]",
    ):
        HierarchicalMirroredKD(wrong_shape).check_data(data)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.student: reads the privileged simulator state"):
        HierarchicalMirroredKD(privileged()).check_data(data)
    hidden = small_data(expose_privileged=False)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.teacher: reads the privileged .*expose_privileged"):
        HierarchicalMirroredKD(student(), privileged()).check_data(hidden)
    pixels = HierarchicalPolicy(BABYAI_HIERARCHY, input_categories=None, vocab_size=40, width=8, hidden=16)
    with pytest.raises(KDConfigError, match=r"input_categories: is None .* set input_categories: \[11, 6, 3\]"):
        HierarchicalMirroredKD(pixels).check_data(data)
    other = HierarchicalPolicy({"actor": {"action": 17}}, vocab_size=40, width=8, hidden=16)
    with pytest.raises(KDConfigError, match=r"hierarchy: has actor/action with 17 classes"):
        HierarchicalMirroredKD(other).check_data(data)
    with pytest.raises(KDConfigError, match=r"data\.init_args\.on_policy: REINFORCE needs"):
        PolicyGradient(student()).check_data(data)
    PolicyGradient(student()).check_data(small_data(on_policy=True, beta_schedule="constant", beta0=0.0))


@pytest.mark.parametrize(
    "config",
    # REINFORCE's path is the BabyAI reward-only config's; on Crafter it adds ~6 s, so slow
    ["crafter_steve2.yaml", pytest.param("crafter_reward_only.yaml", marks=pytest.mark.slow)],
)
def test_crafter_configs_fit_and_report_achievements(config: str, in_tmp: Path) -> None:
    pytest.importorskip("crafter")
    tiny_world = '--data.init_args.env_kwargs={"area": 32, "length": 24, "size": 64}'
    cli = fit(["--config", str(CONFIGS_DIR / config), *TINY_EMBODIED, "--trainer.max_epochs=1", tiny_world])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    for key in ("val/crafter_score", "val/success_navigation", "val/success_creation", "val/achievement/collect_wood"):
        assert key in metrics, sorted(metrics)
    assert 0.0 <= float(metrics["val/crafter_score"]) <= 100.0


@pytest.mark.ddp
@pytest.mark.slow  # ~19 s, two processes; DDP launch stays in the default run (dense, teacher cases)
def test_dagger_under_ddp_two_processes_on_cpu(in_tmp: Path) -> None:
    """Each rank collects its own environments (seeds offset by rank) and yields the same number of minibatches;
    evaluation episodes are split across ranks and the success metric is synced."""
    exe = Path(sys.executable).parent / "kd-fit"
    result = subprocess.run(
        [str(exe), "--config", str(CONFIGS_DIR / "babyai_dagger.yaml"), *TINY_EMBODIED,
         "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2"],
        capture_output=True, text=True, timeout=400, cwd=in_tmp,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1" in output or "MEMBER: 2/2" in output
    assert output.count("kd: fit finished") == 1 and "val success" in output
