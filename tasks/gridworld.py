"""Dark Room, Dark Room Hard and Dark Key-to-Door (AD paper: Laskin et al. 2022, arXiv 2210.14215, Sec. 5).

Every family has a **batched numpy core** that steps ``n`` tasks in lockstep (used by data generation and by
the in-context evaluation of methods) and a Gymnasium env that is a thin view on the same core with ``n = 1``,
so the two cannot drift apart.

Shared conventions: a cell is ``(x, y)``, ``y`` growing downwards; the observation is the cell index
``y * size + x`` and nothing else (AD paper, Sec. 5: the agent only knows its position; goal, key, door and
key possession stay hidden); actions 0 no-op, 1 up, 2 right, 3 down, 4 left, walls stop the agent; a step's
reward depends on the cell *after* the action; on an episode's last step exactly one of ``terminated`` (goal /
door reached) and ``truncated`` (``horizon`` steps) is true.

Batched core API (:class:`GridCore`; ``core_for(spec, tasks)`` builds the right one for a spec)::

    core = DarkRoomCore(goals)      # goals: int (n, 2) of (x, y); KeyToDoorCore(tasks): (n, 2, 2); starts reset
    obs = core.reset(mask=None)     # (n,) int64 cells; with a bool mask only those envs start over
    obs, reward, terminated, truncated = core.step(actions)   # (n,) int64 / float32 / bool / bool
    core.cell, core.t, core.done    # state arrays (KeyToDoorCore: also core.has_key); plan_batch(core): oracle

An env whose episode has ended stays frozen until it is reset: it does not move, earns 0 and reports neither
``terminated`` nor ``truncated`` again, so lockstep rollouts can simply step until ``core.done.all()``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from bench.registry import AdaptBenchError, load_target
from tasks.spec import Budget, Reference, TaskSpec

__all__ = [
    "DARK_ROOM_HARD_SPLIT", "DARK_ROOM_SPLIT", "KEY_TO_DOOR_SPECS", "KEY_TO_DOOR_SPLIT", "NUM_ACTIONS", "SPECS",
    "SPLIT_SEED", "DarkKeyToDoorEnv", "DarkRoomCore", "DarkRoomEnv", "DarkRoomHardEnv", "GridCore", "GridTaskError",
    "InvalidActionError", "KeyToDoorCore", "core_for", "optimal_return", "plan_batch", "planner", "random_return",
    "shortest_paths", "transition_table",
]

NUM_ACTIONS = 5
# (dx, dy) of each action; y grows downwards
_MOVES = np.array([(0, 0), (0, -1), (1, 0), (0, 1), (-1, 0)], dtype=np.int64)
# One seed for every split, fixed forever (the arXiv number of the AD paper); changing it is a new task version.
SPLIT_SEED = 221014215


class GridTaskError(AdaptBenchError, ValueError):
    """A goal / key / door that is not a cell of the room, a badly shaped task, or a key on the door."""


class InvalidActionError(AdaptBenchError, ValueError):
    """An action outside ``{0, 1, 2, 3, 4}`` or a batch of the wrong shape."""


# -- Tables: transitions and shortest paths, computed once per room size -------------------------------------------


@functools.cache
def transition_table(size: int) -> np.ndarray:
    """``next_cell[cell, action]`` for an open ``size x size`` room, shape ``(size**2, 5)``, read-only."""
    y, x = np.divmod(np.arange(size * size), size)
    nx = np.clip(x[:, None] + _MOVES[None, :, 0], 0, size - 1)
    ny = np.clip(y[:, None] + _MOVES[None, :, 1], 0, size - 1)
    table = (ny * size + nx).astype(np.int64)
    table.flags.writeable = False
    return table


@functools.cache
def shortest_paths(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dist, first_action)``, both ``(C, C)`` with ``C = size**2``, by breadth-first search on the table.

    ``dist[c, g]`` is the number of moves from cell ``c`` to cell ``g``; ``first_action[c, g]`` is the lowest
    action starting a shortest path, and ``0`` (no-op) when ``c == g``. BFS rather than the Manhattan formula
    so the planner stays right if rooms ever get walls.
    """
    nxt = transition_table(size)
    n_cells = size * size
    dist = np.full((n_cells, n_cells), -1, dtype=np.int64)
    dist[np.arange(n_cells), np.arange(n_cells)] = 0
    for k in range(1, n_cells):
        # c reaches g in k moves iff a neighbour of c reaches g in k - 1
        frontier = (dist[nxt[:, 1:]] == k - 1).any(axis=1) & (dist < 0)
        if not frontier.any():
            break
        dist[frontier] = k
    # (C, 4, C): is action a (1..4) a first step of a shortest path from c to g?
    steps = dist[nxt[:, 1:]] == (dist - 1)[:, None, :]
    first = (steps.argmax(axis=1) + 1).astype(np.int64)
    first[np.arange(n_cells), np.arange(n_cells)] = 0
    for arr in (dist, first):
        arr.flags.writeable = False
    return dist, first


