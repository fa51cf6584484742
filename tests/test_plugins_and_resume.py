"""Real processes: a third-party plugin installed with pip, duplicate names, SIGKILL mid-sweep and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.store import ResultsStore
from tests.conftest import ROOT, bench_cli

EXAMPLE = ROOT / "examples" / "adapt-bench-example-plugin"


def _pip_install(src: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True, text=True, timeout=300)


def _install_package(tmp_path: Path, dist: str, module: str, source: str, group: str, entry: str) -> Path:
    """Write a one-module package declaring one entry point, pip-install it into a private target, return it."""
    src = tmp_path / f"src-{dist}"
    (src / module).mkdir(parents=True)
    (src / module / "__init__.py").write_text(source)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{dist}"\nversion = "0.0.1"\n'
        f'[project.entry-points."{group}"]\n{entry}\n'
        f'[tool.setuptools]\npackages = ["{module}"]\n'
    )
    target = tmp_path / f"site-{dist}"
    _pip_install(src, target)
    return target


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """The README's example plugin, really installed (into a private target directory)."""
    target = tmp_path_factory.mktemp("site")
    _pip_install(EXAMPLE, target)
    return target


def _env(*paths: Path, cache: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join(str(p) for p in paths), "ADAPT_BENCH_CACHE": str(cache)}


def test_plugin_round_trip(plugin_path, tmp_path, cache_dir):
    env = _env(plugin_path, cache=cache_dir)
    listed = bench_cli("list", "methods", env=env, check=True).stdout
    assert "sticky-random" in listed and "adapt-bench-example-plugin" in listed
    res = tmp_path / "results"
    bench_cli("run", "--methods", "sticky-random,random", "--tasks", "DarkRoom-v0", "--seeds", "2",
              "--results-dir", str(res), env=env, check=True)
    bench_cli("leaderboard", "--results-dir", str(res), "--reps", "100", env=env, check=True)
    board = (res / "leaderboard.md").read_text()
    assert "| sticky-random" in board and "| random" in board
    metas = [ResultsStore(res).read_meta(i) for i in ResultsStore(res).run_ids()]
    sticky = [m for m in metas if m["method"] == "sticky-random"]
    assert sticky[0]["method_provider"] == "adapt-bench-example-plugin"
    assert sticky[0]["config"] == {"repeat": 2} and sticky[0]["deviations"] == {"repeat": [4, 2]}


def test_two_distributions_same_method_name(plugin_path, tmp_path, cache_dir):
    target = _install_package(tmp_path, "clash-plugin", "clash_pkg",
                              "from adapt_bench_example import StickyRandom as Impostor\n",
                              "adapt_bench.methods", 'sticky-random = "clash_pkg:Impostor"')
    proc = bench_cli("list", "methods", env=_env(plugin_path, target, cache=cache_dir))
    assert proc.returncode == 2
    assert "adapt-bench-example-plugin" in proc.stderr and "clash-plugin" in proc.stderr


