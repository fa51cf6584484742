"""Plan a sweep (suite x preset x methods x tasks x seeds), run its cells, store each as one record.

Each cell is a :class:`Cell`; its id is a hash of (method, config, task id, seed, preset), so re-running the
same command finds finished cells in the store and skips them.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import platform
import random
import re
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from bench.config import check_preset, config_to_dict, resolve_config, run_id_omissions
from bench.method import ArtifactCache, RunContext, RunLogger, stable_hash, support_reason
from bench.methods import get_method, method_registry
from bench.registry import AdaptBenchError, UnknownNameError
from bench.store import ResultsStore

EVAL_KEY = "eval/return"


# ---------------------------------------------------------------------------------------------- suites
@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    preset: str
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: int
    parts: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()
    """``(methods, tasks)`` blocks whose cross products make the suite (one block = ``(methods, tasks)``); an
    ablation suite pairs each experiment's methods with its own tasks this way."""
    experiments: tuple[tuple[str, str], ...] = ()
    """``(name, title)`` of each block, in ``parts`` order (``name`` defaults to ``part<k>``, ``title`` to it)."""
    headline: bool = False
    """A headline suite (``headline = true``): the leaderboard's per-family curves show its methods, and the
    ablation variants it drops are left to their experiments' own figures."""


@cache
def suites() -> dict[str, Suite]:
    data = tomllib.loads(resources.files("bench").joinpath("suites.toml").read_text())
    out = {}
    for name, s in data.items():
        parts = tuple((tuple(p["methods"]), tuple(p["tasks"])) for p in s.get("parts", []))
        if not parts:
            parts = ((tuple(s["methods"]), tuple(s["tasks"])),)
        experiments = tuple((p.get("name", f"part{k}"), p.get("title", p.get("name", f"part{k}")))
                            for k, p in enumerate(s.get("parts", [])))
        methods = tuple(dict.fromkeys(m for ms, _ in parts for m in ms))
        tasks = tuple(dict.fromkeys(t for _, ts in parts for t in ts))
        out[name] = Suite(name, s["description"], s["preset"], methods, tasks, int(s["seeds"]), parts, experiments,
                          bool(s.get("headline", False)))
    return out


def headline_methods() -> set[str]:
    """The methods that a headline suite runs: listed by it (plugins included through its ``"*"``) and supporting
    at least one of its tasks."""
    from tasks import get_task

    out = set()
    for s in suites().values():
        if not s.headline:
            continue
        try:
            specs = [get_task(t) for t in expand_tasks(list(s.tasks))]
            names = expand_methods(list(s.methods))
        except AdaptBenchError:  # a suite naming an uninstalled plugin: a leaderboard never fails on it
            continue
        for m in names:
            try:
                if any(support_reason(get_method(m), spec) is None for spec in specs):
                    out.add(m)
            except Exception:  # a plugin that no longer imports or whose supports() raises: not shown
                continue
    return out


def suite_plan(suite: Suite, seeds: list[int], preset: str, overrides: dict[str | None, dict[str, str]] | None,
               methods: list[str] | None = None, tasks: list[str] | None = None) -> Plan:
    """The plan of ``suite``. One block: ``methods`` / ``tasks`` (from the command line) replace the suite's. Several
    blocks: they filter each block (a block left empty is dropped), so ``--tasks DarkRoom-v0`` runs the Dark Room
    experiments of an ablation suite only."""
    if len(suite.parts) <= 1:
        return make_plan(methods or expand_methods(list(suite.methods)), tasks or expand_tasks(list(suite.tasks)),
                         seeds, preset, overrides)
    all_methods = expand_methods(list(suite.methods))
    make_plan(all_methods, [], seeds, preset, overrides)  # validates names and overrides against the whole suite
    cells, skipped, planned = [], [], set()
    for part_methods, part_tasks in suite.parts:
        ms = [m for m in expand_methods(list(part_methods)) if methods is None or m in methods]
        ts = [t for t in expand_tasks(list(part_tasks)) if tasks is None or t in tasks]
        if not ms or not ts:
            continue
        planned.update(ms)
        own = {k: v for k, v in (overrides or {}).items() if k is None or k in ms}
        part = make_plan(ms, ts, seeds, preset, own, check_unused=False)
        cells += part.cells
        skipped += part.skipped
    if not cells and not skipped:
        raise AdaptBenchError(f"no block of suite `{suite.name}` matches --methods {methods} / --tasks {tasks}; "
                              f"its blocks: {[(list(m), list(t)) for m, t in suite.parts]}")
    check_override_targets(overrides or {}, sorted(planned))  # one dropped by the filter would be silently lost
    return plan_dedup(Plan(cells, skipped, preset))


