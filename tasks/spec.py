"""The task contract: a frozen :class:`TaskSpec` per registered task id.

A task id follows Gymnasium's grammar ``Name-vN``; a change that can move scores is a new version and the
old one stays (Gymnasium ``envs/registration.py``). Every spec is also a Gymnasium env registered under the
``adapt_bench/`` namespace.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

import numpy as np

Family = Literal["in-context", "control"]
ObsKind = Literal["discrete", "pixels", "state"]
ActKind = Literal["discrete", "continuous"]
PRESETS: tuple[str, ...] = ("smoke", "quick", "paper")
NAMESPACE = "adapt_bench"

_ID_RE = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_.]*(?:-[A-Za-z0-9_.]+)*)-v(?P<version>\d+)$")


class TaskSpecError(ValueError):
    """A task spec that breaks the contract (bad id, missing preset budget, ...)."""


@dataclass(frozen=True)
class Budget:
    """What one run of a method may spend on a task at one preset."""

    train_steps: int
    """Environment steps a learner takes per run (control: frames, i.e. agent steps x action repeat;
    in-context: environment steps of the source learner on *each* train task)."""
    eval_episodes: int
    """In-context: episodes run in context on each held-out task. Control: episodes per evaluation."""
    eval_every: int = 0
    """Control: frames between evaluations (0 = only at the end)."""
    num_train_tasks: int | None = None
    """Cap on the train tasks used (None = the whole train split)."""
    num_test_tasks: int | None = None
    """Cap on the held-out tasks evaluated (None = the whole test split)."""
    eval_trials: int = 1
    """In-context: independent trials (fresh context, own random stream) per held-out task; the curve is the mean
    over tasks x trials. With ~17 held-out tasks one trial each, whether a goal is found at all moves a run's
    score by ~10 points; more trials measure the same quantity with less noise."""

    def __post_init__(self) -> None:
        for name in ("train_steps", "eval_episodes", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise TaskSpecError(f"Budget.{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.eval_trials, int) or self.eval_trials < 1:
            raise TaskSpecError(f"Budget.eval_trials must be an int >= 1, got {self.eval_trials!r}")


@dataclass(frozen=True)
class Reference:
    """The top normalisation reference ``R_reference`` and where it comes from.

    Either a fixed ``value`` with a citation (``source="cited: ..."``), or ``compute``: a lazy
    ``"module:attr"`` callable ``f(spec, tasks) -> float``, the mean over the held-out ``tasks`` that a preset
    evaluates (``source="computed: ..."``).
    """

    source: str
    value: float | None = None
    compute: str | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.compute is None):
            raise TaskSpecError("Reference needs exactly one of `value` and `compute`")


class BatchedCore(Protocol):
    """Many episodes of one family stepped at once; the Gymnasium env of the family is a view on one of them.

    Arrays have a leading ``num_envs`` axis. An episode that ended stays frozen (reward 0, no new done flag)
    until ``reset(mask)`` restarts it, so a rollout may step until ``done.all()``.
    """

    num_envs: int
    done: np.ndarray
    """``(num_envs,)`` bool: the episode ended and waits for a reset."""

    def reset(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Restart all episodes (or those where ``mask``); returns every env's observation."""
        ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(obs, reward float32, terminated bool, truncated bool)``."""
        ...

    def expert_actions(self) -> np.ndarray:
        """Shortest-path actions for every env's current state (the oracle / expert)."""
        ...