def test_sigkill_mid_sweep_then_resume(tmp_path, cache_dir, spawn):
    """Kill `bench run` with SIGKILL after its first stored run; nothing partial remains and a re-run finishes."""
    res = tmp_path / "results"
    args = ["run", "--methods", "random", "--tasks", "DarkKeyToDoor-v0", "--preset", "quick", "--seeds", "4",
            "--results-dir", str(res)]
    env = {**os.environ, "ADAPT_BENCH_CACHE": str(cache_dir)}
    # warm the reference cache so the timing below is about runs
    bench_cli("list", "tasks", env={"ADAPT_BENCH_CACHE": str(cache_dir)}, check=True)
    proc = spawn([sys.executable, "-m", "bench.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = ResultsStore(res)
    deadline = time.time() + 300
    while time.time() < deadline and not store.run_ids():
        time.sleep(0.05)
    assert store.run_ids(), "no run finished in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = store.run_ids()
    assert 1 <= len(done_before) < 4
    for run_id in done_before:  # every visible record is complete and verifies
        assert store.read(run_id).status == "ok"
    resumed = bench_cli(*args, env={"ADAPT_BENCH_CACHE": str(cache_dir)}, check=True)
    assert f"{len(done_before)} already stored, {4 - len(done_before)} to run" in resumed.stderr
    assert len(store.run_ids()) == 4
    assert not list((res / "runs").glob(".tmp-*"))


def _children(pid: int) -> set[int]:
    """Live child pids of ``pid`` (Linux /proc)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (an orphan's reaper may be slow)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads process trees from Linux /proc")
def test_workers_exit_when_the_driver_is_killed(tmp_path, cache_dir, spawn):
    """SIGKILL of `bench run --workers 2` mid-run: its workers stop within seconds instead of training runs that
    nobody will collect (and that a resumed sweep starts again beside them)."""
    res = tmp_path / "results"
    args = ["run", "--methods", "random", "--tasks", "DarkKeyToDoor-v0", "--preset", "quick", "--seeds", "6",
            "--workers", "2", "--results-dir", str(res)]
    env = {**os.environ, "ADAPT_BENCH_CACHE": str(cache_dir)}
    bench_cli("list", "tasks", env={"ADAPT_BENCH_CACHE": str(cache_dir)}, check=True)
    proc = spawn([sys.executable, "-m", "bench.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = ResultsStore(res)
    deadline = time.time() + 300
    while time.time() < deadline and not store.run_ids():
        time.sleep(0.05)
    workers = {c for c in _children(proc.pid) if _alive(c)}
    assert store.run_ids() and len(workers) >= 2, "no run finished in time"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:  # never leave them running after the test
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their driver"


def test_process_pool_workers(tmp_path, cache_dir):
    res = tmp_path / "results"
    proc = bench_cli("run", "--methods", "random,oracle", "--tasks", "DarkRoom-v0", "--seeds", "2",
                     "--workers", "2", "--results-dir", str(res), env={"ADAPT_BENCH_CACHE": str(cache_dir)},
                     check=True)
    assert "[4/4]" in proc.stderr
    metas = [ResultsStore(res).read_meta(i) for i in ResultsStore(res).run_ids()]
    assert len(metas) == 4 and all(m["status"] == "ok" and m["torch_threads"] >= 1 for m in metas)


def test_shared_builds_in_the_process_pool_report_progress(tmp_path, cache_dir):
    """`--workers 2` builds two groups' shared artifacts in spawned workers (a plugin method, so the workers can
    import it); each build's own progress reports reach the driver's display, and each build's end is announced."""
    target = _install_package(tmp_path, "slow-prep", "slow_prep", textwrap.dedent("""
        import time

        class SlowPrepare:
            name = "slow-prepare"

            def supports(self, task):
                return task.family == "in-context"

            def _data(self, ctx):
                def build(d):
                    ctx.progress(0.5, "halfway through the build")
                    time.sleep(12.0)  # longer than the display's 10-s refresh: one line falls inside
                    (d / "x.txt").write_text("1")
                return ctx.cache.get_or_build("slow-data", {"task": ctx.task.id}, build)

            def prepare(self, ctx):
                self._data(ctx)

            def run(self, ctx):
                ctx.log(0, {"eval/return": float((self._data(ctx) / "x.txt").read_text())}, axis="episode")
        """), "adapt_bench.methods", 'slow-prepare = "slow_prep:SlowPrepare"')
    res = tmp_path / "results"
    proc = bench_cli("run", "--methods", "slow-prepare", "--tasks", "DarkRoom-v0,DarkKeyToDoor-v0", "--preset",
                     "smoke", "--workers", "2", "--results-dir", str(res), env=_env(target, cache=cache_dir),
                     check=True)
    assert "building shared artifacts for 2 (method, task) group(s)" in proc.stderr
    assert "preparing slow-prepare/DarkRoom-v0 50% halfway through the build" in proc.stderr
    assert "preparing slow-prepare/DarkKeyToDoor-v0: ok" in proc.stderr
    assert "preparing slow-prepare/DarkRoom-v0: ok" in proc.stderr


def test_third_party_task_plugin(tmp_path, cache_dir):
    """A package adds a task through `adapt_bench.tasks`; it is listed, made through gymnasium and run."""
    target = _install_package(tmp_path, "room-plugin", "room_plugin", textwrap.dedent("""
        import dataclasses
        from tasks.gridworld import SPECS

        _base = next(s for s in SPECS if s.id == "DarkRoom-v0")
        SPEC = dataclasses.replace(_base, id="PluginRoom-v0", description="a third-party copy of Dark Room")
        """), "adapt_bench.tasks", 'pluginroom = "room_plugin:SPEC"')
    env = _env(target, cache=cache_dir)
    listed = bench_cli("list", "tasks", "--no-references", env=env, check=True).stdout
    assert "PluginRoom-v0" in listed
    made = subprocess.run([sys.executable, "-c", "import gymnasium as gym, tasks; "
                           "e = gym.make('adapt_bench/PluginRoom-v0', goal=(2, 7)); print(e.reset(seed=0)[0])"],
                          capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT, timeout=120)
    assert made.returncode == 0, made.stderr
    res = tmp_path / "results"
    bench_cli("run", "--methods", "random,oracle", "--tasks", "PluginRoom-v0", "--results-dir", str(res),
              env=env, check=True)
    assert {ResultsStore(res).read_meta(i)["task"] for i in ResultsStore(res).run_ids()} == {"PluginRoom-v0"}
