"""Per-held-out-task in-context returns: which tasks a method solves, when, and whether it keeps them.

The leaderboard scores a run by its mean over held-out tasks. That mean hides the failure that held AD on Dark
Room below 70 for several sessions: goals found in the first 20 episodes and then scored ~0 over the last 10 (the
model had learnt to stay on a reward only at the train goals' cells). ``bench per-task`` reads the
``eval/task/<i>`` rows every in-context run logs beside ``eval/return`` (:func:`bench.evaluation.log_in_context`)
and prints, for each held-out task and method (means over seeds):

* ``first``: the return of the first in-context episode;
* ``peak``: the best trailing mean over a window of ``ceil(10%)`` of the episodes (the leaderboard's final window);
* ``final``: the mean over the last window, as the leaderboard's final;
* ``found``: the first episode whose return reaches half of the task's optimum (when the task computes one per
  task, e.g. a shortest path), else half of the peak; ``–`` if never.

A task whose ``final`` lies far below its ``peak`` was solved and then lost. Runs stored before the per-task rows
existed are named, not guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bench import scoring
from bench.evaluation import TASK_KEY_PREFIX
from bench.registry import AdaptBenchError, load_target
from bench.store import CorruptRecordError, ResultsStore

STATS = ("first", "peak", "final", "found")


@dataclass
class PerTaskReport:
    task: str
    preset: str
    table: pd.DataFrame
    """One row per held-out task (index: its label), columns ``(method, stat)`` with ``stat`` in :data:`STATS`
    (means over seeds), and ``optimum`` where the task computes one per task."""
    seeds: dict[str, list[int]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def lost(self, method: str, fraction: float = 0.5) -> list[str]:
        """Held-out tasks whose final is below ``fraction`` of their peak (and whose peak is above 0)."""
        peak, final = self.table[(method, "peak")], self.table[(method, "final")]
        return [str(t) for t in self.table.index[(peak > 0) & (final < fraction * peak)]]

    def markdown(self) -> str:
        methods = list(dict.fromkeys(m for m, _ in self.table.columns if m != "optimum"))
        header = ["held-out task"] + (["optimum"] if ("optimum", "") in self.table.columns else [])
        header += [f"{m} {s}" for m in methods for s in STATS]
        lines = [f"## {self.task} — preset `{self.preset}`: in-context return per held-out task",
                 "",
                 "Raw returns, mean over seeds (" + "; ".join(f"{m}: seeds {', '.join(map(str, self.seeds[m]))}"
                                                              for m in methods) + "). " + _LEGEND,
                 "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, row in self.table.iterrows():
            cells = [str(label)]
            if ("optimum", "") in self.table.columns:
                cells.append(_num(row[("optimum", "")]))
            for m in methods:
                cells += [_num(row[(m, s)]) if s != "found" else _episode(row[(m, s)]) for s in STATS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for m in methods:
            lost = self.lost(m)
            lines.append(f"- {m}: {len(lost)} of {len(self.table)} held-out tasks end below half of their peak"
                         + (f" ({', '.join(lost)})" if lost else ""))
        return "\n".join(lines) + "\n"


_LEGEND = ("first: in-context episode 1; peak: best trailing mean over the final window (ceil(10%) of the "
           "episodes); final: mean over the last window; found: first episode (1-based) reaching half of the "
           "optimum (or of the peak where the task has no per-task optimum), mean over the seeds that reach it.")


def _num(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3g}"


def _episode(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.0f}"


def task_matrix(curve: pd.DataFrame, n_tasks: int) -> np.ndarray | None:
    """``(n_tasks, episodes)`` returns from a run's ``eval/task/<i>`` rows, or None if it has none (a run stored
    before they were logged) or they do not cover ``n_tasks`` tasks x every episode."""
    rows = curve[(curve["axis"] == "episode") & curve["key"].str.startswith(TASK_KEY_PREFIX)]
    if rows.empty:
        return None
    index = rows["key"].str.removeprefix(TASK_KEY_PREFIX).astype(int)
    wide = rows.assign(task=index).pivot_table(index="task", columns="step", values="value", aggfunc="mean")
    if list(wide.index) != list(range(n_tasks)) or wide.isna().any().any():
        return None
    return wide.to_numpy(dtype=float)


def task_stats(returns: np.ndarray, threshold: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:data:`STATS` per task of one run's ``(n_tasks, episodes)`` returns; ``found`` (1-based, NaN: never) is
    the first episode at or above ``threshold`` (per task; default: half of the task's peak)."""
    k = scoring.final_window(returns.shape[1])  # the leaderboard's final window (scoring.final_window_mean)
    windows = np.lib.stride_tricks.sliding_window_view(returns, k, axis=1).mean(axis=-1)  # (n, episodes-k+1)
    peak = windows.max(axis=1)
    thr = 0.5 * peak if threshold is None else np.asarray(threshold, float)
    reached = returns >= thr[:, None]
    found = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1.0, np.nan)
    found[~(thr > 0)] = np.nan  # a threshold of 0 or below says nothing about finding the task
    return {"first": returns[:, 0], "peak": peak, "final": windows[:, -1], "found": found}


