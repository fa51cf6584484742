"""Adversarial Bandit: a 10-armed Bernoulli bandit whose best arm flips parity between training and evaluation.

AD paper (Laskin et al. 2022, arXiv 2210.14215, Sec. 5 and Fig. 3): a bandit with 10 arms and 100 pulls per
episode, as in RL² (Duan et al. 2016); reward is more likely under odd arms 95% of the time during training and
under even arms 95% of the time at evaluation, so the held-out tasks are *out of distribution*. UCB is the source
algorithm whose learning histories AD distils (``baselines.ucb``; the spec's ``source_learner``). The paper's
wording is recalled here, not re-checked against the PDF; the distribution below is our concrete reading of it.

## Task distribution (fixed, generated from ``SPLIT_SEED``)
A task is the tuple of the 10 arms' reward probabilities ``p``. One task is drawn as:

1. every arm: ``p_a = k / 100`` with ``k ~ U{0, ..., 49}`` (so ``p_a`` in ``[0.00, 0.49]``);
2. the best arm ``b``: with probability 0.95 uniform among the *favoured* arms, else uniform among the other
   five; favoured = the odd arms ``{1, 3, 5, 7, 9}`` for training tasks, the even arms ``{0, 2, 4, 6, 8}`` for
   the flipped (evaluation) distribution;
3. ``p_b = k / 100`` with ``k ~ U{50, ..., 100}``: the best arm is unique and at least 0.01 better than any other.

Splits: ``default_rng([SPLIT_SEED, 0])`` draws 1,100 training-distribution tasks: the first 1,000 are the train
split of both registered ids, the last 100 the held-out tasks of ``AdversarialBanditID-v0``;
``default_rng([SPLIT_SEED, 1])`` draws the 100 flipped-distribution held-out tasks of ``AdversarialBandit-v0``.

## In and out of distribution
Two ids share the dynamics and the train split and differ only in their held-out tasks:

* ``AdversarialBandit-v0``: held-out tasks from the flipped distribution (best arm even 95% of the time): the
  AD paper's out-of-distribution evaluation.
* ``AdversarialBanditID-v0``: 100 further tasks from the training distribution (best arm odd 95% of the time),
  disjoint from the train split: the in-distribution control.

A method trained on one id and evaluated on its held-out tasks therefore measures the ID or the OOD score; the
gap between the two ids' scores is the cost of the flip.

## References (computed exactly, per preset over the held-out tasks it evaluates)
* random: uniform pulls earn ``100 * mean(p)`` in expectation per episode (:func:`random_return`);
* reference: always pulling the best arm earns ``100 * max(p)`` (:func:`optimal_return`).

Over all 100 held-out tasks (quick, paper): random 29.53 and reference 73.00 for ``AdversarialBandit-v0``, 29.57
and 71.84 for ``AdversarialBanditID-v0``.

Batched core API (:class:`BanditCore`; ``core_for(spec, tasks)`` builds it)::

    core = BanditCore(probs, horizon=100, seed=0)   # probs: float (n, 10)
    obs = core.reset(mask=None)                     # (n,) int64 zeros: the bandit has one state
    obs, reward, terminated, truncated = core.step(actions)   # reward 0/1 float32; truncated after 100 pulls
    core.expert_actions()                           # (n,) the best arm of every task

Rewards are drawn with one uniform number per env and step from ``core.rng`` (drawn for every env, also those
whose episode is over, so an env's reward noise never depends on the others' actions or episode ends).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from bench.registry import AdaptBenchError
from tasks.spec import Budget, Reference, TaskSpec

__all__ = [
    "HORIZON", "ID_TEST_TASKS", "NUM_ARMS", "OOD_TEST_TASKS", "SPECS", "SPLIT_SEED", "TRAIN_TASKS",
    "AdversarialBanditEnv", "BanditCore", "BanditTaskError", "InvalidArmError", "core_for", "draw_tasks",
    "optimal_return", "planner", "random_return",
]

NUM_ARMS = 10
HORIZON = 100
# One seed for every split, fixed forever (the arXiv number of the AD paper, as in tasks.gridworld); changing it,
# or any number of the distribution below, is a new task version.
SPLIT_SEED = 221014215
FAVOURED_PROB = 0.95
ODD_ARMS = (1, 3, 5, 7, 9)
EVEN_ARMS = (0, 2, 4, 6, 8)
_CORE_SEED = 14215  # mixed with the tasks into the reward-noise seed of cores built by core_for


class BanditTaskError(AdaptBenchError, ValueError):
    """A task that is not 10 reward probabilities in [0, 1], or a batch of the wrong shape."""


class InvalidArmError(AdaptBenchError, ValueError):
    """An action outside ``{0, ..., 9}`` or a batch of the wrong shape."""


# -- Task distribution and splits ----------------------------------------------------------------------------------


def draw_tasks(rng: np.random.Generator, n: int, favoured: Sequence[int]) -> tuple[tuple[float, ...], ...]:
    """``n`` tasks of the module docstring's distribution whose best arm lies in ``favoured`` w.p. 0.95."""
    others = tuple(a for a in range(NUM_ARMS) if a not in favoured)
    out = []
    for _ in range(n):
        k = rng.integers(0, 50, NUM_ARMS)
        pool = favoured if rng.random() < FAVOURED_PROB else others
        k[pool[int(rng.integers(len(pool)))]] = rng.integers(50, 101)
        out.append(tuple(int(v) / 100 for v in k))
    return tuple(out)


