"""Dark Room, Dark Room Hard and Dark Key-to-Door: API, determinism, core == env, optima, splits, errors."""

from __future__ import annotations

import hashlib

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import tasks
from bench.registry import AdaptBenchError, load_target
from tasks import gridworld as gw

TASK_IDS = ["DarkRoom-v0", "DarkRoomHard-v0", "DarkKeyToDoor-v0"]
# sha256 of repr((train_tasks, test_tasks)): an accidental change of a split must fail here (new version instead)
SPLIT_HASHES = {
    "DarkRoom-v0": "202b722b0167fd22",
    "DarkRoomHard-v0": "da6716d77995648e",
    "DarkKeyToDoor-v0": "526aaec9a18b2d8a",
}
SPLIT_SIZES = {"DarkRoom-v0": (64, 17), "DarkRoomHard-v0": (231, 58), "DarkKeyToDoor-v0": (5832, 648)}


@pytest.fixture(params=TASK_IDS)
def spec(request: pytest.FixtureRequest) -> tasks.TaskSpec:
    return tasks.get_task(request.param)


def _rollout(env: gym.Env, actions: list[int], seed: int | None) -> list[tuple]:
    """(obs, reward, terminated, truncated) of every step, resetting whenever an episode ends."""
    env.reset(seed=seed)
    out = []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        out.append((int(obs), r, term, trunc))
        if term or trunc:
            env.reset()
    return out


# ---------------------------------------------------------------------------------------------- Gymnasium API


@pytest.mark.parametrize("with_task", [True, False], ids=["fixed-task", "sampled-task"])
def test_check_env(spec: tasks.TaskSpec, with_task: bool) -> None:
    env = spec.make(spec.test_tasks[0] if with_task else None)
    check_env(env.unwrapped)
    env.close()


def test_same_seed_determinism(spec: tasks.TaskSpec) -> None:
    actions = [int(a) for a in np.random.default_rng(0).integers(0, 5, 3 * spec.episode_length)]
    env_a, env_b = spec.make(), spec.make()  # task=None: the task is drawn with np_random at every reset
    assert _rollout(env_a, actions, seed=7) == _rollout(env_b, actions, seed=7)

    def drawn(seed: int) -> list:
        env = spec.make()
        env.reset(seed=seed)
        out = [env.unwrapped.task]
        for _ in range(7):
            env.reset()
            out.append(env.unwrapped.task)
        return out

    assert drawn(1) == drawn(1)
    assert drawn(1) != drawn(2)
    # sampling never leaks a held-out task
    assert set(drawn(3)) <= set(spec.train_tasks)


def test_core_matches_env(spec: tasks.TaskSpec) -> None:
    """The batched core and the gym env (a view on a core with n = 1) give identical trajectories."""
    task_list = list(spec.test_tasks[:6])
    core = gw.core_for(spec, task_list)
    rng = np.random.default_rng(1)
    recorded_actions, recorded = [], []
    # half planner, half random, so goals, keys and doors are actually reached
    for _ in range(4 * spec.episode_length):
        a = np.where(rng.random(core.n) < 0.5, gw.plan_batch(core), rng.integers(0, 5, core.n))
        obs, r, term, trunc = core.step(a)
        recorded_actions.append(a)
        recorded.append((obs, r, term, trunc))
        core.reset(term | trunc)
    acts = np.array(recorded_actions)
    assert sum(float(r.sum()) for _, r, _, _ in recorded) > 0
    for i, task in enumerate(task_list):
        got = _rollout(spec.make(task), [int(a) for a in acts[:, i]], seed=None)
        want = [(int(o[i]), float(r[i]), bool(te[i]), bool(tr[i])) for o, r, te, tr in recorded]
        assert got == want, f"task {task}"


def test_render_ansi() -> None:
    env = gw.DarkKeyToDoorEnv(task=((0, 0), (8, 8)), render_mode="ansi")
    env.reset(seed=0)
    lines = env.render().splitlines()
    assert lines[0][0] == "K" and lines[8][8] == "D" and lines[4][4] == "A"


# ------------------------------------------------------------------------------------------------ dynamics


def test_actions_and_walls() -> None:
    env = gw.DarkRoomEnv(goal=(0, 0))
    obs, _ = env.reset(seed=0)
    assert obs == 4 * 9 + 4  # centre, cell index y * 9 + x
    for action, expected in [(1, (4, 3)), (2, (5, 3)), (3, (5, 4)), (4, (4, 4)), (0, (4, 4))]:
        obs, *_ = env.step(action)
        assert divmod(int(obs), 9)[::-1] == expected
    for _ in range(6):
        obs, *_ = env.step(4)  # into the west wall: stays at x = 0
    assert int(obs) == 4 * 9 + 0


