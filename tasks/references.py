"""Normalisation references, computed rather than typed in, and cached stamped with the task version.

``R_reference`` comes from the spec (a cited value, or a computation such as the mean shortest-path optimum
over the held-out tasks). ``R_random`` is the mean return of uniform random actions with a fixed seed over
``spec.random_episodes`` episodes (per held-out task for in-context families).

For in-context families both are means over the held-out tasks *that a preset evaluates*
(``spec.test_split(preset)``), so a preset that evaluates a subset is normalised against that subset.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.method import stable_hash
from bench.registry import load_target
from tasks.spec import TaskSpec

RANDOM_SEED = 12345
# bump when the way references are computed changes, so stale caches are not reused
_FORMAT = 1


@dataclass(frozen=True)
class References:
    random: float
    reference: float
    random_source: str
    reference_source: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADAPT_BENCH_CACHE", Path.home() / ".cache" / "adapt-bench"))


def gym_random_return(spec: TaskSpec, tasks: tuple, episodes: int, seed: int) -> float:
    """Mean undiscounted return of uniform random actions, through Gymnasium (the generic path)."""
    rng = np.random.default_rng(seed)
    returns = []
    for task in tasks or (None,):
        env = spec.make(task)
        env.action_space.seed(int(rng.integers(2**31)))
        for _ in range(episodes):
            env.reset(seed=int(rng.integers(2**31)))
            total, done = 0.0, False
            while not done:
                _, r, term, trunc, _ = env.step(env.action_space.sample())
                total += float(r)
                done = term or trunc
            returns.append(total)
        env.close()
    return float(np.mean(returns))


def _compute(spec: TaskSpec, tasks: tuple) -> References:
    ref = spec.reference
    reference = float(ref.value) if ref.value is not None else float(load_target(ref.compute)(spec, tasks))  # type: ignore[arg-type]
    rollout = load_target(spec.random_rollout) if spec.random_rollout else gym_random_return
    random = float(rollout(spec, tasks, spec.random_episodes, RANDOM_SEED))
    per = f" on each of {len(tasks)} held-out tasks" if tasks else ""
    return References(
        random=random,
        reference=reference,
        random_source=spec.random_source
        or f"measured: uniform random actions, {spec.random_episodes} episodes{per}, seed {RANDOM_SEED}",
        reference_source=ref.source,
    )


def get_references(spec: TaskSpec, preset: str, cache_dir: Path | None = None) -> References:
    """References for ``spec`` at ``preset``, from the cache if computed before for this exact task version."""
    tasks = tuple(spec.test_split(preset))
    path = (cache_dir or default_cache_dir()) / "references" / f"{spec.id}-{stable_hash(repr(tasks), 10)}.json"
    stamp = {"task": spec.id, "format": _FORMAT, "episodes": spec.random_episodes, "seed": RANDOM_SEED,
             "reference": repr(spec.reference), "tasks": repr(tasks)}
    try:
        data = json.loads(path.read_text())
        if data["stamp"] == stamp:
            return References(**data["references"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing, corrupt or stale: recompute
    refs = _compute(spec, tasks)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump({"stamp": stamp, "references": refs.__dict__}, f, indent=1)
    os.replace(f.name, path)
    return refs
