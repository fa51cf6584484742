"""Executors: run a plan's pending cells and show progress. The local process pool is the default."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import TextIO

from bench.registry import AdaptBenchError
from bench.runner import (
    Cell,
    CellResult,
    Plan,
    check_device,
    check_torch_threads,
    default_torch_threads,
    execute_cell,
    execute_prepare,
    prepare_groups,
    stored_elsewhere,
)
from bench.store import ResultsStore


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class Progress:
    """Cells done/total with an ETA, plus each running cell's own progress.

    The ETA weighs every cell by its expected cost, not by one. A running cell is priced by its own pace once its
    reports have moved 2% (fraction gained over the time between its first report and its latest, so a queued
    build's wait, a resumed run's jump to its checkpoint's fraction or a retried task's lost attempt count for
    nothing); any other cell costs the mean wall time of the finished cells of its (method, task), else of its
    method, else of every finished cell, else the running cells' extrapolations; and the ETA is never shorter than
    the slowest running cell's own time left. A sweep's cells differ by orders of magnitude (an AD run 12-24 min,
    a random-policy run seconds): counting them alike put the ETA of the quick in-context suite at 3h38m after 14
    minutes, and that of its data generation at 5 s while a Key-to-Door history had 83 s to go. ``cells`` are the
    cells this progress will see (their groups price the cells not yet started); cells it was not given cost the
    mean. Cells that finished in 0 s (a worker that died, stored by another driver) price nothing."""

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    cells: Sequence[Cell] = ()
    clock: Callable[[], float] = time.monotonic
    done: int = 0
    failed: int = 0
    start: float | None = None  # clock() at creation unless given
    running: dict[str, tuple[str, float, str]] = field(default_factory=dict)  # run_id -> (label, frac, msg)
    _groups: dict[str, tuple[str, str]] = field(default_factory=dict)  # run_id -> (method, task)
    _walls: list[tuple[tuple[str, str] | None, float]] = field(default_factory=list)  # (group, wall s) if > 0
    _finished_ids: set[str] = field(default_factory=set)
    # run_id -> (time, fraction) of its first report of this attempt and of its latest
    _first: dict[str, tuple[float, float]] = field(default_factory=dict)
    _latest: dict[str, tuple[float, float]] = field(default_factory=dict)
    _last_print: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    #: a running cell's own pace prices it once its reports have moved this much (before, mostly setup)
    EXTRAPOLATE_FROM = 0.02

    def __post_init__(self) -> None:
        if self.start is None:
            self.start = self.clock()
        self._groups.update({cell.run_id: (cell.method, cell.task) for cell in self.cells})

    def started(self, cell: Cell, label: str | None = None) -> None:
        with self._lock:
            self.running[cell.run_id] = (label or cell.label, 0.0, "")
            self._groups.setdefault(cell.run_id, (cell.method, cell.task))
            self._first.pop(cell.run_id, None)
            self._latest.pop(cell.run_id, None)

    def update(self, run_id: str, fraction: float, message: str) -> None:
        with self._lock:
            if run_id in self.running:
                self.running[run_id] = (self.running[run_id][0], fraction, message)
                now, last = self.clock(), self._latest.get(run_id)
                if last is None or fraction < last[1]:  # the first report, or a restart (a retried attempt)
                    self._first[run_id] = (now, fraction)
                self._latest[run_id] = (now, fraction)

    def finished(self, result: CellResult) -> None:
        with self._lock:
            self.running.pop(result.run_id, None)
            self._first.pop(result.run_id, None)
            self._latest.pop(result.run_id, None)
            self.done += 1
            self.failed += result.status != "ok"
            self._finished_ids.add(result.run_id)
            if result.wall_time_s > 0 and not result.elsewhere:
                self._walls.append((self._groups.get(result.run_id), result.wall_time_s))
        if result.status == "ok":
            mark = f"ok ({result.reason})" if result.reason else "ok"  # e.g. stored by another driver
        else:
            mark = f"FAILED ({result.reason})"
        self.stream.write(f"[{self.done}/{self.total}] {result.label}: {mark} in {_fmt_time(result.wall_time_s)}\n")
        self.stream.flush()

    def _pricer(self, extrapolated: list[float]) -> Callable[[tuple[str, str] | None], float]:
        """The expected wall time of a cell of a (method, task) group: its group's mean, else its method's, else
        every finished cell's, else the running cells' ``extrapolated`` totals (1.0, a cell, with no timing)."""
        if not self._walls:
            fallback = sum(extrapolated) / len(extrapolated) if extrapolated else 1.0
            return lambda group: fallback
        by_group: dict[tuple[str, str], list[float]] = {}
        by_method: dict[str, list[float]] = {}
        for group, wall in self._walls:
            if group is not None:
                by_group.setdefault(group, []).append(wall)
                by_method.setdefault(group[0], []).append(wall)
        overall = sum(w for _, w in self._walls) / len(self._walls)

        def price(group: tuple[str, str] | None) -> float:
            same = by_group.get(group) if group is not None else None
            same = same or (by_method.get(group[0]) if group is not None else None)
            return sum(same) / len(same) if same else overall

        return price

    def _own_left(self, run_id: str, now: float) -> tuple[float, float] | None:
        """``(seconds left, seconds a whole cell takes)`` of a running cell at its own pace, or None."""
        first, latest = self._first.get(run_id), self._latest.get(run_id)
        if first is None or latest is None:
            return None
        moved, took = latest[1] - first[1], latest[0] - first[0]
        if moved < self.EXTRAPOLATE_FROM or took <= 0:
            return None
        per_unit = took / moved
        return max(0.0, (1.0 - min(latest[1], 1.0)) * per_unit - (now - latest[0])), per_unit

    def eta(self, elapsed: float) -> float:
        """Seconds left: the expected cost still to run over the rate at which cost has been done so far
        (finished cells at their wall time, running ones at their fraction of their expected cost); NaN before
        any report. Call with ``_lock`` held (``line`` does)."""
        now = self.clock()
        own = {run_id: o for run_id in self.running if (o := self._own_left(run_id, now)) is not None}
        price = self._pricer([whole for _, whole in own.values()])
        timed = bool(self._walls) or bool(own)  # else the unit is a cell, not a second
        done = sum(w for _, w in self._walls) if timed else float(self.done)
        left = 0.0
        for run_id, (_, frac, _) in self.running.items():
            frac = min(max(frac, 0.0), 1.0)
            if run_id in own:
                mine_left, whole = own[run_id]
                done += max(0.0, whole - mine_left)
                left += mine_left
            else:
                cost = price(self._groups.get(run_id))
                done += frac * cost
                left += (1.0 - frac) * cost
        unstarted = [g for run_id, g in self._groups.items()
                     if run_id not in self.running and run_id not in self._finished_ids]
        left += sum(price(g) for g in unstarted)
        unknown = self.total - self.done - len(self.running) - len(unstarted)  # cells not given to this progress
        left += max(0, unknown) * price(None)
        if done <= 0:
            return float("nan")
        # no sooner than the slowest running cell at its own pace: the rate so far may count workers that will idle
        return max(elapsed / done * left, max((mine for mine, _ in own.values()), default=0.0))

    def line(self) -> str:
        with self._lock:
            elapsed = self.clock() - self.start
            eta = self.eta(elapsed)
            parts = [f"{self.done}/{self.total} done", f"{self.failed} failed" if self.failed else "",
                     f"elapsed {_fmt_time(elapsed)}", f"ETA {_fmt_time(eta)}" if eta == eta else "ETA ?"]
            head = ", ".join(p for p in parts if p)
            runs = "; ".join(f"{lab} {100 * f:.0f}%{' ' + m if m else ''}" for lab, f, m in self.running.values())
        return f"[{head}] {runs}"

    def tick(self, every: float = 10.0) -> None:
        now = time.monotonic()
        if now - self._last_print >= every and self.running:
            self._last_print = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------- local
_QUEUE: mp.Queue | None = None


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Exit this worker once its driver is gone (polled every ``every`` s, a daemon thread).

    A driver killed by SIGKILL or SIGTERM cannot stop its pool, and an orphaned worker would go on training a run
    nobody collects, holding a core and the run's artifact lock, while a resumed sweep starts the same run again.
    The worker's last checkpoint stays, so the resumed run continues from it."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(q: mp.Queue | None, parent: int | None = None) -> None:
    global _QUEUE
    _QUEUE = q
    if parent is not None:
        _exit_with_parent(parent)


def _worker_progress(run_id: str, fraction: float, message: str) -> None:
    if _QUEUE is not None:
        _QUEUE.put((run_id, fraction, message))


def _worker_execute(cell: Cell, results_root: str, cache_root: str, threads: int, device: str) -> CellResult:
    return execute_cell(cell, results_root, cache_root, threads, device, progress=_worker_progress)


def _worker_prepare(cell: Cell, cache_root: str, threads: int, device: str) -> tuple[str | None, float]:
    """The build's error (None: built) and its own seconds (a build queued behind others waits in the pool)."""
    t0 = time.monotonic()
    err = execute_prepare(cell, cache_root, threads, device, progress=_worker_progress)
    return err, time.monotonic() - t0


