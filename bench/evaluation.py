"""Shared evaluation protocols, so every method is scored the same way.

* In-context families: on each held-out task of the preset's test split, run ``budget.eval_trials``
  independent trials of ``budget.eval_episodes`` consecutive episodes (:func:`eval_tasks` lists them); row
  ``eval/return`` at ``axis="episode"``, step ``k`` = mean return over held-out tasks x trials of in-context
  episode ``k``; beside it ``eval/task/<i>`` (:func:`task_key`), the return on held-out task ``i`` of the preset's
  test split (mean over its trials), which ``bench per-task`` reads: a mean over tasks can hide tasks an agent
  found and then lost.
* Control families: ``budget.eval_episodes`` episodes at each evaluation point; row ``eval/return`` at
  ``axis="env_step"`` (frames).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from bench.method import RunContext
from bench.registry import load_target

EVAL_KEY = "eval/return"
TASK_KEY_PREFIX = "eval/task/"


def task_key(index: int) -> str:
    """The key of the per-task in-context rows of held-out task ``index`` (its place in the preset's test split)."""
    return f"{TASK_KEY_PREFIX}{index}"


class EpisodicPolicy(Protocol):
    """A policy that may adapt across episodes of one task (``begin_task`` resets its memory)."""

    def begin_task(self, env: Any) -> None: ...

    def act(self, env: Any, obs: Any) -> Any: ...

    def observe(self, obs: Any, action: Any, reward: float, done: bool) -> None: ...


def run_episode(env: Any, policy: EpisodicPolicy, seed: int | None) -> float:
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        action = policy.act(env, obs)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        done = bool(terminated or truncated)
        policy.observe(obs, action, float(reward), done)
    return total


def eval_tasks(ctx: RunContext) -> list:
    """The held-out tasks one in-context evaluation runs: the preset's test split, ``budget.eval_trials`` times
    (trial-major: ``[t0, t1, ..., t0, t1, ...]``). The mean over them is the mean over the test split."""
    return list(ctx.task.test_split(ctx.preset)) * ctx.budget.eval_trials


def in_context_returns(ctx: RunContext, make_policy: Callable[[], EpisodicPolicy]) -> np.ndarray:
    """Returns ``(len(eval_tasks(ctx)), eval_episodes)`` of a policy run in context on the held-out tasks."""
    test = eval_tasks(ctx)
    n_eps = ctx.budget.eval_episodes
    out = np.zeros((len(test), n_eps))
    seeds = ctx.rng.integers(0, 2**31 - 1, size=(len(test), n_eps))
    for i, task in enumerate(test):
        env = ctx.task.make(task)
        env.action_space.seed(int(seeds[i, 0]))
        policy = make_policy()
        policy.begin_task(env)
        for k in range(n_eps):
            out[i, k] = run_episode(env, policy, int(seeds[i, k]))
        env.close()
        ctx.progress((i + 1) / len(test), f"task {i + 1}/{len(test)}")
    return out


def core_in_context_returns(ctx: RunContext, act: Callable[[Any, np.random.Generator], np.ndarray]) -> np.ndarray:
    """:func:`in_context_returns` through the task's batched core: every held-out task x trial at once.

    ``act(core, rng)`` gives one action per env of the core at each step (``rng`` is seeded from ``ctx.rng``).
    Same protocol, ~1000x fewer Python calls than stepping Gymnasium envs one by one."""
    core = load_target(ctx.task.batched_core)(ctx.task, eval_tasks(ctx))
    rng = np.random.default_rng(ctx.rng.integers(2**63))
    n, episodes = core.num_envs, ctx.budget.eval_episodes
    out, ret, count = np.zeros((n, episodes)), np.zeros(n), np.zeros(n, np.int64)
    core.reset()
    while (count < episodes).any():
        _, reward, terminated, truncated = core.step(np.asarray(act(core, rng)))
        done = np.asarray(terminated | truncated)
        ret += reward
        ended = np.flatnonzero(done)
        k = count[ended]
        scored = k < episodes
        out[ended[scored], k[scored]] = ret[ended[scored]]
        ret[done] = 0.0
        count += done
        if ended.size:
            core.reset(done)
            ctx.progress(float(np.minimum(count, episodes).mean() / episodes), "in-context evaluation")
    return out


def log_in_context(ctx: RunContext, returns: np.ndarray) -> None:
    """Log returns ``(rows, episodes)`` as one ``eval/return`` row per in-context episode (the mean over rows) and,
    when the rows are trial-major repeats of the preset's test split (:func:`eval_tasks`, or the split itself, as a
    source learner runs it), one ``eval/task/<i>`` row per held-out task and episode (the mean over its trials)."""
    returns = np.asarray(returns, dtype=float)
    n_test = len(ctx.task.test_split(ctx.preset))
    per_task = None
    if returns.ndim == 2 and n_test and returns.shape[0] in (n_test, n_test * ctx.budget.eval_trials):
        per_task = returns.reshape(-1, n_test, returns.shape[1]).mean(axis=0)  # (n_test, episodes)
    for k, value in enumerate(returns.mean(axis=0)):
        row = {EVAL_KEY: float(value)}
        if per_task is not None:
            row.update({task_key(i): float(v) for i, v in enumerate(per_task[:, k])})
        ctx.log(k, row, axis="episode")


def control_eval_points(ctx: RunContext) -> list[int]:
    """Frames at which a control-family method evaluates: every ``eval_every`` frames and at the end."""
    total, every = ctx.budget.train_steps, ctx.budget.eval_every
    points = list(range(0, total + 1, every)) if every > 0 else [0]
    if points[-1] != total:
        points.append(total)
    return points


def evaluate_episodes(ctx: RunContext, env: Any, policy: EpisodicPolicy, episodes: int) -> float:
    """Mean return of ``episodes`` evaluation episodes (control families)."""
    seeds = ctx.rng.integers(0, 2**31 - 1, size=episodes)
    policy.begin_task(env)
    return float(np.mean([run_episode(env, policy, int(s)) for s in seeds]))
