"""Embodied data: rollouts of gymnasium vector environments, collected DAgger-style and streamed into training.

:class:`EnvRolloutDataModule` owns the parallel simulation: ``num_envs`` environments of the embodied zoo
(:mod:`kd_lightning.data.envs`: BabyAI levels with the BabyAI bot, Crafter with a scripted planner) in a
``gymnasium.vector`` Sync/AsyncVectorEnv, the scripted **expert** that labels every visited state at every level
of the task hierarchy (inside each environment), optional **mirror** rollouts, and an aggregated transition
buffer. One training epoch is one DAgger iteration (Ross et al. 2011):

1. collect ``steps_per_iteration`` environment steps; at each step and in each environment the teacher drives with
   probability ``β_i`` (the trained module's teacher network, or the expert when the module has none; with
   probability ``expert_advice`` the extra expert's action replaces the teacher's) and the student otherwise, so
   the data move from the teacher's state distribution to the student's; every state is labelled by the expert
   and, in the method, by the teacher;
2. every ``mirror_every`` steps each environment is deep-copied and the expert acts ``mirror_horizon`` steps in
   the copy from the student's current state: teacher continuations branching off the student's own states
   ("mirrored distillation over parallel simulation", our reading of STEVE-2, arXiv 2404.04619);
3. the epoch then yields ``passes x steps_per_iteration / batch_size`` random minibatches of the buffer (the same
   count on every DDP rank).

Environment stepping happens in the data loader's iterator (the training step never steps an environment); the
policy is read from the Trainer's LightningModule through ``act(observation, role, greedy)``. Validation and
test loaders run evaluation episodes on held-out seeds (``eval_seed``, ``test_seed``) and yield per-episode
statistics for each role the module asks for (``evaluation_roles``): student, teacher, expert.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from kd_lightning.data.envs.common import OBSERVATION_KEYS, factor_names, require_module
from kd_lightning.errors import ConfigFieldPrefix, KDConfigError

__all__ = ["EMBODIED_ENVS", "EnvRolloutDataModule", "TransitionBuffer", "make_env"]

#: Environment families of the zoo: id prefix -> (package, what it is).
EMBODIED_ENVS = {"BabyAI-": ("minigrid", "BabyAI levels (minigrid)"), "Crafter": ("crafter", "Crafter")}
ROLES = ("student", "teacher", "expert")
SOURCE_STUDENT, SOURCE_TEACHER, SOURCE_MIRROR = 0, 1, 2


def make_env(env: str, env_kwargs: Mapping[str, Any] | None = None) -> Any:
    """An environment of the zoo by id: ``BabyAI-<Level>-v0`` or ``Crafter`` (``env_kwargs`` go to its class)."""
    kwargs = dict(env_kwargs or {})
    if env.startswith("BabyAI-"):
        require_module("minigrid", "embodied", "data.init_args.env", f"{env} (a BabyAI level)")
        from kd_lightning.data.envs.babyai import BabyAIEnv

        return BabyAIEnv(env, **kwargs)
    if env == "Crafter":
        require_module("crafter", "embodied", "data.init_args.env", "Crafter")
        from kd_lightning.data.envs.crafter import CrafterEnv

        return CrafterEnv(**kwargs)
    raise KDConfigError(
        "data.init_args.env",
        f"{env!r} is not an installed embodied environment (known: BabyAI-<Level>-v0 from minigrid, Crafter)",
        "pip install 'kd-lightning[embodied]' and use a BabyAI level id or Crafter",
    )


class TransitionBuffer:
    """A FIFO of transitions (dicts of equally long arrays), preallocated on the first :meth:`add`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.arrays: dict[str, np.ndarray] = {}
        self.size = 0
        self.position = 0

    def __len__(self) -> int:
        return self.size

    def clear(self) -> None:
        self.size = self.position = 0

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        count = len(next(iter(batch.values())))
        if not self.arrays:
            self.arrays = {k: np.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in batch.items()}
        index = (self.position + np.arange(count)) % self.capacity
        for key, store in self.arrays.items():
            store[index] = batch[key][-self.capacity :] if count > self.capacity else batch[key]
        self.position = int((self.position + count) % self.capacity)
        self.size = min(self.capacity, self.size + count)

    def sample(self, indices: np.ndarray) -> dict[str, Tensor]:
        return {key: torch.from_numpy(store[indices]) for key, store in self.arrays.items()}


