"""DeepMind Control pixel tasks (tasks/dmc.py): API, DrQ-v2 wrappers, cheap rendering, backend errors.

Rendering costs ~5-25 ms a frame on a CPU (Mesa), so every test steps a handful of times at most.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import tasks
from bench.registry import UnknownNameError
from tasks.dmc import SPECS, DMCEnv, _ActionMap, random_return

ROOT = Path(__file__).resolve().parent.parent
BY_ID = {spec.id: spec for spec in SPECS}


def _make(spec_id: str, **kwargs) -> gym.Env:
    spec = BY_ID[spec_id]
    if spec.id not in tasks.task_registry:  # normally registered by `import tasks`
        tasks.register_task(spec)
    return gym.make(spec.gym_id, **kwargs)


def _rollout(env: gym.Env, seed: int, steps: int) -> tuple[list[np.ndarray], list[float]]:
    """Observations and rewards of ``steps`` steps of fixed pseudo-random actions after ``reset(seed)``."""
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, *env.action_space.shape)).astype(np.float32)
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for a in actions:
        obs, r, _, _, _ = env.step(a)
        observations.append(obs)
        rewards.append(r)
    return observations, rewards


def test_specs_follow_drqv2():
    expected = {"cartpole-swingup", "reacher-easy", "finger-spin", "ball_in_cup-catch", "cheetah-run",
                "walker-walk", "walker-run", "quadruped-run"}
    assert {s.id.removeprefix("DMC-").removesuffix("-v0") for s in SPECS} == expected
    for spec in SPECS:
        assert (spec.family, spec.observation, spec.actions) == ("control", "pixels", "continuous")
        assert spec.entry_point == "tasks.dmc:DMCEnv" and spec.episode_length == 500
        assert spec.kwargs["camera_id"] == (2 if spec.kwargs["domain"] == "quadruped" else 0)
        assert (spec.kwargs["frame_stack"], spec.kwargs["action_repeat"], spec.kwargs["size"]) == (3, 2, 84)
        assert spec.reference.value == 1000.0 and spec.reference.source.startswith("cited:")
        assert spec.random_rollout == "tasks.dmc:random_return" and spec.random_episodes == 10
        # DrQ-v2 cfgs/task: easy tasks 1.1M frames, medium 3.1M
        assert spec.budget("paper").train_steps in (1_100_000, 3_100_000)


@pytest.mark.parametrize("spec_id", sorted(BY_ID))
def test_check_env(spec_id):
    env = _make(spec_id)
    check_env(env.unwrapped)
    assert env.observation_space == gym.spaces.Box(0, 255, (9, 84, 84), np.uint8)
    assert env.action_space.dtype == np.float32 and env.action_space.low.min() == -1.0
    env.close()


def test_same_seed_same_trajectory():
    # reacher-easy: the target and both arm angles are random, so different seeds show different pixels
    env_a, env_b = _make("DMC-reacher-easy-v0"), _make("DMC-reacher-easy-v0")
    obs_a, rew_a = _rollout(env_a, seed=7, steps=5)
    obs_b, rew_b = _rollout(env_b, seed=7, steps=5)
    assert rew_a == rew_b
    for a, b in zip(obs_a, obs_b, strict=True):
        np.testing.assert_array_equal(a, b)
    other, _ = env_b.reset(seed=8)
    assert not np.array_equal(other, obs_a[0])
    env_a.close(), env_b.close()


def test_frame_stack_and_shapes():
    env = _make("DMC-walker-walk-v0")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    # DrQ-v2 fills the stack with the first frame
    np.testing.assert_array_equal(obs[0:3], obs[6:9])
    np.testing.assert_array_equal(obs[3:6], obs[6:9])
    nxt, *_ = env.step(np.ones(env.action_space.shape, np.float32))
    np.testing.assert_array_equal(nxt[0:6], obs[3:9])  # oldest frame dropped, the rest shift forward
    assert not np.array_equal(nxt[6:9], obs[6:9])  # a full-force action moves the walker
    env.close()


def test_action_repeat_sums_rewards():
    two, one = _make("DMC-cartpole-swingup-v0"), _make("DMC-cartpole-swingup-v0", action_repeat=1)
    two.reset(seed=3), one.reset(seed=3)
    action = np.array([0.7], np.float32)
    for _ in range(3):
        obs2, r2, *_ = two.step(action)
        obs1a, r1a, *_ = one.step(action)
        obs1b, r1b, *_ = one.step(action)
        assert r2 == pytest.approx(r1a + r1b, abs=1e-12) and r2 > 0
        np.testing.assert_array_equal(obs2[6:9], obs1b[6:9])  # the same physics state is shown
    two.close(), one.close()


def test_truncation_after_500_agent_steps():
    env = _make("DMC-cartpole-swingup-v0")
    env.reset(seed=0)
    # rendering is irrelevant here: a blank frame keeps 500 steps cheap
    blank = np.zeros((3, 84, 84), np.uint8)
    env.unwrapped._render_frame = lambda: blank
    steps, terminated, truncated = 0, False, False
    while not (terminated or truncated):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps += 1
    assert (steps, terminated, truncated) == (500, False, True)
    with pytest.raises(gym.error.ResetNeeded):
        env.unwrapped.step(env.action_space.sample())
    env.close()


def test_actions_are_clipped_and_rescaled():
    # quadruped's actuator ranges are not [-1, 1] (e.g. [-0.8, 0.8], [-1, 1.1]); DrQ-v2 rescales them
    act = _ActionMap(SimpleNamespace(shape=(2,), minimum=np.array([-0.8, -1.0]), maximum=np.array([0.8, 1.1])))
    np.testing.assert_allclose(act([-1, -1]), [-0.8, -1.0])
    np.testing.assert_allclose(act([1, 1]), [0.8, 1.1])
    np.testing.assert_allclose(act([0, 0]), [0.0, 0.05])
    np.testing.assert_allclose(act([5, -5]), [0.8, -1.0])  # clipped first
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        act([0.0, 0.0, 0.0])


@pytest.mark.parametrize("spec_id", ["DMC-cartpole-swingup-v0", "DMC-reacher-easy-v0"])
def test_fast_render_matches_default(spec_id):
    fast, default = _make(spec_id), _make(spec_id, fast_render=False)
    assert fast.unwrapped._env.physics.model.vis.global_.offwidth == 84
    frames_fast, _ = _rollout(fast, seed=1, steps=8)
    frames_default, _ = _rollout(default, seed=1, steps=8)
    diff = np.abs(np.stack(frames_fast).astype(np.int16) - np.stack(frames_default).astype(np.int16))
    # In [0, 255] units. Dropping MSAA only re-aliases edges: measured over 7 tasks x 40 states the mean
    # change is 0.83 (per task 0.57-1.59, reacher the most) and 4-12% of pixels change at all. A bound of
    # 2 (0.8% of full scale) fails on any real change (a wrong camera, missing shadows, another size).
    print(f"{spec_id}: mean |fast - default| = {diff.mean():.3f} / 255, changed pixels {np.mean(diff > 0):.3f}")
    assert diff.mean() < 2.0
    assert np.mean(diff > 0) < 0.25
    fast.close(), default.close()


_BACKEND_SCRIPT = textwrap.dedent("""
    import sys
    from tasks.dmc import DMCEnv, RenderBackendError
    try:
        DMCEnv("cartpole", "swingup")
    except RenderBackendError as exc:
        print(exc)
        sys.exit(3)
