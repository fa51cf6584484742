"""The harness end to end: plans, the store, resume, failures, bad input, the reference methods."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.config import ConfigError, apply_overrides, parse_set_args, resolve_config
from bench.method import ArtifactCache, RunLogger
from bench.methods import get_method, method_registry
from bench.registry import AdaptBenchError, DuplicateNameError, Registry, UnknownNameError
from bench.runner import make_plan
from bench.store import CorruptRecordError, ResultsStore


# ---------------------------------------------------------------------------------------------- test methods
@dataclass
class _Cfg:
    lr: float = 3e-4
    """learning rate"""
    layers: int = 4
    """number of layers"""
    use_aug: bool = True
    """augmentation switch"""


class _Boom:
    name = "test-boom"

    def supports(self, task):
        return task.family == "in-context" or "in-context only"

    def run(self, ctx):
        ctx.log(0, {"eval/return": 1.0}, axis="episode")
        raise RuntimeError("exploded on purpose")


class _NaN:
    name = "test-nan"

    def supports(self, task):
        return True

    def run(self, ctx):
        ctx.log(0, {"eval/return": float("nan")}, axis="episode")


class _Silent:
    name = "test-silent"

    def supports(self, task):
        return True

    def run(self, ctx):
        ctx.log(0, {"losses/x": 1.0})


class _Configured:
    name = "test-configured"
    Config = _Cfg
    presets = {"smoke": {"layers": 1}}

    def supports(self, task):
        return True

    def run(self, ctx):
        assert ctx.config.layers == 1  # the smoke preset applied
        ctx.log(0, {"eval/return": 0.0}, axis="episode")


class _PerTask:
    """A preset setting on one task only (``task_presets``): Key-to-Door runs with 2 layers, Dark Room with the
    smoke preset's 1; each run checks that it got its own."""

    name = "test-per-task"
    Config = _Cfg
    presets = {"smoke": {"layers": 1}}
    task_presets = {"smoke": {"DarkKeyToDoor-v0": {"layers": 2}}}

    def supports(self, task):
        return task.family == "in-context" or "in-context only"

    def run(self, ctx):
        assert ctx.config.layers == (2 if ctx.task.id == "DarkKeyToDoor-v0" else 1)
        ctx.log(0, {"eval/return": float(ctx.config.layers)}, axis="episode")


@pytest.fixture
def test_methods():
    reg = method_registry()
    for m in (_Boom(), _NaN(), _Silent(), _Configured(), _PerTask()):
        reg.register(m.name, m, "tests", replace=True)
    yield
    for m in ("test-boom", "test-nan", "test-silent", "test-configured", "test-per-task"):
        reg._entries.pop(m, None)


def _run(results_dir, cache_dir, *args) -> int:
    return main(["run", "--results-dir", str(results_dir), "--cache-dir", str(cache_dir), *args])


# ---------------------------------------------------------------------------------------------- registry / config
def test_registry_close_matches_and_duplicates():
    reg: Registry[int] = Registry("task", hint="Run `bench list tasks`.")
    reg.register("DarkRoom-v0", 1, "adapt-bench")
    with pytest.raises(UnknownNameError, match=r"Unknown task `DarkRom-v0`\. Did you mean `DarkRoom-v0`\?"):
        reg.get("DarkRom-v0")
    with pytest.raises(DuplicateNameError, match="adapt-bench.*other-dist"):
        reg.register("DarkRoom-v0", 2, "other-dist")


def test_unknown_task_suggests():
    from tasks import get_task

    with pytest.raises(UnknownNameError, match="Did you mean `DarkRoom-v0`"):
        get_task("DarkRom-v0")


def test_config_overrides_typed_and_validated():
    cfg = _Cfg()
    new = apply_overrides(cfg, {"lr": "1e-3", "layers": "2", "use_aug": "false"}, "m")
    assert (new.lr, new.layers, new.use_aug) == (1e-3, 2, False)
    with pytest.raises(ConfigError, match="unknown config field `layer`.*Did you mean `layers`"):
        apply_overrides(cfg, {"layer": "2"}, "m")
    with pytest.raises(ConfigError, match="`layers` expects an int, got '2.5'"):
        apply_overrides(cfg, {"layers": "2.5"}, "m")
    with pytest.raises(ConfigError, match="`use_aug` expects a bool"):
        apply_overrides(cfg, {"use_aug": "maybe"}, "m")
    assert parse_set_args(["lr=1", "drqv2.batch=64"]) == {None: {"lr": "1"}, "drqv2": {"batch": "64"}}
    with pytest.raises(ConfigError):
        parse_set_args(["novalue"])
    assert resolve_config(_Configured(), "smoke").layers == 1
    assert resolve_config(_Configured(), "paper").layers == 4


def test_logger_rejects_nan_and_bad_axis():
    log = RunLogger()
    with pytest.raises(ValueError, match="nan"):
        log(3, {"eval/return": math.nan})
    with pytest.raises(ValueError, match="axis"):
        log(3, {"eval/return": 1.0}, axis="frames")


