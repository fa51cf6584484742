"""Reference methods that anchor the normalised scale: ``random`` (≈ 0) and ``oracle`` (= 100).

They prove the pipeline end to end and are registered through the same entry-point group as any plugin.
"""

from __future__ import annotations

from typing import Any

from bench.evaluation import (
    EVAL_KEY,
    control_eval_points,
    core_in_context_returns,
    evaluate_episodes,
    in_context_returns,
    log_in_context,
)
from bench.method import RunContext
from bench.registry import load_target
from tasks.spec import TaskSpec


class _RandomPolicy:
    def begin_task(self, env: Any) -> None:
        pass

    def act(self, env: Any, obs: Any) -> Any:
        return env.action_space.sample()

    def observe(self, obs: Any, action: Any, reward: float, done: bool) -> None:
        pass


class _PlannerPolicy:
    def __init__(self, planner) -> None:
        self.planner = planner

    def begin_task(self, env: Any) -> None:
        pass

    def act(self, env: Any, obs: Any) -> Any:
        return self.planner(env.unwrapped)

    def observe(self, obs: Any, action: Any, reward: float, done: bool) -> None:
        pass


class RandomMethod:
    """Uniform random actions (seeded through the env's action space)."""

    name = "random"

    def supports(self, task: TaskSpec) -> bool:
        return True

    def run(self, ctx: RunContext) -> None:
        if ctx.task.family == "in-context":
            if ctx.task.batched_core is not None:  # all held-out tasks at once
                env = ctx.task.make()
                n_actions = int(env.action_space.n)
                env.close()
                log_in_context(ctx, core_in_context_returns(ctx, lambda core, rng: rng.integers(0, n_actions,
                                                                                                core.num_envs)))
            else:
                log_in_context(ctx, in_context_returns(ctx, _RandomPolicy))
            return
        env = ctx.task.make()
        env.action_space.seed(ctx.seed)
        points = control_eval_points(ctx)
        for i, frame in enumerate(points):  # random does not learn: each point is a fresh evaluation
            ctx.log(frame, {EVAL_KEY: evaluate_episodes(ctx, env, _RandomPolicy(), ctx.budget.eval_episodes)})
            ctx.progress((i + 1) / len(points), f"frame {frame}")
        env.close()


class OracleMethod:
    """The task's shortest-path planner (gridworld families): the top of the normalised scale."""

    name = "oracle"

    def supports(self, task: TaskSpec) -> bool | str:
        return True if task.planner else f"task `{task.id}` has no shortest-path planner"

    def run(self, ctx: RunContext) -> None:
        if ctx.task.batched_core is not None:  # the core's expert is the same shortest-path planner, batched
            log_in_context(ctx, core_in_context_returns(ctx, lambda core, rng: core.expert_actions()))
            return
        planner = load_target(ctx.task.planner)  # type: ignore[arg-type]
        log_in_context(ctx, in_context_returns(ctx, lambda: _PlannerPolicy(planner)))

