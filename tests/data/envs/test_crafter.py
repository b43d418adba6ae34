"""Crafter env + scripted expert: the embodied contract, episode ends, determinism, the expert, mirrors, vectors.

World generation costs ~1 s per reset on a 64x64 world, so one module fixture plays a seeded expert episode and a
random one on the same seed, and the other tests use small worlds.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("crafter")
gymnasium = pytest.importorskip("gymnasium")

from kd_lightning.data.envs.common import OBSERVATION_KEYS, factor_sizes  # noqa: E402
from kd_lightning.data.envs.crafter import (  # noqa: E402
    ACTION_LABEL,
    CRAFTER_HIERARCHY,
    CRAFTER_TASKS,
    SEMANTIC,
    CrafterEnv,
)
from kd_lightning.errors import KDConfigError  # noqa: E402

LENGTH = 150  # steps of the fixture's episodes
WOOD_WITHIN = 40  # the expert's first wood, in steps
MIRROR_AT, HORIZON = 20, 10
SMALL = {"area": 32}  # 4x faster world generation


def _state(env: CrafterEnv) -> tuple:
    inner = env._env
    player = inner._player
    return (
        tuple(player.pos),
        tuple(player.facing),
        dict(player.inventory),
        dict(player.achievements),
        inner._step,
        env._steps,
        inner._world._mat_map.tobytes(),
        str(inner._world.random.get_state()[1][:8]),
        tuple(tuple(obj.pos) for obj in inner._world.objects),
    )


@pytest.fixture(scope="module")
def played() -> dict:
    """A seeded expert episode (with a mirror taken on the way), then a random one from the same seed."""
    env = CrafterEnv(length=LENGTH)
    first, _ = env.reset(seed=0)
    record = {"env": env, "first": first, "obs": [first], "ends": [], "infos": [], "wood_at": None}
    obs, done = first, False
    while not done:
        if env._steps == MIRROR_AT:
            before = _state(env)
            record["mirror"] = env.mirror_rollout(HORIZON)
            record["mirror_live"] = (before, _state(env), obs)
        obs, _, terminated, truncated, info = env.step(env.expert_action())
        done = terminated or truncated
        record["obs"].append(obs)
        record["ends"].append((terminated, truncated))
        record["infos"].append(info)
        if record["wood_at"] is None and env._env._player.inventory["wood"] > 0:
            record["wood_at"] = env._steps
    record["expert"] = info["achievements"].sum()
    again, _ = env.reset(seed=0)
    record["again"] = again
    rng, done = np.random.default_rng(0), False
    while not done:
        _, _, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        done = terminated or truncated
    record["random"] = info["achievements"].sum()
    return record


def test_spaces_hierarchy_and_observations(played: dict) -> None:
    env = played["env"]
    assert env.action_space.n == 17 and len(env.achievement_names) == 22 and len(CRAFTER_TASKS) == 23
    assert CRAFTER_HIERARCHY == {
        "manager": {"task": 23},
        "conductor": {"target": 20, "direction": 9, "distance": 4},
        "actor": {"action": 17},
    }
    assert set(env.achievement_families["creation"]) | set(env.achievement_families["navigation"]) == set(
        env.achievement_names
    )
    sizes = np.array(factor_sizes(env.hierarchy))
    centre = env.crop // 2
    for obs in played["obs"]:
        assert tuple(obs) == OBSERVATION_KEYS
        assert env.observation_space.contains(obs)
        assert obs["privileged"][centre, centre, 0] == SEMANTIC["player"]
        labels = obs["labels"]
        assert ((labels == -1) | ((labels >= 0) & (labels < sizes))).all()
    assert (played["obs"][0]["labels"] >= 0).all()  # the expert labels every factor of the first state


def test_privileged_crop_is_the_world_around_the_player(played: dict) -> None:
    env = played["env"]
    half = env.crop // 2
    x, y = (int(v) for v in env._env._player.pos)
    semantic = env._semantic
    crop = env._obs["privileged"][..., 0]
    for dx, dy in ((1, 0), (0, 1), (-2, 3), (half, -half)):
        inside = 0 <= x + dx < env.area and 0 <= y + dy < env.area
        assert crop[half + dy, half + dx] == (semantic[x + dx, y + dy] if inside else 0)


def test_episode_ends_only_on_death_or_length(played: dict) -> None:
    ends, infos = played["ends"], played["infos"]
    assert not any(t or u for t, u in ends[:-1])
    terminated, truncated = ends[-1]
    died = infos[-1]["discount"] == 0
    assert terminated == died and truncated == (len(ends) == LENGTH)
    assert "success" not in infos[0] and isinstance(infos[-1]["success"], bool)
    assert infos[-1]["achievements"].dtype == np.bool_ and infos[-1]["achievements"].shape == (22,)


def test_same_seed_gives_the_same_first_observation(played: dict) -> None:
    for key in OBSERVATION_KEYS:
        np.testing.assert_array_equal(played["first"][key], played["again"][key])


def test_expert_collects_wood_and_beats_random(played: dict) -> None:
    assert played["wood_at"] is not None and played["wood_at"] <= WOOD_WITHIN
    assert played["expert"] >= played["random"] + 3, (played["expert"], played["random"])


def test_mirror_rollout_leaves_the_live_env_alone(played: dict) -> None:
    before, after, live_obs = played["mirror_live"]
    assert before == after
    mirror = played["mirror"]
    assert mirror is not None and tuple(mirror) == OBSERVATION_KEYS
    assert 1 <= len(mirror["labels"]) <= HORIZON
    assert (mirror["labels"][:, ACTION_LABEL] >= 0).all()
    for key in OBSERVATION_KEYS:  # the mirror starts from the live state
        np.testing.assert_array_equal(mirror[key][0], live_obs[key])
    assert played["env"].mirror_rollout(0) is None


def test_death_terminates() -> None:
    env = CrafterEnv(length=50, **SMALL)
    env.reset(seed=1)
    env._env._player.health = 0
    _, _, terminated, truncated, info = env.step(0)
    assert terminated and not truncated and info["discount"] == 0.0 and info["success"] is False
    assert env._obs["labels"].tolist() == [-1] * len(env._obs["labels"])
    assert env.mirror_rollout(5) is None


def test_target_mode_terminates_with_success() -> None:
    env = CrafterEnv(length=100, target="collect_wood", **SMALL)
    assert env.task_family == "navigation" and CrafterEnv.achievement_families["creation"][0].startswith("make_")
    obs, _ = env.reset(seed=2)
    assert obs["mission"].tolist()[:2] == [env.vocabulary.encode(w)[0] for w in ("collect", "wood")]
    for _ in range(100):
        obs, reward, terminated, truncated, info = env.step(env.expert_action())
        if terminated or truncated:
            break
    assert terminated and info["success"] and reward == 1.0
    assert info["achievements"][env.achievement_names.index("collect_wood")]


def test_unknown_target_names_the_field() -> None:
    with pytest.raises(KDConfigError, match="target") as caught:
        CrafterEnv(target="make_diamond_sword")
    assert caught.value.field == "target" and "make_wood_pickaxe" in str(caught.value)


def test_sync_vector_env_same_step_autoreset() -> None:
    envs = gymnasium.vector.SyncVectorEnv(
        [lambda: CrafterEnv(length=2, **SMALL)] * 2, autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP
    )
    obs, _ = envs.reset(seed=0)
    assert set(obs) == set(OBSERVATION_KEYS) and obs["image"].shape == (2, 64, 64, 3)
    for _ in range(2):
        obs, _, terminated, truncated, info = envs.step(np.array([0, 5]))
    assert truncated.all() and not terminated.any()
    assert info["final_obs"][0]["labels"].shape == obs["labels"].shape[1:]
    assert info["final_info"]["achievements"].shape == (2, 22)
    assert obs["labels"].shape == (2, 5) and (obs["labels"][:, ACTION_LABEL] >= 0).all()  # fresh episodes
    envs.close()