""")


@pytest.mark.parametrize(
    ("env_vars", "expected"),
    [
        ({"MUJOCO_GL": "bogus"}, ["MUJOCO_GL='bogus'", "must be one of", "libosmesa6"]),
        ({"MUJOCO_GL": "off"}, ["no usable OpenGL backend", "MUJOCO_GL='off'"]),
        # unset MUJOCO_GL with a PyOpenGL platform that neither EGL nor OSMesa accepts: both probes fail
        ({"PYOPENGL_PLATFORM": "bogus"}, ["MUJOCO_GL is unset", "MUJOCO_GL=egl:", "MUJOCO_GL=osmesa:", "libegl1"]),
    ],
    ids=["invalid-MUJOCO_GL", "rendering-off", "no-backend-works"],
)
def test_missing_backend_raises_clear_error(env_vars, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    proc = subprocess.run([sys.executable, "-c", _BACKEND_SCRIPT], env={**env, **env_vars}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    for text in expected:
        assert text in proc.stdout, proc.stdout


def test_unknown_domain_and_task():
    with pytest.raises(UnknownNameError, match="Did you mean `cartpole`"):
        DMCEnv("cartpol", "swingup")
    with pytest.raises(UnknownNameError, match="Unknown `walker` task `wlak`. Did you mean `walk`"):
        DMCEnv("walker", "wlak")
    with pytest.raises(ValueError, match="camera_id"):
        DMCEnv("cartpole", "swingup", camera_id=99)


def test_random_return_is_state_only_and_seeded():
    spec = BY_ID["DMC-cartpole-swingup-v0"]
    first = random_return(spec, (), episodes=1, seed=0)
    assert 0.0 <= first <= 1000.0
    assert random_return(spec, (), episodes=1, seed=0) == first
    assert random_return(spec, (), episodes=1, seed=1) != first


@pytest.mark.parametrize("spec_id", ["DMC-walker-walk-v0", "DMC-quadruped-run-v0"])
def test_kept_camera_renders_what_physics_render_does(spec_id):
    """The env keeps one Camera instead of physics.render's new Camera + scene per frame: same pixels."""
    env = tasks.get_task(spec_id).make()
    try:
        env.reset(seed=3)
        for _ in range(5):
            obs, *_ = env.step(env.action_space.sample())
            fresh = env.unwrapped._env.physics.render(env.unwrapped.size, env.unwrapped.size,
                                                      camera_id=env.unwrapped.camera_id)
            np.testing.assert_array_equal(obs[-3:], fresh.transpose(2, 0, 1))
    finally:
        env.close()
