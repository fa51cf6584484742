"""Learning-history and expert datasets for Algorithm Distillation / Expert Distillation.

Paper: AD, Laskin et al. 2022, https://arxiv.org/abs/2210.14215 (Sec. 4-5: a source RL algorithm's whole learning
history on each train task is the training data; ED distils expert episodes on the same tasks).

The learning histories come from the A2C learner of :mod:`baselines.source`, or from the task's own source
algorithm where its spec names one (``TaskSpec.source_learner``; the Adversarial Bandit's UCB, AD paper Sec. 5).

Both datasets are built once per (task id + version, preset, train tasks, steps, generator config, data seed)
through ``ctx.cache.get_or_build`` and shared by every method and seed: the data seed is a fixed constant, *not*
``ctx.seed``. On disk a dataset is a directory of ``.npy`` files in compact dtypes plus ``manifest.json``
(shapes, dtypes); it is opened with ``np.load(mmap_mode="r")`` and :func:`validate` rejects a truncated or
mismatched file so the cache rebuilds it. No pickles.

Reading a dataset: :class:`Histories` holds array-like views that *cast on access*: ``h.obs[i, a:b]`` returns
int64 cells (grid worlds) or ``(b - a, 54, 54, 3)`` uint8 images (pixel maze), ``h.actions[...]`` int64,
``h.rewards[...]`` float32, while the files keep uint8 / uint16. The maze stores the agent's pose per step and
renders the exact image the env shows from the family's view table, so 25k steps x 38 tasks take 1 MB instead
of 8 GB. ``np.asarray(view)`` materialises a whole array.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from baselines.source import Config, SourceError, SourceMethod, adapter_for, make_core, train_learners
from bench.method import ArtifactCache, RunContext
from bench.registry import AdaptBenchError, load_target
from tasks.spec import TaskSpec

__all__ = ["DATA_SEED", "FORMAT", "Histories", "HistoriesError", "expert_histories", "learning_histories",
           "load_histories", "plot_histories", "save_history_plot", "source_config", "validate"]

DATA_SEED = 14215
"""The one seed of every learning-history dataset (AD's arXiv number); changing it changes the data key."""
FORMAT = 1
"""On-disk format version; part of every key, so a format change never reads an old artifact."""
_ARRAYS = ("obs", "actions", "rewards", "dones", "episode_returns")


class HistoriesError(AdaptBenchError, ValueError):
    """A dataset that cannot be built or read (bad subsample, unknown observation encoding, ...)."""


# --------------------------------------------------------------------------------------------- views
class ArrayView:
    """Read-only, indexable view of a stored array that converts what is read.

    ``view[idx]`` is ``table[base[idx]]`` when a lookup ``table`` is given (pose -> image), else
    ``base[idx].astype(dtype)``; ``shape``, ``dtype``, ``ndim``, ``len`` describe the converted array.
    """

    def __init__(self, base: np.ndarray, dtype: Any, table: np.ndarray | None = None) -> None:
        self.base, self.table = base, table
        self.dtype = np.dtype(table.dtype if table is not None else dtype)
        self.shape = tuple(base.shape) + (tuple(table.shape[1:]) if table is not None else ())
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        raw = np.asarray(self.base[idx])
        return self.table[raw] if self.table is not None else raw.astype(self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"ArrayView(shape={self.shape}, dtype={self.dtype}, stored={self.base.dtype})"


@dataclass(frozen=True)
class Histories:
    """One dataset: ``n_tasks`` histories of ``T`` steps each (the same ``T`` for every task).

    ``obs[i, t]`` is the observation action ``actions[i, t]`` was taken from; ``rewards[i, t]`` the reward it
    earned; ``dones[i, t]`` is true on the last step of an episode. A task's last episode may be cut at ``T``
    (then it has no ``done``) when episodes have different lengths (Key-to-Door terminates at the door).
    """

    obs: ArrayView
    """``(n_tasks, T)`` int64 cell index (grid worlds) or ``(n_tasks, T, 54, 54, 3)`` uint8 pixels (maze)."""
    actions: ArrayView
    """``(n_tasks, T)`` int64."""
    rewards: ArrayView
    """``(n_tasks, T)`` float32."""
    dones: np.ndarray
    """``(n_tasks, T)`` bool."""
    episode_returns: np.ndarray
    """``(n_tasks, n_episodes)`` float32 returns of the complete episodes; NaN-padded where a task completed
    fewer (variable-length episodes)."""
    tasks: tuple[Any, ...]
    """The train tasks, in order."""
    episode_length: int
    """The family's maximum episode length (the env's horizon)."""
    kind: str
    """``"learning"`` (source learning histories) or ``"expert"``."""
    subsample: int = 1
    """Every ``subsample``-th episode of the learner was kept (``Config.subsample``)."""

    @property
    def n_tasks(self) -> int:
        return self.dones.shape[0]

    @property
    def steps(self) -> int:
        """``T``: steps per task."""
        return self.dones.shape[1]


# --------------------------------------------------------------------------------------------- storage
def validate(path: Path) -> bool:
    """True iff every array of the manifest exists with its shape and dtype and the file is complete."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            return False
        for name in _ARRAYS:
            spec = manifest["arrays"][name]
            file = Path(path) / f"{name}.npy"
            arr = np.load(file, mmap_mode="r")  # raises on a file shorter than its header says
            if list(arr.shape) != spec["shape"] or str(arr.dtype) != spec["dtype"]:
                return False
            if isinstance(arr, np.memmap) and os.path.getsize(file) != arr.offset + arr.nbytes:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write(out: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, **meta, "arrays": {}}
    for name in _ARRAYS:
        arr = np.ascontiguousarray(arrays[name])
        np.save(out / f"{name}.npy", arr, allow_pickle=False)
        manifest["arrays"][name] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def load_histories(path: Path, tasks: Sequence[Any]) -> Histories:
    """Open a stored dataset memory-mapped (see the module docstring for what its views return)."""
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    arr = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _ARRAYS}
    encoding = manifest["encoding"]
    if encoding == "index":
        obs = ArrayView(arr["obs"], np.int64)
    elif encoding == "watermaze-pose":
        from tasks.watermaze import NUM_STATES, OBS_SHAPE, tables

        obs = ArrayView(arr["obs"], np.uint8, table=tables()[0].reshape(NUM_STATES, *OBS_SHAPE))
    else:
        raise HistoriesError(f"{path}: unknown observation encoding {encoding!r}")
    return Histories(
        obs=obs, actions=ArrayView(arr["actions"], np.int64), rewards=ArrayView(arr["rewards"], np.float32),
        dones=arr["dones"], episode_returns=np.asarray(arr["episode_returns"]), tasks=tuple(tasks),
        episode_length=int(manifest["episode_length"]), kind=str(manifest["kind"]),
        subsample=int(manifest.get("subsample", 1)),
    )


def fingerprint(histories: Histories) -> str:
    """SHA-256 of a dataset's content: its stored arrays (as stored, before any lookup table), observation table,
    episode length, kind and subsampling. Two datasets with this fingerprint train the same model, whatever task
    id they were built for (:func:`baselines.ad.shared_training`). Reads each array once (the quick Key-to-Door
    dataset: 0.25 s here)."""
    import hashlib

    # getattr: a duck-typed dataset with plain arrays (tests' synthetic histories) hashes the same way
    meta = [getattr(histories, name, None) for name in ("episode_length", "kind", "subsample")]
    h = hashlib.sha256(json.dumps(meta, default=str).encode())
    arrays = (histories.obs, histories.actions, histories.rewards, histories.dones)
    parts: list[Any] = [getattr(a, "base", a) for a in arrays]
    if getattr(histories.obs, "table", None) is not None:
        parts.append(histories.obs.table)
    for arr in parts:
        arr = np.asarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        if arr.dtype.hasobject:  # never in a stored dataset; a hand-built one may hold Python objects
            h.update(json.dumps(arr.tolist(), default=repr).encode())
            continue
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # no copy when already contiguous
    return h.hexdigest()


def _episode_returns(rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
    """``(n, max_episodes)`` returns of the complete episodes of each row, NaN-padded."""
    rows = []
    for r, d in zip(rewards, dones):
        # cumulative return at each episode end, differenced; a trailing cut episode has no end and is left out
        at_end = np.cumsum(r, dtype=np.float64)[np.flatnonzero(d)]
        rows.append(np.diff(at_end, prepend=0.0))
    out = np.full((len(rows), max([len(s) for s in rows] + [0])), np.nan, dtype=np.float32)
    for i, s in enumerate(rows):
        out[i, : len(s)] = s
    return out


def _compact_rewards(rewards: np.ndarray) -> np.ndarray:
    """uint8 when every reward is an integer in [0, 255] (all built-in families: 0/1), else float32."""
    if rewards.size and np.array_equal(rewards, np.round(rewards)) and rewards.min() >= 0 and rewards.max() <= 255:
        return rewards.astype(np.uint8)
    return rewards.astype(np.float32)


def _subsample(arrays: dict[str, np.ndarray], every: int) -> dict[str, np.ndarray]:
    """Keep episodes ``0, k, 2k, ...`` of every task, then cut all tasks to the shortest kept length."""
    if every == 1:
        return arrays
    dones = arrays["dones"]
    episode = np.concatenate([np.zeros((dones.shape[0], 1), np.int64), np.cumsum(dones, axis=1)[:, :-1]], axis=1)
    keep = episode % every == 0
    length = int(keep.sum(axis=1).min())
    if length == 0:
        raise HistoriesError(f"subsample={every} leaves no step of some task's history")
    idx = np.stack([np.flatnonzero(k)[:length] for k in keep])
    return {name: np.take_along_axis(a, idx, axis=1) for name, a in arrays.items()}


# --------------------------------------------------------------------------------------------- generators
def _observation_reader(spec: TaskSpec, core: Any) -> tuple[Callable[[Any, np.ndarray], np.ndarray], int, str]:
    """``(visible(core, obs), n_visible, encoding)``: what the histories store for each step. The A2C source's
    adapter for the families it knows; for any other family with ``Discrete`` observations, the observation
    index itself (``"index"`` encoding)."""
    try:
        adapter = adapter_for(core)
    except SourceError:
        if spec.observation != "discrete":
            raise
        env = spec.make(spec.train_tasks[0] if spec.train_tasks else None)
        n_obs = int(env.observation_space.n)  # type: ignore[attr-defined]
        env.close()
        return (lambda _core, obs: obs), n_obs, "index"
    return (lambda c, _obs: adapter.visible(c)), adapter.n_visible, adapter.encoding


def _generate_from_source(spec: TaskSpec, tasks: Sequence[Any], steps: int, seed: int,
                          progress: Callable[[float, str], None] | None) -> tuple[dict[str, np.ndarray], str]:
    """The learning histories of the spec's own ``source_learner`` (observations stored as their index)."""
    if spec.observation != "discrete":
        raise HistoriesError(f"{spec.id}: a source_learner's histories store observation indices, so the task "
                             f"needs discrete observations, not {spec.observation!r}")
    out = load_target(spec.source_learner)(spec, list(tasks), steps, seed, progress=progress)  # type: ignore[arg-type]
    arrays = {}
    for name, dtype in (("obs", None), ("actions", None), ("rewards", np.float32), ("dones", bool)):
        arr = np.asarray(out[name])
        if arr.shape != (len(tasks), steps):
            raise HistoriesError(f"{spec.source_learner} returned {name} of shape {arr.shape}, "
                                 f"expected {(len(tasks), steps)}")
        if dtype is None:  # indices: the same compact dtypes as the A2C histories
            dtype = np.uint8 if arr.size == 0 or int(arr.max()) <= 255 else np.uint16
        arrays[name] = arr.astype(dtype)
    return arrays, "index"


def _generate_learning(spec: TaskSpec, tasks: Sequence[Any], steps: int, cfg: Config, seed: int,
                       progress: Callable[[float, str], None] | None) -> tuple[dict[str, np.ndarray], str]:
    if spec.source_learner is not None:
        arrays, encoding = _generate_from_source(spec, tasks, steps, seed, progress)
        return _subsample(arrays, cfg.subsample), encoding
    core = make_core(spec, tasks)
    encoding = adapter_for(core).encoding
    res = train_learners(core, cfg, seed, episode_length=spec.episode_length, steps=steps, record=True,
                         progress=progress)
    arrays = {"obs": res.visible, "actions": res.actions, "rewards": res.rewards, "dones": res.dones}
    return _subsample(arrays, cfg.subsample), encoding  # type: ignore[arg-type]


def _generate_expert(spec: TaskSpec, tasks: Sequence[Any], steps: int,
                     progress: Callable[[float, str], None] | None) -> tuple[dict[str, np.ndarray], str]:
    core = make_core(spec, tasks)
    visible, n_visible, encoding = _observation_reader(spec, core)
    n = core.num_envs
    vis_dtype = np.uint8 if n_visible <= 256 else np.uint16
    out = {"obs": np.zeros((n, steps), vis_dtype), "actions": np.zeros((n, steps), np.uint8),
           "rewards": np.zeros((n, steps), np.float32), "dones": np.zeros((n, steps), bool)}
    obs = core.reset()
    for t in range(steps):
        out["obs"][:, t] = visible(core, obs)
        a = np.asarray(core.expert_actions(), dtype=np.int64)
        obs, r, term, trunc = core.step(a)
        done = term | trunc
        out["actions"][:, t], out["rewards"][:, t], out["dones"][:, t] = a, r, done
        if done.any():
            obs = core.reset(done)
        if progress is not None and (t + 1) % 1000 == 0:
            progress((t + 1) / steps, f"expert step {t + 1}/{steps} per task")
    return out, encoding


def _build(out: Path, kind: str, arrays: dict[str, np.ndarray], encoding: str, episode_length: int,
           subsample: int = 1) -> None:
    arrays = dict(arrays)
    arrays["episode_returns"] = _episode_returns(arrays["rewards"], arrays["dones"])
    arrays["rewards"] = _compact_rewards(arrays["rewards"])
    _write(out, arrays, {"kind": kind, "encoding": encoding, "episode_length": episode_length,
                         "subsample": subsample})


# --------------------------------------------------------------------------------------------- public API
def source_config(preset: str, task: str | None = None) -> Config:
    """The source algorithm's settings at ``preset`` on ``task``: the ``source-a2c`` method's ``Config`` + its
    preset + its per-task preset there (it has none today), as its own runs on that task resolve them."""
    from bench.config import resolve_config

    return resolve_config(SourceMethod(), preset, task=task)


def _base_key(kind: str, spec: TaskSpec, preset: str, tasks: Sequence[Any], steps: int) -> dict[str, Any]:
    return {"kind": kind, "format": FORMAT, "task": spec.id, "task_version": spec.version, "preset": preset,
            "train_tasks": [np.asarray(t).tolist() for t in tasks], "steps": steps}


def build_learning(spec: TaskSpec, preset: str, cache: ArtifactCache, *, config: Config | None = None,
                   data_seed: int = DATA_SEED, progress: Callable[[float, str], None] | None = None) -> Histories:
    """The learning histories of ``spec``'s train split at ``preset`` (built once, then read from ``cache``)."""
    cfg = config if config is not None else source_config(preset, spec.id)
    if cfg.subsample < 1:
        raise HistoriesError(f"subsample must be >= 1, got {cfg.subsample}")
    tasks = spec.train_split(preset)
    steps = spec.budget(preset).train_steps
    if spec.source_learner is None:
        generator = {"algorithm": "a2c", **cfg.generator_key()}
    else:  # the task's own source algorithm: A2C's settings do not determine its data, subsampling does
        generator = {"algorithm": spec.source_learner, "subsample": cfg.subsample}
    key = {**_base_key("learning", spec, preset, tasks, steps), "generator": generator, "data_seed": data_seed}

    def build(out: Path) -> None:
        if cfg.subsample == 1:
            arrays, encoding = _generate_learning(spec, tasks, steps, cfg, data_seed, progress)
        else:  # the learner does not depend on `subsample`: cut the (cached) full history instead of re-learning
            full = build_learning(spec, preset, cache, config=dataclasses.replace(cfg, subsample=1),
                                  data_seed=data_seed, progress=progress)
            raw = {"obs": full.obs.base, "actions": full.actions.base, "rewards": full.rewards.base,
                   "dones": full.dones}
            arrays = _subsample({k: np.asarray(v) for k, v in raw.items()}, cfg.subsample)
            encoding = _observation_reader(spec, make_core(spec, tasks[:1]))[2]
        _build(out, "learning", arrays, encoding, spec.episode_length, cfg.subsample)

    path = cache.get_or_build(f"histories-{spec.id}-learning", key, build, validate)
    return load_histories(path, tasks)


def build_expert(spec: TaskSpec, preset: str, cache: ArtifactCache, *, steps: int | None = None,
                 progress: Callable[[float, str], None] | None = None) -> Histories:
    """Episodes of the shortest-path expert (``core.expert_actions()``) on ``spec``'s train split.

    ``steps`` per task defaults to the preset's ``train_steps``, the same budget as the learning histories.
    The expert is deterministic, so there is no seed in the key.
    """
    tasks = spec.train_split(preset)
    steps = spec.budget(preset).train_steps if steps is None else int(steps)
    if steps < 1:
        raise HistoriesError(f"expert histories need steps >= 1, got {steps}")
    key = {**_base_key("expert", spec, preset, tasks, steps), "generator": {"algorithm": "expert_actions"}}

    def build(out: Path) -> None:
        arrays, encoding = _generate_expert(spec, tasks, steps, progress)
        _build(out, "expert", arrays, encoding, spec.episode_length)

    path = cache.get_or_build(f"histories-{spec.id}-expert", key, build, validate)
    return load_histories(path, tasks)


def learning_histories(ctx: RunContext, config: Config | None = None, *, data_seed: int = DATA_SEED) -> Histories:
    """AD's data: A2C learning histories (or those of the task's ``source_learner``) on
    ``ctx.task.train_split(ctx.preset)``, ``ctx.budget.train_steps`` environment steps per task (fewer in the file
    with ``subsample > 1``). ``config`` defaults to the source method's settings at ``ctx.preset`` (only its
    ``subsample`` applies to a ``source_learner``); the data never depends on ``ctx.seed``."""
    return build_learning(ctx.task, ctx.preset, ctx.cache, config=config, data_seed=data_seed,
                          progress=lambda f, msg: ctx.progress(f, f"learning histories: {msg}"))


def expert_histories(ctx: RunContext, *, steps: int | None = None) -> Histories:
    """ED's data: expert episodes on the same train tasks, same format as :func:`learning_histories`."""
    return build_expert(ctx.task, ctx.preset, ctx.cache, steps=steps,
                        progress=lambda f, msg: ctx.progress(f, f"expert histories: {msg}"))


# --------------------------------------------------------------------------------------------- plots
def plot_histories(histories: Histories, n_sample: int = 8, seed: int = 0, title: str = "", bins: int = 100):
    """Return per episode along the history: a random sample of ``n_sample`` tasks (thin, smoothed over 2% of
    their episodes) and the mean over all tasks (black, in ``bins`` bins of environment steps).

    The x axis is the environment step at which an episode ended, not the episode index: where episodes have
    different lengths (Key-to-Door) late episode indices exist only for the fastest learners, and a mean over
    episode index would show survivors only. Returns the matplotlib figure; the caller saves it.
    """
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    ret, dones = histories.episode_returns, np.asarray(histories.dones)
    ends = [np.flatnonzero(d) for d in dones]
    rets = [r[: len(e)] for r, e in zip(ret, ends)]
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(ret), size=min(n_sample, len(ret)), replace=False))
    frames = []
    for i in sample:
        window = max(1, len(rets[i]) // 50)
        smooth = pd.Series(rets[i]).rolling(window, min_periods=1).mean().to_numpy()
        frames.append(pd.DataFrame({"step": ends[i] + 1, "return": smooth, "task": str(histories.tasks[i])}))
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    if frames:
        sns.lineplot(data=pd.concat(frames), x="step", y="return", hue="task", lw=0.8, alpha=0.55, ax=ax,
                     legend=False, estimator=None)
    all_ends, all_rets = np.concatenate(ends) + 1, np.concatenate(rets)
    edges = np.linspace(0, histories.steps, bins + 1)
    which = np.clip(np.digitize(all_ends, edges) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    total = np.bincount(which, weights=all_rets, minlength=bins)
    seen = count > 0
    centres = (edges[:-1] + edges[1:]) / 2
    ax.plot(centres[seen], total[seen] / count[seen], color="black", lw=2.0,
            label=f"mean over all {len(ret)} tasks")
    note = f" (every {histories.subsample}th episode kept)" if histories.subsample > 1 else ""
    ax.set_xlabel(f"environment step of the history{note}")
    ax.set_ylabel("episode return")
    ax.legend(loc="best", frameon=False)
    ax.set_title(title or f"{histories.kind} histories: {len(sample)} sampled tasks (thin), mean (black)")
    fig.tight_layout()
    return fig


def save_history_plot(task_id: str, preset: str, cache_dir: str | Path, out_dir: str | Path) -> Path:
    """Build or load the learning histories of ``task_id`` at ``preset`` and save their plot as
    ``<out_dir>/histories-<task_id>-<preset>.png`` (for ``results/plots/``)."""
    from tasks import get_task

    spec = get_task(task_id)
    hist = build_learning(spec, preset, ArtifactCache(Path(cache_dir) / "artifacts"))
    source = "A2C" if spec.source_learner is None else spec.source_learner
    fig = plot_histories(hist, title=f"{spec.id}: {source} learning histories (preset `{preset}`)")
    out = Path(out_dir) / f"histories-{spec.id}-{preset}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
