"""PixelWatermaze: Gymnasium contract, core/env/MiniGrid identity, planner optimum, split, invisibility."""

from __future__ import annotations

import hashlib

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from tasks import watermaze as wm
from tasks.references import get_references

SPEC = wm.SPECS[0]
ALL_PLATFORMS = SPEC.train_tasks + SPEC.test_tasks


def rollout(env, actions) -> tuple[list[np.ndarray], list[float], list[bool], list[bool]]:
    obs, _ = env.reset(seed=0)
    seen, rewards, terms, truncs = [obs], [], [], []
    for a in actions:
        obs, r, term, trunc, _ = env.step(a)
        seen.append(obs)
        rewards.append(r)
        terms.append(term)
        truncs.append(trunc)
    return seen, rewards, terms, truncs


def test_spec_contract() -> None:
    assert SPEC.id == "PixelWatermaze-v0"
    assert (SPEC.family, SPEC.observation, SPEC.actions) == ("in-context", "pixels", "discrete")
    assert SPEC.task_kwarg == "platform" and SPEC.episode_length == wm.EPISODE_LENGTH == 50
    assert SPEC.budget("smoke").num_train_tasks == 3 and SPEC.budget("smoke").num_test_tasks == 2
    env = SPEC.make(SPEC.test_tasks[0])
    assert env.unwrapped.platform == SPEC.test_tasks[0]
    assert env.observation_space.shape == (54, 54, 3) and env.observation_space.dtype == np.uint8
    assert env.action_space.n == 3
    env.close()


@pytest.mark.parametrize("render_mode", [None, "rgb_array"])
def test_check_env(render_mode: str | None) -> None:
    check_env(SPEC.make(SPEC.test_tasks[0], render_mode=render_mode).unwrapped)


def test_same_seed_determinism() -> None:
    actions = np.random.default_rng(0).integers(3, size=wm.EPISODE_LENGTH)
    a = rollout(SPEC.make(SPEC.test_tasks[1]), actions)
    b = rollout(SPEC.make(SPEC.test_tasks[1]), actions)
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert a[1:] == b[1:]
    assert a[3][-1] and not any(a[3][:-1]) and not any(a[2])  # truncated exactly at step 50, never terminated


def test_core_matches_env_and_minigrid() -> None:
    """The batched core, the Gymnasium env and MiniGrid's own stepping agree on every step."""
    platforms = np.array(SPEC.test_tasks)
    actions = np.random.default_rng(1).integers(3, size=(wm.EPISODE_LENGTH, len(platforms)))
    core = wm.WatermazeCore(platforms)
    core_obs = [core.reset()]
    core_out = [core.step(a) for a in actions]
    core_obs += [o for o, *_ in core_out]
    for i, platform in enumerate(SPEC.test_tasks):
        obs, rewards, terms, truncs = rollout(SPEC.make(platform), actions[:, i])
        for t, o in enumerate(obs):
            assert np.array_equal(o, core_obs[t][i]), (platform, t)
        assert rewards == [float(out[1][i]) for out in core_out]
        assert terms == [bool(out[2][i]) for out in core_out]
        assert truncs == [bool(out[3][i]) for out in core_out]

    # independent check of the tables: step MiniGrid itself with the same actions
    room = wm._minigrid_room()
    env = SPEC.make(SPEC.test_tasks[0])
    obs, _ = env.reset(seed=0)
    assert np.array_equal(obs, room.get_pov_render(wm.TILE_SIZE))
    for a in actions[:, 0]:
        obs, reward, *_, info = env.step(a)
        room.step(int(a))
        assert info["agent_pos"] == tuple(room.agent_pos) and info["agent_dir"] == room.agent_dir
        assert np.array_equal(obs, room.get_pov_render(wm.TILE_SIZE))
        assert reward == float(tuple(room.agent_pos) == SPEC.test_tasks[0])


@pytest.mark.parametrize("platform", ALL_PLATFORMS)
def test_planner_reaches_the_optimum(platform: tuple[int, int]) -> None:
    env = SPEC.make(platform)
    env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        _, r, term, trunc, _ = env.step(wm.planner(env))
        total += r
        done = term or trunc
    assert total == wm.optimal_returns([platform])[0]
    assert total >= wm.EPISODE_LENGTH - 14  # no platform is more than 14 actions from the start


def test_references_and_random_far_below_optimum(tmp_path) -> None:
    refs = get_references(SPEC, "paper", cache_dir=tmp_path)
    assert refs.reference == pytest.approx(float(np.mean(wm.optimal_returns(SPEC.test_tasks))))
    assert refs.random == wm.random_return(SPEC, SPEC.test_tasks, SPEC.random_episodes, 12345)  # seeded: reproducible
    assert 0.0 < refs.random < 0.1 * refs.reference