def test_artifact_cache_builds_once_and_rejects_stale(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def build(d):
        calls.append(1)
        (d / "data.npy").write_bytes(b"x" * 10)

    p1 = cache.get_or_build("hist", {"task": "DarkRoom-v0", "seed": 0}, build)
    p2 = cache.get_or_build("hist", {"task": "DarkRoom-v0", "seed": 0}, build)
    assert p1 == p2 and len(calls) == 1
    # another key (task version, preset) is another artifact, never the same one reused
    p3 = cache.get_or_build("hist", {"task": "DarkRoom-v1", "seed": 0}, build)
    assert p3 != p1 and len(calls) == 2
    # a truncated artifact is detected by its validator and rebuilt
    (p1 / "data.npy").write_bytes(b"x")
    cache.get_or_build("hist", {"task": "DarkRoom-v0", "seed": 0}, build,
                       validate=lambda d: (d / "data.npy").stat().st_size == 10)
    assert len(calls) == 3
    assert not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- store
def _meta(**kw):
    return {"status": "ok", "method": "m", "task": "DarkRoom-v0", "seed": 0, "preset": "smoke", **kw}


def test_store_atomic_roundtrip_and_corruption(tmp_path):
    store = ResultsStore(tmp_path)
    rows = [{"axis": "episode", "step": i, "key": "eval/return", "value": float(i)} for i in range(5)]
    store.write("r1", _meta(), rows)
    rec = store.read("r1")
    assert rec.curve["value"].tolist() == [0, 1, 2, 3, 4]
    assert not list((tmp_path / "runs").glob(".tmp-*"))
    # truncated curve
    p = tmp_path / "runs" / "r1" / "curve.parquet"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(CorruptRecordError, match="r1.*checksum"):
        store.read("r1")
    # broken JSON
    store.write("r2", _meta(), rows)
    (tmp_path / "runs" / "r2" / "meta.json").write_text('{"status": "ok", "run_')
    with pytest.raises(CorruptRecordError, match="not valid JSON"):
        store.read("r2")
    assert store.status("r2") == "corrupt"
    assert store.status("r1") == "corrupt"  # the truncated curve: `bench run` computes it again
    errors = [r for r in store.iter_records() if isinstance(r, CorruptRecordError)]
    assert len(errors) == 2


def test_run_recomputes_a_record_whose_curve_was_truncated(results_dir, cache_dir, capsys):
    args = ("--methods", "random", "--tasks", "DarkRoom-v0", "--preset", "smoke")
    assert _run(results_dir, cache_dir, *args) == 0
    (record,) = (p for p in (results_dir / "runs").iterdir() if not p.name.startswith("."))
    curve = record / "curve.parquet"
    good = curve.read_bytes()
    curve.write_bytes(good[:100])
    capsys.readouterr()
    assert _run(results_dir, cache_dir, *args, "--dry-run") == 0
    assert "the stored record is corrupt: it runs again" in capsys.readouterr().out
    assert _run(results_dir, cache_dir, *args) == 0
    assert "0 already stored, 1 to run" in capsys.readouterr().err
    assert curve.read_bytes() == good  # the same seed computes the same curve
    assert ResultsStore(results_dir).status(record.name) == "ok"


def test_store_cleans_tmp_of_dead_process(tmp_path):
    store = ResultsStore(tmp_path)
    dead = tmp_path / "runs" / ".tmp-r9-999999999-abcdef12"
    dead.mkdir(parents=True)
    (dead / "meta.json").write_text("{")
    assert store.run_ids() == []
    store.cleanup_stale()
    assert not dead.exists()


def test_unwritable_results_root_fails_before_running(tmp_path, cache_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = _run(blocker, cache_dir, "--methods", "random", "--tasks", "DarkRoom-v0")
    assert code == 2
    assert "not writable" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- runs
def test_reference_methods_score_zero_and_hundred(results_dir, cache_dir):
    assert _run(results_dir, cache_dir, "--methods", "random,oracle", "--tasks", "DarkRoom-v0,DarkKeyToDoor-v0",
                "--preset", "quick", "--seeds", "2") == 0
    from bench.leaderboard import load_scores

    runs, curves, _, messages = load_scores(results_dir)
    assert not messages and len(runs) == 8
    oracle = runs[runs["method"] == "oracle"]
    np.testing.assert_allclose(curves[curves["method"] == "oracle"]["score"], 100.0)
    assert (oracle["final"] == 100).all()
    rnd = runs[runs["method"] == "random"]
    assert rnd["final"].abs().max() < 10, rnd[["task", "final"]]


def test_rerun_skips_finished_and_records_are_traceable(results_dir, cache_dir, capsys):
    args = ("--methods", "random", "--tasks", "DarkRoom-v0", "--seeds", "2")
    assert _run(results_dir, cache_dir, *args) == 0
    store = ResultsStore(results_dir)
    ids = store.run_ids()
    mtimes = {i: (results_dir / "runs" / i / "meta.json").stat().st_mtime_ns for i in ids}
    capsys.readouterr()
    assert _run(results_dir, cache_dir, *args) == 0
    assert "2 already stored, 0 to run" in capsys.readouterr().err
    assert {i: (results_dir / "runs" / i / "meta.json").stat().st_mtime_ns for i in ids} == mtimes
    meta = json.loads((results_dir / "runs" / ids[0] / "meta.json").read_text())
    for key in ("method", "config", "preset", "task", "task_version", "seed", "versions", "git_commit", "device",
                "wall_time_s", "references"):
        assert key in meta, key
    for dist in ("adapt-bench", "torch", "gymnasium", "mujoco", "dm-control"):
        assert dist in meta["versions"]


class _Committing:
    """Stands for a commit made while a long run trains: the checkout's HEAD changes during ``run``."""

    name = "test-committing"

    def supports(self, task):
        return True

    def run(self, ctx):
        _Committing.head = "after"
        ctx.log(0, {"eval/return": 0.0}, axis="episode")


def test_record_names_the_commit_checked_out_when_the_run_started(monkeypatch, cache_dir):
    import bench.runner as runner

    _Committing.head = "before"
    monkeypatch.setattr(runner, "_git_commit", lambda: _Committing.head)
    method_registry().register("test-committing", _Committing(), "tests", replace=True)
    try:
        cell = make_plan(["test-committing"], ["DarkRoom-v0"], [0], "smoke").cells[0]
        meta, _ = runner.compute_cell(cell, str(cache_dir))
    finally:
        method_registry()._entries.pop("test-committing", None)
    assert meta["status"] == "ok", meta["reason"]
    assert meta["git_commit"] == "before"


def test_failures_are_stored_sweep_goes_on_and_retry(results_dir, cache_dir, test_methods, capsys):
    code = _run(results_dir, cache_dir, "--methods", "test-boom,test-nan,test-silent,random",
                "--tasks", "DarkRoom-v0")
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED test-boom/DarkRoom-v0/seed0: RuntimeError: exploded on purpose" in err
    assert "--retry-failed" in err
    store = ResultsStore(results_dir)
    metas = {store.read_meta(i)["method"]: store.read_meta(i) for i in store.run_ids()}
    assert metas["random"]["status"] == "ok"
    assert metas["test-boom"]["status"] == "failed" and "exploded on purpose" in metas["test-boom"]["traceback"]
    assert metas["test-nan"]["status"] == "failed" and "nan" in metas["test-nan"]["reason"]
    assert metas["test-silent"]["reason"].startswith("no evaluation rows")
    # failed runs are never scored
    from bench.leaderboard import load_scores

    runs, _, _, messages = load_scores(results_dir)
    assert set(runs["method"]) == {"random"} and len(messages) == 3
    # without --retry-failed the failures stay (and the exit status says so); with it they run again
    assert _run(results_dir, cache_dir, "--methods", "test-boom", "--tasks", "DarkRoom-v0") == 1
    before = store.read_meta(metas["test-boom"]["run_id"])["started"]
    assert _run(results_dir, cache_dir, "--methods", "test-boom", "--tasks", "DarkRoom-v0", "--retry-failed") == 1
    assert store.status(metas["test-boom"]["run_id"]) == "failed"
    assert store.read_meta(metas["test-boom"]["run_id"])["started"] >= before


def test_unsupported_pairs_are_skipped_with_reason(test_methods, capsys, results_dir, cache_dir):
    plan = make_plan(["test-boom", "oracle"], ["DarkRoom-v0", "DMC-cartpole-swingup-v0"], [0], "smoke")
    reasons = {(m, t): r for m, t, r in plan.skipped}
    assert reasons[("test-boom", "DMC-cartpole-swingup-v0")] == "in-context only"
    assert "planner" in reasons[("oracle", "DMC-cartpole-swingup-v0")]
    assert main(["run", "--methods", "oracle,random", "--tasks", "DMC-cartpole-swingup-v0", "--dry-run",
                 "--results-dir", str(results_dir)]) == 0
    assert "skip    oracle/DMC-cartpole-swingup-v0" in capsys.readouterr().out
    # nothing at all to run: an error naming why, not a silent "0 to run"
    assert main(["run", "--methods", "oracle", "--tasks", "DMC-cartpole-swingup-v0", "--dry-run",
                 "--results-dir", str(results_dir)]) == 2
    assert "nothing to run" in (err := capsys.readouterr().err) and "shortest-path planner" in err


def test_config_presets_and_overrides_change_run_id(test_methods):
    a = make_plan(["test-configured"], ["DarkRoom-v0"], [0], "smoke").cells[0]
    b = make_plan(["test-configured"], ["DarkRoom-v0"], [0], "smoke", {None: {"lr": "0.1"}}).cells[0]
    c = make_plan(["test-configured"], ["DarkRoom-v0"], [1], "smoke").cells[0]
    assert len({a.run_id, b.run_id, c.run_id}) == 3
    assert a.config["layers"] == 1 and b.config["lr"] == 0.1
    with pytest.raises(ConfigError, match="no planned method"):
        make_plan(["random"], ["DarkRoom-v0"], [0], "smoke", {None: {"lr": "0.1"}})


def test_a_per_task_preset_reaches_the_run_its_id_record_and_leaderboard(test_methods, results_dir, cache_dir):
    from bench.leaderboard import family_table, load_scores

    plan = make_plan(["test-per-task"], ["DarkRoom-v0", "DarkKeyToDoor-v0"], [0], "smoke")
    layers = {c.task: c.config["layers"] for c in plan.cells}
    assert layers == {"DarkRoom-v0": 1, "DarkKeyToDoor-v0": 2}
    # an explicit --set wins over the per-task preset, and the id follows the config
    over = make_plan(["test-per-task"], ["DarkKeyToDoor-v0"], [0], "smoke", {None: {"layers": "1"}}).cells[0]
    assert over.config["layers"] == 1 and over.run_id != plan.cells[1].run_id
    # other presets are untouched (paper: the defaults on every task)
    assert {c.config["layers"] for c in make_plan(["test-per-task"], ["DarkKeyToDoor-v0"], [0], "paper").cells} == {4}
    # the worker resolves the same config as the plan (it asserts its own layers) and the record says so
    assert _run(results_dir, cache_dir, "--methods", "test-per-task", "--tasks", "DarkRoom-v0,DarkKeyToDoor-v0",
                "--preset", "smoke") == 0
    store = ResultsStore(results_dir)
    metas = {store.read_meta(i)["task"]: store.read_meta(i) for i in store.run_ids()}
    assert metas["DarkKeyToDoor-v0"]["config"]["layers"] == 2
    assert metas["DarkKeyToDoor-v0"]["deviations"] == {"layers": [4, 2]}
    assert metas["DarkRoom-v0"]["deviations"] == {"layers": [4, 1]}
    runs, _, _, _ = load_scores(results_dir)
    table, _ = family_table(runs, 0, 100)
    assert table.iloc[0]["Deviations from paper"] == ("layers=1 (paper 4) on DarkRoom-v0; "
                                                      "layers=2 (paper 4) on DarkKeyToDoor-v0")


def test_leaderboard_row_with_more_seeds_on_one_task():
    """A method with 3 seeds on one task and 5 on another: the aggregates and the first / improvement columns use the
    3 seeds both tasks have, the task column all 5, and the Seeds column says so."""
    from bench.leaderboard import family_table

    rows = [{"family": "in-context", "method": "m", "task": t, "seed": s, "final": float(10 * s), "raw_final": 0.0,
             "first": float(s), "improvement": float(9 * s), "plateau": 1.0, "deviation_items": []}
            for t, seeds in (("A-v0", range(3)), ("B-v0", range(5))) for s in seeds]
    table, csv = family_table(pd.DataFrame(rows), 0, 100)
    row = table.iloc[0]
    assert row["Seeds"] == "3 (B-v0: 5)"
    assert row["First ep."].startswith("1.0 ")  # seeds 0, 1, 2: mean 1 (all five seeds of B would give 2)
    assert row["B-v0"].startswith("20.0 ") and row["A-v0"].startswith("10.0 ")
    assert csv[(csv["task"] == "B-v0")]["seeds"].item() == 5


def test_leaderboard_row_of_a_method_whose_tasks_share_no_seed():
    """Seed 0 on one task and seed 1 on another (a sweep run one seed and task at a time): the method has no
    aggregate ("–") and ranks last, its task columns still show, and the other methods are scored as before."""
    from bench.leaderboard import family_table

    rows = [{"family": "control", "method": m, "task": t, "seed": s, "final": float(10 + s), "raw_final": 0.0,
             "auc": 1.0, "fau_critic": 0.5, "deviation_items": []}
            for m, cells in (("split", (("A-v0", 0), ("B-v0", 1))), ("whole", (("A-v0", 0), ("B-v0", 0))))
            for t, s in cells]
    table, csv = family_table(pd.DataFrame(rows), 0, 100)
    assert list(table["method"]) == ["whole", "split"]
    split = table.iloc[1]
    assert (split["IQM"], split["Mean"], split["Critic FAU"], split["Seeds"]) == ("–", "–", "–", "0 (A-v0: 1, B-v0: 1)")
    assert split["A-v0"].startswith("10.0 ") and split["B-v0"].startswith("11.0 ")
    assert table.iloc[0]["IQM"].startswith("10.0 ")
    assert not ((csv["method"] == "split") & csv["task"].str.startswith("aggregate/")).any()


def test_a_bad_per_task_preset_is_named():
    bad = type("M", (), {"name": "m", "Config": _Cfg, "task_presets": {"quick": {"DarkRoom-v0": {"layer": 2}}}})()
    with pytest.raises(ConfigError, match="preset `quick` on task `DarkRoom-v0`.*Did you mean `layers`"):
        resolve_config(bad, "quick", task="DarkRoom-v0")
    assert resolve_config(bad, "quick", task="DarkKeyToDoor-v0").layers == 4
    assert resolve_config(bad, "quick").layers == 4  # no task, no per-task preset
    bad.task_presets = {"quick": [("DarkRoom-v0", {"layers": 2})]}
    with pytest.raises(ConfigError, match="task_presets must be"):
        resolve_config(bad, "quick", task="DarkRoom-v0")
    bad.task_presets = {"quick": {"DarkRoom-v0": "layers=2"}}
    with pytest.raises(ConfigError, match="task_presets must be"):
        resolve_config(bad, "quick", task="DarkRoom-v0")


@pytest.mark.parametrize("table, needle", [
    ({"quick": {"DarkRom-v0": {"layers": 2}}}, "Did you mean `DarkRoom-v0`"),  # a misspelt task is never ignored
    ({"quik": {"DarkRoom-v0": {"layers": 2}}}, "quik"),
    ({"quick": {"DarkRoom-v0": {"layer": 2}}}, "Did you mean `layers`"),
])
def test_a_plan_refuses_a_bad_per_task_preset_before_running(table, needle, test_methods):
    method = method_registry().get("test-per-task")
    saved = method.task_presets
    method.task_presets = table
    try:
        with pytest.raises(AdaptBenchError, match=needle):
            make_plan(["test-per-task"], ["DarkRoom-v0"], [0], "quick")
    finally:
        method.task_presets = saved


def test_a_later_config_field_at_its_default_keeps_stored_run_ids():
    """A field marked OMIT_DEFAULT_FROM_RUN_ID stays out of the id at its default (a run stored before the field
    existed is found again) and is part of it otherwise."""
    import dataclasses

    from bench.config import OMIT_DEFAULT_FROM_RUN_ID, config_to_dict, run_id_omissions
    from bench.runner import Cell

    @dataclass
    class Old:
        lr: float = 1e-3

    @dataclass
    class New(Old):
        later: bool = dataclasses.field(default=False, metadata=OMIT_DEFAULT_FROM_RUN_ID)

    def run_id(cfg) -> str:
        return Cell("m", "DarkRoom-v0", 0, "quick", config_to_dict(cfg), {}, None, run_id_omissions(cfg)).run_id

    assert run_id(New()) == run_id(Old()) and run_id_omissions(New()) == ("later",)
    assert run_id(New(later=True)) != run_id(Old()) and run_id_omissions(New(later=True)) == ()
    assert run_id(New(lr=1.0)) != run_id(New())


def test_budget_is_part_of_the_run_id_and_eval_trials_repeat_the_test_split():
    import dataclasses
    from types import SimpleNamespace

    from bench.evaluation import eval_tasks
    from tasks import get_task
    from tasks.spec import Budget, TaskSpecError

    cell = make_plan(["random"], ["DarkRoom-v0"], [0], "quick").cells[0]
    assert cell.budget["eval_trials"] == 4 and cell.budget["eval_episodes"] == 100
    changed = dataclasses.replace(cell, budget={**cell.budget, "eval_episodes": 40})
    assert changed.run_id != cell.run_id  # a changed budget is a new run, never a stale skip
    spec = get_task("DarkRoom-v0")
    ctx = SimpleNamespace(task=spec, preset="quick", budget=spec.budget("quick"))
    test = list(spec.test_split("quick"))
    assert eval_tasks(ctx) == test * 4
    with pytest.raises(TaskSpecError, match="eval_trials"):
        Budget(train_steps=1, eval_episodes=1, eval_trials=0)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--methods", "randm", "--tasks", "DarkRoom-v0"], "Did you mean `random`"),
        (["run", "--methods", "random", "--tasks", "DarkRom-v0"], "Did you mean `DarkRoom-v0`"),
        (["run", "--suite", "smok"], "Did you mean `smoke`"),
        (["run", "--suite", "smoke", "--preset", "quik"], "Did you mean `quick`"),
        (["run", "--suite", "smoke", "--set", "nosuchfield=1"], "nosuchfield"),
        (["run", "--methods", "ad", "--tasks", "DarkRoom-v0", "--set", "ad.learning_rate=nan"], "finite float"),
        (["run", "--methods", "ad", "--tasks", "DarkRoom-v0", "--set", "ad.learning_rate=inf"], "finite float"),
        (["run", "--methods", "ad", "--tasks", "DarkRoom-v0", "--set", "drqv2.batch_size=64"],
         "method `drqv2` is not in this plan"),
        (["run", "--methods", "random", "--tasks", "DarkRoom-v0", "--device", "gpu"], "unknown device `gpu`"),
        (["run", "--methods", "random", "--tasks", "DarkRoom-v0", "--workers", "0"], "--workers must be >= 1"),
        (["run", "--methods", "random", "--tasks", "DarkRoom-v0", "--torch-threads", "0"],
         "--torch-threads must be >= 1"),
        (["run", "--methods", "random", "--tasks", "DarkRoom-v0", "--first-seed", "-1"], "--first-seed must be"),
        (["run", "--suite", "icrl", "--methods", "drqv2"], "nothing to run"),
        # a multi-block suite filtered by --methods: an override of a method left out is refused, not dropped
        (["run", "--suite", "icrl-ablations", "--methods", "ad-ctx1", "--tasks", "DarkRoom-v0",
          "--set", "ad.learning_rate=1e-3"], "method `ad` is not in this plan"),
        (["run", "--methods", "random", "--tasks", "DarkRoom-v0", "--executor", "ray", "--device", "mps"],
         "Ray places runs on CPUs and CUDA GPUs only"),
    ],
)
def test_bad_input_exits_2_with_close_matches(args, needle, capsys, results_dir):
    assert main([*args, "--results-dir", str(results_dir), "--dry-run"]) == 2
    assert needle in capsys.readouterr().err