class _Rollouts(IterableDataset):
    """One epoch: a DAgger iteration of collection, then random minibatches of the buffer."""

    def __init__(self, datamodule: EnvRolloutDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        dm = self.datamodule
        dm.collect_iteration()
        count = dm.batches_per_iteration()
        rng = dm.sampling_rng
        for _ in range(count):
            yield dm.buffer.sample(rng.integers(0, len(dm.buffer), dm.batch_size))


class _Evaluation(IterableDataset):
    def __init__(self, datamodule: EnvRolloutDataModule, stage: str) -> None:
        self.datamodule, self.stage = datamodule, stage

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.datamodule.evaluation_batches(self.stage)


class EnvRolloutDataModule(L.LightningDataModule, metaclass=ConfigFieldPrefix):
    """Parallel-simulation rollouts with expert labels at every hierarchy level (see the module docstring).

    Args:
        env: ``BabyAI-<Level>-v0`` or ``Crafter``.
        env_kwargs: arguments of the environment class (``observation``, ``max_steps``; Crafter's ``target``,
            ``length``, ``size``).
        num_envs: parallel environments per process.
        vectorization: ``sync`` (one process) or ``async`` (one subprocess per environment).
        steps_per_iteration: environment steps collected per DAgger iteration (= epoch) and process.
        passes: times the epoch's minibatches cover ``steps_per_iteration`` transitions.
        batch_size: transitions per minibatch.
        buffer_size: capacity of the aggregated FIFO buffer (transitions).
        on_policy: clear the buffer before each iteration (reward-only training).
        beta_schedule: share of teacher-driven steps per iteration ``i``: ``exponential`` ``β_0·decay^i``,
            ``linear`` from ``β_0`` to 0 over the run, ``constant`` ``β_0`` (1: behaviour cloning), ``first``
            ``β_0`` at ``i = 0`` then 0.
        beta0: ``β_0``.
        beta_decay: ``decay`` of the exponential schedule.
        expert_advice: probability that the extra expert's action replaces the teacher's on a teacher-driven step.
        mirror_every: deep-copy every environment each this many steps and let the expert act in the copy
            (0: no mirrors).
        mirror_horizon: expert steps per mirror rollout.
        sample_actions: the student samples its actions during collection (else argmax).
        gamma: discount of the returns stored with each transition.
        expose_privileged: serve the privileged simulator state (``privileged``, ``privileged_vector``) to the
            networks; ``false`` is a deployment-like setting in which only the expert (inside the simulator) sees it.
        eval_episodes: evaluation episodes per validation/test (split across DDP ranks).
        seed: seed of the training environments, the beta mixing and minibatch sampling; ``None``: the run's
            ``seed_everything`` (so the seeds of a benchmark differ in their training episodes, not only in weights).
        eval_seed: first seed of the validation episodes (disjoint from training seeds).
        test_seed: first seed of the test episodes.
    """

    config_prefix = "data.init_args."
    task: str = "embodied"
    #: ``kd fit`` checks the networks against the environment before it trains a missing teacher.
    checks_early: bool = True

    def __init__(
        self,
        env: str = "BabyAI-GoToLocal-v0",
        env_kwargs: dict[str, Any] | None = None,
        num_envs: int = 4,
        vectorization: Literal["sync", "async"] = "sync",
        steps_per_iteration: int = 4096,
        passes: int = 4,
        batch_size: int = 256,
        buffer_size: int = 200_000,
        on_policy: bool = False,
        beta_schedule: Literal["exponential", "linear", "constant", "first"] = "exponential",
        beta0: float = 1.0,
        beta_decay: float = 0.5,
        expert_advice: float = 0.0,
        mirror_every: int = 0,
        mirror_horizon: int = 16,
        sample_actions: bool = True,
        gamma: float = 0.99,
        expose_privileged: bool = True,
        eval_episodes: int = 64,
        seed: int | None = None,
        eval_seed: int = 1_000_000_000,
        test_seed: int = 2_000_000_000,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_envs", num_envs, 1),
            ("steps_per_iteration", steps_per_iteration, 1),
            ("passes", passes, 1),
            ("batch_size", batch_size, 1),
            ("buffer_size", buffer_size, 1),
            ("eval_episodes", eval_episodes, 1),
            ("mirror_every", mirror_every, 0),
            ("mirror_horizon", mirror_horizon, 1),
        ):
            if value < low:
                raise KDConfigError(name, f"must be >= {low}, got {value}")
        for name, value in (
            ("beta0", beta0),
            ("beta_decay", beta_decay),
            ("expert_advice", expert_advice),
            ("gamma", gamma),
        ):
            if not 0.0 <= value <= 1.0:
                raise KDConfigError(name, f"must be in [0, 1], got {value}")
        if beta_schedule not in ("exponential", "linear", "constant", "first"):
            raise KDConfigError(
                "beta_schedule", f"must be exponential, linear, constant or first, got {beta_schedule!r}"
            )
        if vectorization not in ("sync", "async"):
            raise KDConfigError("vectorization", f"must be 'sync' or 'async', got {vectorization!r}")
        self.env_id, self.env_kwargs = env, dict(env_kwargs or {})
        probe = make_env(env, self.env_kwargs)  # fails early on a bad id or argument
        self.observation_space = probe.observation_space
        self.hierarchy: dict[str, dict[str, int]] = {k: dict(v) for k, v in probe.hierarchy.items()}
        self.task_family: str = probe.task_family
        self.achievement_names: tuple[str, ...] = tuple(probe.achievement_names)
        self.achievement_families: dict[str, tuple[str, ...]] = {
            k: tuple(v) for k, v in probe.achievement_families.items()
        }
        self.image_categories = getattr(probe, "image_categories", None)
        self.privileged_categories = getattr(probe, "privileged_categories", None)
        probe.close()
        self.num_envs, self.vectorization = num_envs, vectorization
        self.steps_per_iteration, self.passes, self.batch_size = steps_per_iteration, passes, batch_size
        self.on_policy = on_policy
        self.beta_schedule, self.beta0, self.beta_decay = beta_schedule, beta0, beta_decay
        self.expert_advice = expert_advice
        self.mirror_every, self.mirror_horizon = mirror_every, mirror_horizon
        self.sample_actions, self.gamma = sample_actions, gamma
        self.expose_privileged = expose_privileged
        self.observation_keys = tuple(
            k for k in OBSERVATION_KEYS if expose_privileged or k not in ("privileged", "privileged_vector")
        )
        self.eval_episodes, self.eval_seed, self.test_seed = eval_episodes, eval_seed, test_seed
        self._seed = seed
        self.buffer = TransitionBuffer(buffer_size)
        self.action_index = len(factor_names(self.hierarchy)) - sum(1 for _ in list(self.hierarchy.values())[-1])
        self.collection_stats: dict[str, float] = {}
        self._envs: Any = None
        self._eval_envs: Any = None
        self._fit_id: int | None = None
        self._expert_reference: dict[tuple[int, int], tuple[float, float]] = {}

    # --- helpers ----------------------------------------------------------------------------------------------
    @property
    def factor_names(self) -> list[str]:
        return factor_names(self.hierarchy)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each observation key (one sample)."""
        return {key: tuple(self.observation_space[key].shape) for key in self.observation_keys}

    @property
    def seed(self) -> int:
        """The training seed: ``seed``, else the run's ``seed_everything`` (``PL_GLOBAL_SEED``), else 0."""
        if self._seed is not None:
            return int(self._seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _agent(self) -> Any:
        trainer = getattr(self, "trainer", None)
        module = None if trainer is None else trainer.lightning_module
        if module is None or not hasattr(module, "act"):
            raise KDConfigError(
                "model",
                f"{type(module).__name__} cannot act in an environment",
                "use a policy method (kd_lightning.methods.tasks.policy)",
            )
        return module

    def _vector_env(self) -> Any:
        gymnasium = require_module("gymnasium", "embodied", "data.init_args.env", self.env_id)
        env_id, kwargs = self.env_id, self.env_kwargs
        fns = [lambda: make_env(env_id, kwargs) for _ in range(self.num_envs)]
        mode = gymnasium.vector.AutoresetMode.SAME_STEP
        if self.vectorization == "async":
            return gymnasium.vector.AsyncVectorEnv(fns, shared_memory=False, autoreset_mode=mode)
        return gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=mode)

    def beta(self, iteration: int) -> float:
        """The share of teacher-driven steps in DAgger iteration ``iteration`` (0-based)."""
        if self.beta_schedule == "constant":
            return self.beta0
        if self.beta_schedule == "first":
            return self.beta0 if iteration == 0 else 0.0
        if self.beta_schedule == "linear":
            total = max(int(getattr(getattr(self, "trainer", None), "max_epochs", 1) or 1) - 1, 1)
            return max(0.0, self.beta0 * (1.0 - iteration / total))
        return self.beta0 * self.beta_decay**iteration

    def batches_per_iteration(self) -> int:
        return max(1, math.ceil(self.passes * self.steps_per_iteration / self.batch_size))

    # --- Lightning hooks ----------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Rollouts(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Evaluation(self, "val"), batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_Evaluation(self, "test"), batch_size=None, num_workers=0)

    def teardown(self, stage: str) -> None:
        for envs in (self._envs, self._eval_envs):
            if envs is not None:
                envs.close()
        self._envs = self._eval_envs = None

    @contextlib.contextmanager
    def full_training_set(self) -> Iterator[None]:
        """Within the block (``kd fit`` training a missing teacher) collection is plain DAgger from the expert: no
        expert advice, no mirrors, the whole buffer kept; the teacher's cache key leaves those settings out."""
        saved = (self.expert_advice, self.mirror_every, self.on_policy)
        self.expert_advice, self.mirror_every, self.on_policy = 0.0, 0, False
        try:
            yield
        finally:
            self.expert_advice, self.mirror_every, self.on_policy = saved

    # --- collection --------------------------------------------------------------------------------------------
    def _start_fit(self) -> None:
        """A new fit (the teacher's, then the student's, share this module): fresh envs, buffer and seeds."""
        rank, _ = self._rank()
        if self._envs is not None:
            self._envs.close()
        self._envs = self._vector_env()
        seeds = [self.seed * 100_003 + rank * self.num_envs + i for i in range(self.num_envs)]
        self._obs, _ = self._envs.reset(seed=seeds)
        self._pending: list[list[dict[str, Any]]] = [[] for _ in range(self.num_envs)]
        self.buffer.clear()
        self.sampling_rng = np.random.default_rng([self.seed, rank, 1])
        self.mixing_rng = np.random.default_rng([self.seed, rank, 2])
        self.totals = {"env_steps": 0, "mirror_steps": 0, "episodes": 0}
        self._iteration = 0

    def _to_torch(self, obs: Mapping[str, np.ndarray], device: Any) -> dict[str, Tensor]:
        return {key: torch.as_tensor(obs[key], device=device) for key in self.observation_keys}

    def _actions(self, agent: Any, obs: Mapping[str, np.ndarray], role: str, greedy: bool) -> np.ndarray:
        expert = obs["labels"][:, self.action_index]
        if role == "expert":
            return np.where(expert >= 0, expert, 0)
        with torch.no_grad():
            actions = agent.act(self._to_torch(obs, agent.device), role, greedy)
        if actions is None:  # no teacher network: the expert drives
            return np.where(expert >= 0, expert, 0)
        return actions.detach().cpu().numpy().astype(np.int64)

    def collect_iteration(self) -> None:
        """Collect one DAgger iteration into the buffer and update :attr:`collection_stats`."""
        trainer = getattr(self, "trainer", None)
        fit_id = id(trainer)
        if fit_id != self._fit_id or self._envs is None:
            self._fit_id = fit_id
            self._start_fit()
        agent = self._agent()
        beta = self.beta(self._iteration)
        if self.on_policy:
            self.buffer.clear()
        started = time.perf_counter()
        stats = {"teacher_steps": 0, "successes": 0.0, "episodes": 0, "mirror_steps": 0}
        steps = math.ceil(self.steps_per_iteration / self.num_envs)
        for step in range(steps):
            obs = self._obs
            actions = self._actions(agent, obs, "student", greedy=not self.sample_actions)
            drive = self.mixing_rng.random(self.num_envs) < beta
            if drive.any():
                teacher = self._actions(agent, obs, "teacher", greedy=True)
                expert = obs["labels"][:, self.action_index]
                advice = (self.mixing_rng.random(self.num_envs) < self.expert_advice) & (expert >= 0)
                teacher = np.where(advice, expert, teacher)
                actions = np.where(drive, teacher, actions)
                stats["teacher_steps"] += int(drive.sum())
            next_obs, rewards, terminated, truncated, info = self._envs.step(actions)
            for i in range(self.num_envs):
                self._pending[i].append(
                    {
                        **{k: obs[k][i] for k in self.observation_keys},
                        "action": actions[i],
                        "reward": rewards[i],
                        "source": SOURCE_TEACHER if drive[i] else SOURCE_STUDENT,
                    }
                )
                if terminated[i] or truncated[i]:
                    final = info.get("final_info", {})
                    stats["successes"] += float(bool(final.get("success", np.zeros(self.num_envs))[i]))
                    stats["episodes"] += 1
                    self._flush(i)
            if self.mirror_every and (step + 1) % self.mirror_every == 0:
                stats["mirror_steps"] += self._mirror()
            self._obs = next_obs
        seconds = time.perf_counter() - started
        env_steps = steps * self.num_envs
        self.totals["env_steps"] += env_steps
        self.totals["mirror_steps"] += stats["mirror_steps"]
        self.totals["episodes"] += stats["episodes"]
        self.collection_stats = {
            "beta": beta,
            "teacher_share": stats["teacher_steps"] / env_steps,
            "env_steps": float(self.totals["env_steps"]),
            "mirror_steps": float(self.totals["mirror_steps"]),
            "steps_per_s": (env_steps + stats["mirror_steps"]) / max(seconds, 1e-9),
            "collect_seconds": seconds,
            "episode_success": stats["successes"] / max(stats["episodes"], 1),
            "buffer": float(len(self.buffer)),
        }
        self._iteration += 1
        if len(self.buffer) == 0:
            raise KDConfigError(
                "data.init_args.steps_per_iteration",
                f"{self.steps_per_iteration} steps finished no episode, so nothing entered the buffer",
                "collect more steps per iteration",
            )

    def _flush(self, i: int) -> None:
        """Move env ``i``'s finished episode into the buffer, with discounted returns-to-go."""
        episode, self._pending[i] = self._pending[i], []
        returns = np.zeros(len(episode), dtype=np.float32)
        running = 0.0
        for t in range(len(episode) - 1, -1, -1):
            running = float(episode[t]["reward"]) + self.gamma * running
            returns[t] = running
        batch = {key: np.stack([row[key] for row in episode]) for key in episode[0] if key != "reward"}
        batch["action"] = batch["action"].astype(np.int64)
        batch["source"] = batch["source"].astype(np.int64)
        batch["return"] = returns
        self.buffer.add(batch)

    def _mirror(self) -> int:
        """Expert continuations from deep copies of every environment's current state (source ``mirror``)."""
        added = 0
        for rollout in self._envs.call("mirror_rollout", self.mirror_horizon):
            if rollout is None:
                continue
            count = len(rollout["labels"])
            batch = {key: rollout[key] for key in self.observation_keys}
            batch["action"] = rollout["labels"][:, self.action_index].astype(np.int64)
            batch["source"] = np.full(count, SOURCE_MIRROR, dtype=np.int64)
            batch["return"] = np.zeros(count, dtype=np.float32)
            self.buffer.add(batch)
            added += count
        return added

    # --- evaluation --------------------------------------------------------------------------------------------
    def evaluation_batches(self, stage: str) -> Iterator[dict[str, Any]]:
        """One batch of per-episode statistics per role the module evaluates (expert first: it is the reference
        of the efficiency metric)."""
        agent = self._agent()
        roles = [role for role in ROLES if role in agent.evaluation_roles(stage)]
        first = self.test_seed if stage == "test" else self.eval_seed
        rank, world = self._rank()
        seeds = [first + k for k in range(rank, self.eval_episodes, world)]
        if not seeds:
            return
        reference = [self._expert_reference.get((stage == "test", s)) for s in seeds]
        if any(r is None for r in reference):
            results = self.run_episodes(agent, "expert", seeds)
            for s, success, length in zip(seeds, results["success"], results["length"]):
                self._expert_reference[(stage == "test", s)] = (float(success), float(length))
        reference_arr = np.array([self._expert_reference[(stage == "test", s)] for s in seeds])
        for role in ["expert", *[r for r in roles if r != "expert"]]:
            if role not in roles:
                continue
            results = self.run_episodes(agent, role, seeds)
            expert_ok, expert_length = reference_arr[:, 0] > 0, reference_arr[:, 1]
            efficiency = np.where(
                expert_ok,
                results["success"] * expert_length / np.maximum(expert_length, results["length"]),
                results["success"],
            )
            yield {
                "role": role,
                "success": torch.as_tensor(results["success"], dtype=torch.float32),
                "length": torch.as_tensor(results["length"], dtype=torch.float32),
                "return": torch.as_tensor(results["return"], dtype=torch.float32),
                "efficiency": torch.as_tensor(efficiency, dtype=torch.float32),
                "achievements": torch.as_tensor(results["achievements"], dtype=torch.float32),
            }

    def run_episodes(self, agent: Any, role: str, seeds: Sequence[int], greedy: bool = True) -> dict[str, np.ndarray]:
        """One episode per seed with ``role`` acting (``greedy``); success, length, return and achievements each."""
        if self._eval_envs is None:
            self._eval_envs = self._vector_env()
        envs, n = self._eval_envs, self.num_envs
        out: dict[str, list[Any]] = {"success": [], "length": [], "return": [], "achievements": []}
        for start in range(0, len(seeds), n):
            chunk = list(seeds[start : start + n])
            padded = chunk + [chunk[-1]] * (n - len(chunk))
            obs, _ = envs.reset(seed=padded)
            done = np.zeros(n, dtype=bool)
            length, total = np.zeros(n), np.zeros(n)
            success = np.zeros(n)
            achievements = np.zeros((n, len(self.achievement_names)), dtype=bool)
            while not done.all():
                actions = self._actions(agent, obs, role, greedy)
                obs, rewards, terminated, truncated, info = envs.step(actions)
                live = ~done
                length[live] += 1
                total[live] += rewards[live]
                for i in np.flatnonzero(live & (terminated | truncated)):
                    final = info["final_info"]
                    success[i] = float(bool(final["success"][i]))
                    if self.achievement_names:
                        achievements[i] = np.asarray(final["achievements"][i], dtype=bool)
                    done[i] = True
            k = len(chunk)
            out["success"].append(success[:k])
            out["length"].append(length[:k])
            out["return"].append(total[:k])
            out["achievements"].append(achievements[:k])
        return {key: np.concatenate(value) for key, value in out.items()}

    def record_episode(
        self, act: Callable[[dict[str, Tensor]], Tensor] | None, seed: int, max_steps: int = 200
    ) -> list[np.ndarray]:
        """Frames (``env.render()``) of one episode on ``seed``; ``act`` maps a batch-of-one observation to an
        action (``None``: the expert acts)."""
        env = make_env(self.env_id, self.env_kwargs)
        obs, _ = env.reset(seed=seed)
        frames = [env.render()]
        for _ in range(max_steps):
            if act is None:
                action = max(int(obs["labels"][self.action_index]), 0)
            else:
                batch = {k: torch.as_tensor(obs[k])[None] for k in self.observation_keys}
                action = int(act(batch)[0])
            obs, _, terminated, truncated, _ = env.step(action)
            frames.append(env.render())
            if terminated or truncated:
                break
        env.close()
        return frames
