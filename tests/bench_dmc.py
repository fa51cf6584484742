"""Speed of the pixel DMC envs with cheap rendering (``fast_render=True``) against DMC's default, in one run.

Run: ``python -m pytest tests/bench_dmc.py --benchmark-only`` (the default addopts skip benchmarks).
Both envs are made with ``gym.make`` (wrappers included, as a user gets them) and replay the same pre-drawn
uniform random actions, so action sampling is not timed; every agent step renders one 84x84 frame.
Frames are counted as the budgets count them: physics control steps = agent steps x action repeat 2.
The speed-up of fast over default rendering is reported, not asserted: it depends on the GL backend
(~2-2.5x with Mesa's software EGL on a CPU; a GPU renders both quickly).
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest

import tasks
from tasks.dmc import SPECS

STEPS = 50  # agent steps per round: 50 rendered frames, 100 physics frames
BY_ID = {spec.id: spec for spec in SPECS}


def _make(spec_id: str, **kwargs) -> gym.Env:
    spec = BY_ID[spec_id]
    if spec.id not in tasks.task_registry:  # normally registered by `import tasks`
        tasks.register_task(spec)
    return gym.make(spec.gym_id, **kwargs)


def _stepper(env: gym.Env):
    actions = np.random.default_rng(0).uniform(-1, 1, (STEPS, *env.action_space.shape)).astype(np.float32)
    env.reset(seed=0)

    def run() -> None:
        for a in actions:  # 50 steps never reach the 500-step time limit from one reset...
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:  # ...but rounds add up, so reset when they do
                env.reset()

    return run


def _seconds_per_round(env: gym.Env, rounds: int = 3) -> float:
    run = _stepper(env)
    run()  # warm-up: GL context, caches
    best = float("inf")
    for _ in range(rounds):  # best of a few, like the benchmark's min, on a shared machine
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("spec_id", ["DMC-walker-walk-v0", "DMC-quadruped-run-v0"])
def test_fast_vs_default_render(benchmark, capsys: pytest.CaptureFixture, spec_id: str) -> None:
    fast, default = _make(spec_id), _make(spec_id, fast_render=False)
    benchmark.pedantic(_stepper(fast), rounds=5, warmup_rounds=1)
    fast_s = benchmark.stats.stats.min
    default_s = _seconds_per_round(default)
    repeat = BY_ID[spec_id].kwargs["action_repeat"]
    info = {
        "fast_frames_per_s": STEPS * repeat / fast_s,
        "default_frames_per_s": STEPS * repeat / default_s,
        "fast_renders_per_s": STEPS / fast_s,
        "default_renders_per_s": STEPS / default_s,
        "speedup": default_s / fast_s,
    }
    benchmark.extra_info.update(info)
    with capsys.disabled():
        print(
            f"\n{spec_id}: env frames/s with rendering: fast {info['fast_frames_per_s']:.0f}, "
            f"default {info['default_frames_per_s']:.0f} -> fast render is {info['speedup']:.2f}x faster"
        )
    fast.close(), default.close()


class _PerFrameCamera:
    """Swaps the env's kept camera for dm_control's ``physics.render`` (a new Camera and scene every frame),
    the renderer before the kept camera, to measure what keeping it saves."""

    def __init__(self, env: gym.Env) -> None:
        self.env = env.unwrapped

    def __enter__(self):
        env = self.env

        def per_frame() -> np.ndarray:
            pixels = env._env.physics.render(env.size, env.size, camera_id=env.camera_id)
            return np.ascontiguousarray(pixels.transpose(2, 0, 1))

        env._render_frame = per_frame
        return self

    def __exit__(self, *exc) -> None:
        del self.env._render_frame  # back to the class's method


@pytest.mark.parametrize("spec_id", ["DMC-walker-walk-v0", "DMC-cheetah-run-v0"])
def test_kept_camera_vs_per_frame_camera(benchmark, capsys: pytest.CaptureFixture, spec_id: str) -> None:
    env = _make(spec_id)
    benchmark.pedantic(_stepper(env), rounds=5, warmup_rounds=1)
    kept_s = benchmark.stats.stats.min
    with _PerFrameCamera(env):
        per_frame_s = _seconds_per_round(env)
    info = {"kept_ms_per_step": 1e3 * kept_s / STEPS, "per_frame_ms_per_step": 1e3 * per_frame_s / STEPS,
            "speedup": per_frame_s / kept_s}
    benchmark.extra_info.update(info)
    with capsys.disabled():
        print(f"\n{spec_id}: env step with rendering: kept camera {info['kept_ms_per_step']:.2f} ms, a new camera "
              f"per frame {info['per_frame_ms_per_step']:.2f} ms -> {info['speedup']:.2f}x")
    env.close()