def per_task_optimum(spec: Any, tasks: tuple) -> np.ndarray | None:
    """Each held-out task's reference return where the task computes it (e.g. a shortest path), else None."""
    compute = getattr(spec.reference, "compute", None)
    if compute is None:
        return None
    fn = load_target(compute)
    return np.array([float(fn(spec, (t,))) for t in tasks])


def per_task_report(results_dir: str, task_id: str, methods: list[str] | None = None,
                    preset: str = "quick") -> PerTaskReport:
    """The per-task table of ``task_id``'s stored ok runs at ``preset`` (``methods``: all that have per-task
    rows)."""
    from tasks import get_task

    spec = get_task(task_id)
    if spec.family != "in-context":
        raise AdaptBenchError(f"`{task_id}` is a {spec.family} task; per-task returns are for in-context tasks "
                              "(held-out task splits)")
    tasks = tuple(spec.test_split(preset))
    store = ResultsStore(results_dir)
    stats: dict[str, list[dict[str, np.ndarray]]] = {}
    seeds: dict[str, list[int]] = {}
    messages: list[str] = []
    optimum = per_task_optimum(spec, tasks)
    for run_id in store.run_ids():
        try:  # the meta first: only the matching runs' curves are read and verified
            meta = store.read_meta(run_id)
            if meta["task"] != task_id or meta["preset"] != preset or meta["status"] != "ok" or (
                    methods is not None and meta["method"] not in methods):
                continue
            rec = store.read(run_id)
        except CorruptRecordError as e:
            messages.append(f"skipped corrupt record: {e}")
            continue
        matrix = task_matrix(rec.curve, len(tasks))
        if matrix is None:
            messages.append(f"{rec.run_id}: no per-task rows for the {len(tasks)} held-out tasks (stored before "
                            "they were logged); re-run it to get them")
            continue
        stats.setdefault(meta["method"], []).append(task_stats(matrix, None if optimum is None else 0.5 * optimum))
        seeds.setdefault(meta["method"], []).append(int(meta["seed"]))
    wanted = methods if methods is not None else sorted(stats)
    missing = [m for m in wanted if m not in stats]
    if not stats or missing:
        shown = messages[:3] + ([f"... {len(messages) - 3} more"] if len(messages) > 3 else [])
        raise AdaptBenchError(f"no run of {', '.join(missing or wanted) or 'any method'} on {task_id} at preset "
                              f"`{preset}` with per-task rows under {results_dir}"
                              + (": " + "; ".join(shown) if messages else ""))
    columns: dict[tuple[str, str], np.ndarray] = {}
    if optimum is not None:
        columns[("optimum", "")] = optimum
    for m in wanted:
        for s in STATS:
            values = np.stack([run[s] for run in stats[m]])  # (seeds, tasks); `found` is NaN where never
            reached = np.isfinite(values)
            count = reached.sum(axis=0)
            total = np.where(reached, values, 0.0).sum(axis=0)
            columns[(m, s)] = np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)
    table = pd.DataFrame(columns, index=[_label(t) for t in tasks])
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return PerTaskReport(task_id, preset, table, {m: sorted(seeds[m]) for m in wanted}, messages)


def _label(task: Any) -> str:
    return str(task).replace("|", "/")  # a markdown cell
