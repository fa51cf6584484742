"""Run a plan on a Ray cluster: ``bench run --executor ray [--address ADDRESS]``.

The same plan, store and resume as the local executor; only where the cells run changes.

* Each pending cell is one Ray task with the resources its method declares for the task and preset
  (the optional ``resources(task, preset, config)`` hook, see :mod:`bench.method`; default 1 CPU).
* Shared artifacts (a method's ``prepare`` groups) are built first, one Ray task per group, in the cache of
  the node that runs it. When the workers may not share that cache (several nodes, or ``--worker-cache-dir``),
  the prepare task also packs the artifact directories it used into a tar held in Ray's object store; a run
  task unpacks it into its node's cache only where the artifact's ``key.json`` is missing, so an artifact is
  built once and copied, never rebuilt per run.
* Workers never touch the results directory (it may be on another machine): a task returns the record
  ``(meta, rows)`` and the driver stores it with :meth:`ResultsStore.write`, atomically, as it arrives.
* A method's exception is a result (a failed record with its traceback), never retried. A lost worker
  (killed, out of memory, node gone) is a system failure: Ray runs the task again up to ``max_retries``
  times, then the run is stored as failed. Ctrl-C cancels every outstanding task (``ray.cancel(force=True)``);
  only records already complete are in the store, and the next ``bench run`` resumes from them.
* Progress: cells done/total with an ETA (:class:`bench.executor.Progress`); each running cell's own
  ``ctx.progress`` reaches the driver through a small actor that the driver polls.

Ray is an optional dependency, imported only when this executor is used.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bench.executor import Progress
from bench.method import ArtifactCache, RunLogger, stable_hash
from bench.registry import AdaptBenchError
from bench.runner import (
    Cell,
    CellResult,
    check_device,
    check_torch_threads,
    compute_cell,
    discard_checkpoint,
    make_context,
    stored_elsewhere,
)
from bench.store import ResultsStore

INSTALL_HINT = 'pip install "adapt-bench[ray]"'
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")


def import_ray() -> Any:
    """The ``ray`` module, or an :class:`AdaptBenchError` that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise AdaptBenchError(
            f"--executor ray needs Ray, which is not installed here ({e}). Install it with: {INSTALL_HINT}"
        ) from None
    return ray


# ---------------------------------------------------------------------------------------------- resources
@dataclass(frozen=True)
class Resources:
    """What one run reserves on a Ray node. ``memory`` is in bytes (0: not declared)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int = 0

    def describe(self) -> str:
        mem = f", {self.memory / 2**30:.3g} GiB" if self.memory else ""
        return f"{self.num_cpus:g} CPU, {self.num_gpus:g} GPU{mem}"


def run_resources(cell: Cell) -> Resources:
    """The resources ``cell``'s method declares through its optional ``resources`` hook (default 1 CPU)."""
    from bench.methods import get_method
    from bench.runner import cell_config
    from tasks import get_task

    method = get_method(cell.method)
    hook = getattr(method, "resources", None)
    if hook is None:
        return Resources()
    declared = hook(get_task(cell.task), cell.preset, cell_config(cell))
    if not isinstance(declared, dict):
        raise AdaptBenchError(f"method `{cell.method}`: resources() must return a dict, got {declared!r}")
    unknown = sorted(set(declared) - set(RESOURCE_KEYS))
    if unknown:
        raise AdaptBenchError(f"method `{cell.method}`: resources() returned unknown key(s) {unknown}; "
                              f"allowed: {list(RESOURCE_KEYS)}")
    values = {**Resources().__dict__, **declared}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise AdaptBenchError(f"method `{cell.method}`: resources()[{key!r}] must be a number >= 0, got {value!r}")
    if values["num_cpus"] <= 0:
        raise AdaptBenchError(f"method `{cell.method}`: resources()['num_cpus'] must be > 0, got {values['num_cpus']}")
    return Resources(float(values["num_cpus"]), float(values["num_gpus"]), int(values["memory"]))