# -- Task validation -----------------------------------------------------------------------------------------------


def _check_cells(value: Any, shape: tuple[int, ...], size: int, what: str) -> np.ndarray:
    """``value`` as an int64 array of ``shape`` (last axis ``(x, y)``), every cell inside the room."""
    words = "an (x, y) pair" if shape == (2,) else f"an array of shape {shape} (last axis (x, y))"
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged nesting such as ((1, 2), 3)
        raise GridTaskError(f"{what} must be {words} of ints, got {value!r}") from exc
    if arr.shape != shape or arr.dtype.kind not in "iu":
        raise GridTaskError(f"{what} must be {words} of ints, got {value!r}")
    arr = arr.astype(np.int64)
    bad = ((arr < 0) | (arr >= size)).any(axis=-1)
    if bad.any():
        first = arr[np.argwhere(bad)[0][0]] if arr.ndim > 1 else arr
        raise GridTaskError(
            f"{what} {tuple(int(v) for v in np.ravel(first)[:2])} is off the {size}x{size} grid; "
            f"x and y must lie in [0, {size - 1}]"
        )
    return arr


def _batch_len(value: Any, item_shape: tuple[int, ...], what: str) -> int:
    """``n`` for a batch of shape ``(n, *item_shape)``, n >= 1."""
    try:
        shape = np.shape(value)
    except ValueError as exc:  # ragged nesting
        raise GridTaskError(f"{what} must have shape (n, {', '.join(map(str, item_shape))}), got {value!r}") from exc
    if len(shape) != 1 + len(item_shape) or tuple(shape[1:]) != item_shape or shape[0] < 1:
        raise GridTaskError(f"{what} must have shape (n, {', '.join(map(str, item_shape))}) with n >= 1, got {shape}")
    return int(shape[0])


def _as_cell(xy: Any, size: int, what: str) -> tuple[int, int]:
    arr = _check_cells(xy, (2,), size, what)
    return int(arr[0]), int(arr[1])


