"""EnvRolloutDataModule: DAgger collection with beta mixing, mirrors, the buffer, evaluation episodes, errors."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("minigrid")

from kd_lightning.data.embodied import EnvRolloutDataModule, TransitionBuffer, make_env
from kd_lightning.errors import KDConfigError


class ScriptedAgent:
    """Acts without a network: the student turns left forever, the teacher (when present) always moves forward."""

    device = torch.device("cpu")

    def __init__(self, with_teacher: bool = False) -> None:
        self.with_teacher = with_teacher
        self.calls: list[str] = []

    def act(self, observation: dict[str, torch.Tensor], role: str, greedy: bool = True) -> torch.Tensor | None:
        self.calls.append(role)
        n = observation["labels"].shape[0]
        if role == "teacher":
            return torch.full((n,), 2) if self.with_teacher else None
        return torch.zeros(n, dtype=torch.long)

    def evaluation_roles(self, stage: str) -> tuple[str, ...]:
        return ("student", "expert")


def attach(dm: EnvRolloutDataModule, agent: Any, max_epochs: int = 4) -> None:
    dm.trainer = SimpleNamespace(lightning_module=agent, global_rank=0, world_size=1, max_epochs=max_epochs)


def small(**kwargs: Any) -> EnvRolloutDataModule:
    defaults = dict(num_envs=2, steps_per_iteration=256, batch_size=16, passes=1, eval_episodes=4)
    return EnvRolloutDataModule(**{**defaults, **kwargs})


def test_transition_buffer_is_a_fifo() -> None:
    buffer = TransitionBuffer(capacity=4)
    buffer.add({"x": np.arange(3)})
    buffer.add({"x": np.arange(3, 6)})
    assert len(buffer) == 4
    assert sorted(buffer.arrays["x"].tolist()) == [2, 3, 4, 5]  # 0 and 1 were overwritten first
    assert buffer.sample(np.array([0, 1]))["x"].tolist() == [4, 5]


def test_beta_schedules() -> None:
    dm = small(beta_schedule="exponential", beta0=1.0, beta_decay=0.5)
    assert [dm.beta(i) for i in range(3)] == [1.0, 0.5, 0.25]
    assert [small(beta_schedule="first").beta(i) for i in range(2)] == [1.0, 0.0]
    assert small(beta_schedule="constant", beta0=0.3).beta(5) == 0.3
    linear = small(beta_schedule="linear")
    attach(linear, ScriptedAgent(), max_epochs=5)
    assert [linear.beta(i) for i in (0, 2, 4)] == [1.0, 0.5, 0.0]


def test_beta_one_is_expert_driven_and_solves_episodes() -> None:
    dm = small(beta_schedule="constant", beta0=1.0)
    attach(dm, ScriptedAgent(with_teacher=False))  # no teacher network: the expert drives
    dm.collect_iteration()
    stats = dm.collection_stats
    assert stats["teacher_share"] == 1.0 and stats["episode_success"] == 1.0
    batch = dm.buffer.sample(np.arange(len(dm.buffer)))
    assert (batch["source"] == 1).all()
    assert torch.equal(batch["action"], batch["labels"][:, -1])  # the expert's actions were taken
    assert (batch["return"] > 0).all()  # every transition leads to a rewarded success


def test_beta_zero_is_student_driven_and_labels_are_the_experts() -> None:
    dm = small(beta_schedule="constant", beta0=0.0)
    attach(dm, ScriptedAgent())
    dm.collect_iteration()
    batch = dm.buffer.sample(np.arange(len(dm.buffer)))
    assert (batch["source"] == 0).all() and (batch["action"] == 0).all()  # the student (always "left") drove
    assert dm.collection_stats["episode_success"] == 0.0
    assert (batch["labels"][:, -1] != 0).any()  # ... while the expert labels what it should have done


def test_teacher_network_and_expert_advice_drive_the_teacher_steps() -> None:
    dm = small(beta_schedule="constant", beta0=1.0, expert_advice=0.0)
    attach(dm, ScriptedAgent(with_teacher=True))
    dm.collect_iteration()
    assert (dm.buffer.sample(np.arange(len(dm.buffer)))["action"] == 2).all()  # the teacher network's action
    advised = small(beta_schedule="constant", beta0=1.0, expert_advice=1.0)
    attach(advised, ScriptedAgent(with_teacher=True))
    advised.collect_iteration()
    batch = advised.buffer.sample(np.arange(len(advised.buffer)))
    assert torch.equal(batch["action"], batch["labels"][:, -1])  # the extra expert overrides the teacher


def test_mirrors_add_expert_continuations_from_student_states() -> None:
    dm = small(beta_schedule="constant", beta0=0.0, mirror_every=8, mirror_horizon=4)
    attach(dm, ScriptedAgent())
    dm.collect_iteration()
    assert dm.collection_stats["mirror_steps"] > 0
    batch = dm.buffer.sample(np.arange(len(dm.buffer)))
    mirror = batch["source"] == 2
    assert mirror.any() and torch.equal(batch["action"][mirror], batch["labels"][mirror, -1])
    with dm.full_training_set():  # a teacher's training: plain DAgger
        assert dm.mirror_every == 0 and dm.expert_advice == 0.0
    assert dm.mirror_every == 8


def test_epoch_yields_a_fixed_number_of_minibatches() -> None:
    dm = small(passes=2)
    attach(dm, ScriptedAgent())
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.batches_per_iteration() == 2 * 256 // 16
    assert set(batches[0]) >= {"image", "mission", "privileged", "labels", "action", "return", "source"}
    assert batches[0]["image"].shape == (16, 7, 7, 3)


def test_evaluation_batches_hold_per_episode_statistics_per_role() -> None:
    dm = small()
    attach(dm, ScriptedAgent())
    batches = list(dm.val_dataloader())
    by_role = {b["role"]: b for b in batches}
    assert set(by_role) == {"student", "expert"}
    assert by_role["expert"]["success"].tolist() == [1.0] * 4
    assert by_role["expert"]["efficiency"].tolist() == [1.0] * 4
    assert by_role["student"]["success"].sum() == 0  # turning left forever solves nothing
    assert (by_role["student"]["length"] == by_role["student"]["length"].max()).all()  # ... until the horizon


def test_privileged_keys_can_be_withheld() -> None:
    dm = small(expose_privileged=False)
    assert "privileged" not in dm.input_shapes and "privileged_vector" not in dm.input_shapes


def test_unknown_environment_names_the_extra() -> None:
    with pytest.raises(
        KDConfigError,
        match=r"data\.init_args\.env: 'MiniHack-Room-5x5-v0' is not an installed.*kd-lightning\[embodied\]",
    ):
        make_env("MiniHack-Room-5x5-v0")


def test_missing_simulator_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "crafter", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(
        KDConfigError,
        match=r"Crafter needs the crafter package, which is not installed\. pip install 'kd-lightning\[embodied\]'",
    ):
        make_env("Crafter")


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(KDConfigError, match="beta0"):
        small(beta0=1.5)
    with pytest.raises(KDConfigError, match="num_envs"):
        small(num_envs=0)
    with pytest.raises(KDConfigError, match="beta_schedule"):
        small(beta_schedule="cosine")
