"""UCB1, the source algorithm of Algorithm Distillation on the Adversarial Bandit (``tasks.bandit``).

Paper: AD, Laskin et al. 2022, https://arxiv.org/abs/2210.14215 (Sec. 5: UCB generates the bandit's learning
histories). UCB1: Auer, Cesa-Bianchi and Fischer 2002, "Finite-time analysis of the multiarmed bandit problem".

One independent learner per task, batched. A learner's counts and mean rewards persist across the episodes of
its whole history (they are never reset at an episode boundary), so its per-episode return rises from that of
uniform pulls towards the best arm's: that rise is what AD distils. Pull ``t`` (counted over the whole history,
from 1) goes to an arm never pulled yet (a random one among them, drawn from the seed), else to
``argmax_a mean_a + c * sqrt(2 ln t / n_a)``; ``c = 1`` is UCB1 itself.

Registered as the bandit spec's ``source_learner``: :func:`learning_histories` has the signature documented on
:attr:`tasks.spec.TaskSpec.source_learner` and is called by ``baselines.histories``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.registry import AdaptBenchError, load_target
from tasks.spec import TaskSpec

__all__ = ["BatchedUCB", "UCBError", "learning_histories"]

EXPLORATION = 1.0
"""``c`` of the bonus ``c * sqrt(2 ln t / n)``: 1 = UCB1. Part of the algorithm; changing it changes the data."""


class UCBError(AdaptBenchError, ValueError):
    """A task UCB cannot learn (no bandit core) or a bad setting."""


class BatchedUCB:
    """``n`` independent UCB1 learners over ``arms`` arms; :meth:`act` picks, :meth:`update` learns."""

    def __init__(self, n: int, arms: int, rng: np.random.Generator, exploration: float = EXPLORATION) -> None:
        if exploration < 0:
            raise UCBError(f"exploration must be >= 0, got {exploration!r}")
        self.n, self.arms, self.exploration, self.rng = n, arms, exploration, rng
        self.counts = np.zeros((n, arms), dtype=np.int64)
        self.sums = np.zeros((n, arms), dtype=np.float64)
        self.t = 0
        self._rows = np.arange(n)

    def act(self) -> np.ndarray:
        """``(n,)`` int64 arms for the next pull of every learner."""
        u = self.rng.random((self.n, self.arms))  # random order among untried arms; drawn every pull, so fixed
        tried = self.counts > 0
        n = np.maximum(self.counts, 1)
        bonus = self.exploration * np.sqrt(2.0 * np.log(max(self.t, 1)) / n)
        score = np.where(tried, self.sums / n + bonus, np.inf)
        best = score.max(axis=1, keepdims=True)
        # ties (untried arms, all at inf) are broken at random; tried arms' float scores rarely tie
        return np.argmax(np.where(score == best, u, -1.0), axis=1).astype(np.int64)

    def update(self, arms: np.ndarray, rewards: np.ndarray) -> None:
        self.t += 1
        self.counts[self._rows, arms] += 1
        self.sums[self._rows, arms] += rewards


def learning_histories(spec: TaskSpec, tasks: Sequence[Any], steps: int, seed: int,
                       progress: Callable[[float, str], None] | None = None) -> dict[str, np.ndarray]:
    """UCB1 on every task of ``tasks`` for ``steps`` pulls each, episodes restarting automatically.

    Returns ``(len(tasks), steps)`` arrays ``obs`` uint8 (always 0), ``actions`` uint8, ``rewards`` float32 and
    ``dones`` bool (see :attr:`tasks.spec.TaskSpec.source_learner`). ``seed`` fixes both the tie-breaking and the
    reward noise.
    """
    from tasks.bandit import NUM_ARMS, BanditCore

    if spec.batched_core is None:
        raise UCBError(f"task `{spec.id}` has no batched core")
    core = load_target(spec.batched_core)(spec, list(tasks))
    if not isinstance(core, BanditCore):
        raise UCBError(f"UCB learns bandits; `{spec.id}` has a {type(core).__name__}")
    learner_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    core.rng = noise_rng  # the data depend on `seed` only, not on the noise seed core_for derives from the tasks
    n = core.num_envs
    ucb = BatchedUCB(n, NUM_ARMS, learner_rng)
    out = {"obs": np.zeros((n, steps), np.uint8), "actions": np.zeros((n, steps), np.uint8),
           "rewards": np.zeros((n, steps), np.float32), "dones": np.zeros((n, steps), bool)}
    out["obs"][:, 0] = core.reset()
    report = max(1, steps // 100)
    for t in range(steps):
        arms = ucb.act()
        obs, reward, terminated, truncated = core.step(arms)
        ucb.update(arms, reward)
        done = terminated | truncated
        out["actions"][:, t], out["rewards"][:, t], out["dones"][:, t] = arms, reward, done
        if done.any():
            obs = core.reset(done)
        if t + 1 < steps:
            out["obs"][:, t + 1] = obs
        if progress is not None and (t + 1) % report == 0:
            progress((t + 1) / steps, f"UCB pull {t + 1}/{steps} per task")
    return out