def test_episode_end_and_frozen_core() -> None:
    core = gw.DarkRoomCore([(4, 4), (0, 0)], sparse=True)
    _, r, term, trunc = core.step(np.array([0, 0]))
    assert r.tolist() == [1.0, 0.0] and term.tolist() == [True, False] and not trunc.any()
    # an ended episode stays frozen: no reward, no second termination, no movement
    for _ in range(19):
        obs, r, term, trunc = core.step(np.array([1, 0]))
        assert r[0] == 0 and not term[0] and not trunc[0] and obs[0] == 40
    assert trunc[1] and core.done.all()
    assert core.reset(np.array([False, True])).tolist() == [40, 40] and core.done.tolist() == [True, False]


def test_key_before_door() -> None:
    env = gw.DarkKeyToDoorEnv(task=((5, 4), (4, 4)))  # door on the start cell, key one step right
    env.reset(seed=0)
    assert env.step(0)[1:4] == (0.0, False, False)  # on the door without the key: nothing
    assert env.step(2)[1:4] == (1.0, False, False)  # key
    assert env.step(2)[1:4] == (0.0, False, False)  # key only pays once
    assert env.step(4)[1:4] == (0.0, False, False)
    assert env.step(4)[1:4] == (1.0, True, False)  # door with the key
    env = gw.DarkKeyToDoorEnv(task=((4, 4), (0, 0)))  # key on the start cell: a no-op picks it up
    env.reset(seed=0)
    assert env.step(0)[1] == 1.0


# ------------------------------------------------------------------------------------------------ optima


def _room_table(size: int) -> np.ndarray:
    """next[cell, action], written out independently of the module under test."""
    moves = {0: (0, 0), 1: (0, -1), 2: (1, 0), 3: (0, 1), 4: (-1, 0)}
    table = np.zeros((size * size, 5), dtype=np.int64)
    for y in range(size):
        for x in range(size):
            for a, (dx, dy) in moves.items():
                nx, ny = min(max(x + dx, 0), size - 1), min(max(y + dy, 0), size - 1)
                table[y * size + x, a] = ny * size + nx
    return table


