"""BabyAI with the bot's hierarchical labels: the observation contract, the expert, mirrors, the privileged view."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("minigrid")

from minigrid.core.constants import DIR_TO_VEC

from kd_lightning.data.envs.babyai import (
    BABYAI_HIERARCHY,
    COLORS,
    OBJECTS,
    BabyAIEnv,
    _relative_direction,
)
from kd_lightning.data.envs.common import factor_sizes
from kd_lightning.errors import KDConfigError


def run_expert(env: BabyAIEnv, seed: int, limit: int = 200) -> tuple[bool, int]:
    obs, _ = env.reset(seed=seed)
    for step in range(1, limit + 1):
        obs, _, terminated, truncated, info = env.step(int(obs["labels"][-1]))
        if terminated or truncated:
            return bool(info["success"]), step
    return False, limit


def test_observations_follow_the_contract_and_labels_are_in_range() -> None:
    env = BabyAIEnv("BabyAI-GoToLocal-v0")
    obs, _ = env.reset(seed=3)
    sizes = factor_sizes(BABYAI_HIERARCHY)
    rng = np.random.default_rng(0)
    for _ in range(30):
        assert env.observation_space.contains(obs)
        labels = obs["labels"]
        assert all(-1 <= label < size for label, size in zip(labels, sizes, strict=True))
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(0, 3)))
        if terminated or truncated:
            obs, _ = env.reset(seed=4)
    assert env.task_family == "navigation"
    assert BabyAIEnv("BabyAI-PickupLoc-v0").task_family == "creation"


def test_expert_solves_gotolocal_seeds_and_is_deterministic() -> None:
    env = BabyAIEnv("BabyAI-GoToLocal-v0")
    results = [run_expert(env, seed) for seed in range(20)]
    assert all(success for success, _ in results)
    assert run_expert(env, 7) == results[7]  # same seed, same episode


def test_manager_label_names_the_mission_object() -> None:
    env = BabyAIEnv("BabyAI-GoToLocal-v0")
    obs, _ = env.reset(seed=0)  # "go to the green ball"
    verb, color, obj = obs["labels"][:3]
    mission = env.env.mission  # "go to the <color> <object>" or "go to a <object>"
    assert verb == 0 and mission.startswith("go to")
    assert OBJECTS[obj] in mission and obj != 0
    assert COLORS[color] in mission and color != 0


def test_privileged_window_is_centred_on_the_agent_and_turned_to_its_heading() -> None:
    env = BabyAIEnv("BabyAI-GoToLocal-v0")
    rng = np.random.default_rng(1)
    obs, _ = env.reset(seed=0)
    centre = env.privileged_view // 2
    for _ in range(40):
        grid, e = obs["privileged"], env.env
        assert tuple(grid[centre, centre]) == (10, 0, e.agent_dir)
        front = e.grid.get(*(e.agent_pos + DIR_TO_VEC[e.agent_dir]))
        assert tuple(grid[centre, centre - 1]) == ((1, 0, 0) if front is None else front.encode())
        view = obs["image"]  # minigrid's egocentric view: agent at (3, 6) facing -y
        if view[3, 5, 0] != 0:
            assert tuple(view[3, 5]) == tuple(grid[centre, centre - 1])
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(0, 3)))
        if terminated or truncated:
            obs, _ = env.reset(seed=1)


def test_relative_direction_in_the_agent_frame() -> None:
    # agent at (2, 2) facing +x (dir 0): (3, 2) is in front, (2, 3) on the right, (1, 2) behind, (2, 1) on the left
    assert _relative_direction((2, 2), 0, (2, 2)) == 0
    assert _relative_direction((2, 2), 0, (3, 2)) == 1
    assert _relative_direction((2, 2), 0, (2, 3)) == 3
    assert _relative_direction((2, 2), 0, (1, 2)) == 5
    assert _relative_direction((2, 2), 0, (2, 1)) == 7
    assert _relative_direction((2, 2), 3, (3, 1)) == 2  # facing up: up-right is front-right


def test_mirror_rollout_leaves_the_live_env_alone_and_the_expert_continues() -> None:
    env = BabyAIEnv("BabyAI-GoToLocal-v0")
    obs, _ = env.reset(seed=11)
    obs, *_ = env.step(0)  # a student turn
    before = (tuple(env.env.agent_pos), env.env.agent_dir, env.env.step_count)
    mirror = env.mirror_rollout(16)
    assert (tuple(env.env.agent_pos), env.env.agent_dir, env.env.step_count) == before
    assert mirror is not None and (mirror["labels"][:, -1] >= 0).all()
    np.testing.assert_array_equal(mirror["image"][0], obs["image"])
    # the live env continued by the expert's actions reproduces the mirror (BabyAI twins stay identical)
    for k in range(len(mirror["labels"])):
        np.testing.assert_array_equal(obs["labels"], mirror["labels"][k])
        obs, _, terminated, truncated, _ = env.step(int(obs["labels"][-1]))
        if terminated or truncated:
            break


def test_unknown_and_unsolvable_levels_are_one_line_errors() -> None:
    with pytest.raises(KDConfigError, match=r"data\.init_args\.env: 'BabyAI-Nope-v0' is not a registered BabyAI level"):
        BabyAIEnv("BabyAI-Nope-v0")
    with pytest.raises(KDConfigError, match="bot cannot solve"):
        BabyAIEnv("BabyAI-KeyInBox-v0")
    with pytest.raises(KDConfigError, match="privileged_view"):
        BabyAIEnv("BabyAI-GoToLocal-v0", privileged_view=4)