_TRAIN_DISTRIBUTION = draw_tasks(np.random.default_rng([SPLIT_SEED, 0]), 1_100, ODD_ARMS)
TRAIN_TASKS = _TRAIN_DISTRIBUTION[:1_000]
ID_TEST_TASKS = _TRAIN_DISTRIBUTION[1_000:]
OOD_TEST_TASKS = draw_tasks(np.random.default_rng([SPLIT_SEED, 1]), 100, EVEN_ARMS)


def _as_probs(value: Any, n: int | None = None) -> np.ndarray:
    """``value`` as float64 ``(NUM_ARMS,)`` (``n`` None) or ``(n, NUM_ARMS)``, every entry in [0, 1]."""
    shape = (NUM_ARMS,) if n is None else (n, NUM_ARMS)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BanditTaskError(f"a task must be {NUM_ARMS} reward probabilities, got {value!r}") from exc
    if arr.shape != shape:
        raise BanditTaskError(f"tasks must have shape {shape} ({NUM_ARMS} reward probabilities each), got {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise BanditTaskError(f"reward probabilities must lie in [0, 1], got {value!r}")
    return arr


# -- Batched core --------------------------------------------------------------------------------------------------


class BanditCore:
    """``n`` episodes of a Bernoulli bandit stepped in lockstep, each with its own arm probabilities.

    State arrays (shape ``(n,)``): ``t`` (pulls this episode), ``done``. ``rng`` draws the reward noise; a new
    core starts reset. Implements :class:`tasks.spec.BatchedCore`.
    """

    def __init__(self, probs: Any, *, horizon: int = HORIZON, seed: int | np.random.Generator | None = 0) -> None:
        n = int(np.shape(probs)[0]) if np.ndim(probs) == 2 else 0
        if n < 1:
            raise BanditTaskError(f"probs must have shape (n, {NUM_ARMS}) with n >= 1, got {np.shape(probs)}")
        self.n, self.horizon = n, horizon
        self.set_tasks(probs)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.t = np.zeros(n, dtype=np.int64)
        self.done = np.zeros(n, dtype=bool)
        self._rows = np.arange(n)

    @property
    def num_envs(self) -> int:
        return self.n

    def set_tasks(self, tasks: Any) -> None:
        """Replace the ``n`` tasks (keeps the state; call :meth:`reset` to start over)."""
        self.probs = _as_probs(tasks, self.n)
        self.best_arm = self.probs.argmax(axis=1)

    def reset(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Start new episodes (all, or where ``mask`` is true); returns every env's observation ``(n,)`` (zeros)."""
        if mask is None:
            self.t = np.zeros(self.n, dtype=np.int64)
            self.done = np.zeros(self.n, dtype=bool)
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (self.n,):
                raise ValueError(f"reset mask must have shape ({self.n},), got {mask.shape}")
            self.t = np.where(mask, 0, self.t)
            self.done = self.done & ~mask
        return np.zeros(self.n, dtype=np.int64)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pull one arm per env: ``(obs int64, reward float32, terminated bool, truncated bool)``, each ``(n,)``."""
        a = np.asarray(actions)
        if a.shape != (self.n,) or a.dtype.kind not in "iu":
            raise InvalidArmError(f"actions must be an int array of shape ({self.n},), got {a.dtype} {a.shape}")
        bad = (a < 0) | (a >= NUM_ARMS)
        if bad.any():
            raise InvalidArmError(f"arm {int(a[bad][0])} is not in 0..{NUM_ARMS - 1}")
        u = self.rng.random(self.n)  # drawn for every env, so no env's noise depends on another's episode
        active = ~self.done
        reward = ((u < self.probs[self._rows, a]) & active).astype(np.float32)
        self.t = self.t + active
        truncated = (self.t >= self.horizon) & active
        self.done = self.done | truncated
        return np.zeros(self.n, dtype=np.int64), reward, np.zeros(self.n, dtype=bool), truncated

    def expert_actions(self) -> np.ndarray:
        """The best arm of every env (the oracle / expert of ED)."""
        return self.best_arm.copy()


def core_for(spec: TaskSpec, tasks: Sequence[Any]) -> BanditCore:
    """A batched core running ``tasks`` (one env per task, in order).

    The reward noise is seeded from the tasks themselves, so the same list of tasks meets the same noise in every
    method and seed (common random numbers), and a different list (an RL² trial batch) meets fresh noise.
    """
    probs = _as_probs(list(tasks), len(tasks))
    digest = int.from_bytes(hashlib.sha256(np.ascontiguousarray(probs).tobytes()).digest(), "little")
    rng = np.random.default_rng(np.random.SeedSequence([_CORE_SEED, digest]))
    return BanditCore(probs, horizon=spec.episode_length, seed=rng)


# -- Gymnasium env: a thin view on a core with n = 1 -----------------------------------------------------------------


class AdversarialBanditEnv(gym.Env[np.int64, np.int64]):
    """A 10-armed Bernoulli bandit, 100 pulls per episode (AD paper, Sec. 5: Adversarial Bandit).

    ## Description
    A task is the tuple of the 10 arms' reward probabilities (see the module docstring for their distribution
    and the splits). ``probs=None`` draws a train task with ``self.np_random`` at every reset.

    ## Observation
    ``Discrete(1)``: always 0 (a bandit has a single state; only the rewards reveal the arms).

    ## Action
    ``Discrete(10)``: the arm to pull.

    ## Reward
    1 with probability ``probs[arm]``, else 0, drawn with ``self.np_random``. Expected return: ``100 * mean(p)``
    for uniform pulls, ``100 * max(p)`` for always pulling the best arm.

    ## Termination
    Never terminates; truncated after 100 pulls.

    ## Registered ids
    ``adapt_bench/AdversarialBandit-v0`` (held-out tasks out of distribution), ``adapt_bench/AdversarialBanditID-v0``
    (held-out tasks in distribution); same env, same train tasks.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}
    horizon: ClassVar[int] = HORIZON
    train_pool: ClassVar[tuple[Any, ...]] = TRAIN_TASKS

    def __init__(self, probs: Sequence[float] | None = None, render_mode: str | None = None) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        self.observation_space = spaces.Discrete(1)
        self.action_space = spaces.Discrete(NUM_ARMS)
        self._sample_task = probs is None
        self.task = self.train_pool[0] if probs is None else tuple(float(p) for p in _as_probs(probs))
        self.core = BanditCore([self.task], horizon=self.horizon)
        self._last: int | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.int64, dict]:
        super().reset(seed=seed)
        if self._sample_task:
            self.task = self.train_pool[int(self.np_random.integers(len(self.train_pool)))]
            self.core.set_tasks([self.task])
        self.core.rng = self.np_random  # all randomness through np_random
        self._last = None
        return self.core.reset()[0], {}

    def step(self, action: Any) -> tuple[np.int64, float, bool, bool, dict]:
        if not self.action_space.contains(action):
            raise InvalidArmError(f"action {action!r} is not in 0..{NUM_ARMS - 1}")
        obs, reward, terminated, truncated = self.core.step(np.array([action], dtype=np.int64))
        self._last = int(action)
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        arms = " ".join(f"{'*' if a == self._last else ' '}{p:.2f}" for a, p in enumerate(self.task))
        return f"pull {int(self.core.t[0])}/{self.horizon}: {arms}\n"


