"""sticky-random: uniform random actions, each repeated for `repeat` steps (a plugin example)."""

from dataclasses import dataclass

from bench.evaluation import EVAL_KEY, control_eval_points, evaluate_episodes, in_context_returns, log_in_context


@dataclass
class Config:
    repeat: int = 4
    """Steps each sampled action is held for."""


class _Policy:
    def __init__(self, repeat: int) -> None:
        self.repeat, self.left, self.action = repeat, 0, None

    def begin_task(self, env) -> None:
        self.left = 0

    def act(self, env, obs):
        if self.left == 0:
            self.action, self.left = env.action_space.sample(), self.repeat
        self.left -= 1
        return self.action

    def observe(self, obs, action, reward, done) -> None:
        if done:
            self.left = 0


class StickyRandom:
    """Random actions held for several steps."""

    name = "sticky-random"
    Config = Config
    presets = {"smoke": {"repeat": 2}}

    def supports(self, task):
        return True

    def run(self, ctx) -> None:
        make = lambda: _Policy(ctx.config.repeat)
        if ctx.task.family == "in-context":
            log_in_context(ctx, in_context_returns(ctx, make))
            return
        env = ctx.task.make()
        env.action_space.seed(ctx.seed)
        for frame in control_eval_points(ctx):
            ctx.log(frame, {EVAL_KEY: evaluate_episodes(ctx, env, make(), ctx.budget.eval_episodes)})
        env.close()