def get_suite(name: str) -> Suite:
    table = suites()
    if name not in table:
        raise UnknownNameError("suite", name, list(table), "Run `bench list suites`.")
    return table[name]


def expand_tasks(patterns: tuple[str, ...] | list[str]) -> list[str]:
    from tasks import get_task, list_tasks

    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith("family:"):
            family = pattern.removeprefix("family:")
            ids = [s.id for s in list_tasks() if s.family == family]
            if not ids:
                raise UnknownNameError("task family", family, sorted({s.family for s in list_tasks()}))
            out += ids
        else:
            out.append(get_task(pattern).id)
    return list(dict.fromkeys(out))


def expand_methods(patterns: tuple[str, ...] | list[str]) -> list[str]:
    """``"*"``: every registered method (plugins included); ``"-<glob>"``: drop the names matching the glob (an
    ablation suite's variants out of a headline suite); else a method name."""
    import fnmatch

    reg = method_registry()
    out: list[str] = []
    drop: list[str] = []
    for pattern in patterns:
        if pattern == "*":
            out += reg.names()
        elif pattern.startswith("-"):
            if not fnmatch.filter(reg.names(), pattern[1:]):
                raise UnknownNameError("method pattern", pattern[1:], reg.names())
            drop.append(pattern[1:])
        else:
            reg.get(pattern)  # raises with close matches
            out.append(pattern)
    return [m for m in dict.fromkeys(out) if not any(fnmatch.fnmatchcase(m, d) for d in drop)]


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Cell:
    method: str
    task: str
    seed: int
    preset: str
    config: dict[str, Any] | None
    overrides: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    budget: dict[str, Any] | None = field(default=None, hash=False)
    """The task's budget at ``preset`` (part of the id: a changed budget is a new run, never a stale skip)."""
    id_omit: tuple[str, ...] = field(default=(), hash=False, compare=False)
    """Config fields the id leaves out (:func:`bench.config.run_id_omissions`: later fields at their default;
    :func:`run_id_ignored`: fields the task's runs do not read)."""

    @property
    def run_id(self) -> str:
        config = self.config if self.config is None else {
            k: v for k, v in self.config.items() if k not in self.id_omit}
        key = {"method": self.method, "config": config, "task": self.task, "seed": self.seed,
               "preset": self.preset}
        if self.budget is not None:
            key["budget"] = self.budget
        return f"{self.method}.{self.task}.s{self.seed}.{stable_hash(key, 10)}"

    @property
    def label(self) -> str:
        return f"{self.method}/{self.task}/seed{self.seed}"


@dataclass
class Plan:
    cells: list[Cell]
    skipped: list[tuple[str, str, str]]  # (method, task, reason)
    preset: str


def check_override_targets(overrides: dict[str | None, dict[str, str]], methods: list[str]) -> None:
    """Every ``method.field`` override names a method of the plan: an unknown name fails with close matches, a
    registered method that is not planned fails too (its setting would be silently lost)."""
    for target in overrides:
        if target is None or target in methods:
            continue
        if target in method_registry():
            raise AdaptBenchError(f"--set {target}.…: method `{target}` is not in this plan (its methods: "
                                  f"{', '.join(methods)}); add it to --methods or drop the override")
        raise UnknownNameError("method in override", target, methods)


