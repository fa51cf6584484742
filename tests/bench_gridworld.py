"""Speed of the batched grid-world cores against the single Gymnasium env, measured in one run.

Run: ``python -m pytest tests/bench_gridworld.py --benchmark-only`` (the default addopts skip benchmarks).
The batched core steps 1,024 tasks at once; the single env is made with ``gym.make`` (its wrappers included,
as a user would get it). Both reset finished episodes and replay pre-drawn uniform random actions, so action
sampling is not timed. The ratio of steps/s is reported and asserted >= 20x: a benchmark, not a unit test.
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest

import tasks
from tasks import gridworld as gw

N_TASKS = 1024
BATCH_STEPS = 100  # lockstep steps per benchmark round: 102,400 env steps
SINGLE_STEPS = 20_000
MIN_RATIO = 20.0


def _single_env_steps_per_s(spec: tasks.TaskSpec, repeats: int = 3) -> float:
    env = gym.make(spec.gym_id, **{spec.task_kwarg: spec.train_tasks[0]})
    actions = [int(a) for a in np.random.default_rng(1).integers(0, gw.NUM_ACTIONS, SINGLE_STEPS)]
    best = float("inf")
    for _ in range(repeats):  # best of a few, like the benchmark's min, on a shared machine
        env.reset(seed=0)
        start = time.perf_counter()
        for a in actions:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()
        best = min(best, time.perf_counter() - start)
    env.close()
    return SINGLE_STEPS / best


@pytest.mark.parametrize("task_id", ["DarkRoom-v0", "DarkRoomHard-v0", "DarkKeyToDoor-v0"])
def test_batched_vs_single_env(benchmark, capsys: pytest.CaptureFixture, task_id: str) -> None:
    spec = tasks.get_task(task_id)
    train = spec.train_tasks
    core = gw.core_for(spec, [train[i % len(train)] for i in range(N_TASKS)])
    actions = np.random.default_rng(0).integers(0, gw.NUM_ACTIONS, (BATCH_STEPS, N_TASKS))

    def batched() -> None:
        for a in actions:
            core.step(a)
            if np.count_nonzero(core.done):
                core.reset(core.done)

    benchmark.pedantic(batched, rounds=20, warmup_rounds=2)
    batched_sps = N_TASKS * BATCH_STEPS / benchmark.stats.stats.min
    single_sps = _single_env_steps_per_s(spec)
    ratio = batched_sps / single_sps
    benchmark.extra_info.update(batched_steps_per_s=batched_sps, single_steps_per_s=single_sps, ratio=ratio)
    with capsys.disabled():
        print(f"\n{task_id}: batched ({N_TASKS} tasks) {batched_sps:,.0f} steps/s, "
              f"single gym env {single_sps:,.0f} steps/s, ratio {ratio:,.0f}x")
    assert ratio >= MIN_RATIO