@dataclass(frozen=True)
class TaskSpec:
    """Everything the harness needs to know about a task; see DESIGN.md "Core contracts"."""

    id: str
    """``Name-vN``; the Gymnasium id is ``adapt_bench/<id>``."""
    family: Family
    entry_point: str
    """``"module:Class"`` of the Gymnasium env."""
    episode_length: int
    observation: ObsKind
    actions: ActKind
    reference: Reference
    budgets: Mapping[str, Budget]
    """One :class:`Budget` per preset in :data:`PRESETS`."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Default env kwargs passed to ``gym.make``."""
    task_kwarg: str | None = None
    """The env kwarg that selects a task of the family (``"goal"``, ``"task"``, ``"platform"``)."""
    train_tasks: tuple[Any, ...] = ()
    test_tasks: tuple[Any, ...] = ()
    split_source: str = ""
    """How the train/test split was made (documented, fixed)."""
    random_rollout: str | None = None
    """Optional fast ``"module:attr"`` ``f(spec, tasks, episodes, seed) -> float`` for the random reference
    (mean over ``tasks``, ``episodes`` each); the default rolls out uniform random actions through Gymnasium."""
    random_episodes: int = 100
    """Episodes (per held-out task for in-context families) behind the random reference."""
    random_source: str | None = None
    """How ``random_rollout`` obtains the random reference when it computes it exactly instead of sampling
    (stored with the reference); None: "measured: uniform random actions, ... episodes, seed ..."."""
    batched_core: str | None = None
    """Optional ``"module:attr"`` ``f(spec, tasks) -> core``: one env per task stepped in lockstep (see
    :class:`BatchedCore`), for data generation and batched in-context evaluation."""
    planner: str | None = None
    """Optional ``"module:attr"`` ``f(env) -> action``: a shortest-path planner on the unwrapped env (oracle)."""
    source_learner: str | None = None
    """Optional ``"module:attr"`` ``f(spec, tasks, steps, seed, progress=None) -> dict``: the source algorithm whose
    learning histories Algorithm Distillation distils on this family, instead of the A2C of ``baselines.source``
    (None). It runs one learner per task of ``tasks`` for ``steps`` environment steps each (episodes restart
    automatically; the learner keeps what it learnt across them) and returns ``(len(tasks), steps)`` arrays
    ``"obs"`` (the ``Discrete`` observation index), ``"actions"``, ``"rewards"`` and ``"dones"`` (true on an
    episode's last step); ``seed`` fixes all its randomness, ``progress(fraction, message)`` may be called. The
    target string is part of the histories' cache key (``baselines.histories``)."""
    description: str = ""

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.id):
            raise TaskSpecError(f"task id `{self.id}` does not match `Name-vN` (for example `DarkRoom-v0`)")
        if self.family not in ("in-context", "control"):
            raise TaskSpecError(f"{self.id}: family must be 'in-context' or 'control', got {self.family!r}")
        missing = [p for p in PRESETS if p not in self.budgets]
        if missing:
            raise TaskSpecError(f"{self.id}: no budget for preset(s) {missing}")
        if self.family == "in-context" and (not self.train_tasks or not self.test_tasks or self.task_kwarg is None):
            raise TaskSpecError(f"{self.id}: in-context tasks need task_kwarg, train_tasks and test_tasks")
        overlap = set(self.train_tasks) & set(self.test_tasks)
        if overlap:
            raise TaskSpecError(f"{self.id}: {len(overlap)} task(s) in both train and test splits")
        # freeze the mappings so a spec cannot be edited after registration
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))
        object.__setattr__(self, "budgets", MappingProxyType(dict(self.budgets)))

    @property
    def name(self) -> str:
        return _ID_RE.match(self.id)["name"]  # type: ignore[index]

    @property
    def version(self) -> int:
        return int(_ID_RE.match(self.id)["version"])  # type: ignore[index]

    @property
    def gym_id(self) -> str:
        return f"{NAMESPACE}/{self.id}"

    def budget(self, preset: str) -> Budget:
        try:
            return self.budgets[preset]
        except KeyError:
            from bench.registry import UnknownNameError

            raise UnknownNameError("preset", preset, list(self.budgets)) from None

    def train_split(self, preset: str) -> tuple[Any, ...]:
        n = self.budget(preset).num_train_tasks
        return self.train_tasks if n is None else self.train_tasks[:n]

    def test_split(self, preset: str) -> tuple[Any, ...]:
        n = self.budget(preset).num_test_tasks
        return self.test_tasks if n is None else self.test_tasks[:n]

    def make(self, task: Any = None, **kwargs: Any):
        """``gym.make`` this task; ``task`` is a member of the family (a goal, a key/door pair, ...)."""
        import gymnasium as gym

        import tasks  # noqa: F401  (registers the namespace with Gymnasium)

        if task is not None:
            if self.task_kwarg is None:
                raise TaskSpecError(f"{self.id} has no task parameter; got task={task!r}")
            kwargs[self.task_kwarg] = task
        return gym.make(self.gym_id, **kwargs)
