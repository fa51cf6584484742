"""PixelWatermaze: a MiniGrid stand-in for the DMLab Watermaze of Algorithm Distillation (arXiv 2210.14215).

## Description

A square MiniGrid room of 9x9 cells including the walls, so 7x7 = 49 free cells ``(x, y)`` with
``1 <= x, y <= 7`` (MiniGrid coordinates: x grows east, y grows south). One free cell is an *invisible
platform*; a task of the family is its position (``platform=(x, y)``). The agent must find the platform
by exploring and, in later episodes of an in-context run, go straight back to it.

Every episode starts from the same fixed pose: the centre cell ``(4, 4)`` facing north. A fixed start
keeps the shortest-path optimum of each platform well defined (see ``optimal_return``); the start cell is
therefore left out of the task split (48 platforms remain).

The four walls have different colours so that the egocentric view tells where the agent is: north red,
east yellow, south blue, west purple (the corners belong to the north and south walls); MiniGrid hides
(draws black) what lies behind a wall. With a 9x9 view in this room the facing wall is always in view
and at least one side wall shows the lateral offset, so every one of the 196 poses ``(cell, direction)``
has a different image (tested). The platform itself is never drawn in an observation.

## Observation

``Box(0, 255, (54, 54, 3), uint8)``: MiniGrid's partial agent view (``agent_view_size=9``,
``see_through_walls=False``) rendered to pixels with ``get_pov_render`` at ``tile_size=6`` (9 tiles x
6 px = 54 px), the agent at the bottom centre looking up, as MiniGrid's ``RGBImgPartialObsWrapper``
shows it. 54x54 keeps a small CNN cheap enough for a CPU transformer. In this empty room the view
depends only on ``(cell, direction)``, so all 196 views are rendered once, lazily, and looked up.

## Action

| Num | Name    | Action       |
|-----|---------|--------------|
| 0   | left    | Turn left    |
| 1   | right   | Turn right   |
| 2   | forward | Move forward (into a wall: stay) |

These are MiniGrid's first three actions; the transition table is read off ``MiniGridEnv.step``.

## Reward

1 on every step that ends on the platform, else 0. Turning in place on the platform keeps earning, so
the optimum of a platform at shortest-path distance ``d`` (in actions, over ``(cell, direction)``) from
the start pose is ``50 - d + 1``.

## Termination

Never terminates; truncated after 50 steps (the env handles this itself, no ``TimeLimit`` wrapper).

## Registered ids

- ``adapt_bench/PixelWatermaze-v0`` (kwarg ``platform=(x, y)``; default: the first train platform)

## Differences from DMLab Watermaze

DMLab ``rooms_watermaze`` is a 3-D first-person level: a circular pool with distal visual cues on the
walls, near-continuous movement and turning (many actions, RGB(D) at a much higher resolution), a hidden
platform that *rises* when the agent stands on it long enough (then the agent respawns at a random spot
and must return), and 90 s episodes with the platform kept fixed across the respawns. Here: a square
top-down grid room rendered egocentrically, 3 discrete actions, a fixed start pose, wall colours instead
of distal cues, reward on every step on the platform instead of a rise-and-respawn, 50-step episodes, and
the platform changes only between tasks. What is kept is what AD needs: an invisible goal that can only be
found by exploring, pixel observations, and landmarks that let a memory-based learner return to it.

## Batched core

In-context methods step many tasks at once: :class:`WatermazeCore` steps ``n`` platforms in lockstep with
table look-ups (``next_state[state, action]``, ``views[cell, dir]``); :class:`WatermazeEnv` is the same
core with ``n = 1``.
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from bench.registry import AdaptBenchError
from tasks.spec import Budget, Reference, TaskSpec

GRID_SIZE = 9
"""Room side in MiniGrid cells, walls included."""
ROOM_SIZE = GRID_SIZE - 2
"""Free cells per side (7)."""
NUM_CELLS = ROOM_SIZE * ROOM_SIZE
NUM_DIRS = 4
NUM_STATES = NUM_CELLS * NUM_DIRS
NUM_ACTIONS = 3
EPISODE_LENGTH = 50
VIEW_SIZE = 9
"""MiniGrid ``agent_view_size`` in cells; 9 keeps the facing wall in view from every cell."""
TILE_SIZE = 6
OBS_SHAPE = (VIEW_SIZE * TILE_SIZE, VIEW_SIZE * TILE_SIZE, 3)
RENDER_TILE_SIZE = 16
START_POS = (4, 4)
START_DIR = 3
"""MiniGrid direction: 0 east, 1 south, 2 west, 3 north."""
WALL_COLOURS = {"north": "red", "east": "yellow", "south": "blue", "west": "purple"}
SPLIT_SEED = 14215
"""Seed of the train/test permutation (AD's arXiv number); changing it is a new task version."""
NUM_TEST = 10
"""Held-out platforms: 10 of 48, about 20%."""


class WatermazeError(AdaptBenchError, ValueError):
    """A bad platform, action or call order for the Watermaze env or core; the message carries the value."""


def _cell(x: int, y: int) -> int:
    return (y - 1) * ROOM_SIZE + (x - 1)


START_STATE = _cell(*START_POS) * NUM_DIRS + START_DIR


def check_platforms(platforms: Any) -> np.ndarray:
    """``platforms`` as an ``int64`` array ``(n, 2)`` of free cells ``(x, y)``, or a :class:`WatermazeError`."""
    arr = np.asarray(platforms)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != 2:
        raise WatermazeError(f"platforms must have shape (n, 2) with n >= 1, got shape {arr.shape}: {platforms!r}")
    if arr.dtype.kind not in "iu":
        raise WatermazeError(f"platform coordinates must be integers, got dtype {arr.dtype}: {platforms!r}")
    arr = arr.astype(np.int64)
    off = ((arr < 0) | (arr >= GRID_SIZE)).any(axis=1)
    if off.any():
        x, y = arr[off.argmax()]
        raise WatermazeError(f"platform {(int(x), int(y))} is off the {GRID_SIZE}x{GRID_SIZE} grid")
    wall = ((arr < 1) | (arr > ROOM_SIZE)).any(axis=1)
    if wall.any():
        x, y = arr[wall.argmax()]
        raise WatermazeError(f"platform {(int(x), int(y))} is on a wall; free cells have 1 <= x, y <= {ROOM_SIZE}")
    return arr


def check_platform(platform: Any) -> tuple[int, int]:
    """One platform ``(x, y)`` as a tuple of ints, or a :class:`WatermazeError` naming the bad value."""
    arr = np.asarray(platform)
    if arr.shape != (2,):
        raise WatermazeError(f"platform must be a pair (x, y), got {platform!r}")
    x, y = check_platforms(arr[None])[0]
    return int(x), int(y)


# --------------------------------------------------------------------------------------------- MiniGrid side
def _minigrid_room(platform: tuple[int, int] | None = None):
    """A MiniGrid env of the room (imported lazily: MiniGrid pulls in pygame).

    ``platform`` places a green goal tile, for the human debugging view only; the tables are built from a
    room without it, so the platform can never reach an observation.
    """
    from minigrid.core.grid import Grid
    from minigrid.core.mission import MissionSpace
    from minigrid.core.world_object import Goal, Wall
    from minigrid.minigrid_env import MiniGridEnv

    class WatermazeRoom(MiniGridEnv):
        def __init__(self) -> None:
            super().__init__(
                mission_space=MissionSpace(mission_func=lambda: "find the hidden platform"),
                grid_size=GRID_SIZE,
                max_steps=EPISODE_LENGTH,
                see_through_walls=False,
                agent_view_size=VIEW_SIZE,
                tile_size=RENDER_TILE_SIZE,
            )

        def _gen_grid(self, width: int, height: int) -> None:
            self.grid = Grid(width, height)
            for i in range(width):
                self.grid.set(i, 0, Wall(WALL_COLOURS["north"]))
                self.grid.set(i, height - 1, Wall(WALL_COLOURS["south"]))
            for j in range(1, height - 1):
                self.grid.set(0, j, Wall(WALL_COLOURS["west"]))
                self.grid.set(width - 1, j, Wall(WALL_COLOURS["east"]))
            if platform is not None:
                self.grid.set(*platform, Goal())
            self.agent_pos, self.agent_dir = START_POS, START_DIR

    room = WatermazeRoom()
    room.reset(seed=0)  # builds the grid; nothing in this room is random
    return room


def _set_pose(room, state: int) -> None:
    cell, direction = divmod(int(state), NUM_DIRS)
    y, x = divmod(cell, ROOM_SIZE)
    room.agent_pos, room.agent_dir = (x + 1, y + 1), direction
    room.step_count = 0


@functools.cache
def tables() -> tuple[np.ndarray, np.ndarray]:
    """``(views, next_state)``, built once per process from MiniGrid and read-only.

    ``views[cell, dir]`` is the ``OBS_SHAPE`` uint8 image of a pose (``cell = (y-1)*7 + (x-1)``);
    ``next_state[state, action]`` with ``state = cell*4 + dir``, taken from ``MiniGridEnv.step``.
    """
    room = _minigrid_room()
    views = np.empty((NUM_CELLS, NUM_DIRS, *OBS_SHAPE), np.uint8)
    next_state = np.empty((NUM_STATES, NUM_ACTIONS), np.int64)
    for s in range(NUM_STATES):
        _set_pose(room, s)
        views[divmod(s, NUM_DIRS)] = room.get_pov_render(TILE_SIZE)
        for a in range(NUM_ACTIONS):
            _set_pose(room, s)
            room.step(a)
            (x, y), d = room.agent_pos, room.agent_dir
            next_state[s, a] = _cell(x, y) * NUM_DIRS + d
    views.setflags(write=False)
    next_state.setflags(write=False)
    return views, next_state


@functools.cache
def distances() -> np.ndarray:
    """``dist[platform_cell, state]``: fewest actions from ``state`` to stand on the platform (BFS).

    Computed as a value iteration of unit-cost shortest paths over all platforms at once; it converges in at
    most the diameter of the ``(cell, direction)`` graph.
    """
    _, next_state = tables()
    cell_of = np.arange(NUM_STATES) // NUM_DIRS
    dist = np.where(cell_of[None, :] == np.arange(NUM_CELLS)[:, None], 0, NUM_STATES).astype(np.int64)
    while True:
        new = np.minimum(dist, 1 + dist[:, next_state].min(axis=2))
        if np.array_equal(new, dist):
            break
        dist = new
    dist.setflags(write=False)
    return dist


# ------------------------------------------------------------------------------------------------ the core
class WatermazeCore:
    """``n`` Watermaze tasks stepped in lockstep; all episodes start and end together.

    ``platforms``: ``(n, 2)`` int array of free cells. ``reset() -> obs (n, 54, 54, 3) uint8``;
    ``step(actions (n,)) -> (obs, reward (n,) float32, terminated (n,) bool, truncated (n,) bool)``.
    """

    def __init__(self, platforms: np.ndarray) -> None:
        self.platforms = check_platforms(platforms)
        self.platforms.setflags(write=False)
        self.num_envs = len(self.platforms)
        self._platform_cell = (self.platforms[:, 1] - 1) * ROOM_SIZE + (self.platforms[:, 0] - 1)
        self._views, self._next = tables()
        self._flat_views = self._views.reshape(NUM_STATES, *OBS_SHAPE)
        self.state = np.full(self.num_envs, START_STATE, np.int64)
        self.t = -1  # -1: not reset yet

    @property
    def positions(self) -> np.ndarray:
        """``(n, 2)`` agent cells ``(x, y)``."""
        cell = self.state // NUM_DIRS
        return np.stack([cell % ROOM_SIZE + 1, cell // ROOM_SIZE + 1], axis=1)

    @property
    def directions(self) -> np.ndarray:
        return self.state % NUM_DIRS

    def on_platform(self) -> np.ndarray:
        return self.state // NUM_DIRS == self._platform_cell

    def observe(self) -> np.ndarray:
        return self._flat_views[self.state]

    @property
    def done(self) -> np.ndarray:
        """``(n,)``: every episode ends at the same step (no termination)."""
        return np.full(self.num_envs, self.t >= EPISODE_LENGTH)

    def reset(self, mask: np.ndarray | None = None) -> np.ndarray:
        # All episodes start and end together, so only a whole-batch reset exists; a mask that covers every
        # env (what a generic rollout passes at the shared episode end) is accepted.
        if mask is not None and not np.asarray(mask, dtype=bool).all():
            raise WatermazeError("WatermazeCore episodes run in lockstep: reset all envs at once (mask all true)")
        self.state = np.full(self.num_envs, START_STATE, np.int64)
        self.t = 0
        return self.observe()

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self.t < 0:
            raise WatermazeError("step() before reset()")
        if self.t >= EPISODE_LENGTH:
            raise WatermazeError(f"step() after the episode was truncated at {EPISODE_LENGTH} steps; call reset()")
        acts = np.asarray(actions)
        if acts.shape != (self.num_envs,) or acts.dtype.kind not in "iu":
            raise WatermazeError(
                f"actions must be {self.num_envs} integers in [0, {NUM_ACTIONS}), got {acts.dtype} array of shape "
                f"{acts.shape}: {actions!r}"
            )
        if acts.size and (acts.min() < 0 or acts.max() >= NUM_ACTIONS):
            raise WatermazeError(f"actions must be in [0, {NUM_ACTIONS}), got {actions!r}")
        self.state = self._next[self.state, acts]
        self.t += 1
        reward = self.on_platform().astype(np.float32)
        terminated = np.zeros(self.num_envs, bool)
        truncated = np.full(self.num_envs, self.t >= EPISODE_LENGTH)
        return self.observe(), reward, terminated, truncated

    def expert_actions(self) -> np.ndarray:
        """``(n,)`` shortest-path actions to each platform (ties: the lowest action; on it: turn left)."""
        dist = distances()[self._platform_cell[:, None], self._next[self.state]]  # (n, actions)
        return dist.argmin(axis=1)


# ------------------------------------------------------------------------------------------------ gym env
class WatermazeEnv(gym.Env[np.ndarray, np.int64]):
    """The Gymnasium view of :class:`WatermazeCore` with one task; see the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, platform: tuple[int, int] | None = None, render_mode: str | None = None) -> None:
        if render_mode not in (None, "rgb_array"):
            raise WatermazeError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.platform = check_platform(TRAIN_PLATFORMS[0] if platform is None else platform)
        self.render_mode = render_mode
        self.core = WatermazeCore(np.array([self.platform]))
        self.observation_space = spaces.Box(0, 255, OBS_SHAPE, np.uint8)
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        self._room = None  # MiniGrid room for render(), built on first use

    def __getstate__(self) -> dict[str, Any]:
        # the MiniGrid render room is a local class and cannot be pickled; it is rebuilt on demand
        return {**self.__dict__, "_room": None}

    def _info(self) -> dict[str, Any]:
        return {
            "agent_pos": tuple(int(v) for v in self.core.positions[0]),
            "agent_dir": int(self.core.directions[0]),
            "on_platform": bool(self.core.on_platform()[0]),
        }

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)  # nothing here is random; seeding keeps the Gymnasium contract
        return self.core.reset()[0], self._info()

    def step(self, action: Any):
        obs, reward, terminated, truncated = self.core.step(np.asarray(action).reshape(-1))
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), self._info()

    def render(self) -> np.ndarray | None:
        """The full top-down MiniGrid frame for people: the platform shows as a green goal tile here only."""
        if self.render_mode is None:
            return None
        if self._room is None:
            self._room = _minigrid_room(self.platform)
        _set_pose(self._room, int(self.core.state[0]))
        return self._room.get_frame(highlight=True, tile_size=RENDER_TILE_SIZE)


def core_for(spec: TaskSpec, tasks: Any) -> WatermazeCore:
    """A batched core of the platforms ``tasks`` (the :class:`tasks.spec.BatchedCore` protocol)."""
    return WatermazeCore(np.asarray(tasks))


def planner(env: gym.Env) -> int:
    """Shortest-path action (BFS over ``(cell, direction)``) to the platform from the env's current pose."""
    base = env.unwrapped
    if not isinstance(base, WatermazeEnv):
        raise WatermazeError(f"planner needs a WatermazeEnv, got {type(base).__name__}")
    return int(base.core.expert_actions()[0])


# ------------------------------------------------------------------------------------------------ references
def optimal_returns(platforms: Any) -> np.ndarray:
    """``(n,)`` best undiscounted returns from the start pose: walk the shortest path, then turn in place."""
    cells = np.array([_cell(x, y) for x, y in check_platforms(platforms)])
    d = distances()[cells, START_STATE]
    return np.clip(EPISODE_LENGTH - np.maximum(d, 1) + 1, 0, None).astype(np.float64)


def optimal_return(spec: TaskSpec, tasks: Any) -> float:
    """Mean shortest-path optimum over the platforms ``tasks``."""
    return float(optimal_returns(tasks).mean())


def random_return(spec: TaskSpec, tasks: Any, episodes: int, seed: int) -> float:
    """Mean return of uniform random actions, ``episodes`` per platform of ``tasks``, via the batched core."""
    rng = np.random.default_rng(seed)
    core = WatermazeCore(np.repeat(np.asarray(tasks), episodes, axis=0))
    core.reset()
    total = np.zeros(core.num_envs)
    for _ in range(EPISODE_LENGTH):
        total += core.step(rng.integers(NUM_ACTIONS, size=core.num_envs))[1]
    return float(total.mean())


# ------------------------------------------------------------------------------------------------ split + spec
def _split() -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    cells = [(x, y) for y in range(1, ROOM_SIZE + 1) for x in range(1, ROOM_SIZE + 1) if (x, y) != START_POS]
    # the permuted order is kept so that a preset's cap (the first k tasks) is a spread-out subset
    order = np.random.default_rng(SPLIT_SEED).permutation(len(cells))
    shuffled = tuple(cells[i] for i in order)
    return shuffled[NUM_TEST:], shuffled[:NUM_TEST]


TRAIN_PLATFORMS, TEST_PLATFORMS = _split()

SPECS: list[TaskSpec] = [
    TaskSpec(
        id="PixelWatermaze-v0",
        family="in-context",
        entry_point="tasks.watermaze:WatermazeEnv",
        episode_length=EPISODE_LENGTH,
        observation="pixels",
        actions="discrete",
        reference=Reference(
            source="computed: mean shortest-path optimum over held-out platforms",
            compute="tasks.watermaze:optimal_return",
        ),
        budgets={
            "smoke": Budget(train_steps=1000, eval_episodes=3, num_train_tasks=3, num_test_tasks=2),
            "quick": Budget(train_steps=25_000, eval_episodes=30),
            # Our estimate, not a DMLab number (DMLab steps are not comparable): a pixel source learner
            # (A3C/PPO-style) needs on the order of 1e5 steps to settle on one platform of this 196-pose
            # room, and AD wants the whole learning history up to and past convergence, so 5e5 per train
            # task; 100 in-context episodes (5000 steps) per held-out platform let the curve plateau.
            "paper": Budget(train_steps=500_000, eval_episodes=100),
        },
        task_kwarg="platform",
        train_tasks=TRAIN_PLATFORMS,
        test_tasks=TEST_PLATFORMS,
        split_source=(
            f"the 48 free cells other than the start {START_POS}, permuted by "
            f"np.random.default_rng({SPLIT_SEED}); the first {NUM_TEST} are held out (about 20%)"
        ),
        random_rollout="tasks.watermaze:random_return",
        random_episodes=100,
        planner="tasks.watermaze:planner",
        batched_core="tasks.watermaze:core_for",
        description="Invisible-platform search in a 7x7 MiniGrid room from 54x54 egocentric pixels "
        "(a stand-in for DMLab Watermaze, AD paper).",
    )
]
