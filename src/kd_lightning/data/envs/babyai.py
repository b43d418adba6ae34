"""BabyAI (minigrid) as an embodied environment of the zoo, with the BabyAI bot as the privileged expert.

Reconstruction for STEVE-2 (arXiv 2404.04619, whose Minecraft system cannot run here), our design after
``methods/14_steve2_embodied.md`` §4: the expert E is minigrid's ``BabyAIBot``, tracked on the live trajectory
with ``replan(action_taken)`` (its docstring names DAgger as a use), and its plan is read as a three-level
hierarchy:

- **manager** — the current atomic instruction, in the bot's order (``Before``/``And``: a then b; ``After``: b
  then a; it advances when its verifier succeeds): ``verb`` (go to / open / pick up / put next) x ``color``
  (none + 6) x ``object`` (none, door, key, ball, box) of the (moved) object;
- **conductor** — the bot's current subgoal: ``subgoal`` (go next to, open, pick up, drop, close, explore) and
  the ``direction`` of its target in the agent's frame (here, front, front-right, right, back-right, back,
  back-left, left, front-left; -1 when the target is not known);
- **actor** — the bot's action (left, right, forward, pickup, drop, toggle, done).

The student sees the 7x7 egocentric view (symbolic categories, or RGB pixels with ``observation: rgb``) and the
mission; the privileged view is the full grid (as ``FullyObsWrapper`` encodes it) plus direction and the carried
object. When the bot fails (it raises on a disappeared box or an impossible plan from a state the student
drove it into), the labels are -1 for the rest of the episode.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Literal

import numpy as np

from kd_lightning.data.envs.common import MissionVocabulary, require_module, stack_observations
from kd_lightning.errors import KDConfigError

__all__ = ["BABYAI_HIERARCHY", "BABYAI_WORDS", "BabyAIEnv", "babyai_levels"]

#: The words of the BabyAI grammar (instructions are built from these).
BABYAI_WORDS = [
    "go",
    "to",
    "the",
    "a",
    "pick",
    "up",
    "put",
    "next",
    "open",
    "then",
    "after",
    "you",
    "and",
    ",",
    "red",
    "green",
    "blue",
    "purple",
    "yellow",
    "grey",
    "ball",
    "box",
    "key",
    "door",
    "on",
    "your",
    "left",
    "right",
    "in",
    "front",
    "of",
    "behind",
    "object",
]
VERBS = ("goto", "open", "pickup", "putnext")
COLORS = ("none", "red", "green", "blue", "purple", "yellow", "grey")
OBJECTS = ("none", "door", "key", "ball", "box")
SUBGOALS = ("go_next_to", "open", "pickup", "drop", "close", "explore")
DIRECTIONS = ("here", "front", "front_right", "right", "back_right", "back", "back_left", "left", "front_left")
NUM_ACTIONS = 7
BABYAI_HIERARCHY: dict[str, dict[str, int]] = {
    "manager": {"verb": len(VERBS), "color": len(COLORS), "object": len(OBJECTS)},
    "conductor": {"subgoal": len(SUBGOALS), "direction": len(DIRECTIONS)},
    "actor": {"action": NUM_ACTIONS},
}
#: Levels the bot cannot solve (its docstring).
UNSOLVABLE = (
    "BabyAI-PutNextS5N2Carrying-v0",
    "BabyAI-PutNextS6N3Carrying-v0",
    "BabyAI-PutNextS7N4Carrying-v0",
    "BabyAI-KeyInBox-v0",
)
#: Levels whose missions are single go-to instructions (navigation); the rest manipulate objects (creation).
NAVIGATION_PREFIXES = ("BabyAI-GoTo",)
OBJECT_CATEGORIES = 11  # minigrid OBJECT_TO_IDX
COLOR_CATEGORIES = 6
STATE_CATEGORIES = 3
PRIVILEGED_VECTOR = 4 + OBJECT_CATEGORIES + COLOR_CATEGORIES  # direction, carried type, carried colour


def babyai_levels() -> list[str]:
    """Registered BabyAI level ids the bot can solve."""
    gymnasium = require_module("gymnasium", "embodied", "data.init_args.env", "BabyAI")
    require_module("minigrid", "embodied", "data.init_args.env", "BabyAI")
    return sorted(k for k in gymnasium.registry if k.startswith("BabyAI-") and k not in UNSOLVABLE)


def _make_gym_base() -> type:
    gymnasium = require_module("gymnasium", "embodied", "data.init_args.env", "BabyAI")
    return gymnasium.Env


def _relative_direction(agent_pos: Any, agent_dir: int, target: Any) -> int:
    """The target's direction in the agent's frame (index into ``DIRECTIONS``)."""
    dx, dy = int(target[0]) - int(agent_pos[0]), int(target[1]) - int(agent_pos[1])
    if dx == 0 and dy == 0:
        return 0
    # rotate the world offset into the agent frame: forward = DIR_TO_VEC[agent_dir]
    fx, fy = [(1, 0), (0, 1), (-1, 0), (0, -1)][agent_dir]
    forward = dx * fx + dy * fy
    right = dx * (-fy) + dy * fx
    angle = np.degrees(np.arctan2(right, forward)) % 360.0
    return 1 + int(((angle + 22.5) % 360.0) // 45.0)


class BabyAIEnv:
    """A BabyAI level with the bot's hierarchical labels, as a gymnasium environment (see the module docstring).

    Args:
        env_id: a registered BabyAI id (``BabyAI-GoToLocal-v0``, ``BabyAI-PickupLoc-v0``, ...).
        observation: the student's view: ``symbolic`` (7x7x3 categories) or ``rgb`` (pixels, ``tile_size`` each).
        tile_size: pixels per cell of the ``rgb`` view.
        mission_length: tokens kept of a mission.
        max_steps: episode horizon (``None``: the level's own).
        privileged_view: side (odd) of the privileged window: the whole grid, unoccluded, centred on the agent and
            rotated so that it faces up (15 covers an 8x8 room from any cell; cells off the map read 0).
        expert_knows_map: the bot starts with the whole level mapped (its visibility mask all true), so it plans on
            the true grid instead of exploring first and its labels depend on the state, not on what it happened to
            see (a privileged "map specialist"); ``None``: on for single-room levels (in a one-off check it solved
            100/100 seeds of GoToLocal, PickupLoc and PutNextLocal; the suite checks 20 GoToLocal seeds), off for
            multi-room levels, where a full mask breaks the bot (assertions in 82-95 % of BossLevel episodes, spec
            §3).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # A real gymnasium.Env subclass, built on first use so the package imports without gymnasium.
        return object.__new__(_babyai_class())

    def __init__(
        self,
        env_id: str = "BabyAI-GoToLocal-v0",
        observation: Literal["symbolic", "rgb"] = "symbolic",
        tile_size: int = 8,
        mission_length: int = 24,
        max_steps: int | None = None,
        privileged_view: int = 15,
        expert_knows_map: bool | None = None,
    ) -> None:
        gymnasium = require_module("gymnasium", "embodied", "data.init_args.env", "BabyAI")
        require_module("minigrid", "embodied", "data.init_args.env", "BabyAI")
        if env_id in UNSOLVABLE:
            raise KDConfigError("data.init_args.env", f"the BabyAI bot cannot solve {env_id}", "use another level")
        if env_id not in gymnasium.registry:
            raise KDConfigError(
                "data.init_args.env",
                f"{env_id!r} is not a registered BabyAI level",
                "use one of " + ", ".join(lvl for lvl in babyai_levels() if "Local" in lvl) + ", ...",
            )
        if privileged_view < 3 or privileged_view % 2 == 0:
            raise KDConfigError("privileged_view", f"must be an odd number >= 3, got {privileged_view}")
        if observation not in ("symbolic", "rgb"):
            raise KDConfigError("observation", f"must be 'symbolic' or 'rgb', got {observation!r}")
        kwargs = {} if max_steps is None else {"max_steps": max_steps}
        with contextlib.redirect_stdout(io.StringIO()):
            self.env = gymnasium.make(env_id, **kwargs).unwrapped
        self.env_id = env_id
        self.observation = observation
        self.tile_size = tile_size
        self.privileged_view = privileged_view
        single_room = getattr(self.env, "num_rows", 1) == 1 and getattr(self.env, "num_cols", 1) == 1
        self.expert_knows_map = single_room if expert_knows_map is None else bool(expert_knows_map)
        self.vocabulary = MissionVocabulary(BABYAI_WORDS, mission_length)
        self.hierarchy = BABYAI_HIERARCHY
        self.task_family = "navigation" if env_id.startswith(NAVIGATION_PREFIXES) else "creation"
        self.achievement_names: tuple[str, ...] = ()
        self.achievement_families: dict[str, tuple[str, ...]] = {}
        self.image_categories = (
            (OBJECT_CATEGORIES, COLOR_CATEGORIES, STATE_CATEGORIES) if observation == "symbolic" else None
        )
        self.privileged_categories = (OBJECT_CATEGORIES, COLOR_CATEGORIES, 4)  # state channel holds the agent's dir
        view = self.env.agent_view_size
        image_shape = (view, view, 3) if observation == "symbolic" else (view * tile_size, view * tile_size, 3)
        spaces = gymnasium.spaces
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, image_shape, np.uint8),
                "mission": spaces.Box(0, self.vocabulary.size - 1, (mission_length,), np.int64),
                "privileged": spaces.Box(0, 255, (privileged_view, privileged_view, 3), np.uint8),
                "privileged_vector": spaces.Box(0.0, 1.0, (PRIVILEGED_VECTOR,), np.float32),
                "labels": spaces.Box(-1, max(max(f.values()) for f in BABYAI_HIERARCHY.values()), (6,), np.int64),
            }
        )
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        self.bot: Any = None
        self.bot_failed = False
        self._labels = np.full(6, -1, dtype=np.int64)

    # --- the gymnasium API -------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        with contextlib.redirect_stdout(io.StringIO()):  # the level generator prints "Sampling rejected: ..."
            obs, _ = self.env.reset(seed=seed)
        self.bot, self.bot_failed = BabyAIBot(self.env), False
        if self.expert_knows_map:
            self.bot.vis_mask[:] = True
        self._replan(None)
        return self._observe(obs), {}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(int(action))
        info = dict(info)
        if terminated or truncated:
            info["success"] = bool(reward > 0)
            info["achievements"] = np.zeros(0, dtype=bool)
            self._labels = np.full(6, -1, dtype=np.int64)
        else:
            self._replan(int(action))
        return self._observe(obs), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        return self.env.get_frame(highlight=True, tile_size=self.tile_size)

    def close(self) -> None:
        self.env.close()

    # --- the expert ----------------------------------------------------------------------------------------------
    def _replan(self, action_taken: int | None) -> None:
        self._labels = np.full(6, -1, dtype=np.int64)
        if self.bot_failed:
            return
        try:
            action = self.bot.replan(action_taken)
        except Exception:  # the bot's own failure modes (DisappearedBoxError, assertions): no labels from now on
            self.bot_failed = True
            return
        self._labels[5] = int(action)
        self._labels[0:3] = self._manager_labels()
        self._labels[3:5] = self._conductor_labels()

    def _manager_labels(self) -> tuple[int, int, int]:
        from minigrid.envs.babyai.core.verifier import (
            AfterInstr,
            AndInstr,
            BeforeInstr,
            GoToInstr,
            OpenInstr,
            PickupInstr,
        )

        instr = self.env.instrs
        while True:
            if isinstance(instr, (BeforeInstr, AndInstr)):
                instr = instr.instr_b if instr.a_done == "success" else instr.instr_a
            elif isinstance(instr, AfterInstr):
                instr = instr.instr_a if instr.b_done == "success" else instr.instr_b
            else:
                break
        verb = {GoToInstr: 0, OpenInstr: 1, PickupInstr: 2}.get(type(instr), 3)
        desc = instr.desc_move if verb == 3 else instr.desc
        color = COLORS.index(desc.color) if desc.color in COLORS else 0
        obj = OBJECTS.index(desc.type) if desc.type in OBJECTS else 0
        return verb, color, obj

    def _conductor_labels(self) -> tuple[int, int]:
        from minigrid.core.world_object import WorldObj
        from minigrid.envs.babyai.core.verifier import ObjDesc
        from minigrid.utils import baby_ai_bot as bot_module

        if not self.bot.stack:
            return -1, -1
        subgoal = self.bot.stack[-1]
        kinds = {
            bot_module.OpenSubgoal: 1,
            bot_module.PickupSubgoal: 2,
            bot_module.DropSubgoal: 3,
            bot_module.CloseSubgoal: 4,
            bot_module.ExploreSubgoal: 5,
        }
        kind = kinds.get(type(subgoal), 5 if subgoal.is_exploratory() else 0)
        env = self.env
        target: Any = None
        if kind in (1, 2, 3, 4):
            target = env.front_pos
        elif isinstance(subgoal.datum, ObjDesc):
            seen = [
                pos
                for obj, pos in zip(subgoal.datum.obj_set, subgoal.datum.obj_poss)
                if obj is not env.carrying and self.bot.vis_mask[tuple(pos)]
            ]
            if seen:
                target = min(seen, key=lambda p: abs(p[0] - env.agent_pos[0]) + abs(p[1] - env.agent_pos[1]))
        elif isinstance(subgoal.datum, WorldObj):
            target = subgoal.datum.cur_pos
        elif subgoal.datum is not None:
            target = tuple(subgoal.datum)
        direction = -1 if target is None else _relative_direction(env.agent_pos, env.agent_dir, target)
        return kind, direction

    # --- observations ----------------------------------------------------------------------------------------
    def _observe(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        env = self.env
        if self.observation == "symbolic":
            image = obs["image"].astype(np.uint8)
        else:
            image = env.get_frame(highlight=False, tile_size=self.tile_size, agent_pov=True).astype(np.uint8)
        full = self._privileged_window()
        vector = np.zeros(PRIVILEGED_VECTOR, dtype=np.float32)
        vector[env.agent_dir] = 1.0
        if env.carrying is not None:
            encoded = env.carrying.encode()
            vector[4 + encoded[0]] = 1.0
            vector[4 + OBJECT_CATEGORIES + encoded[1]] = 1.0
        return {
            "image": image,
            "mission": self.vocabulary.encode(env.mission),
            "privileged": full.astype(np.uint8),
            "privileged_vector": vector,
            "labels": self._labels.copy(),
        }

    def _privileged_window(self) -> np.ndarray:
        """The full grid ([x, y], unoccluded) around the agent, rotated so that the agent faces -y (up)."""
        env, half = self.env, self.privileged_view // 2
        grid = env.grid.encode()
        grid[env.agent_pos[0], env.agent_pos[1]] = (10, 0, env.agent_dir)
        padded = np.zeros((grid.shape[0] + 2 * half, grid.shape[1] + 2 * half, 3), dtype=np.uint8)
        padded[half : half + grid.shape[0], half : half + grid.shape[1]] = grid
        x, y = env.agent_pos[0] + half, env.agent_pos[1] + half
        window = padded[x - half : x + half + 1, y - half : y + half + 1]
        # k quarter turns of the [x, y] array bring the agent's heading to -y: dir 0 (+x) 3, 1 (+y) 2, 2 (-x) 1, 3 0
        return np.ascontiguousarray(np.rot90(window, k=(3 - env.agent_dir) % 4, axes=(0, 1)))

    def mirror_rollout(self, horizon: int) -> dict[str, np.ndarray] | None:
        """From a deep copy of (level, bot), the bot acts up to ``horizon`` steps; the copy's labelled observations."""
        mirror = copy.deepcopy(self)
        observations = []
        obs = mirror._observe(mirror.env.gen_obs())
        for _ in range(horizon):
            action = int(obs["labels"][5])
            if action < 0:
                break
            observations.append(obs)
            obs, _, terminated, truncated, _ = mirror.step(action)
            if terminated or truncated:
                break
        return stack_observations(observations) if observations else None


_CLASS: type | None = None


def _babyai_class() -> type:
    global _CLASS
    if _CLASS is None:
        _CLASS = type(
            "BabyAIEnv", (BabyAIEnv, _make_gym_base()), {"__module__": __name__, "__doc__": BabyAIEnv.__doc__}
        )
    return _CLASS
