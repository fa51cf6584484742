"""The task registry. Importing this package registers every task with Gymnasium under ``adapt_bench/``.

Tasks come from the entry-point group ``adapt_bench.tasks``; the built-in families register through the same
group in ``pyproject.toml`` that a third-party package uses. An entry point resolves to a :class:`TaskSpec`,
an iterable of them, or a zero-argument callable returning either.
"""

from __future__ import annotations

from collections.abc import Iterable

from bench.registry import AdaptBenchError, DuplicateNameError, Registry, iter_entry_points, load_target
from tasks.spec import PRESETS, Budget, Reference, TaskSpec, TaskSpecError

__all__ = [
    "PRESETS",
    "Budget",
    "Reference",
    "TaskSpec",
    "TaskSpecError",
    "get_task",
    "list_tasks",
    "register_task",
    "task_registry",
]

ENTRY_POINT_GROUP = "adapt_bench.tasks"
# The built-in families, used when the distribution is not installed (running from a source checkout);
# an installed distribution declares the same targets in pyproject.toml.
_BUILTIN = {
    "darkroom": "tasks.gridworld:SPECS",
    "keytodoor": "tasks.gridworld:KEY_TO_DOOR_SPECS",
    "watermaze": "tasks.watermaze:SPECS",
    "dmc": "tasks.dmc:SPECS",
    "bandit": "tasks.bandit:SPECS",
}

task_registry: Registry[TaskSpec] = Registry("task", hint="Run `bench list tasks`.")
_loaded = False


def register_task(spec: TaskSpec, provider: str = "<code>") -> None:
    """Add ``spec`` to the registry and to Gymnasium (``adapt_bench/<id>``)."""
    import gymnasium as gym

    if not isinstance(spec, TaskSpec):
        raise TaskSpecError(f"{provider} provided {type(spec).__name__}, not a TaskSpec")
    task_registry.register(spec.id, spec, provider)
    if spec.gym_id not in gym.registry:
        gym.register(id=spec.gym_id, entry_point=spec.entry_point, kwargs=dict(spec.kwargs))


def _specs_from(obj: object, target: str) -> list[TaskSpec]:
    if callable(obj) and not isinstance(obj, TaskSpec):
        obj = obj()
    if isinstance(obj, TaskSpec):
        return [obj]
    if isinstance(obj, Iterable):
        return list(obj)
    raise TaskSpecError(f"entry point `{target}` gave {type(obj).__name__}, not TaskSpec(s)")


def load_all() -> None:
    """Load every task provider once (built-ins, then installed entry points)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    providers = {name: (target, "adapt-bench") for name, target in _BUILTIN.items()}
    for name, target, dist in iter_entry_points(ENTRY_POINT_GROUP):
        if name in providers and providers[name][0] == target:
            continue  # our own entry point when the distribution is installed
        if name in providers:
            raise DuplicateNameError(
                f"task provider `{name}` is declared by `{providers[name][1]}` and by `{dist}`"
            )
        providers[name] = (target, dist)
    for _name, (target, dist) in providers.items():
        try:
            specs = _specs_from(load_target(target), target)
        except AdaptBenchError:
            raise
        except Exception as exc:  # a broken plugin should name itself, not crash with a bare traceback
            raise AdaptBenchError(f"could not load tasks from `{target}` (distribution `{dist}`): {exc!r}") from exc
        for spec in specs:
            register_task(spec, provider=dist)


def get_task(task_id: str) -> TaskSpec:
    """The spec of ``task_id``; unknown ids raise :class:`bench.registry.UnknownNameError` with close matches."""
    load_all()
    if task_id.startswith("adapt_bench/"):
        task_id = task_id.removeprefix("adapt_bench/")
    return task_registry.get(task_id)


def list_tasks() -> list[TaskSpec]:
    load_all()
    return [task_registry.get(n) for n in task_registry.names()]


load_all()