def _as_key_door(task: Any, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    if not isinstance(task, Sequence | np.ndarray) or len(task) != 2:
        raise GridTaskError(f"task must be ((key_x, key_y), (door_x, door_y)), got {task!r}")
    key, door = _as_cell(task[0], size, "key"), _as_cell(task[1], size, "door")
    if key == door:
        raise GridTaskError(f"key and door must be different cells, got both at {key} in task {task!r}")
    return key, door


# -- Batched cores -------------------------------------------------------------------------------------------------


class GridCore:
    """``n`` episodes of one open ``size x size`` room stepped in lockstep, each with its own task.

    State arrays (shape ``(n,)``): ``cell`` (int64 cell index), ``t`` (steps taken this episode), ``done``
    (episode over, waiting for :meth:`reset`). A new core starts reset. The arrays are live state: copy them
    to keep a snapshot.
    """

    can_terminate: bool = True  # families that never terminate skip a mask per step

    def __init__(self, n: int, *, size: int, horizon: int, start: tuple[int, int]) -> None:
        self.n, self.size, self.horizon = n, size, horizon
        self.start = _as_cell(start, size, "start")
        self.start_cell = self.start[1] * size + self.start[0]
        self.next_cell = transition_table(size)
        self._next_flat = self.next_cell.ravel()
        self.cell = np.full(n, self.start_cell, dtype=np.int64)
        self.t = np.zeros(n, dtype=np.int64)
        self.done = np.zeros(n, dtype=bool)

    @property
    def xy(self) -> np.ndarray:
        """The agents' cells as ``(n, 2)`` ``(x, y)``."""
        return np.stack([self.cell % self.size, self.cell // self.size], axis=-1)

    def reset(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Start new episodes (all, or where ``mask`` is true); returns every env's observation ``(n,)``."""
        if mask is None:
            self.cell = np.full(self.n, self.start_cell, dtype=np.int64)
            self.t = np.zeros(self.n, dtype=np.int64)
            self.done = np.zeros(self.n, dtype=bool)
            self._reset_extra(None)
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (self.n,):
                raise ValueError(f"reset mask must have shape ({self.n},), got {mask.shape}")
            self.cell = np.where(mask, self.start_cell, self.cell)
            self.t = np.where(mask, 0, self.t)
            self.done = self.done & ~mask
            self._reset_extra(mask)
        return self.cell.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Apply one action per env: ``(obs int64, reward float32, terminated bool, truncated bool)``, each ``(n,)``."""
        a = np.asarray(actions)
        if a.shape != (self.n,) or a.dtype.kind not in "iu":
            raise InvalidActionError(f"actions must be an int array of shape ({self.n},), got {a.dtype} {a.shape}")
        # one reduction checks both bounds: viewed as unsigned, negative actions become huge
        if (a.view(f"u{a.itemsize}") if a.dtype.kind == "i" else a).max() >= NUM_ACTIONS:
            bad = a[(a < 0) | (a >= NUM_ACTIONS)][0]
            raise InvalidActionError(f"action {int(bad)} is not in 0..{NUM_ACTIONS - 1}")
        # a flat table lookup is the whole move; ended episodes need masking only when there are any
        cell = self._next_flat[self.cell * NUM_ACTIONS + a]
        if np.count_nonzero(self.done):
            active = ~self.done
            cell = np.where(active, cell, self.cell)
            self.cell = cell
            reward, terminated = self._transition(cell, active)
            self.t = self.t + active
            truncated = (self.t >= self.horizon) & active
        else:
            self.cell = cell
            reward, terminated = self._transition(cell, None)
            self.t += 1
            truncated = self.t >= self.horizon
        if self.can_terminate:
            truncated &= ~terminated
        self.done = self.done | terminated | truncated
        return cell.copy(), reward, terminated, truncated

    # --- what a family defines -------------------------------------------------------------------------
    def _reset_extra(self, mask: np.ndarray | None) -> None:
        """Reset family state (e.g. the key) for all envs or where ``mask``."""

    def _transition(self, cell: np.ndarray, active: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(reward float32, terminated bool)`` for agents now on ``cell``; only ``active`` envs may score."""
        raise NotImplementedError

    @property
    def num_envs(self) -> int:
        return self.n

    def expert_actions(self) -> np.ndarray:
        """Shortest-path actions for every env (the :class:`tasks.spec.BatchedCore` protocol)."""
        return plan_batch(self)

    def target_cell(self) -> np.ndarray:
        """The cell each agent should head for now (used by :func:`plan_batch`)."""
        raise NotImplementedError

    def set_tasks(self, tasks: Any) -> None:
        """Replace the ``n`` tasks (keeps the state; call :meth:`reset` to start over)."""
        raise NotImplementedError


class DarkRoomCore(GridCore):
    """Dark Room (``sparse=False``): reward 1 on every step that ends on the goal, no termination.
    Dark Room Hard (``sparse=True``): reward 1 once, on reaching the goal, which terminates the episode.

    ``goals``: int array ``(n, 2)`` of ``(x, y)``.
    """

    def __init__(self, goals: Any, *, size: int = 9, horizon: int = 20, sparse: bool = False,
                 start: tuple[int, int] | None = None) -> None:
        n = _batch_len(goals, (2,), "goals")
        super().__init__(n, size=size, horizon=horizon, start=start or (size // 2, size // 2))
        self.sparse = self.can_terminate = sparse
        self.set_tasks(goals)

    def set_tasks(self, tasks: Any) -> None:
        goals = _check_cells(tasks, (self.n, 2), self.size, "goal")
        self.goals = goals
        self.goal_cell = goals[:, 1] * self.size + goals[:, 0]

    def _transition(self, cell: np.ndarray, active: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        hit = cell == self.goal_cell
        if active is not None:
            hit &= active
        terminated = hit if self.sparse else np.zeros(self.n, dtype=bool)
        return hit.astype(np.float32), terminated

    def target_cell(self) -> np.ndarray:
        return self.goal_cell


class KeyToDoorCore(GridCore):
    """Dark Key-to-Door: reward 1 on first reaching the key, then 1 on reaching the door with the key, which
    terminates the episode (maximum return 2). The door without the key is an ordinary cell.

    ``tasks``: int array ``(n, 2, 2)``, ``tasks[i] = ((key_x, key_y), (door_x, door_y))``, key != door.
    """

    def __init__(self, tasks: Any, *, size: int = 9, horizon: int = 50, start: tuple[int, int] | None = None) -> None:
        n = _batch_len(tasks, (2, 2), "tasks")
        super().__init__(n, size=size, horizon=horizon, start=start or (size // 2, size // 2))
        self.has_key = np.zeros(self.n, dtype=bool)
        self.set_tasks(tasks)

    def set_tasks(self, tasks: Any) -> None:
        arr = _check_cells(tasks, (self.n, 2, 2), self.size, "key/door")
        same = (arr[:, 0] == arr[:, 1]).all(axis=-1)
        if same.any():
            i = int(np.argmax(same))
            raise GridTaskError(f"key and door must be different cells, task {i} has both at {tuple(arr[i, 0])}")
        self.keys, self.doors = arr[:, 0], arr[:, 1]
        self.key_cell = self.keys[:, 1] * self.size + self.keys[:, 0]
        self.door_cell = self.doors[:, 1] * self.size + self.doors[:, 0]

    def _reset_extra(self, mask: np.ndarray | None) -> None:
        self.has_key = np.zeros(self.n, dtype=bool) if mask is None else self.has_key & ~mask

    def _transition(self, cell: np.ndarray, active: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        got_key = (cell == self.key_cell) & ~self.has_key
        if active is not None:
            got_key &= active
        self.has_key = self.has_key | got_key
        # key != door, so the key and the door never both score on one step: the reward is 0 or 1
        opened = (cell == self.door_cell) & self.has_key
        if active is not None:
            opened &= active
        return (got_key | opened).astype(np.float32), opened

    def target_cell(self) -> np.ndarray:
        return np.where(self.has_key, self.door_cell, self.key_cell)


def plan_batch(core: GridCore) -> np.ndarray:
    """Shortest-path actions ``(n,)`` for every env of ``core``: toward the goal, or the key then the door.

    On the target cell the action is the no-op: it collects Dark Room's per-step reward, and it picks up a
    key lying on the start cell.
    """
    _, first = shortest_paths(core.size)
    return first[core.cell, core.target_cell()]


# -- Splits -------------------------------------------------------------------------------------------------------


def _cells(size: int) -> list[tuple[int, int]]:
    return [(x, y) for y in range(size) for x in range(size)]


def _split(tasks: list[Any], n_test: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(train, test)``: the tasks permuted by ``default_rng(SPLIT_SEED)``; the first ``n_test`` are held out.

    Both keep the permuted order, so a budget's ``num_*_tasks`` cap takes a random subset, not a corner.
    """
    order = np.random.default_rng(SPLIT_SEED).permutation(len(tasks))
    return tuple(tasks[i] for i in order[n_test:]), tuple(tasks[i] for i in order[:n_test])


# 64 train goals, not fewer: with ~40 train goals AD memorises the goals instead of learning to explore
DARK_ROOM_SPLIT = _split(_cells(9), n_test=17)
DARK_ROOM_HARD_SPLIT = _split(_cells(17), n_test=58)  # 80 / 20
KEY_TO_DOOR_SPLIT = _split([(k, d) for k in _cells(9) for d in _cells(9) if k != d], n_test=648)  # 90 / 10


# -- Gymnasium envs: thin views on a core with n = 1 ---------------------------------------------------------------


class _GridEnv(gym.Env[np.int64, np.int64]):
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}
    size: ClassVar[int]
    horizon: ClassVar[int]
    task_kwarg: ClassVar[str]
    train_pool: ClassVar[tuple[Any, ...]]  # what task=None draws from: the train split, never held-out tasks

    def __init__(self, task: Any = None, render_mode: str | None = None) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        self.observation_space = spaces.Discrete(self.size * self.size)
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        # task=None: a new task is drawn from the train split at every reset (meta-RL training); never test tasks
        self._sample_task = task is None
        self.task = self.train_pool[0] if task is None else self._parse_task(task)
        self.core = self.make_core([self.task])

    # family hooks
    @classmethod
    def make_core(cls, tasks: Sequence[Any]) -> GridCore:
        """A batched core running ``tasks`` with this env's dynamics."""
        raise NotImplementedError

    def _parse_task(self, task: Any) -> Any:
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.int64, dict]:
        super().reset(seed=seed)
        if self._sample_task:
            pool = self.train_pool
            self.task = pool[int(self.np_random.integers(len(pool)))]
            self.core.set_tasks([self.task])
        obs = self.core.reset()
        return obs[0], {}

    def step(self, action: Any) -> tuple[np.int64, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise InvalidActionError(f"action {action!r} is not in 0..{NUM_ACTIONS - 1}")
        obs, reward, terminated, truncated = self.core.step(np.array([action], dtype=np.int64))
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        grid = [["." for _ in range(self.size)] for _ in range(self.size)]
        for ch, (x, y) in self._landmarks():
            grid[y][x] = ch
        x, y = self.core.xy[0]
        grid[y][x] = "A"
        return "\n".join("".join(row) for row in grid) + "\n"

    def _landmarks(self) -> list[tuple[str, tuple[int, int]]]:
        raise NotImplementedError


class DarkRoomEnv(_GridEnv):
    """Find an invisible goal in a dark 9x9 room (AD paper, Sec. 5).

    ## Description
    The agent starts every episode at the centre ``(4, 4)`` and must find a goal cell it cannot see; only the
    reward reveals it. A task is the goal ``(x, y)``: 81 goals, split with ``SPLIT_SEED`` into 64 train and
    17 held-out goals. ``goal=None`` draws a train goal with ``self.np_random`` at every reset.

    ## Observation
    ``Discrete(81)``: the agent's own cell ``y * 9 + x`` (``y`` grows downwards). Nothing else.

    ## Action
    ``Discrete(5)``: 0 no-op, 1 up (y-1), 2 right (x+1), 3 down (y+1), 4 left (x-1); walls stop the agent.

    ## Reward
    1 for every step that *ends* on the goal, else 0. Optimal return: 20 for the goal on the start cell
    (no-op throughout), ``21 - d`` for a goal at Manhattan distance ``d >= 1`` (arrive on step ``d``, stay).

    ## Termination
    Never terminates; truncated after 20 steps.

    ## Registered ids
    ``adapt_bench/DarkRoom-v0``
    """

    size, horizon, task_kwarg, train_pool = 9, 20, "goal", DARK_ROOM_SPLIT[0]
    sparse: ClassVar[bool] = False

    def __init__(self, goal: tuple[int, int] | None = None, render_mode: str | None = None) -> None:
        super().__init__(goal, render_mode)

    @classmethod
    def make_core(cls, tasks: Sequence[Any]) -> DarkRoomCore:
        return DarkRoomCore(np.asarray(tasks), size=cls.size, horizon=cls.horizon, sparse=cls.sparse)

    def _parse_task(self, task: Any) -> tuple[int, int]:
        return _as_cell(task, self.size, "goal")

    def _landmarks(self) -> list[tuple[str, tuple[int, int]]]:
        return [("G", self.task)]


class DarkRoomHardEnv(DarkRoomEnv):
    """Dark Room Hard: a 17x17 dark room with a sparse, one-off reward (AD paper, Sec. 5).

    ## Description
    :class:`DarkRoomEnv` in a 17x17 room, start at the centre ``(8, 8)``. 289 goals, split with ``SPLIT_SEED``
    into 231 train and 58 held-out goals; ``goal=None`` draws a train goal at every reset.

    ## Observation
    ``Discrete(289)``: the agent's own cell ``y * 17 + x``.

    ## Action
    As :class:`DarkRoomEnv`: ``Discrete(5)``, 0 no-op, 1 up, 2 right, 3 down, 4 left.

    ## Reward
    1 once, on the step that ends on the goal (a goal on the start cell takes a no-op), else 0. No goal is
    more than 16 moves from the centre, so the optimal return is 1 for every task.

    ## Termination
    On reaching the goal; truncated after 20 steps (the AD paper gives Dark Room's 20 and no other length).

    ## Registered ids
    ``adapt_bench/DarkRoomHard-v0``
    """

    size, horizon, train_pool = 17, 20, DARK_ROOM_HARD_SPLIT[0]
    sparse = True



class DarkKeyToDoorEnv(_GridEnv):
    """Dark Key-to-Door: find an invisible key, then an invisible door, in a dark 9x9 room (AD paper, Sec. 5).

    ## Description
    The agent starts every episode at the centre ``(4, 4)``. A task is ``((key_x, key_y), (door_x, door_y))``
    with key != door: 81 * 80 = 6480 tasks, split with ``SPLIT_SEED`` into 5832 train and 648 held-out
    tasks. ``task=None`` draws a train task with ``self.np_random`` at every reset.

    ## Observation
    ``Discrete(81)``: the agent's own cell ``y * 9 + x``. Whether the key is held is *not* observed.

    ## Action
    ``Discrete(5)``: 0 no-op, 1 up (y-1), 2 right (x+1), 3 down (y+1), 4 left (x-1); walls stop the agent.

    ## Reward
    1 on the first step that ends on the key (a key on the start cell is picked up by a no-op), and 1 on the
    step that ends on the door while holding the key; 0 otherwise. Maximum return 2, reachable in every task
    (at most 8 + 16 moves, well within 50 steps).

    ## Termination
    Terminates on reaching the door with the key; truncated after 50 steps.

    ## Registered ids
    ``adapt_bench/DarkKeyToDoor-v0``
    """

    size, horizon, task_kwarg, train_pool = 9, 50, "task", KEY_TO_DOOR_SPLIT[0]

    def __init__(
        self, task: tuple[tuple[int, int], tuple[int, int]] | None = None, render_mode: str | None = None
    ) -> None:
        super().__init__(task, render_mode)

    @classmethod
    def make_core(cls, tasks: Sequence[Any]) -> KeyToDoorCore:
        return KeyToDoorCore(np.asarray(tasks), size=cls.size, horizon=cls.horizon)

    def _parse_task(self, task: Any) -> tuple[tuple[int, int], tuple[int, int]]:
        return _as_key_door(task, self.size)

    def _landmarks(self) -> list[tuple[str, tuple[int, int]]]:
        key, door = self.task
        return [("D", door)] + ([] if self.core.has_key[0] else [("K", key)])


# -- Oracle, references --------------------------------------------------------------------------------------------


def planner(env: gym.Env) -> int:
    """Shortest-path action for the current state of a (possibly wrapped) grid env."""
    core = getattr(env.unwrapped, "core", None)
    if not isinstance(core, GridCore):
        raise TypeError(f"planner needs a tasks.gridworld env, got {type(env.unwrapped).__name__}")
    return int(plan_batch(core)[0])


def core_for(spec: TaskSpec, tasks: Sequence[Any]) -> GridCore:
    """A batched core running ``tasks`` of ``spec``'s family (one env per task, in order)."""
    env_cls = load_target(spec.entry_point)
    if not (isinstance(env_cls, type) and issubclass(env_cls, _GridEnv)):
        raise TypeError(f"{spec.id} is not a grid-world task (entry point {spec.entry_point})")
    return env_cls.make_core(list(tasks))


def _rollout_returns(core: GridCore, act) -> np.ndarray:
    """Undiscounted return of one episode per env, choosing actions with ``act(core)``."""
    core.reset()
    total = np.zeros(core.n, dtype=np.float64)
    while not core.done.all():
        total += core.step(act(core))[1]
    return total


def optimal_return(spec: TaskSpec, tasks: Sequence[Any]) -> float:
    """Mean over ``tasks`` of the optimal return, found by rolling out the shortest-path planner."""
    return float(_rollout_returns(core_for(spec, tasks), plan_batch).mean())


def random_return(spec: TaskSpec, tasks: Sequence[Any], episodes: int, seed: int) -> float:
    """Mean return of uniform random actions, ``episodes`` episodes per task of ``tasks``, ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    core = core_for(spec, [task for task in tasks for _ in range(episodes)])
    return float(_rollout_returns(core, lambda c: rng.integers(0, NUM_ACTIONS, c.n)).mean())


# -- Specs -----------------------------------------------------------------------------------------------------


_REFERENCE = Reference(source="computed: mean shortest-path optimum over held-out tasks",
                       compute="tasks.gridworld:optimal_return")
_SMOKE = Budget(train_steps=2_000, eval_episodes=4, num_train_tasks=4, num_test_tasks=2)
# Paper budgets: the AD paper (Sec. 5) distils 2,000 A3C learning histories per family and runs a single-stream
# Key-to-Door experiment with 2,048 tasks x 2,000 episodes; it states no per-task history length for the main
# runs, so we take those 2,000 episodes per task. Fig. 4 reports 20 test seeds per training seed
# (num_test_tasks=20 where the split has more). The in-context evaluation length, 100 episodes, is our estimate.
_PAPER_EPISODES = 2_000


def _spec(task_id: str, env_cls: type[_GridEnv], split: tuple, what: str, quick: Budget, paper_tests: int | None,
          paper_train: int | None, description: str) -> TaskSpec:
    return TaskSpec(
        id=task_id,
        family="in-context",
        entry_point=f"tasks.gridworld:{env_cls.__name__}",
        episode_length=env_cls.horizon,
        observation="discrete",
        actions="discrete",
        reference=_REFERENCE,
        budgets={
            "smoke": _SMOKE,
            "quick": quick,
            "paper": Budget(train_steps=_PAPER_EPISODES * env_cls.horizon, eval_episodes=100,
                            num_train_tasks=paper_train, num_test_tasks=paper_tests),
        },
        task_kwarg=env_cls.task_kwarg,
        train_tasks=split[0],
        test_tasks=split[1],
        split_source=f"all {what}, permuted with np.random.default_rng({SPLIT_SEED}); "
                     f"the first {len(split[1])} are held out",
        random_rollout="tasks.gridworld:random_return",
        random_episodes=100,
        planner="tasks.gridworld:planner",
        batched_core="tasks.gridworld:core_for",
        description=description,
    )


# quick: 1,000 source episodes per Dark Room task; 100 in-context episodes (AD plateaus after ~30-60 of them at
# quick), 4 trials per held-out goal (with one trial per goal, whether each of the 17 goals is found moved a run's
# score by ~10 points between two checkpoints of one model).
SPECS: list[TaskSpec] = [
    _spec("DarkRoom-v0", DarkRoomEnv, DARK_ROOM_SPLIT, "81 goals",
          Budget(train_steps=20_000, eval_episodes=100, eval_trials=4), None, None,
          "AD Dark Room: find an invisible goal in a 9x9 room from position only; reward on every step at the "
          "goal; 20 steps."),
    _spec("DarkRoomHard-v0", DarkRoomHardEnv, DARK_ROOM_HARD_SPLIT, "289 goals",
          Budget(train_steps=20_000, eval_episodes=100, eval_trials=4), 20, None,
          "AD Dark Room Hard: 17x17, reward 1 once on reaching the invisible goal, which ends the episode; "
          "20 steps."),
]

KEY_TO_DOOR_SPECS: list[TaskSpec] = [
    _spec("DarkKeyToDoor-v0", DarkKeyToDoorEnv, KEY_TO_DOOR_SPLIT, "6480 (key, door) pairs with key != door",
          Budget(train_steps=50_000, eval_episodes=100, num_train_tasks=256, num_test_tasks=64,
                 eval_trials=2), 20, 2_048,
          "AD Dark Key-to-Door: 9x9, reach an invisible key (+1) then an invisible door (+1, ends the episode) "
          "from position only; 50 steps."),
]