def test_device_strings():
    from bench.executor import LocalExecutor
    from bench.runner import check_device

    for ok in ("auto", "cpu", "cuda", "cuda:1", "cpu:0", "xpu:2"):
        assert check_device(ok, here=False) == ok
    for bad in ("gpu", "cuda:", "cuda 0", "CPU", ""):
        with pytest.raises(AdaptBenchError, match="unknown device"):
            check_device(bad, here=False)
    with pytest.raises(AdaptBenchError, match="unknown device `gpu`.*Did you mean `cuda`"):
        LocalExecutor(1, 1, "gpu")  # programmatic use is checked too, before any run


def test_cuda_device_without_cuda_is_refused_before_any_run(capsys, results_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", "--methods", "random", "--tasks", "DarkRoom-v0", "--device", "cuda",
                 "--results-dir", str(results_dir)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    # planning needs no device: the dry run of the same sweep lists it
    assert main(["run", "--methods", "random", "--tasks", "DarkRoom-v0", "--device", "cuda", "--dry-run",
                 "--results-dir", str(results_dir)]) == 0
    assert not (results_dir / "runs").exists() or not any((results_dir / "runs").iterdir())


def test_leaderboard_of_a_directory_without_runs_exits_2(tmp_path, capsys):
    assert main(["leaderboard", "--results-dir", str(tmp_path / "nothing"), "--no-plots"]) == 2
    assert "has no run records" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["leaderboard", "--results-dir", str(tmp_path / "afile"), "--no-plots"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty" / "runs").mkdir(parents=True)  # a runs/ directory with nothing (or only corrupt) in it
    assert main(["leaderboard", "--results-dir", str(tmp_path / "empty"), "--no-plots"]) == 0
    assert "No completed runs yet" in (tmp_path / "empty" / "leaderboard.md").read_text()


def test_leaderboard_regenerates_identically(results_dir, cache_dir):
    assert _run(results_dir, cache_dir, "--methods", "random,oracle", "--tasks", "DarkRoom-v0", "--seeds", "3") == 0
    assert main(["leaderboard", "--results-dir", str(results_dir), "--reps", "200"]) == 0
    md1 = (results_dir / "leaderboard.md").read_text()
    csv1 = (results_dir / "leaderboard.csv").read_text()
    plots = sorted(p.name for p in (results_dir / "plots").glob("*.png"))
    assert "in-context-smoke-curves.png" in plots and "in-context-smoke-aggregates.png" in plots
    assert main(["leaderboard", "--results-dir", str(results_dir), "--reps", "200"]) == 0
    assert (results_dir / "leaderboard.md").read_text() == md1
    assert (results_dir / "leaderboard.csv").read_text() == csv1
    table = pd.read_csv(results_dir / "leaderboard.csv")
    iqm = table[(table["task"] == "aggregate/IQM") & (table["metric"] == "final")].set_index("method")["value"]
    assert iqm["oracle"] == pytest.approx(100.0)
    assert md1.index("| oracle") < md1.index("| random")  # sorted by the aggregate


class _Shared:
    """Uses a dataset shared by all seeds; prepare() builds it once before the runs."""

    name = "test-shared"
    builds: list[str] = []

    def supports(self, task):
        return task.family == "in-context"

    def _dataset(self, ctx):
        def build(d):
            _Shared.builds.append(ctx.task.id)
            (d / "data.txt").write_text("42")

        return ctx.cache.get_or_build("test-data", {"task": ctx.task.id, "preset": ctx.preset}, build)

    def prepare(self, ctx):
        self._dataset(ctx)

    def run(self, ctx):
        value = float((self._dataset(ctx) / "data.txt").read_text())
        ctx.log(0, {"eval/return": value}, axis="episode")


def test_shared_artifacts_built_once_before_runs(results_dir, tmp_path, capsys):
    reg = method_registry()
    reg.register("test-shared", _Shared(), "tests", replace=True)
    _Shared.builds.clear()
    try:
        assert _run(results_dir, tmp_path / "cache", "--methods", "test-shared", "--tasks", "DarkRoom-v0",
                    "--seeds", "3") == 0
        assert _Shared.builds == ["DarkRoom-v0"]
        assert "building shared artifacts for 1 (method, task) group(s)" in capsys.readouterr().err
    finally:
        reg._entries.pop("test-shared", None)


class _SlowPrepare(_Shared):
    """A shared build that reports its progress (as a dataset build or an encoder pretraining run does)."""

    name = "test-slow-prepare"

    def prepare(self, ctx):
        ctx.progress(0.0, "starting")
        time.sleep(0.6)  # ctx.progress is rate-limited to one report per 0.5 s
        ctx.progress(0.5, "half of the data built")
        self._dataset(ctx)


def test_shared_artifact_builds_show_their_progress(tmp_path):
    """A build of minutes must not look like a hang: its own progress reports reach the sweep's stream, and the
    end of each build is announced; a failing build is named and left to its runs."""
    import io

    from bench.executor import LocalExecutor
    from bench.runner import Cell

    class _Broken(_Shared):
        name = "test-broken-prepare"

        def prepare(self, ctx):
            raise RuntimeError("disk full")

    reg = method_registry()
    reg.register("test-slow-prepare", _SlowPrepare(), "tests", replace=True)
    reg.register("test-broken-prepare", _Broken(), "tests", replace=True)
    try:
        stream = io.StringIO()
        cells = [Cell("test-slow-prepare", "DarkRoom-v0", 0, "smoke", None),
                 Cell("test-broken-prepare", "DarkRoom-v0", 0, "smoke", None)]
        LocalExecutor(workers=1, progress_every=0.0).prepare(cells, str(tmp_path / "cache"), stream)
        out = stream.getvalue()
        assert "preparing test-slow-prepare/DarkRoom-v0 50% half of the data built" in out
        assert "[1/2] preparing test-slow-prepare/DarkRoom-v0: ok" in out
        assert "[2/2] preparing test-broken-prepare/DarkRoom-v0: FAILED (RuntimeError: disk full)" in out
        assert "1 shared artifact build(s) failed" in out
    finally:
        reg._entries.pop("test-slow-prepare", None)
        reg._entries.pop("test-broken-prepare", None)


class _Counted(_Shared):
    """Counts its runs: a cell another driver is running must not be computed a second time."""

    name = "test-counted"
    runs: list[int] = []

    def run(self, ctx):
        _Counted.runs.append(ctx.seed)
        ctx.log(0, {"eval/return": 1.0}, axis="episode")


def test_a_second_driver_waits_for_a_running_cell_and_does_not_repeat_it(tmp_path):
    """Two `bench run` drivers on one results directory: while one holds a cell's claim, the other waits, then
    finds the record stored and skips it. The claim is a lock file, released when its holder ends."""
    import threading

    from bench.runner import Cell, execute_cell

    reg = method_registry()
    reg.register("test-counted", _Counted(), "tests", replace=True)
    _Counted.runs.clear()
    store = ResultsStore(tmp_path / "results")
    cell = Cell("test-counted", "DarkRoom-v0", 0, "smoke", None)

    def other_driver_stores(cell, status: str) -> list:
        """Hold ``cell``'s claim as another driver would, start this driver's execute_cell, store ``status``."""
        waiting, result = threading.Event(), []

        def report(_id, _f, msg):
            assert msg == "waiting: another `bench run` is running this cell"
            waiting.set()

        with store.claim(cell.run_id):
            waiter = threading.Thread(target=lambda: result.append(
                execute_cell(cell, str(store.root), str(tmp_path / "cache"), progress=report)))
            waiter.start()
            assert waiting.wait(timeout=60) and waiter.is_alive()  # it found the claim taken and waits
            log = RunLogger()
            log(0, {"eval/return": 2.0}, axis="episode")
            store.write(cell.run_id, {"status": status, "reason": None if status == "ok" else "boom",
                                      "method": cell.method, "task": cell.task, "seed": cell.seed,
                                      "preset": "smoke"}, log.rows)
        waiter.join(timeout=60)
        assert not waiter.is_alive()
        return result

    try:
        (r,) = other_driver_stores(cell, "ok")
        assert (r.status, r.reason, _Counted.runs) == ("ok", "stored by another `bench run`", [])
        assert store.read(cell.run_id).curve.value.tolist() == [2.0]  # the stored record is left as it was
        failed = Cell("test-counted", "DarkRoom-v0", 2, "smoke", None)  # a failure there stands here too
        (r,) = other_driver_stores(failed, "failed")
        assert (r.status, r.reason, _Counted.runs) == ("failed", "stored by another `bench run`: boom", [])
        # once free, a claim is taken at once: a cell nobody is running is computed
        other = Cell("test-counted", "DarkRoom-v0", 1, "smoke", None)
        assert execute_cell(other, str(store.root), str(tmp_path / "cache")).status == "ok" and _Counted.runs == [1]
    finally:
        reg._entries.pop("test-counted", None)


def test_headline_methods_leave_ablation_variants_to_their_experiments():
    """The per-family curves show the headline suites' methods: those they list that run one of their tasks."""
    from bench.runner import headline_methods

    shown = headline_methods()
    assert {"ad", "ed", "rl2", "source-a2c", "random", "oracle", "drqv2", "drqv2-noaug", "drqv2-arr"} <= shown
    assert not shown & {"ad-ctx1", "ad-keep0.9", "ad-prompt", "ed-prompt", "drqv2-noaug-wd", "drqv2-frozen"}


def test_headline_methods_survive_an_uninstalled_plugin(monkeypatch):
    """A headline suite naming a method that is not installed drops out of the figure's choice; it never breaks
    `bench leaderboard`."""
    import bench.runner as runner

    good = runner.suites()["icrl"]
    bad = runner.Suite("mine", "a plugin's headline", "quick", ("no-such-plugin-method",), ("DarkRoom-v0",), 1,
                       headline=True)
    monkeypatch.setattr(runner, "suites", lambda: {"icrl": good, "mine": bad})
    assert "ad" in runner.headline_methods() and "no-such-plugin-method" not in runner.headline_methods()


def test_suite_blocks_and_method_exclusion(capsys, results_dir):
    from bench.runner import expand_methods, get_suite, suite_plan

    everything = expand_methods(["*"])
    headline = expand_methods(get_suite("icrl").methods)
    assert "ad" in headline and not any(m.startswith(("ad-ctx", "ad-keep")) for m in headline)
    assert set(everything) - set(headline) == {"ad-ctx0.5", "ad-ctx1", "ad-ctx2", "ad-ctx4",
                                               "ad-keep0.5", "ad-keep0.75", "ad-keep0.9", "ad-prompt", "ed-prompt"}
    with pytest.raises(UnknownNameError):
        expand_methods(["*", "-nosuchmethod*"])
    suite = get_suite("icrl-ablations")
    assert len(suite.parts) == 5
    plan = suite_plan(suite, [0], "smoke", {})
    pairs = {(c.method, c.task) for c in plan.cells}
    assert ("ad-ctx0.5", "DarkRoom-v0") in pairs and ("ad", "AdversarialBandit-v0") in pairs
    assert ("ad-ctx0.5", "AdversarialBandit-v0") not in pairs and ("rl2", "DarkRoom-v0") not in pairs  # blocks
    assert ("ad-keep0.9", "DarkKeyToDoor-v0") in pairs and ("ad-keep0.9", "AdversarialBandit-v0") not in pairs
    # Key-to-Door's sliding-context block names its three settings (ad keeps 0.9 there at quick)
    assert ("ad-keep0.5", "DarkKeyToDoor-v0") in pairs and ("ad-keep0.5", "DarkRoom-v0") not in pairs
    assert ("ed-prompt", "DarkRoom-v0") in pairs and ("ed-prompt", "DarkKeyToDoor-v0") not in pairs
    # evaluation-only variants (trains_as) run after every training run, never beside their own model's training
    order = [getattr(get_method(c.method), "trains_as", None) is not None for c in plan.cells]
    assert order == sorted(order) and any(order)
    only = suite_plan(suite, [0], "smoke", {}, tasks=["DarkRoom-v0"])  # a filter, block by block
    assert {c.task for c in only.cells} == {"DarkRoom-v0"}
    with pytest.raises(AdaptBenchError, match="no block"):
        suite_plan(suite, [0], "smoke", {}, methods=["drqv2"])
    assert main(["run", "--suite", "icrl-ablations", "--preset", "smoke", "--dry-run",
                 "--results-dir", str(results_dir)]) == 0
    assert "ad-ctx2/DarkRoom-v0/seed0" in capsys.readouterr().out


def test_ablation_experiments_get_a_leaderboard_section_and_plot(tmp_path, cache_dir):
    """Each named block of an ablation suite is an experiment: the leaderboard gives it a table and a curves plot
    once one of its own methods ran; shared references alone (random, oracle) make no experiment section."""
    from bench.leaderboard import build_leaderboard, experiments
    from bench.runner import get_suite

    plasticity = get_suite("plasticity-ablations")
    assert [n for n, _ in plasticity.experiments] == ["fixes", "stages", "frozen", "replay-ratio"]
    by_tag = {e.tag: e for e in experiments()}
    assert by_tag["plasticity-ablations-replay-ratio"].own == ["drqv2-rr2", "drqv2-arr"]
    assert by_tag["icrl-ablations-context-length"].own == ["ad-ctx0.5", "ad-ctx1", "ad-ctx2", "ad-ctx4"]
    assert by_tag["plasticity-ablations-frozen"].own == ["drqv2-frozen", "drqv2-noaug-frozen"]
    # a variant with a block per task is each block's own (ad-keep0.75: Dark Room here, Key-to-Door there)
    assert by_tag["icrl-ablations-sliding-context"].own == ["ad-keep0.75", "ad-keep0.9"]
    assert by_tag["icrl-ablations-sliding-context-key-to-door"].own == ["ad-keep0.5", "ad-keep0.75", "ad-keep0.9"]
    res = tmp_path / "results"
    common = ["--preset", "smoke", "--seeds", "1", "--results-dir", str(res), "--cache-dir", str(cache_dir)]
    assert main(["run", "--methods", "random,oracle", "--tasks", "DarkRoom-v0", *common]) == 0
    build_leaderboard(res, reps=50)
    assert "icrl-ablations-context-length" not in (res / "leaderboard.md").read_text()
    assert main(["run", "--suite", "icrl-ablations", "--methods", "ad-ctx1", "--tasks", "DarkRoom-v0", *common]) == 0
    report = build_leaderboard(res, reps=50)
    board = (res / "leaderboard.md").read_text()
    section = board.split("## Experiment `icrl-ablations-context-length` — preset `smoke`")[1].split("\n## ")[0]
    rows = [line.split(" | ")[0].strip("| ") for line in section.splitlines() if line.startswith("| ")]
    assert rows == ["method", "ad-ctx1", "random", "oracle"], rows  # the suite's order
    assert "icrl-ablations-bandit" not in board
    plot = res / "plots" / "icrl-ablations-context-length-smoke-curves.png"
    assert plot in report.plot_paths and plot.stat().st_size > 1000


def test_histories_command_plots_and_refuses_control_tasks(tmp_path, capsys):
    common = ["--preset", "smoke", "--cache-dir", str(tmp_path / "c"), "--results-dir", str(tmp_path / "r")]
    assert main(["histories", "--tasks", "DarkRoom-v0", *common]) == 0
    out = tmp_path / "r" / "plots" / "histories-DarkRoom-v0-smoke.png"
    assert out.is_file() and out.stat().st_size > 1000 and str(out) in capsys.readouterr().out
    assert main(["histories", "--tasks", "DMC-cartpole-swingup-v0", *common]) == 2
    assert "no learning histories" in capsys.readouterr().err


def test_artifacts_of_a_dotted_name_lock_per_key(tmp_path):
    """Each artifact has its own lock file, also when the name holds a dot (``model-ad-ctx0.5``): one lock per
    name would make the runs of different seeds wait on each other's training."""
    from bench.method import ArtifactCache

    cache = ArtifactCache(tmp_path)
    for seed in (0, 1):
        cache.get_or_build("model-ad-ctx0.5", {"seed": seed}, lambda out: (out / "x").write_text("1"))
    locks = sorted(p.name for p in tmp_path.glob("*.lock"))
    assert len(locks) == 2 and all(name.startswith("model-ad-ctx0.5-") for name in locks), locks