def test_expert_actions_batched_equal_planner() -> None:
    core = wm.WatermazeCore(np.array(SPEC.test_tasks))
    core.reset()
    for a in np.random.default_rng(2).integers(3, size=(10, len(SPEC.test_tasks))):
        core.step(a)
    expert = core.expert_actions()
    for i, platform in enumerate(SPEC.test_tasks):
        single = wm.WatermazeCore(np.array([platform]))
        single.reset()
        single.state[:] = core.state[i]
        assert expert[i] == single.expert_actions()[0]


@pytest.mark.parametrize(
    ("platform", "words"),
    [
        ((0, 3), "on a wall"),
        ((8, 8), "on a wall"),
        ((4, 0), "on a wall"),
        ((9, 1), "off the"),
        ((-1, 2), "off the"),
        ((1, 2, 3), "pair"),
        ((1.5, 2), "integers"),
        ("ab", "pair"),
    ],
)
def test_bad_platform(platform, words: str) -> None:
    with pytest.raises(wm.WatermazeError, match=words) as err:
        wm.WatermazeEnv(platform=platform)
    assert str(platform[0]) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_core_input() -> None:
    with pytest.raises(wm.WatermazeError, match=r"shape \(3,\)"):
        wm.WatermazeCore(np.array([1, 2, 3]))
    with pytest.raises(wm.WatermazeError, match="on a wall"):
        wm.WatermazeCore(np.array([[1, 1], [0, 5]]))
    core = wm.WatermazeCore(np.array([[1, 1], [2, 2]]))
    with pytest.raises(wm.WatermazeError, match="before reset"):
        core.step(np.array([0, 0]))
    core.reset()
    with pytest.raises(wm.WatermazeError, match=r"\[0, 3\)"):
        core.step(np.array([0, 3]))
    with pytest.raises(wm.WatermazeError, match=r"shape \(1,\)"):
        core.step(np.array([0]))
    with pytest.raises(wm.WatermazeError, match="float"):
        core.step(np.array([0.0, 1.0]))
    for _ in range(wm.EPISODE_LENGTH):
        core.step(np.array([2, 2]))
    with pytest.raises(wm.WatermazeError, match="truncated"):
        core.step(np.array([2, 2]))
    with pytest.raises(wm.WatermazeError, match="human"):
        wm.WatermazeEnv(render_mode="human")
    with pytest.raises(wm.WatermazeError, match="WatermazeEnv"):
        wm.planner(gym.Env())


def test_split_is_fixed() -> None:
    assert (len(SPEC.train_tasks), len(SPEC.test_tasks)) == (38, 10)
    assert wm.START_POS not in ALL_PLATFORMS and len(set(ALL_PLATFORMS)) == 48
    digest = hashlib.sha256(repr((SPEC.train_tasks, SPEC.test_tasks)).encode()).hexdigest()
    assert digest == "eb8ed6155efbb90ac08db68f3b9bd9d8fcf921db7e145e013b7913671a91c99d"


def test_platform_is_invisible() -> None:
    """Two platforms on one path: same images at every step (before, on and after each), different rewards."""
    actions = [2, 2, 2, 0, 2, 2] + [1] * (wm.EPISODE_LENGTH - 6)  # north to (4, 1), then west to (2, 1)
    a = rollout(SPEC.make((4, 2)), actions)
    b = rollout(SPEC.make((3, 1)), actions)
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    assert a[1][:3] == [0.0, 1.0, 0.0] and b[1][:6] == [0.0] * 4 + [1.0, 0.0]
    views, _ = wm.tables()
    assert not (views.reshape(-1, 3) == [0, 255, 0]).all(axis=1).any()  # no green goal pixel anywhere


def test_visual_cues_identify_every_pose() -> None:
    views, _ = wm.tables()
    flat = views.reshape(wm.NUM_STATES, -1)
    assert len({row.tobytes() for row in flat}) == wm.NUM_STATES
    assert not views.flags.writeable


def test_render_shows_top_down_frame() -> None:
    env = wm.WatermazeEnv(platform=(2, 6), render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (wm.GRID_SIZE * wm.RENDER_TILE_SIZE,) * 2 + (3,) and frame.dtype == np.uint8
    assert wm.WatermazeEnv(platform=(2, 6)).render() is None


def test_env_pickles_after_render_and_rejects_bad_actions() -> None:
    import pickle

    env = wm.WatermazeEnv(platform=(2, 6), render_mode="rgb_array")
    env.reset(seed=0)
    env.step(2)
    env.render()
    clone = pickle.loads(pickle.dumps(env))
    assert np.array_equal(clone.step(2)[0], env.step(2)[0])
    with pytest.raises(wm.WatermazeError, match="1 integers"):
        env.step([1, 2])
    with pytest.raises(wm.WatermazeError, match=r"\[0, 3\)"):
        env.step(3)