@contextlib.contextmanager
def _drained(q: mp.Queue, progress: Progress) -> Iterator[None]:
    """While the block runs, a thread moves the workers' progress reports from ``q`` into ``progress``."""
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                progress.update(*q.get(timeout=0.2))
            except queue.Empty:
                pass
            except (EOFError, OSError):
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield
    finally:
        stop.set()


class LocalExecutor:
    """Runs cells in this process (``workers == 1``) or in a pool of ``workers`` spawned processes."""

    def __init__(self, workers: int = 1, torch_threads: int | None = None, device: str = "auto",
                 progress_every: float = 10.0) -> None:
        if workers < 1:
            raise AdaptBenchError(f"--workers must be >= 1, got {workers}")
        check_torch_threads(torch_threads)
        check_device(device, here=False)  # a malformed device fails here, not as one failed record per run
        self.workers = workers
        self.threads = torch_threads or default_torch_threads(workers)
        self.device = device
        self.progress_every = progress_every

    def prepare(self, groups: list[Cell], cache_root: str, stream: TextIO) -> None:
        """Build shared artifacts once per group before the runs (in parallel across groups), showing the progress
        each build reports through ``ctx.progress`` (a learning-history dataset or a pretraining run takes minutes)."""
        if not groups:
            return
        stream.write(f"building shared artifacts for {len(groups)} (method, task) group(s)\n")
        progress = Progress(total=len(groups), stream=stream, cells=groups)
        labels = {cell.run_id: f"preparing {cell.method}/{cell.task}" for cell in groups}

        def started(cell: Cell) -> None:
            progress.started(cell, label=labels[cell.run_id])

        def finished(cell: Cell, err: str | None, seconds: float) -> None:
            progress.finished(CellResult(cell.run_id, labels[cell.run_id], "failed" if err else "ok", err, seconds))

        if self.workers == 1:
            for cell in groups:
                started(cell)
                t0 = time.monotonic()
                err = execute_prepare(cell, cache_root, self.threads, self.device, progress=self._reporter(progress))
                finished(cell, err, time.monotonic() - t0)
        else:
            spawn = mp.get_context("spawn")
            q = spawn.Queue()
            pool = ProcessPoolExecutor(min(self.workers, len(groups)), mp_context=spawn, initializer=_init_worker,
                                       initargs=(q, os.getpid()))
            with _drained(q, progress), pool:
                futures = {}
                for cell in groups:  # started before submitted: a report that comes first would be dropped
                    started(cell)
                    futures[pool.submit(_worker_prepare, cell, cache_root, self.threads, self.device)] = cell
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                    progress.tick(self.progress_every)
                    for fut in done:
                        try:
                            err, seconds = fut.result()
                        except Exception as e:  # a worker that died; the runs retry the build themselves
                            err, seconds = f"{type(e).__name__}: {e}", 0.0
                        finished(futures[fut], err, seconds)
        if progress.failed:
            stream.write(f"{progress.failed} shared artifact build(s) failed; their runs will retry the build "
                         "and store the error if it recurs\n")

    def _reporter(self, progress: Progress):
        """The progress callback of work run in this process: record the report, print at most every
        ``progress_every`` seconds."""
        def report(run_id: str, fraction: float, message: str) -> None:
            progress.update(run_id, fraction, message)
            progress.tick(self.progress_every)

        return report

    def run(self, cells: list[Cell], store: ResultsStore, cache_root: str, progress: Progress) -> list[CellResult]:
        if self.workers == 1:
            return self._serial(cells, store, cache_root, progress)
        return self._pool(cells, store, cache_root, progress)

    def _serial(self, cells, store, cache_root, progress):
        results = []
        for cell in cells:
            progress.started(cell)
            r = execute_cell(cell, str(store.root), cache_root, self.threads, self.device,
                             progress=self._reporter(progress))
            progress.finished(r)
            results.append(r)
        return results

    def _pool(self, cells, store, cache_root, progress):
        ctx = mp.get_context("spawn")  # fork + torch threads is unsafe; spawn costs one import per worker
        q = ctx.Queue()
        results: list[CellResult] = []
        pending = list(cells)

        def new_pool() -> ProcessPoolExecutor:  # its workers exit with this process (see _exit_with_parent)
            return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(q, os.getpid()))

        pool = new_pool()
        inflight: dict[Future, Cell] = {}
        with _drained(q, progress):
            try:
                while pending or inflight:
                    while pending and len(inflight) < self.workers:
                        cell = pending.pop(0)
                        progress.started(cell)
                        fut = pool.submit(_worker_execute, cell, str(store.root), cache_root, self.threads, self.device)
                        inflight[fut] = cell
                    done, _ = wait(list(inflight), timeout=1.0, return_when=FIRST_COMPLETED)
                    progress.tick(self.progress_every)
                    broken = False
                    for fut in done:
                        cell = inflight.pop(fut)
                        try:
                            r = fut.result()
                        except BrokenProcessPool:
                            broken = True
                            r = self._died(cell, store)
                        except Exception as e:  # harness-side error in the worker (not the method's)
                            r = CellResult(cell.run_id, cell.label, "failed", f"{type(e).__name__}: {e}", 0.0)
                        progress.finished(r)
                        results.append(r)
                    if broken:  # a worker died (segfault, OOM kill): record its cells, start a new pool
                        for cell in inflight.values():
                            r = self._died(cell, store)
                            progress.finished(r)
                            results.append(r)
                        inflight.clear()
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = new_pool()
            except BaseException:
                # Ctrl-C: stop the workers now; their half-written .tmp dirs are cleaned on the next run
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.kill()
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        pool.shutdown(wait=True)
        return results

    @staticmethod
    def _died(cell: Cell, store: ResultsStore) -> CellResult:
        reason = "worker process died (killed, out of memory or crashed in native code)"
        if (done := stored_elsewhere(cell, store)) is not None:  # it was waiting for another driver, which stored it
            return done
        store.write(cell.run_id, {"status": "failed", "reason": reason, "traceback": None, "method": cell.method,
                                  "task": cell.task, "seed": cell.seed, "preset": cell.preset,
                                  "config": cell.config}, [])
        return CellResult(cell.run_id, cell.label, "failed", reason, 0.0)