# -- Oracle, references --------------------------------------------------------------------------------------------


def planner(env: gym.Env) -> int:
    """The best arm of a (possibly wrapped) bandit env."""
    core = getattr(env.unwrapped, "core", None)
    if not isinstance(core, BanditCore):
        raise TypeError(f"planner needs a tasks.bandit env, got {type(env.unwrapped).__name__}")
    return int(core.best_arm[0])


def optimal_return(spec: TaskSpec, tasks: Sequence[Any]) -> float:
    """Mean over ``tasks`` of the expected return of always pulling the best arm: ``horizon * max(p)``."""
    return float(spec.episode_length * _as_probs(list(tasks), len(tasks)).max(axis=1).mean())


def random_return(spec: TaskSpec, tasks: Sequence[Any], episodes: int, seed: int) -> float:
    """Mean over ``tasks`` of the *exact* expected return of uniform pulls, ``horizon * mean(p)``.

    ``episodes`` and ``seed`` are part of the ``random_rollout`` signature and unused: no sampling is needed.
    """
    return float(spec.episode_length * _as_probs(list(tasks), len(tasks)).mean())


# -- Specs -----------------------------------------------------------------------------------------------------


_REFERENCE = Reference(source="computed: exact expected return of always pulling the best arm, 100 * max(p), "
                              "mean over held-out tasks", compute="tasks.bandit:optimal_return")
