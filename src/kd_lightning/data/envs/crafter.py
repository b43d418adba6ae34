"""Crafter as an embodied environment of the zoo, with a scripted privileged planner as the expert.

Reconstruction for STEVE-2 (arXiv 2404.04619, whose Minecraft system cannot run here); the expert is our design
after ``methods/14_steve2_embodied.md`` §4, not a published one. :class:`CrafterEnv` adapts ``crafter.Env``
(old gym API) to gymnasium; :class:`CrafterExpert` plans on the true world and labels every state with a
three-level hierarchy (:data:`CRAFTER_HIERARCHY`):

- **manager** ``task`` — index into :data:`CRAFTER_TASKS` (the 22 achievements in crafter's order, then
  ``explore``): survival first (a zombie within ``zombie_radius`` -> ``defeat_zombie``; drink -> ``collect_drink``;
  food -> ``eat_cow``; low energy, or night with energy not full -> ``wake_up``: wall itself into a two-cell
  shelter with stone when it can, then sleep), then the first goal of :data:`BENCHMARK_PLAN` (or the target) not
  yet unlocked, resolved down its prerequisites (a missing tool, item, table or furnace; a short item is stocked
  up to :data:`BENCHMARK_STOCK`, or to what the target's chain consumes); ``explore`` when the resolved task has
  no reachable target.
- **conductor** — ``target``: the semantic id (0-18) of what the expert walks to or uses, or :data:`FREE_TILE`
  (19) for a tile to place on; ``direction``: its compass bearing in the world frame (:data:`COMPASS`: 0 here,
  1-8 = N, NE, E, SE, S, SW, W, NW; north is -y); ``distance``: its Chebyshev distance binned by
  :data:`DISTANCE_BINS` ({0-1, 2-4, 5-9, >=10}).
- **actor** ``action`` — the first step of a BFS path over grass/sand/path (creatures, water and lava blocked;
  stone is dug through once a pickaxe is held), a move towards the target to face it ("bump to face"), or
  ``do`` / ``place_*`` / ``make_*`` / ``sleep``.

The world is indexed ``[x, y]`` (crafter's semantic map) while images are ``[y, x]``; the privileged crop is
stored image-like: ``privileged[r + dy, r + dx] = semantic[x + dx, y + dy]`` (centre = the player, 0 = outside).
Creature updates iterate Python sets, so two copies of one state can diverge after some steps (mirrors too).
"""

from __future__ import annotations

import copy
import functools
import math
from collections import deque
from typing import Any

import numpy as np

from kd_lightning.data.envs.common import MissionVocabulary, factor_sizes, require_module, stack_observations
from kd_lightning.errors import KDConfigError

try:  # the package imports without gymnasium; constructing the env then names the extra
    import gymnasium

    _Base: type = gymnasium.Env
except ImportError:  # pragma: no cover
    _Base = object

__all__ = ["CRAFTER_ACHIEVEMENTS", "CRAFTER_HIERARCHY", "CRAFTER_TASKS", "CRAFTER_WORDS", "CrafterEnv", "CrafterExpert"]

_FIELD = "data.init_args.env"


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