def placed_resources(res: Resources, device: str, cluster_has_gpu: bool) -> Resources:
    """What to request for a run given ``--device``: ``cpu`` drops GPUs, ``cuda`` needs one, ``auto`` uses
    a declared GPU only if the cluster has any (else the run goes to CPU, as ``auto`` does locally)."""
    if device == "cpu":
        return Resources(res.num_cpus, 0.0, res.memory)
    if device.startswith("cuda"):
        return Resources(res.num_cpus, res.num_gpus or 1.0, res.memory)
    if res.num_gpus and not cluster_has_gpu:
        return Resources(res.num_cpus, 0.0, res.memory)
    return res


def check_feasible(needed: dict[Resources, str], nodes: list[dict[str, float]]) -> None:
    """Raise if a run needs more than any live node has: Ray would otherwise queue it forever."""
    for res, label in needed.items():
        fits = any(n.get("CPU", 0) >= res.num_cpus and n.get("GPU", 0) >= res.num_gpus
                   and (not res.memory or n.get("memory", 0) >= res.memory) for n in nodes)
        if not fits:
            largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            have = Resources(largest.get("CPU", 0), largest.get("GPU", 0), int(largest.get("memory", 0)))
            raise AdaptBenchError(
                f"{label} needs {res.describe()} per run, but no node of the Ray cluster has that "
                f"(largest: {have.describe()}). Add such a node, or run on CPU with --device cpu."
            )


# ---------------------------------------------------------------------------------------------- artifacts
class _RecordingCache(ArtifactCache):
    """An :class:`ArtifactCache` that remembers every artifact directory it handed out (to ship them)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.used: list[Path] = []

    def get_or_build(self, name, key, build, validate=None) -> Path:
        path = super().get_or_build(name, key, build, validate)
        self.used.append(path)
        return path


def pack_artifacts(paths: list[Path]) -> bytes:
    """An uncompressed tar of artifact directories (their data is mostly arrays; gzip would cost CPU)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in dict.fromkeys(paths):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


