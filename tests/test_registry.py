"""Every registered task (third-party ones included) and every registered method, end to end.

Parametrised over the live registries as Gymnasium's ``tests/envs/test_envs.py`` and CleanRL's script runs are:
a task or method added later is checked without editing this file.
"""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import tasks
from bench.cli import main
from bench.methods import method_registry
from bench.runner import get_suite
from bench.store import ResultsStore

ALL_TASKS = [spec.id for spec in tasks.list_tasks()]


def _some_task(spec: tasks.TaskSpec):
    return spec.test_tasks[0] if spec.test_tasks else None


@pytest.mark.parametrize("task_id", ALL_TASKS)
def test_env_checker(task_id: str) -> None:
    spec = tasks.get_task(task_id)
    env = spec.make(_some_task(spec))
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


def _rollout(spec: tasks.TaskSpec, seed: int, steps: int):
    env = spec.make(_some_task(spec))
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out = [np.asarray(obs).copy()]
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        out += [np.asarray(obs).copy(), reward, terminated, truncated]
        if terminated or truncated:
            obs, _ = env.reset()
            out.append(np.asarray(obs).copy())
    env.close()
    return out


@pytest.mark.parametrize("task_id", ALL_TASKS)
def test_same_seed_same_rollout(task_id: str) -> None:
    spec = tasks.get_task(task_id)
    steps = 30 if spec.family == "control" else 120  # rendering makes control steps ~100x dearer
    a, b = _rollout(spec, 7, steps), _rollout(spec, 7, steps)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("task_id", ALL_TASKS)
def test_spec_contract(task_id: str) -> None:
    spec = tasks.get_task(task_id)
    assert spec.gym_id == f"adapt_bench/{task_id}"
    assert set(spec.budgets) >= {"smoke", "quick", "paper"}
    assert spec.reference.source.split(":")[0] in ("computed", "cited", "measured")
    if spec.family == "in-context":
        assert len(spec.test_split("quick")) >= 1 and not set(spec.train_tasks) & set(spec.test_tasks)


SMOKE = get_suite("smoke")


@pytest.mark.slow
@pytest.mark.parametrize("method", method_registry().names())
def test_every_method_runs_the_smoke_suite(method: str, tmp_path, cache_dir) -> None:
    """One seed of the smoke suite per method, through the CLI, every supported task ok and scored."""
    res = tmp_path / "results"
    code = main(["run", "--suite", "smoke", "--methods", method, "--seeds", "1", "--results-dir", str(res),
                 "--cache-dir", str(cache_dir)])
    store = ResultsStore(res)
    metas = [store.read_meta(i) for i in store.run_ids()]
    failed = [(m["task"], m["reason"]) for m in metas if m["status"] != "ok"]
    assert code == 0 and not failed, failed
    assert metas, f"{method} supports none of the smoke suite's tasks {SMOKE.tasks}"
    from bench.leaderboard import load_scores

    runs, _, _, messages = load_scores(res)
    assert not messages and np.isfinite(runs["final"]).all()