def make_plan(
    methods: list[str],
    tasks: list[str],
    seeds: list[int],
    preset: str,
    overrides: dict[str | None, dict[str, str]] | None = None,
    check_unused: bool = True,
) -> Plan:
    """Validate every name and override, then list the cells; unsupported pairs are skipped with a reason."""
    from tasks import get_task

    check_preset(preset)
    overrides = overrides or {}
    check_override_targets(overrides, methods)
    global_over = overrides.get(None, {})
    cells, skipped = [], []
    configs = {}
    for m in methods:
        method = get_method(m)
        check_task_presets(method)
        own = dict(overrides.get(m, {}))
        cls = getattr(method, "Config", None)
        # a bare `field=value` applies to every method that has that field
        if cls is not None:
            names = {f for f in getattr(cls, "__dataclass_fields__", {})}
            own = {**{k: v for k, v in global_over.items() if k in names}, **own}
        configs[m] = (resolve_config(method, preset, own), own)  # validates the overrides before any task
    if global_over and check_unused:
        unused = [k for k in global_over if not any(
            k in getattr(getattr(get_method(m), "Config", None), "__dataclass_fields__", {}) for m in methods)]
        if unused:
            from bench.config import ConfigError

            raise ConfigError(f"override field(s) {unused} belong to no planned method's config")
    for t in tasks:
        spec = get_task(t)
        budget = dataclasses.asdict(spec.budget(preset))
        for m in methods:
            method = get_method(m)
            reason = support_reason(method, spec)
            if reason is not None:
                skipped.append((m, t, reason))
                continue
            own = configs[m][1]
            config = resolve_config(method, preset, own, task=spec.id)  # with the method's per-task preset
            omit = run_id_omissions(config) + run_id_ignored(method, spec)
            for s in seeds:
                cells.append(Cell(m, spec.id, s, preset, config_to_dict(config), own, budget, omit))
    return plan_dedup(Plan(cells, skipped, preset))


def check_task_presets(method: Any) -> None:
    """A method's ``task_presets`` name real presets and registered tasks (a misspelt or renamed task id would
    otherwise drop its setting silently); the field values are checked when a config is resolved."""
    from bench.config import ConfigError, task_preset
    from tasks import get_task

    for preset, tasks in (getattr(method, "task_presets", None) or {}).items():
        check_preset(preset)
        for task_id in tasks:
            try:
                get_task(task_id)
            except UnknownNameError as e:
                raise ConfigError(f"method `{method.name}`: task_presets[{preset!r}]: {e}") from e
            task_preset(method, preset, task_id)  # the entry's shape


def run_id_ignored(method: Any, spec: Any) -> tuple[str, ...]:
    """Config fields ``method`` says ``spec``'s runs do not read (its optional ``run_id_ignores(task)``), left out
    of their run ids: a field added for one kind of task then leaves the stored runs of the others where they are.
    """
    hook = getattr(method, "run_id_ignores", None)
    return tuple(hook(spec)) if hook is not None else ()


def plan_dedup(plan: Plan) -> Plan:
    """Drop repeated cells, and put the cells of evaluation-only variants (methods with a ``trains_as``: they
    evaluate another method's trained model from the artifact cache) after all others: run beside the run that
    trains their model, one would wait on the cache's lock and leave its worker idle."""
    seen, cells = set(), []
    for c in plan.cells:
        if c.run_id not in seen:
            seen.add(c.run_id)
            cells.append(c)
    plan.cells = sorted(cells, key=lambda c: getattr(get_method(c.method), "trains_as", None) is not None)
    return plan


# ---------------------------------------------------------------------------------------------- one cell
def _git_commit() -> str | None:
    # not cached: a worker process runs many cells over hours, and each record names the commit of its own start
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict[str, Any]:
    versions = {}
    for dist in ("adapt-bench", "torch", "gymnasium", "mujoco", "dm-control", "minigrid", "numpy", "pandas"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"versions": versions, "python": platform.python_version(), "git_commit": _git_commit(),
            "host": socket.gethostname(), "platform": platform.platform()}


_DEVICE = re.compile(r"auto|(cpu|mps|xpu|cuda)(:\d+)?")