def _dp_optimum(spec: tasks.TaskSpec, task_list: list) -> np.ndarray:
    """Exact optimal return per task by backward induction over (time, cell[, has_key])."""
    env = spec.make(task_list[0]).unwrapped
    size, horizon = env.size, spec.episode_length
    nxt = _room_table(size)
    start = (size // 2) * size + size // 2
    if isinstance(env, gw.DarkKeyToDoorEnv):
        arr = np.array(task_list)
        key = (arr[:, 0, 1] * size + arr[:, 0, 0])[:, None, None]
        door = (arr[:, 1, 1] * size + arr[:, 1, 0])[:, None, None]
        v0 = v1 = np.zeros((len(task_list), size * size))
        for _ in range(horizon):
            v0, v1 = (
                np.where(nxt == key, 1 + v1[:, nxt], v0[:, nxt]).max(-1),
                np.where(nxt == door, 1.0, v1[:, nxt]).max(-1),
            )
        return v0[:, start]
    goal = np.array([y * size + x for x, y in task_list])[:, None, None]
    v = np.zeros((len(task_list), size * size))
    for _ in range(horizon):
        hit = nxt == goal
        v = (np.where(hit, 1.0, v[:, nxt]) if env.sparse else hit + v[:, nxt]).max(-1)
    return v[:, start]


def test_dark_room_optimum_formula() -> None:
    """Goal on the start cell: 20 (no-op throughout); goal at distance d >= 1: 21 - d."""
    spec = tasks.get_task("DarkRoom-v0")
    goals = [(x, y) for y in range(9) for x in range(9)]
    dp = _dp_optimum(spec, goals)
    d = np.array([abs(x - 4) + abs(y - 4) for x, y in goals])
    assert np.array_equal(dp, np.where(d == 0, 20, 21 - d))
    for goal, expected in [((4, 4), 20.0), ((4, 3), 20.0), ((0, 0), 13.0), ((8, 1), 14.0)]:
        env = spec.make(goal)  # through gym.make and its wrappers, with the spec's planner
        act = load_target(spec.planner)
        env.reset(seed=0)
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(act(env))
            total, done = total + r, term or trunc
        assert total == expected, goal


def test_planner_optimal_on_every_test_task(spec: tasks.TaskSpec) -> None:
    tests = list(spec.test_tasks)
    dp = _dp_optimum(spec, tests)
    core = gw.core_for(spec, tests)
    got = np.zeros(core.n)
    while not core.done.all():
        got += core.step(gw.plan_batch(core))[1]
    assert np.array_equal(got, dp)
    expected = {"DarkRoom-v0": None, "DarkRoomHard-v0": 1.0, "DarkKeyToDoor-v0": 2.0}[spec.id]
    if expected is not None:  # every task is solvable within the horizon
        assert (dp == expected).all()
    assert load_target(spec.reference.compute)(spec, spec.test_tasks) == pytest.approx(dp.mean())


def test_random_reference_far_below_optimum(spec: tasks.TaskSpec) -> None:
    rollout = load_target(spec.random_rollout)
    random = rollout(spec, spec.test_tasks, spec.random_episodes, 12345)
    assert random == rollout(spec, spec.test_tasks, spec.random_episodes, 12345)  # seeded
    assert 0 < random < 0.2 * gw.optimal_return(spec, spec.test_tasks)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"goal": (9, 0)}, "(9, 0)"),
        ({"goal": (-1, 3)}, "(-1, 3)"),
        ({"goal": (1,)}, "(1,)"),
        ({"goal": (1.5, 2)}, "(1.5, 2)"),
        ({"goal": "ab"}, "'ab'"),
    ],
)
def test_bad_goal(kwargs: dict, needle: str) -> None:
    with pytest.raises(gw.GridTaskError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        gw.DarkRoomEnv(**kwargs)
    with pytest.raises(gw.GridTaskError):
        tasks.get_task("DarkRoom-v0").make(kwargs["goal"])


@pytest.mark.parametrize(
    ("task", "needle"),
    [
        (((1, 1), (1, 1)), "different cells"),
        (((1, 1), (9, 9)), r"\(9, 9\)"),
        (((1, 1),), "task must be"),
        (((1, 1), (2, 2), (3, 3)), "task must be"),
        (((1, 1), (2,)), "door"),
    ],
)
def test_bad_key_door(task: tuple, needle: str) -> None:
    with pytest.raises(gw.GridTaskError, match=needle):
        gw.DarkKeyToDoorEnv(task=task)


def test_bad_core_inputs_and_actions() -> None:
    with pytest.raises(gw.GridTaskError, match="shape"):
        gw.DarkRoomCore(np.zeros((3, 3), dtype=int))
    with pytest.raises(gw.GridTaskError, match="task 1"):
        gw.KeyToDoorCore([((0, 0), (1, 1)), ((2, 2), (2, 2))])
    core = gw.DarkRoomCore([(0, 0), (1, 1)])
    for bad in ([0, 5], [-1, 0], [0], [0.0, 1.0]):
        with pytest.raises(gw.InvalidActionError):
            core.step(np.array(bad))
    env = gw.DarkRoomEnv(goal=(0, 0))
    env.reset(seed=0)
    with pytest.raises(gw.InvalidActionError, match="7"):
        env.step(7)
    assert issubclass(gw.GridTaskError, AdaptBenchError) and issubclass(gw.GridTaskError, ValueError)


# ------------------------------------------------------------------------------------------------ splits


def test_split(spec: tasks.TaskSpec) -> None:
    train, test = spec.train_tasks, spec.test_tasks
    assert (len(train), len(test)) == SPLIT_SIZES[spec.id]
    assert not set(train) & set(test) and len(set(train)) == len(train) and len(set(test)) == len(test)
    env = spec.make(test[0]).unwrapped
    size = env.size
    cells = [(x, y) for y in range(size) for x in range(size)]
    family = cells if spec.task_kwarg == "goal" else [(k, d) for k in cells for d in cells if k != d]
    assert set(train) | set(test) == set(family)
    digest = hashlib.sha256(repr((train, test)).encode()).hexdigest()[:16]
    assert digest == SPLIT_HASHES[spec.id], "the split changed: that is a new task version"
    assert spec.make(test[0]).unwrapped.task == test[0]
    assert spec.planner == "tasks.gridworld:planner" and spec.random_episodes == 100
    assert {p: spec.budget(p).train_steps > 0 for p in tasks.PRESETS} == dict.fromkeys(tasks.PRESETS, True)