_EPISODES = {"smoke": 10, "quick": 100, "paper": 1_000}
_BUDGETS = {
    "smoke": Budget(train_steps=_EPISODES["smoke"] * HORIZON, eval_episodes=4, num_train_tasks=4, num_test_tasks=2),
    # quick: UCB histories of 200 train tasks x 100 episodes take ~1-2 s; 20 in-context episodes (2,000 pulls, the
    # steps a Dark Room evaluation of 100 episodes takes) on all 100 held-out tasks, one trial each (100 tasks
    # measure the mean well; the gridworlds need trials because they have 17-64 held-out goals).
    "quick": Budget(train_steps=_EPISODES["quick"] * HORIZON, eval_episodes=20, num_train_tasks=200),
    # paper: our estimate. The AD paper gives 10 arms and 100 pulls per episode; the number and length of the UCB
    # histories and the evaluation length are not stated in the text we recall, so: the whole 1,000-task train
    # split, 1,000 episodes (1e5 pulls) of UCB per task, 100 in-context episodes on the 100 held-out tasks.
    "paper": Budget(train_steps=_EPISODES["paper"] * HORIZON, eval_episodes=100),
}


def _spec(task_id: str, test: tuple[tuple[float, ...], ...], what: str, description: str) -> TaskSpec:
    return TaskSpec(
        id=task_id,
        family="in-context",
        entry_point="tasks.bandit:AdversarialBanditEnv",
        episode_length=HORIZON,
        observation="discrete",
        actions="discrete",
        reference=_REFERENCE,
        budgets=_BUDGETS,
        task_kwarg="probs",
        train_tasks=TRAIN_TASKS,
        test_tasks=test,
        split_source=f"tasks.bandit.draw_tasks: 1,000 train tasks (best arm odd w.p. 0.95) from "
                     f"default_rng([{SPLIT_SEED}, 0]); held out: {what}",
        random_rollout="tasks.bandit:random_return",
        random_source="computed: expected return of uniform random pulls, 100 x mean arm probability, mean over "
                      "held-out tasks",
        planner="tasks.bandit:planner",
        batched_core="tasks.bandit:core_for",
        source_learner="baselines.ucb:learning_histories",
        description=description,
    )


SPECS: list[TaskSpec] = [
    _spec("AdversarialBandit-v0", OOD_TEST_TASKS,
          f"100 flipped tasks (best arm even w.p. 0.95) from default_rng([{SPLIT_SEED}, 1]) (out of distribution)",
          "AD Adversarial Bandit: 10 Bernoulli arms, 100 pulls; the best arm is odd in 95% of train tasks and even "
          "in 95% of held-out tasks (out of distribution). UCB source."),
    _spec("AdversarialBanditID-v0", ID_TEST_TASKS,
          f"the next 100 tasks of the training distribution from default_rng([{SPLIT_SEED}, 0]) (in distribution)",
          "Adversarial Bandit, in-distribution control: as AdversarialBandit-v0, but the held-out tasks come from "
          "the training distribution (best arm odd w.p. 0.95). UCB source."),
]