def check_device(device: str, here: bool = True) -> str:
    """``device`` if it is ``auto`` or a torch device type (``cpu``, ``cuda``, ``mps``, ``xpu``) with an optional
    ``:N``; with ``here`` (runs on this machine, not on Ray
    workers), a CUDA device this machine's torch cannot use is refused before any run starts, rather than every
    run failing (or a CPU-only method storing ``cuda`` as its device)."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        close = (["cuda"] if str(device).lower().startswith("gpu")
                 else difflib.get_close_matches(str(device), ["auto", "cpu", "mps", "cuda"], n=1))
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise AdaptBenchError(f"unknown device `{device}`: use auto, cpu, cuda[:N], mps or xpu[:N].{hint}")
    if here and device.startswith("mps"):
        import torch

        if not torch.backends.mps.is_available():
            raise AdaptBenchError("--device mps: this machine's torch has no MPS device; use --device cpu or auto")
    if here and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AdaptBenchError(f"--device {device}: this machine's torch has no CUDA device "
                                  f"(torch {torch.__version__}); use --device cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise AdaptBenchError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_torch_threads(threads: int | None) -> None:
    """``None`` (the executor's default share of the cores) or a count >= 1."""
    if threads is not None and threads < 1:
        raise AdaptBenchError(f"--torch-threads must be >= 1, got {threads}")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class CellResult:
    run_id: str
    label: str
    status: str  # ok | failed
    reason: str | None
    wall_time_s: float
    elsewhere: bool = False
    """Computed by another ``bench run`` on the same results directory while this one waited or ran."""


def cell_config(cell: Cell) -> Any:
    """``cell``'s config as a worker resolves it: preset, the method's per-task preset, overrides (the plan's)."""
    return resolve_config(get_method(cell.method), cell.preset, cell.overrides, task=cell.task)


def make_context(cell: Cell, cache_root: str, torch_threads: int, device: str, logger: RunLogger,
                 progress=None) -> RunContext:
    """The :class:`RunContext` of ``cell``; sets torch threads and seeds the global generators from the seed."""
    import torch

    from tasks import get_task

    spec = get_task(cell.task)
    config = cell_config(cell)
    if config_to_dict(config) != cell.config:
        raise AdaptBenchError(f"{cell.label}: config resolved in the worker differs from the plan")
    torch.set_num_threads(torch_threads)
    seed_everything(cell.seed)
    cache_dir = Path(cache_root)
    return RunContext(
        task=spec, seed=cell.seed, preset=cell.preset, budget=spec.budget(cell.preset), config=config,
        device=resolve_device(device), log=logger, checkpoint_dir=cache_dir / "checkpoints" / cell.run_id,
        cache=ArtifactCache(cache_dir / "artifacts"), rng=np.random.default_rng(cell.seed),
        torch_threads=torch_threads,
        progress_fn=(lambda f, msg: progress(cell.run_id, f, msg)) if progress else None,
    )


def prepare_groups(cells: list[Cell]) -> list[Cell]:
    """One representative cell per (method, task, preset, config) whose method declares shared artifacts.

    A method may define ``prepare(ctx)``: build what several of its runs share (for example a learning-history
    dataset) into ``ctx.cache``. Executors call it once per group before the runs; ``run`` must still build
    anything missing itself (the cache is idempotent), so ``prepare`` only removes duplicated work.
    """
    groups: dict[str, Cell] = {}
    for cell in cells:
        if callable(getattr(get_method(cell.method), "prepare", None)):
            key = stable_hash({"m": cell.method, "t": cell.task, "p": cell.preset, "c": cell.config})
            groups.setdefault(key, cell)
    return list(groups.values())


def execute_prepare(cell: Cell, cache_root: str, torch_threads: int = 1, device: str = "auto",
                    progress=None) -> str | None:
    """Run ``method.prepare(ctx)`` for ``cell``'s group; returns an error message instead of raising."""
    try:
        ctx = make_context(cell, cache_root, torch_threads, device, RunLogger(), progress)
        get_method(cell.method).prepare(ctx)  # type: ignore[attr-defined]
    except Exception as e:  # the runs will retry the build and record the failure with a traceback
        return f"{type(e).__name__}: {e}"
    return None


def compute_cell(
    cell: Cell,
    cache_root: str,
    torch_threads: int = 1,
    device: str = "auto",
    progress=None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one cell and return its record ``(meta, rows)`` without storing it.

    Never raises for a method's own errors (they become a failed record with the traceback). Executors whose
    workers cannot reach the results store (Ray on other nodes) send this record back to the driver, which
    stores it with :meth:`ResultsStore.write`; :func:`execute_cell` stores it in place.
    """
    from tasks import get_task
    from tasks.references import get_references

    t0 = time.time()
    # The code that runs is the code checked out now: a commit made while a long run trains must not be named as
    # the run's commit, so the environment (git commit included) is read before the method starts, not after.
    env = environment_info()
    spec = get_task(cell.task)
    method = get_method(cell.method)
    cache_dir = Path(cache_root)
    logger = RunLogger()
    status, reason, tb = "ok", None, None
    refs = None
    try:
        refs = get_references(spec, cell.preset, cache_dir)
        ctx = make_context(cell, cache_root, torch_threads, device, logger, progress)
        ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        method.run(ctx)
    except Exception as e:  # a method's failure is a result, not a crash of the sweep
        status, reason, tb = "failed", f"{type(e).__name__}: {e}", traceback.format_exc()
    if status == "ok" and not any(r["key"] == EVAL_KEY for r in logger.rows):
        status, reason = "failed", f"no evaluation rows: the method logged no `{EVAL_KEY}`"
    wall = time.time() - t0
    meta = {
        "deviations": paper_deviations(method, cell_config(cell), cell.task),
        "status": status, "reason": reason, "traceback": tb,
        "method": cell.method, "method_provider": method_registry().provider(cell.method),
        "config": cell.config, "overrides": cell.overrides, "preset": cell.preset,
        "task": spec.id, "task_version": spec.version, "family": spec.family, "seed": cell.seed,
        "references": None if refs is None else refs.__dict__,
        "device": resolve_device(device), "torch_threads": torch_threads,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "wall_time_s": round(wall, 3),
        **env,
    }
    return meta, logger.rows


def discard_checkpoint(cell: Cell, cache_root: str) -> None:
    """Remove a finished run's private checkpoint directory (kept while the run may still be resumed)."""
    import shutil

    shutil.rmtree(Path(cache_root) / "checkpoints" / cell.run_id, ignore_errors=True)


STORED_ELSEWHERE = "stored by another `bench run`"


def stored_elsewhere(cell: Cell, store: ResultsStore, before: str = "failed") -> CellResult | None:
    """The result of ``cell`` if another driver stored it since this one saw status ``before``: an ok record (a
    sweep never plans a stored ok cell), or a failure that was not there before (it stands unless a later
    ``--retry-failed`` asks again). None when this driver should compute, or write, the record itself."""
    now = store.status(cell.run_id)
    if now != "ok" and not (now == "failed" and before != "failed"):
        return None
    reason = store.read_meta(cell.run_id).get("reason")
    return CellResult(cell.run_id, cell.label, now, STORED_ELSEWHERE + (f": {reason}" if reason else ""), 0.0,
                      elsewhere=True)


def execute_cell(
    cell: Cell,
    results_root: str,
    cache_root: str,
    torch_threads: int = 1,
    device: str = "auto",
    progress=None,
) -> CellResult:
    """Run one cell and store its record; never raises for a method's own errors (they become failed runs).

    The run holds its claim in the store meanwhile: a second ``bench run`` on the same results directory waits
    for it, then finds the record stored and does not compute it again (nor write into its checkpoints)."""
    store = ResultsStore(results_root)

    def waiting() -> None:
        if progress is not None:
            progress(cell.run_id, 0.0, "waiting: another `bench run` is running this cell")

    before = store.status(cell.run_id)
    with store.claim(cell.run_id, on_wait=waiting):
        if (done := stored_elsewhere(cell, store, before)) is not None:
            return done
        meta, rows = compute_cell(cell, cache_root, torch_threads, device, progress)
        store.write(cell.run_id, meta, rows)
    if meta["status"] == "ok":
        discard_checkpoint(cell, cache_root)
    return CellResult(cell.run_id, cell.label, meta["status"], meta["reason"], meta["wall_time_s"])


def paper_deviations(method: Any, config: Any, task: str | None = None) -> dict[str, list[Any]]:
    """``{field: [paper value, used value]}`` for every field this run's config changes from the paper's on
    ``task`` (the paper preset with the method's per-task settings there: DrQ-v2's n-step 1 on walker is the
    paper's, not a deviation)."""
    if config is None:
        return {}
    paper = config_to_dict(resolve_config(method, "paper", task=task)) or {}
    used = config_to_dict(config) or {}
    return {k: [paper[k], used[k]] for k in used if paper.get(k) != used[k]}


def default_torch_threads(workers: int) -> int:
    """Torch threads per worker: one, unless a worker has at least 4 cores to itself.

    Measured here (2 cores): with two threads per process under contention, a DrQ-v2 smoke run took 334 s
    against 38 s with one thread; small networks gain nothing from intra-op threads. ``--torch-threads``
    overrides this.
    """
    per_worker = (os.cpu_count() or 1) // max(1, workers)
    return per_worker if per_worker >= 4 else 1
