"""The method contract: a :class:`Method` protocol of three members and the :class:`RunContext` it is given.

A method never parses CLI args, picks file paths or seeds globals: everything it needs is on ``ctx``.

A method may also carry three optional class attributes:

* ``Config``: a dataclass whose defaults are the paper's settings (every field documented);
* ``presets``: ``{"smoke": {...}, "quick": {...}}`` override sets on that config (``paper`` = the defaults);
* ``task_presets``: ``{"quick": {"<task id>": {...}}}``, a preset's further settings on one task (``"paper"``
  too: a paper's per-task settings; a property may compute it, as DrQ-v2's does for every registered DMC task).

The harness resolves ``Config() + presets[preset] + task_presets[preset][task] + CLI overrides`` into
``ctx.config``; the run id, the stored config and the deviations from the paper's config on that task are those
of the result.

And an optional hook ``prepare(ctx) -> None``: build artifacts that several runs share (a learning-history
dataset used by every seed) into ``ctx.cache``. Executors call it once per (method, task, preset, config) before
the runs, so the artifact is built once; ``run`` still builds anything missing (``ArtifactCache`` is idempotent).

And an optional hook ``resources(task, preset, config) -> dict``: what one run needs on a cluster node, any subset
of ``{"num_cpus": float, "num_gpus": float, "memory": int}`` (memory in bytes; default 1 CPU, no GPU, memory not
declared). The Ray executor reserves it for each run and gives the run ``int(num_cpus)`` torch threads; with
``--device cpu`` (or ``auto`` on a cluster without GPUs) the GPUs are dropped. The local process pool ignores it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bench.registry import AdaptBenchError
from bench.store import file_lock
from tasks.spec import Budget, TaskSpec


@runtime_checkable
class Method(Protocol):
    """What the harness calls. ``supports`` returns ``True`` (or ``None``) when the method can run the task,
    else ``False`` or a string saying why not."""

    name: str

    def supports(self, task: TaskSpec) -> bool | str | None: ...

    def run(self, ctx: RunContext) -> None: ...


def support_reason(method: Method, task: TaskSpec) -> str | None:
    """``None`` if ``method`` supports ``task``, else the reason it does not."""
    answer = method.supports(task)
    if answer is True or answer is None:
        return None
    if answer is False:
        return "not supported"
    return str(answer)


class InvalidRowError(AdaptBenchError, ValueError):
    """A logged row that cannot be stored (NaN, unknown axis, non-numeric value)."""


AXES = ("env_step", "episode")


class RunLogger:
    """Collects evaluation rows ``(axis, step, key, value)``; the harness stores them as the run's curve.

    Keys are namespaced like CleanRL's (``eval/return``, ``losses/critic``, ``fau/critic``). ``axis`` is
    ``"env_step"`` (frames / environment steps) or ``"episode"`` (in-context episodes). The score of a run is
    read from its ``eval/return`` rows.
    """

    def __init__(self, on_row: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self._on_row = on_row

    def log(self, step: int, metrics: dict[str, float], axis: str = "env_step") -> None:
        if axis not in AXES:
            raise InvalidRowError(f"axis must be one of {AXES}, got {axis!r}")
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise InvalidRowError(f"metric `{key}` at {axis} {step} is not a number: {value!r}") from None
            if not math.isfinite(value):
                raise InvalidRowError(f"metric `{key}` is {value} at {axis} {step}")
            row = {"axis": axis, "step": int(step), "key": str(key), "value": value}
            self.rows.append(row)
            if self._on_row is not None:
                self._on_row(row)

    def __call__(self, step: int, metrics: dict[str, float], axis: str = "env_step") -> None:
        self.log(step, metrics, axis)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hash of a JSON-able object, independent of dict order and process."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


class ArtifactCache:
    """A directory of heavy artifacts (learning-history datasets, encoders, ...) shared across runs.

    An artifact is keyed by everything that determines it (a JSON-able dict: task version, preset, generator
    config, seed); it is built once into a temporary directory and renamed into place, so a crash never
    leaves a half-built artifact, and two processes asking for the same key build it once (a file lock).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, name: str, key: dict[str, Any]) -> Path:
        return self.root / f"{name}-{stable_hash(key)}"

    @contextlib.contextmanager
    def _lock(self, path: Path) -> Iterator[None]:
        # the name plus ".lock", not with_suffix: "model-ad-ctx0.5-<hash>" would become "model-ad-ctx0.lock", one
        # lock for every key of a name holding a dot, and runs of different seeds would wait on each other
        with file_lock(path.with_name(path.name + ".lock")):
            yield

    def get_or_build(
        self,
        name: str,
        key: dict[str, Any],
        build: Callable[[Path], None],
        validate: Callable[[Path], bool] | None = None,
    ) -> Path:
        """The directory of artifact ``name`` for ``key``; ``build(tmpdir)`` fills it if absent or invalid.

        ``validate(path)`` may reject a stored artifact (truncated file, wrong shape): it is then rebuilt.
        """
        path = self.path_for(name, key)
        with self._lock(path):
            if path.is_dir() and (path / "key.json").is_file():
                try:
                    stored = json.loads((path / "key.json").read_text())
                except ValueError:
                    stored = None
                if stored == json.loads(json.dumps(key, default=str)) and (validate is None or validate(path)):
                    return path
                shutil.rmtree(path)  # stale or corrupt: never reuse silently
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=self.root))
            try:
                build(tmp)
                (tmp / "key.json").write_text(json.dumps(key, sort_keys=True, indent=1, default=str))
                os.replace(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return path


@dataclass
class RunContext:
    """Everything a method may use. It takes nothing else."""

    task: TaskSpec
    seed: int
    preset: str
    budget: Budget
    config: Any
    """The method's resolved config (its ``Config`` dataclass), or ``None`` for config-less methods."""
    device: str
    log: RunLogger
    checkpoint_dir: Path
    """Private to this run and kept across a kill, so a resumed run can pick up its last checkpoint."""
    cache: ArtifactCache
    rng: np.random.Generator
    """Seeded from ``seed``; global torch / numpy / random generators are seeded by the harness too."""
    torch_threads: int = 1
    progress_fn: Callable[[float, str], None] | None = field(default=None, repr=False)
    _last_progress: float = field(default=0.0, repr=False)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report this run's own progress (0..1) to the harness's progress display (rate-limited)."""
        now = time.monotonic()
        if self.progress_fn is not None and (now - self._last_progress > 0.5 or fraction >= 1.0):
            self._last_progress = now
            self.progress_fn(min(max(float(fraction), 0.0), 1.0), message)
