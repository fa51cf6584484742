"""Per-held-out-task in-context rows and the `bench per-task` report built on them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from bench.evaluation import EVAL_KEY, log_in_context, task_key
from bench.method import ArtifactCache, RunContext, RunLogger
from bench.pertask import per_task_report, task_matrix, task_stats
from bench.registry import AdaptBenchError
from bench.store import ResultsStore
from tasks import get_task
from tests.conftest import bench_cli

DARK_ROOM = get_task("DarkRoom-v0")


def _ctx(tmp_path, trials: int) -> RunContext:
    budget = dataclasses.replace(DARK_ROOM.budget("smoke"), eval_trials=trials)
    return RunContext(task=DARK_ROOM, seed=0, preset="smoke", budget=budget, config=None, device="cpu",
                      log=RunLogger(), checkpoint_dir=tmp_path, cache=ArtifactCache(tmp_path),
                      rng=np.random.default_rng(0))


def _rows(ctx: RunContext, key: str) -> list[float]:
    return [r["value"] for r in sorted(ctx.log.rows, key=lambda r: r["step"]) if r["key"] == key]


def test_log_in_context_adds_each_held_out_tasks_mean_over_its_trials(tmp_path):
    ctx = _ctx(tmp_path, trials=2)
    n = len(DARK_ROOM.test_split("smoke"))
    assert n >= 2
    # trial-major rows, as eval_tasks lists them: task i of trial j is row j * n + i
    returns = np.arange(2 * n * 3, dtype=float).reshape(2 * n, 3)
    log_in_context(ctx, returns)
    assert _rows(ctx, EVAL_KEY) == pytest.approx(returns.mean(axis=0))
    for i in range(n):
        assert _rows(ctx, task_key(i)) == pytest.approx((returns[i] + returns[n + i]) / 2)
    assert all(r["axis"] == "episode" for r in ctx.log.rows)


def test_rows_that_are_not_the_test_split_log_only_the_mean(tmp_path):
    ctx = _ctx(tmp_path, trials=1)
    n = len(DARK_ROOM.test_split("smoke"))
    log_in_context(ctx, np.ones((n + 1, 4)))  # a plugin's own task list: no per-task attribution is guessed
    assert {r["key"] for r in ctx.log.rows} == {EVAL_KEY}
    log_in_context(ctx, np.ones((3 * n, 4)))  # a multiple of the split, but not its trials
    assert {r["key"] for r in ctx.log.rows} == {EVAL_KEY}
    log_in_context(ctx, np.ones((n, 4)))  # the split itself, as a source learner runs it
    assert task_key(n - 1) in {r["key"] for r in ctx.log.rows}


def test_task_stats_first_peak_final_found():
    returns = np.array([
        [0, 0, 10, 10, 10, 10, 10, 10, 0, 0],  # found at episode 3, then lost
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # improves to the end
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # never found
    ], dtype=float)
    s = task_stats(returns, threshold=np.array([5.0, 5.0, 5.0]))
    np.testing.assert_array_equal(s["first"], [0, 0, 0])
    np.testing.assert_array_equal(s["peak"], [10, 9, 0])  # window of ceil(10% of 10) = 1 episode
    np.testing.assert_array_equal(s["final"], [0, 9, 0])
    np.testing.assert_array_equal(s["found"][:2], [3, 6])
    assert np.isnan(s["found"][2])
    # without a per-task optimum: half of the task's own peak; a peak of 0 finds nothing
    s = task_stats(returns)
    np.testing.assert_array_equal(s["found"][:2], [3, 6])
    assert np.isnan(s["found"][2])


def test_task_matrix_refuses_partial_rows():
    full = pd.DataFrame([{"axis": "episode", "step": k, "key": task_key(i), "value": float(i + k)}
                         for i in range(3) for k in range(4)])
    np.testing.assert_array_equal(task_matrix(full, 3), [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]])
    assert task_matrix(full, 4) is None  # a task is missing
    assert task_matrix(full.iloc[1:], 3) is None  # an episode of task 0 is missing
    assert task_matrix(full[full["key"] == "x"], 3) is None


def test_report_finds_solved_then_lost_tasks_and_names_runs_without_rows(tmp_path):
    store = ResultsStore(tmp_path)
    tasks = DARK_ROOM.test_split("smoke")
    base = {"task": DARK_ROOM.id, "preset": "smoke", "status": "ok", "family": "in-context"}
    for seed in (0, 1):
        rows = [{"axis": "episode", "step": k, "key": EVAL_KEY, "value": 1.0} for k in range(10)]
        for i in range(len(tasks)):
            lost = i == 0  # task 0 is found at episode 2 and lost from episode 6 on
            values = [0, 14, 14, 14, 14, 0, 0, 0, 0, 0] if lost else [0, 0, 0, 12, 13, 13, 13, 13, 13, 13]
            rows += [{"axis": "episode", "step": k, "key": task_key(i), "value": float(v)}
                     for k, v in enumerate(values)]
        store.write(f"m.s{seed}", {**base, "method": "m", "seed": seed}, rows)
    store.write("old.s0", {**base, "method": "old", "seed": 0},
                [{"axis": "episode", "step": k, "key": EVAL_KEY, "value": 1.0} for k in range(10)])
    broken = store.write("m.s2", {**base, "method": "m", "seed": 2}, rows)
    (broken / "curve.parquet").write_bytes(b"truncated")
    store.write("other-task.s0", {**base, "task": "DarkKeyToDoor-v0", "method": "m", "seed": 0}, rows)

    report = per_task_report(str(tmp_path), DARK_ROOM.id, preset="smoke")
    assert list(report.table.index) == [str(t) for t in tasks]
    assert report.seeds == {"m": [0, 1]}
    assert report.lost("m") == [str(tasks[0])]
    assert report.table[("m", "found")].tolist()[:2] == [2.0, 4.0]  # half of each goal's shortest-path optimum
    assert ("optimum", "") in report.table.columns
    assert any("old.s0" in m and "stored before" in m for m in report.messages)
    assert any("skipped corrupt record" in m and "m.s2" in m for m in report.messages)  # named, not loaded
    text = report.markdown()
    assert f"1 of {len(tasks)} held-out tasks end below half of their peak ({tasks[0]})" in text

    with pytest.raises(AdaptBenchError, match="old.s0: no per-task rows"):
        per_task_report(str(tmp_path), DARK_ROOM.id, ["old"], preset="smoke")
    with pytest.raises(AdaptBenchError, match="control task"):
        per_task_report(str(tmp_path), "DMC-cartpole-swingup-v0", preset="smoke")


@pytest.mark.slow
def test_bench_per_task_on_real_runs(tmp_path, cache_dir):
    """random and oracle through `bench run`, then `bench per-task`: the oracle scores each goal's optimum from
    its first episode; bad input exits 2 with close matches."""
    res = tmp_path / "res"
    bench_cli("run", "--methods", "random,oracle", "--tasks", "DarkRoom-v0", "--seeds", "1", "--preset", "smoke",
              "--results-dir", str(res), "--cache-dir", str(cache_dir), check=True)
    out = tmp_path / "per-task.md"
    bench_cli("per-task", "--task", "DarkRoom-v0", "--preset", "smoke", "--results-dir", str(res), "--out",
              str(out), check=True)
    report = per_task_report(str(res), "DarkRoom-v0", ["oracle"], preset="smoke")
    np.testing.assert_allclose(report.table[("oracle", "final")], report.table[("optimum", "")])
    assert (report.table[("oracle", "found")] == 1).all()
    assert "| held-out task | optimum | oracle first |" in out.read_text()
    bad = bench_cli("per-task", "--task", "DarkRom-v0", "--results-dir", str(res))
    assert bad.returncode == 2 and "DarkRoom-v0" in bad.stderr
    bad = bench_cli("per-task", "--task", "DarkRoom-v0", "--methods", "oracel", "--results-dir", str(res))
    assert bad.returncode == 2 and "oracle" in bad.stderr