# ---------------------------------------------------------------------------------------------- sweep
@dataclass
class SweepSummary:
    planned: int
    skipped_done: int
    results: list[CellResult]

    @property
    def failed(self) -> list[CellResult]:
        return [r for r in self.results if r.status != "ok"]


def pending_cells(plan: Plan, store: ResultsStore, retry_failed: bool) -> tuple[list[Cell], int, list[str]]:
    """Cells still to run, how many are already done, and the stored failures that are not retried."""
    todo, done, kept_failed = [], 0, []
    for cell in plan.cells:
        status = store.status(cell.run_id)
        if status == "ok":
            done += 1
        elif status == "failed" and not retry_failed:
            kept_failed.append(cell.label)
            done += 1
        else:  # missing, corrupt, or a failure being retried
            todo.append(cell)
    return todo, done, kept_failed


def run_sweep(plan: Plan, store: ResultsStore, cache_root: str, executor, retry_failed: bool = False,
              stream: TextIO | None = None) -> SweepSummary:
    stream = stream or sys.stderr
    store.ensure_writable()
    store.cleanup_stale()
    todo, done, kept_failed = pending_cells(plan, store, retry_failed)
    if kept_failed:
        stream.write(f"{len(kept_failed)} stored failed run(s) are kept; re-run them with --retry-failed\n")
    stream.write(f"{len(plan.cells)} cells planned: {done} already stored, {len(todo)} to run\n")
    executor.prepare(prepare_groups(todo), cache_root, stream)
    progress = Progress(total=len(todo), stream=stream, cells=todo)
    results = executor.run(todo, store, cache_root, progress) if todo else []
    return SweepSummary(len(plan.cells), done, results)