def unpack_artifacts(blob: bytes, names: list[str], cache_root: str | Path) -> list[str]:
    """Install the artifacts in ``blob`` under ``cache_root/artifacts`` where missing; returns those installed.

    Each is moved into place with one rename under the same lock file :class:`ArtifactCache` uses, so a run
    on this node that builds the same artifact at the same moment never sees half of it.
    """
    cache = ArtifactCache(Path(cache_root) / "artifacts")
    cache.root.mkdir(parents=True, exist_ok=True)
    installed: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-unpack-", dir=cache.root))
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
            # "data" refuses absolute paths, links out of the tree and device files
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        for name in names:
            target = cache.root / name
            with cache._lock(target):  # the lock ArtifactCache.get_or_build takes for this directory
                if (target / "key.json").is_file():
                    continue
                if not (tmp / name / "key.json").is_file():
                    raise AdaptBenchError(f"shipped artifact `{name}` has no key.json")
                shutil.rmtree(target, ignore_errors=True)  # a half-copied leftover without key.json
                os.replace(tmp / name, target)
                installed.append(name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return installed


@dataclass
class _Shipment:
    """The artifacts one prepare group built: their directory names and the tar in the object store."""

    names: list[str]
    blob: list[Any]  # [ObjectRef], wrapped in a list so Ray passes the reference instead of the bytes


def _group_key(cell: Cell) -> str:
    # the grouping of bench.runner.prepare_groups
    return stable_hash({"m": cell.method, "t": cell.task, "p": cell.preset, "c": cell.config})


# ---------------------------------------------------------------------------------------------- remote code
def expand_worker_path(path: str) -> str:
    """``path`` as the worker sees it: ``$VARS`` and ``~`` are expanded on the worker's own node."""
    return os.path.expanduser(os.path.expandvars(path))


def _prepare_task(cell: Cell, cache_root: str, threads: int, device: str, ship: bool
                  ) -> tuple[tuple[str | None, list[str]], bytes]:
    """Ray task: ``method.prepare(ctx)`` for one group; returns ((error, artifact names), tar or b"").

    The artifacts are built in this node's cache (under its lock, so two groups that need the same artifact
    on one node, or on a shared filesystem, build it once); with ``ship`` they are also packed for other nodes.
    """
    from bench.methods import get_method

    try:
        ctx = make_context(cell, expand_worker_path(cache_root), threads, device, RunLogger())
        ctx.cache = cache = _RecordingCache(ctx.cache.root)
        get_method(cell.method).prepare(ctx)  # type: ignore[attr-defined]
        paths = list(dict.fromkeys(cache.used))
        return (None, [p.name for p in paths]), pack_artifacts(paths) if ship and paths else b""
    except Exception as e:  # the runs build what is missing themselves and record the failure
        return (f"{type(e).__name__}: {e}", []), b""


def _run_task(cell: Cell, cache_root: str, threads: int, device: str, shipment: _Shipment | None,
              sink: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ray task: one cell; returns its record for the driver to store."""
    import ray

    cache_root = expand_worker_path(cache_root)
    if shipment is not None and shipment.names:
        root = Path(cache_root) / "artifacts"
        if not all((root / n / "key.json").is_file() for n in shipment.names):
            try:
                unpack_artifacts(ray.get(shipment.blob[0]), shipment.names, cache_root)
            except (ray.exceptions.RayError, AdaptBenchError, OSError, tarfile.TarError) as e:
                # the run builds the missing artifact itself: slower, same result
                print(f"{cell.label}: shipped artifacts not installed ({type(e).__name__}: {e}); building them",
                      file=sys.stderr)
    report = None
    if sink is not None:
        sink.update.remote(cell.run_id, 0.0, f"on {socket.gethostname()} pid {os.getpid()}")
        report = lambda run_id, fraction, message: sink.update.remote(run_id, fraction, message)
    meta, rows = compute_cell(cell, cache_root, threads, device, report)
    if meta["status"] == "ok":
        # the record is on its way to the driver; a driver that dies before storing it re-runs the cell
        discard_checkpoint(cell, cache_root)
    return meta, rows


class _ProgressSink:
    """Ray actor: collects running cells' progress reports until the driver drains them."""

    def __init__(self) -> None:
        self._updates: list[tuple[str, float, str]] = []

    def update(self, run_id: str, fraction: float, message: str) -> None:
        self._updates.append((run_id, fraction, message))

    def drain(self) -> list[tuple[str, float, str]]:
        out, self._updates = self._updates, []
        return out


# ---------------------------------------------------------------------------------------------- executor
@contextmanager
def _interrupt_flag() -> Iterator[threading.Event]:
    """While the block runs, Ctrl-C (SIGINT) sets the event instead of raising where it lands: delivered while the
    driver waits inside Ray (``ray.wait`` / ``ray.get``), the KeyboardInterrupt could be lost there and the sweep
    went on to its end (seen once in CI under load). The loop checks the event every second and raises then."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class RayExecutor:
    """Runs cells as Ray tasks on the cluster at ``address`` (``None``: ``RAY_ADDRESS`` or a local Ray)."""

    def __init__(self, address: str | None = None, device: str = "auto", torch_threads: int | None = None,
                 worker_cache_dir: str | None = None, max_retries: int = 3, progress_every: float = 10.0) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        check_torch_threads(torch_threads)
        check_device(device, here=False)
        if not (device in ("auto", "cpu") or device.startswith("cuda")):
            raise AdaptBenchError(f"device `{device}`: Ray places runs on CPUs and CUDA GPUs only; "
                                  f"use auto, cpu or cuda")
        self.address = address
        # Ray exposes a task's GPUs as devices 0..n-1 (CUDA_VISIBLE_DEVICES), so an index means nothing there
        self.device = "cuda" if device.startswith("cuda") else device
        self.torch_threads = torch_threads
        self.worker_cache_dir = worker_cache_dir
        self.max_retries = max_retries
        self.progress_every = progress_every
        self._ray: Any = None
        self._nodes: list[dict[str, float]] = []
        self._shipments: dict[str, _Shipment] = {}
        self._noted_cpu = False

    # ------------------------------------------------------------------ connection
    def _connect(self, stream: TextIO) -> Any:
        if self._ray is not None:
            return self._ray
        ray = import_ray()
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = self.address or "RAY_ADDRESS / a new local instance"
            raise AdaptBenchError(f"cannot connect to the Ray cluster at {where}: {e}") from None
        self._ray = ray
        self._nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        cpus = sum(n.get("CPU", 0) for n in self._nodes)
        gpus = sum(n.get("GPU", 0) for n in self._nodes)
        stream.write(f"Ray cluster: {len(self._nodes)} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s)\n")
        return ray

    def _disconnect(self) -> None:
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    def _worker_cache(self, cache_root: str) -> str:
        path = self.worker_cache_dir
        if path is None:
            return str(Path(cache_root).expanduser().absolute())
        # `$VARS` are left for each worker to expand (node-local scratch); a plain relative path is the driver's
        return path if "$" in path or path.startswith("~") else str(Path(path).absolute())

    def _ship(self) -> bool:
        # one node reading the driver's cache directory needs no copies
        return len(self._nodes) > 1 or self.worker_cache_dir is not None

    def _placement(self, cells: list[Cell], stream: TextIO) -> dict[str, Resources]:
        has_gpu = any(n.get("GPU", 0) > 0 for n in self._nodes)
        declared = {c.run_id: run_resources(c) for c in cells}
        placed = {i: placed_resources(r, self.device, has_gpu) for i, r in declared.items()}
        dropped = sorted({c.method for c in cells if declared[c.run_id].num_gpus > placed[c.run_id].num_gpus})
        if dropped and self.device == "auto" and not self._noted_cpu:
            self._noted_cpu = True
            stream.write(f"no GPU in the Ray cluster: {', '.join(dropped)} run on CPU (--device auto)\n")
        needed: dict[Resources, str] = {}
        for c in cells:
            needed.setdefault(placed[c.run_id], f"{c.method} on {c.task} ({c.preset})")
        check_feasible(needed, self._nodes)
        return placed

    def _options(self, res: Resources, name: str) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "name": name}
        if res.memory:
            opts["memory"] = res.memory
        return opts

    def _threads(self, res: Resources) -> int:
        return self.torch_threads or max(1, int(res.num_cpus))

    # ------------------------------------------------------------------ the executor interface
    def prepare(self, groups: list[Cell], cache_root: str, stream: TextIO) -> None:
        """Build each group's shared artifacts once, as Ray tasks, before any run is submitted."""
        if not groups:
            return
        ray = self._connect(stream)
        try:
            placed = self._placement(groups, stream)
            ship = self._ship()
            worker_cache = self._worker_cache(cache_root)
            stream.write(f"building shared artifacts for {len(groups)} (method, task) group(s) on Ray"
                         f"{' (shipped to the workers through the object store)' if ship else ''}\n")
            task = ray.remote(_prepare_task)
            refs = {}
            for cell in groups:
                res = placed[cell.run_id]
                info, blob = task.options(num_returns=2, max_retries=self.max_retries,
                                          **self._options(res, f"prepare {cell.method}/{cell.task}")).remote(
                    cell, worker_cache, self._threads(res), self.device, ship)
                refs[info] = (cell, blob)
            infos = []
            try:
                for ref in refs:
                    try:
                        infos.append(ray.get(ref))
                    except ray.exceptions.RayError as e:  # its worker was lost on every attempt
                        infos.append((f"{type(e).__name__}: {e}", []))
            except BaseException:
                for ref in refs:
                    ray.cancel(ref, force=True)
                raise
        except BaseException:
            self._disconnect()
            raise
        for (cell, blob), (err, names) in zip(refs.values(), infos):
            if err:
                stream.write(f"  preparing {cell.method}/{cell.task} failed ({err}); its runs will retry\n")
            elif ship:
                self._shipments[_group_key(cell)] = _Shipment(names, [blob])

    def run(self, cells: list[Cell], store: ResultsStore, cache_root: str, progress: Progress) -> list[CellResult]:
        ray = self._connect(progress.stream)
        try:
            return self._run(ray, cells, store, cache_root, progress)
        finally:
            self._shipments.clear()
            self._disconnect()

    def _run(self, ray, cells, store, cache_root, progress) -> list[CellResult]:
        placed = self._placement(cells, progress.stream)
        worker_cache = self._worker_cache(cache_root)
        sink = ray.remote(num_cpus=0)(_ProgressSink).remote()
        task = ray.remote(_run_task)
        with _interrupt_flag() as interrupted:
            return self._drive(ray, cells, store, placed, worker_cache, sink, task, interrupted, progress)

    def _drive(self, ray, cells, store, placed, worker_cache, sink, task, interrupted: threading.Event,
               progress: Progress) -> list[CellResult]:
        inflight: dict[Any, Cell] = {}
        results: list[CellResult] = []
        finished: set[str] = set()
        by_id = {c.run_id: c for c in cells}
        try:
            for cell in cells:
                res = placed[cell.run_id]
                # retry_exceptions=False: only system failures (a lost worker) are retried
                ref = task.options(max_retries=self.max_retries, retry_exceptions=False,
                                   **self._options(res, cell.label)).remote(
                    cell, worker_cache, self._threads(res), self.device,
                    self._shipments.get(_group_key(cell)), sink)
                inflight[ref] = cell
            while inflight:
                if interrupted.is_set():
                    raise KeyboardInterrupt
                ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=1.0)
                self._show_progress(ray, sink, by_id, finished, progress)
                for ref in ready:
                    cell = inflight.pop(ref)
                    result = self._store(ray, ref, cell, store)
                    finished.add(cell.run_id)
                    progress.finished(result)
                    results.append(result)
                progress.tick(self.progress_every)
        except BaseException:
            # Ctrl-C (or a failure to store): stop every outstanding run; the store holds only complete records
            for ref in inflight:
                ray.cancel(ref, force=True)
            raise
        return results

    @staticmethod
    def _show_progress(ray, sink, by_id, finished, progress: Progress) -> None:
        try:
            updates = ray.get(sink.drain.remote(), timeout=10)
        except ray.exceptions.RayError:
            return  # progress is cosmetic; never let it stop the sweep
        for run_id, fraction, message in updates:
            if run_id in finished:
                continue
            if run_id not in progress.running:
                progress.started(by_id[run_id])
            progress.update(run_id, fraction, message)

    def _store(self, ray, ref, cell: Cell, store: ResultsStore) -> CellResult:
        """Write ``ref``'s record on the driver; a task that itself failed becomes a failed record."""
        try:
            meta, rows = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the harness raised on the worker (not the method)
            meta, rows = self._failed(cell, f"error on the Ray worker: {e.cause!r}", str(e)), []
        except ray.exceptions.RayError as e:  # worker or node lost more than max_retries times
            reason = (f"Ray worker lost ({type(e).__name__}) on each of {self.max_retries + 1} attempt(s): "
                      "killed, out of memory, or its node died")
            meta, rows = self._failed(cell, reason, str(e)), []
        if (done := stored_elsewhere(cell, store)) is not None:  # another driver stored it (Ray takes no run lock)
            return done
        store.write(cell.run_id, meta, rows)
        return CellResult(cell.run_id, cell.label, meta["status"], meta["reason"], float(meta["wall_time_s"]))

    @staticmethod
    def _failed(cell: Cell, reason: str, tb: str) -> dict[str, Any]:
        return {"status": "failed", "reason": reason, "traceback": tb, "method": cell.method, "task": cell.task,
                "seed": cell.seed, "preset": cell.preset, "config": cell.config, "overrides": cell.overrides,
                "executor": "ray", "wall_time_s": 0.0}