#: crafter 1.8.3's achievements and actions (data.yaml order; checked against the installed package).
CRAFTER_ACHIEVEMENTS = _names(
    "collect_coal collect_diamond collect_drink collect_iron collect_sapling collect_stone collect_wood "
    "defeat_skeleton defeat_zombie eat_cow eat_plant make_iron_pickaxe make_iron_sword make_stone_pickaxe "
    "make_stone_sword make_wood_pickaxe make_wood_sword place_furnace place_plant place_stone place_table wake_up"
)
CRAFTER_ACTIONS = _names(
    "noop move_left move_right move_up move_down do sleep place_stone place_table place_furnace place_plant "
    "make_wood_pickaxe make_stone_pickaxe make_iron_pickaxe make_wood_sword make_stone_sword make_iron_sword"
)
#: The manager's classes: the achievements, then ``explore``.
CRAFTER_TASKS = (*CRAFTER_ACHIEVEMENTS, "explore")
#: Semantic ids: 0 none / outside, materials 1-12, objects 13-18 (crafter's SemanticView).
_SEMANTIC_NAMES = (
    "none water grass stone path sand tree lava coal iron diamond table furnace player cow zombie skeleton arrow plant"
)
SEMANTIC = {name: i for i, name in enumerate(_names(_SEMANTIC_NAMES))}
SEMANTIC_CATEGORIES = len(SEMANTIC)
FREE_TILE = SEMANTIC_CATEGORIES  # the conductor's "a free tile to place on"
COMPASS = ("here", "N", "NE", "E", "SE", "S", "SW", "W", "NW")
DISTANCE_BINS = (2, 5, 10)  # Chebyshev distance < 2, < 5, < 10, else the last bin
CRAFTER_HIERARCHY: dict[str, dict[str, int]] = {
    "manager": {"task": len(CRAFTER_TASKS)},
    "conductor": {"target": SEMANTIC_CATEGORIES + 1, "direction": len(COMPASS), "distance": len(DISTANCE_BINS) + 1},
    "actor": {"action": len(CRAFTER_ACTIONS)},
}
NUM_LABELS = sum(len(factors) for factors in CRAFTER_HIERARCHY.values())
ACTION_LABEL = NUM_LABELS - 1  # the actor's action is the last label
CREATION = tuple(n for n in CRAFTER_ACHIEVEMENTS if n.startswith(("place_", "make_")))
#: "creation" = place_* and make_*; "navigation" = reach-and-collect, eat, defeat and wake_up.
ACHIEVEMENT_FAMILIES = {"navigation": tuple(n for n in CRAFTER_ACHIEVEMENTS if n not in CREATION), "creation": CREATION}
#: Benchmark-mode goal order: the tech tree, with sapling/plant, cow and water slotted in after the wood tools.
BENCHMARK_PLAN = _names(
    "collect_wood place_table make_wood_pickaxe make_wood_sword collect_sapling place_plant eat_cow collect_drink "
    "collect_stone place_stone make_stone_pickaxe make_stone_sword collect_coal place_furnace collect_iron "
    "make_iron_pickaxe make_iron_sword collect_diamond defeat_zombie defeat_skeleton eat_plant"
)
BENCHMARK_MISSION = "unlock every achievement"
#: Mission words: those of the achievement names, then of the benchmark mission.
CRAFTER_WORDS = tuple(dict.fromkeys(" ".join([*CRAFTER_ACHIEVEMENTS, BENCHMARK_MISSION]).replace("_", " ").split()))
COLLECT_MATERIAL = {"drink": "water", "wood": "tree", "sapling": "grass"}  # else the item's own material
INTERACT_TARGETS = {"eat_cow": "cow", "defeat_zombie": "zombie", "defeat_skeleton": "skeleton", "eat_plant": "plant"}
WALKABLE = ("grass", "sand", "path")
INVENTORY_SCALE = 9.0  # crafter's item maximum
MOVES = {(-1, 0): "move_left", (1, 0): "move_right", (0, -1): "move_up", (0, 1): "move_down"}
BENCHMARK_STOCK = {"wood": 5, "stone": 5}  # collect this many once an item runs short (benchmark mode)
WORLD_SEEDS = 2**31 - 1
SHELTER_CELLS = 2  # a shelter is at most this many zombie-walkable cells


@functools.lru_cache(maxsize=4)
def _neighbours(area: int) -> list[list[int]]:
    """4-neighbours of every flat index ``x * area + y``."""
    out = []
    for x in range(area):
        for y in range(area):
            out.append([(x + dx) * area + y + dy for dx, dy in MOVES if 0 <= x + dx < area and 0 <= y + dy < area])
    return out


def _dilate(mask: np.ndarray, box: bool = False) -> np.ndarray:
    """``mask`` grown by one cell: 4-neighbourhood, or the 3x3 box (crafter's ``nearby``)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out if box else mask
    out[:, 1:] |= grown[:, :-1]
    out[:, :-1] |= grown[:, 1:]
    return out


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``out[x, y] = mask[x + dx, y + dy]`` (False outside)."""
    out, (w, h) = np.zeros_like(mask), mask.shape
    out[max(0, -dx) : w - max(0, dx), max(0, -dy) : h - max(0, dy)] = mask[
        max(0, dx) : w + min(0, dx), max(0, dy) : h + min(0, dy)
    ]
    return out


def _clip(value: int, area: int) -> int:
    return min(max(value, 0), area - 1)


def _bearing(dx: int, dy: int) -> tuple[int, int]:
    """(compass index, distance bin) of a world-frame offset."""
    compass = 0 if dx == dy == 0 else 1 + (2 - round(math.degrees(math.atan2(-dy, dx)) / 45)) % 8
    return compass, int(np.searchsorted(DISTANCE_BINS, max(abs(dx), abs(dy)), side="right"))


class CrafterExpert:
    """The scripted privileged planner (module docstring); reads ``crafter.Env`` internals, labels one state per call.

    Args:
        target: an achievement to plan for (its prerequisites only), or ``None`` for :data:`BENCHMARK_PLAN`.
        thirst, hunger, fatigue: drink / food / energy at or below which survival takes over.
        zombie_radius: Manhattan distance of a zombie that makes the expert fight it.
        utility_radius: Chebyshev distance within which a table (and furnace) counts as usable; else place one.
        retry: steps a task whose target was unreachable is skipped for.
        explore_patience: steps before an exploration goal is redrawn.
        night: daylight below which the expert shelters and sleeps whenever its energy is not full.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        thirst: int = 3,
        hunger: int = 3,
        fatigue: int = 2,
        zombie_radius: int = 2,
        utility_radius: int = 12,
        retry: int = 20,
        explore_patience: int = 30,
        night: float = 0.3,
    ) -> None:
        self.target, self.thirst, self.hunger, self.fatigue = target, thirst, hunger, fatigue
        self.zombie_radius, self.utility_radius, self.retry = zombie_radius, utility_radius, retry
        self.patience, self.night = explore_patience, night
        self.goals = BENCHMARK_PLAN if target is None else (target,)
        self.stock = BENCHMARK_STOCK if target is None else self._chain_cost(target)
        self.reset(0)

    @property
    def constants(self) -> Any:
        """crafter's rules (data.yaml): collect / place / make requirements."""
        return require_module("crafter.constants", "embodied", _FIELD, "the Crafter expert")

    def reset(self, seed: int) -> None:
        """Forget the episode; exploration draws from a generator seeded by ``seed``."""
        self.rng = np.random.default_rng(seed)
        self.steps, self.blocked, self.survival, self.stocking, self.fighting = 0, {}, None, None, False
        self.explore_goal: int | None = None
        self.explore_until = 0

    def _chain_cost(self, goal: str, counts: dict[str, int] | None = None) -> dict[str, int]:
        """Items ``goal`` consumes with all its prerequisites, from an empty inventory and no table."""
        c, counts = self.constants, {} if counts is None else counts
        verb, _, name = goal.partition("_")
        rule = {"place": c.place, "make": c.make}.get(verb, {}).get(name, {})
        needs = dict(rule.get("uses", {}))
        if verb == "collect":
            needs = dict(c.collect[COLLECT_MATERIAL.get(name, name)]["require"])
        for util in rule.get("nearby", ()):
            self._chain_cost(f"place_{util}", counts)
        for item, amount in needs.items():
            if item in c.make:
                self._chain_cost(f"make_{item}", counts)
            else:
                counts[item] = counts.get(item, 0) + amount
                self._chain_cost(f"collect_{item}", counts)
        return counts

    # --- manager -----------------------------------------------------------------------------------------------
    def _resolve(self, goal: str) -> str:
        """The task to do now towards ``goal``: the goal itself or its first missing prerequisite."""
        c, inv = self.constants, self.inv
        verb, _, name = goal.partition("_")
        needs: dict[str, int] = {}
        utils: tuple[str, ...] = ()
        if verb == "collect":
            needs = c.collect[COLLECT_MATERIAL.get(name, name)]["require"]
        elif verb == "place":
            needs, utils = c.place[name]["uses"], ("table",) if name == "furnace" else ()
        elif verb == "make":
            needs, utils = c.make[name]["uses"], tuple(c.make[name]["nearby"])
        elif goal == "eat_plant" and not (self.sem == SEMANTIC["plant"]).any():
            return self._resolve("place_plant")
        for item, amount in needs.items():
            if inv[item] < amount:
                return self._resolve(f"make_{item}" if item in c.make else f"collect_{item}")
        if utils and not self._near(utils):
            missing = [u for u in utils if not self._near((u,))] or list(utils[-1:])
            return self._resolve(f"place_{missing[0]}")
        return goal

    def _blocked(self, task: str) -> bool:
        return self.blocked.get(task, -1) >= self.steps

    def _near(self, utils: tuple[str, ...]) -> bool:
        x, y, r = *self.pos, self.utility_radius
        return bool(self._stand(utils)[max(0, x - r) : x + r + 1, max(0, y - r) : y + r + 1].any())

    def _stand(self, utils: tuple[str, ...]) -> np.ndarray:
        """Free cells whose 3x3 box holds every utility in ``utils`` (where ``make_*`` works)."""
        mask = self.free.copy()
        for util in utils:
            mask &= _dilate(self.sem == SEMANTIC[util], box=True)
        return mask

    def _manager(self) -> str:
        inv, sem = self.inv, self.sem
        tired = inv["energy"] <= self.fatigue or (self.daylight < self.night and inv["energy"] < INVENTORY_SCALE)
        if self.player.sleeping or (tired and self._sealed()):
            return "wake_up"
        zombies = np.argwhere(sem == SEMANTIC["zombie"])
        near = np.abs(zombies - self.pos).sum(1).min() if len(zombies) else np.inf
        self.fighting = near <= self.zombie_radius * (2 if self.fighting else 1)  # keep on until it is well away
        if self.fighting:
            return "defeat_zombie"
        if self.survival == "collect_drink" and inv["drink"] >= INVENTORY_SCALE:
            self.survival = None
        if self.survival == "eat_cow" and inv["food"] > self.hunger:
            self.survival = None
        for task, item, low in (("collect_drink", "drink", self.thirst), ("eat_cow", "food", self.hunger)):
            if inv[item] <= low and not self._blocked(task):
                self.survival = self.survival or task
        if self.survival and not self._blocked(self.survival):
            return self.survival
        if tired:
            return "wake_up"
        if self.stocking and inv[self.stocking] < self.stock.get(self.stocking, 0):
            task = f"collect_{self.stocking}"
            if not self._blocked(self._resolve(task)):
                return self._resolve(task)
        self.stocking = None
        unlocked = self.player.achievements
        for goal in self.goals:
            task = self._resolve(goal) if unlocked[goal] == 0 else None
            if task and not self._blocked(task):
                item = task.partition("_")[2]
                self.stocking = item if task.startswith("collect_") and item in self.stock else None
                return task
        return "explore"

    # --- conductor and actor ----------------------------------------------------------------------------------
    def _sealed(self) -> bool:
        """Whether at most :data:`SHELTER_CELLS` zombie-walkable cells connect to the player (walled in)."""
        seen, todo = {self.pos}, [self.pos]
        while todo and len(seen) <= SHELTER_CELLS:
            x, y = todo.pop()
            for dx, dy in MOVES:
                cell = (x + dx, y + dy)
                if cell not in seen and 0 <= cell[0] < self.area and 0 <= cell[1] < self.area and self.open[cell]:
                    seen.add(cell)
                    todo.append(cell)
        return len(seen) <= SHELTER_CELLS

    def _shelter(self) -> tuple[tuple[int, int] | None, str]:
        """Walk (or dig) into a dead-end pair of cells a-b entered from f (collinear), step back from a to b so
        that f is faced, wall f with stone and sleep; sleep in place when no such shelter is reachable."""
        inv, (x, y) = self.inv, self.pos
        dig = inv["wood_pickaxe"] > 0
        if self.player.sleeping or self._sealed() or not (inv["stone"] or dig):
            return None, "sleep"
        stone = self.mat == SEMANTIC["stone"]
        room, closed, entries = self.open | (stone & dig), ~self.open, np.zeros_like(self.open)
        roles = []
        for ex, ey in MOVES:  # b + e = a, b - e = f; the other neighbours of a and b must be closed
            walls = [(ey, ex), (-ey, -ex), (2 * ex, 2 * ey), (ex + ey, ey + ex), (ex - ey, ey - ex)]
            valid = room & _shift(room, ex, ey) & _shift(self.free, -ex, -ey)
            for dx, dy in walls:
                valid &= _shift(closed, dx, dy)
            entries |= _shift(valid, ex, ey)
            roles += [
                (k, ex, ey) for k in (1, 0, -1) if valid[_clip(x - k * ex, self.area), _clip(y - k * ey, self.area)]
            ]
        for k, ex, ey in sorted(roles, reverse=True):  # in a, in b, at f
            front = (x - (k + 1) * ex, y - (k + 1) * ey)  # f
            if k == 1:
                return front, MOVES[(-ex, -ey)]
            if k == 0 and self.facing == (-ex, -ey):
                return front, "place_stone" if inv["stone"] else "sleep"
            ahead = (x + ex, y + ey)
            return front, "do" if stone[ahead] and self.facing == (ex, ey) else MOVES[(ex, ey)]
        found = self._bfs(entries)
        if found is None:
            return None, "sleep"
        goal = found[0]
        return divmod(goal, self.area), self._step_towards(found[1])

    def _bfs(self, goal: np.ndarray | None) -> tuple[int, int, list[int]] | None:
        """(goal cell, first step, visited) of a shortest path over passable cells; a full flood if ``goal`` is None."""
        area, start = self.area, self.pos[0] * self.area + self.pos[1]
        passable = self.free.copy()
        if self.inv["wood_pickaxe"]:
            passable |= self.sem == SEMANTIC["stone"]
        goals = None if goal is None else (goal & passable).ravel().tolist()
        if goals is not None and goal[self.pos]:
            return start, start, [start]
        ok, first, queue, neighbours = passable.ravel().tolist(), {start: start}, deque([start]), _neighbours(area)
        while queue:
            cell = queue.popleft()
            for nxt in neighbours[cell]:
                if ok[nxt] and nxt not in first:
                    first[nxt] = nxt if cell == start else first[cell]
                    if goals is not None and goals[nxt]:
                        return nxt, first[nxt], []
                    queue.append(nxt)
        return None if goals is not None else (start, start, list(first))

    def _step_towards(self, cell: int) -> str:
        """Move to ``cell`` (a neighbour of the player), digging it first if it is stone."""
        dx, dy = cell // self.area - self.pos[0], cell % self.area - self.pos[1]
        if self.sem[cell // self.area, cell % self.area] == SEMANTIC["stone"] and self.facing == (dx, dy):
            return "do"
        return MOVES[(dx, dy)]

    def _interact(
        self, targets: np.ndarray, action: str, stand: np.ndarray | None = None
    ) -> tuple[tuple[int, int], str] | None:
        """Walk next to a ``targets`` cell (or onto a ``stand`` cell), face it and ``action``; None if unreachable."""
        box = stand is not None
        found = self._bfs(self.free & (_dilate(targets) if stand is None else stand))
        if found is None:
            return None
        goal, step, _ = found
        gx, gy = divmod(goal, self.area)
        x0, y0 = max(0, gx - 1), max(0, gy - 1)
        offsets = [(int(i) + x0 - gx, int(j) + y0 - gy) for i, j in np.argwhere(targets[x0 : gx + 2, y0 : gy + 2])]
        near = [o for o in offsets if abs(o[0]) + abs(o[1]) == 1] or offsets
        dx, dy = self.facing if self.facing in near else near[0]
        cell = (gx + dx, gy + dy)
        if goal != self.pos[0] * self.area + self.pos[1]:
            return cell, self._step_towards(step)
        return cell, action if box or (dx, dy) == self.facing else MOVES[(dx, dy)]

    def _place(self, name: str) -> tuple[tuple[int, int] | None, str]:
        """Place ``name`` on the facing tile if allowed, else bump or step so that an allowed tile is faced."""
        where = np.isin(self.sem, [SEMANTIC[m] for m in self.constants.place[name]["where"]])
        area, (x, y) = self.area, self.pos
        inside = lambda cx, cy: 0 <= cx < area and 0 <= cy < area  # noqa: E731
        fx, fy = x + self.facing[0], y + self.facing[1]
        if inside(fx, fy) and where[fx, fy]:
            return (fx, fy), f"place_{name}"
        keep = self._stand(("table",)) if name == "furnace" else self.free
        for (dx, dy), move in MOVES.items():
            if inside(x + 2 * dx, y + 2 * dy) and keep[x + dx, y + dy] and where[x + 2 * dx, y + 2 * dy]:
                return (x + 2 * dx, y + 2 * dy), move
        return None, self._wander()

    def _wander(self) -> str:
        x, y = self.pos
        moves = [m for (dx, dy), m in MOVES.items() if self.free[_clip(x + dx, self.area), _clip(y + dy, self.area)]]
        return str(self.rng.choice(moves)) if moves else "noop"

    def _explore(self) -> tuple[tuple[int, int] | None, str]:
        here = self.pos[0] * self.area + self.pos[1]
        if self.explore_goal is None or self.explore_goal == here or self.steps >= self.explore_until:
            cells = self._bfs(None)[2]  # a full flood never fails
            self.explore_goal = int(cells[-1 - int(self.rng.integers(max(1, len(cells) // 2)))])
            self.explore_until = self.steps + self.patience
        goal = np.zeros_like(self.free)
        goal.flat[self.explore_goal] = True
        found = self._bfs(goal)
        if found is None or found[0] == here:
            self.explore_goal = None
            return None, self._wander()
        return divmod(self.explore_goal, self.area), self._step_towards(found[1])

    def act(self, env: Any, semantic: np.ndarray) -> np.ndarray:
        """Labels (task, target, direction, distance, action) of the current state of ``env`` (a ``crafter.Env``)."""
        self.player, self.sem, self.area = env._player, semantic, semantic.shape[0]
        self.inv, self.facing = self.player.inventory, tuple(self.player.facing)
        self.pos = (int(self.player.pos[0]), int(self.player.pos[1]))
        self.mat, self.daylight = env._world._mat_map, env._world.daylight
        self.open = np.isin(self.mat, [SEMANTIC[m] for m in WALKABLE])  # zombie-walkable, creatures ignored
        self.free = np.isin(semantic, [SEMANTIC[m] for m in WALKABLE])
        self.free[self.pos] = True  # the player's own cell
        task = self._manager()
        cell, target, action = None, -1, "noop"
        verb, _, name = task.partition("_")
        if task == "wake_up":  # the conductor's target: the shelter's entrance, to wall with stone
            cell, action = self._shelter()
            target = -1 if cell is None else FREE_TILE
        elif verb == "place" and name == "furnace" and not self._stand(("table",))[self.pos]:
            target = SEMANTIC["table"]  # first stand by the table, so that iron tools can be made there
            found = self._interact(self.sem == target, "noop", self._stand(("table",)))
            cell, action = found or (None, "noop")
            self.blocked.update({task: self.steps + self.retry} if found is None else {})
        elif verb == "place":
            target, (cell, action) = FREE_TILE, self._place(name)
        elif task != "explore":
            if verb == "make":
                utils = tuple(self.constants.make[name]["nearby"])
                target = SEMANTIC[utils[-1]]
                found = self._interact(semantic == target, task, self._stand(utils))
            else:
                material = INTERACT_TARGETS.get(task) or COLLECT_MATERIAL.get(name, name)
                target = SEMANTIC[material]
                found = self._interact(semantic == target, "do")
            if found is None:
                self.blocked[task] = self.steps + self.retry
                task, target = "explore", -1
            else:
                cell, action = found
        if task == "explore":
            cell, action = self._explore()
        self.steps += 1
        labels = np.full(NUM_LABELS, -1, dtype=np.int64)
        labels[0], labels[1], labels[ACTION_LABEL] = CRAFTER_TASKS.index(task), target, CRAFTER_ACTIONS.index(action)
        if cell is not None:
            labels[2:4] = _bearing(cell[0] - self.pos[0], cell[1] - self.pos[1])
        return labels


class CrafterEnv(_Base):
    """Crafter as a gymnasium env with the contract's dict observation and the expert's labels (module docstring).

    Args:
        size: side of the rendered image in pixels.
        length: episode horizon in steps (``truncated`` when reached).
        target: ``None`` for the benchmark (every achievement; success = any ``place_*``/``make_*`` unlocked;
            reward = crafter's), or an achievement name: the episode terminates with success (reward 1) when it
            is first unlocked, and the mission is its words (``"make wood pickaxe"``).
        privileged_crop: odd side of the semantic crop centred on the player.
        mission_length: tokens of the mission.
        area: side of the world in tiles (64 is the benchmark; smaller worlds generate faster).

    ``reset(seed=s)`` builds the world from ``s`` alone (crafter would mix in its episode counter); with no seed
    the next world seed comes from the env's generator. ``terminated`` = death or target reached.
    """

    metadata = {"render_modes": ["rgb_array"]}
    hierarchy = CRAFTER_HIERARCHY
    achievement_names = CRAFTER_ACHIEVEMENTS
    achievement_families = ACHIEVEMENT_FAMILIES
    image_categories = None  # RGB pixels
    privileged_categories = (SEMANTIC_CATEGORIES,)

    def __init__(
        self,
        size: int = 64,
        length: int = 500,
        target: str | None = None,
        privileged_crop: int = 17,
        mission_length: int = 8,
        area: int = 64,
    ) -> None:
        gym = require_module("gymnasium", "embodied", _FIELD, "the Crafter environment")
        crafter = require_module("crafter", "embodied", _FIELD, "the Crafter environment")
        if (tuple(crafter.constants.achievements), tuple(crafter.constants.actions)) != (
            CRAFTER_ACHIEVEMENTS,
            CRAFTER_ACTIONS,
        ):
            raise KDConfigError(
                _FIELD, "the installed crafter has other achievements or actions", "pip install crafter==1.8.3"
            )
        if target is not None and target not in CRAFTER_ACHIEVEMENTS:
            valid = ", ".join(CRAFTER_ACHIEVEMENTS)
            raise KDConfigError("target", f"unknown Crafter achievement {target!r}", f"use None or one of {valid}")
        for name, value in (("size", size), ("length", length), ("mission_length", mission_length), ("area", area)):
            if int(value) < 1:
                raise KDConfigError(name, f"must be >= 1, got {value}")
        if privileged_crop < 1 or privileged_crop % 2 == 0:
            raise KDConfigError("privileged_crop", f"must be a positive odd number, got {privileged_crop}")
        self.size, self.length, self.target, self.crop, self.area = size, length, target, privileged_crop, area
        self.task_family = "creation" if target is None or target in CREATION else "navigation"
        self.vocabulary = MissionVocabulary(CRAFTER_WORDS, mission_length)
        self.mission = BENCHMARK_MISSION if target is None else target.replace("_", " ")
        self._env = crafter.Env(area=(area, area), size=(size, size), length=None)
        self.expert = CrafterExpert(target)
        spaces = gym.spaces
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (size, size, 3), np.uint8),
                "mission": spaces.Box(0, self.vocabulary.size - 1, (mission_length,), np.int64),
                "privileged": spaces.Box(0, SEMANTIC_CATEGORIES - 1, (privileged_crop, privileged_crop, 1), np.uint8),
                "privileged_vector": spaces.Box(-1.0, 1.0, (len(crafter.constants.items) + 4,), np.float32),
                "labels": spaces.Box(-1, np.array(factor_sizes(CRAFTER_HIERARCHY)) - 1, (NUM_LABELS,), np.int64),
            }
        )
        self.action_space = spaces.Discrete(len(CRAFTER_ACTIONS))
        self._steps, self._done, self._obs, self._semantic = 0, True, None, None

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
        super().reset(seed=seed)
        world_seed = int(seed) if seed is not None else int(self.np_random.integers(WORLD_SEEDS))
        self._env._seed, self._env._episode = world_seed, 0  # crafter seeds the world with hash((seed, episode))
        image = self._env.reset()
        self._semantic = self._env._sem_view()
        self.expert.reset(world_seed)
        self._steps, self._done = 0, False
        return self._observe(image), {}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        image, reward, _, inner = self._env.step(int(action))
        self._steps += 1
        self._semantic = inner["semantic"]
        achievements = np.array([inner["achievements"][name] > 0 for name in CRAFTER_ACHIEVEMENTS], dtype=np.bool_)
        reached = self.target is not None and bool(inner["achievements"][self.target])
        terminated = inner["discount"] == 0 or reached
        truncated = self._steps >= self.length
        self._done = terminated or truncated
        info: dict[str, Any] = {"discount": float(inner["discount"])}
        if self.target is not None:
            reward = float(reached)
        if self._done:
            creation = [achievements[CRAFTER_ACHIEVEMENTS.index(name)] for name in CREATION]
            info["success"] = reached if self.target is not None else bool(any(creation))
            info["achievements"] = achievements
        return self._observe(image), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        return self._env.render()

    def expert_action(self) -> int:
        """The expert's action for the current state."""
        return int(self._obs["labels"][ACTION_LABEL])

    def _observe(self, image: np.ndarray) -> dict[str, np.ndarray]:
        player, half = self._env._player, self.crop // 2
        labels = np.full(NUM_LABELS, -1, np.int64) if self._done else self.expert.act(self._env, self._semantic)
        padded = np.pad(self._semantic, half)  # 0 = outside the world
        x, y = int(player.pos[0]), int(player.pos[1])
        crop = padded[x : x + self.crop, y : y + self.crop].T  # rows = y, like the image
        inventory = np.array(list(player.inventory.values()), np.float32) / INVENTORY_SCALE
        extra = [*player.facing, self._env._world.daylight, float(player.sleeping)]
        self._obs = {
            "image": np.asarray(image, np.uint8),
            "mission": self.vocabulary.encode(self.mission),
            "privileged": crop[..., None].astype(np.uint8),
            "privileged_vector": np.concatenate([inventory, np.array(extra, np.float32)]),
            "labels": labels,
        }
        return self._obs

    def mirror_rollout(self, horizon: int) -> dict[str, np.ndarray] | None:
        """From a deep copy of (world, expert), the expert acts up to ``horizon`` steps; the copy's observations
        before each of its actions (the first is the current one), stacked; None when no step was taken."""
        if self._done or horizon < 1:
            return None
        textures = self._env._textures  # read-only, shared rather than copied
        mirror = copy.deepcopy(self, {id(textures): textures})
        obs, observations = mirror._obs, []
        for _ in range(horizon):
            observations.append(obs)
            obs, _, terminated, truncated, _ = mirror.step(int(obs["labels"][ACTION_LABEL]))
            if terminated or truncated:
                break
        return stack_observations(observations)
