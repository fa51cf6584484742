"""The Ray executor: resources, artifact shipping, and `bench run --executor ray` against a real Ray cluster.

The cluster is a head node started on 127.0.0.1 (`ray start --head --block` in its own process group, so the
teardown stops exactly the processes it started). The test methods live in a tiny plugin on the workers'
PYTHONPATH, registered through an entry point like any third-party plugin.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from bench.method import ArtifactCache
from bench.methods import method_registry
from bench.ray_executor import (
    INSTALL_HINT,
    Resources,
    check_feasible,
    import_ray,
    pack_artifacts,
    placed_resources,
    run_resources,
    unpack_artifacts,
)
from bench.registry import AdaptBenchError
from bench.runner import Cell
from bench.store import ResultsStore
from tests.conftest import ROOT, bench_cli

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason=f"Ray is not installed ({INSTALL_HINT})")

PLUGIN = '''
"""Test methods for the Ray executor; they talk to the test through files under $RAYTEST_DIR."""
import os
import time
from pathlib import Path


def _dir():
    d = Path(os.environ["RAYTEST_DIR"])
    d.mkdir(parents=True, exist_ok=True)
    return d


class Slow:
    """Writes its pid; on a seed's first attempt waits (up to 120 s) to be killed or cancelled."""

    name = "raytest-slow"

    def supports(self, task):
        return task.family == "in-context"

    def resources(self, task, preset, config):
        return {"num_cpus": 1, "memory": 64 * 2**20}

    def run(self, ctx):
        (_dir() / f"slow-{ctx.seed}-{os.getpid()}.pid").touch()
        attempts = len(list(_dir().glob(f"slow-{ctx.seed}-*.pid")))
        deadline = time.time() + 120
        while attempts == 1 and time.time() < deadline:
            time.sleep(0.1)
        ctx.log(0, {"eval/return": float(attempts)}, axis="episode")


class Boom:
    name = "raytest-boom"

    def supports(self, task):
        return True

    def run(self, ctx):
        raise RuntimeError("exploded on a Ray worker")


class Shared:
    """Reads a dataset that prepare() builds once per task; every build leaves a file in $RAYTEST_DIR."""

    name = "raytest-shared"

    def supports(self, task):
        return task.family == "in-context"

    def _data(self, ctx):
        def build(d):
            (_dir() / f"build-{ctx.task.id}-{os.getpid()}-{time.monotonic_ns()}").touch()
            (d / "data.txt").write_text(str(len(ctx.task.id)))

        return ctx.cache.get_or_build("raytest-data", {"task": ctx.task.id, "preset": ctx.preset}, build)

    def prepare(self, ctx):
        self._data(ctx)

    def run(self, ctx):
        value = float((self._data(ctx) / "data.txt").read_text())
        ctx.log(0, {"eval/return": value + ctx.seed}, axis="episode")
'''


# ---------------------------------------------------------------------------------------------- no cluster
def test_missing_ray_says_how_to_install(monkeypatch, tmp_path, capsys):
    from bench.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(AdaptBenchError, match="adapt-bench\\[ray\\]"):
        import_ray()
    code = main(["run", "--executor", "ray", "--methods", "random", "--tasks", "DarkRoom-v0", "--seeds", "1",
                 "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and INSTALL_HINT in capsys.readouterr().err


@dataclass
class _Hooked:
    declared: object
    name: str = "test-hooked"

    def supports(self, task):
        return True

    def resources(self, task, preset, config):
        return self.declared

    def run(self, ctx):
        ctx.log(0, {"eval/return": 0.0}, axis="episode")


@pytest.mark.parametrize("declared, expected", [
    ({"num_gpus": 1, "memory": 2**30}, Resources(1.0, 1.0, 2**30)),
    ({"num_cpus": 0.5}, Resources(0.5, 0.0, 0)),
    ({"num_cpu": 2}, "unknown key"),
    ({"num_cpus": -1}, "must be a number >= 0"),
    ({"num_cpus": 0}, "must be > 0"),
    ({"memory": "8G"}, "must be a number"),
    ([1, 0], "must return a dict"),
])
def test_resources_hook(declared, expected):
    reg = method_registry()
    reg.register("test-hooked", _Hooked(declared), "tests", replace=True)
    cell = Cell("test-hooked", "DarkRoom-v0", 0, "smoke", None)
    try:
        assert run_resources(Cell("random", "DarkRoom-v0", 0, "smoke", None)) == Resources(1.0, 0.0, 0)
        if isinstance(expected, Resources):
            assert run_resources(cell) == expected
        else:
            with pytest.raises(AdaptBenchError, match=expected):
                run_resources(cell)
    finally:
        reg._entries.pop("test-hooked", None)


def test_device_placement_and_feasibility():
    gpu = Resources(2.0, 1.0, 0)
    assert placed_resources(gpu, "cpu", True) == Resources(2.0, 0.0, 0)
    assert placed_resources(gpu, "auto", False) == Resources(2.0, 0.0, 0)  # no GPU anywhere: run on CPU
    assert placed_resources(gpu, "auto", True) == gpu
    assert placed_resources(Resources(), "cuda", False) == Resources(1.0, 1.0, 0)
    nodes = [{"CPU": 4.0, "memory": 8 * 2**30}, {"CPU": 8.0, "GPU": 1.0, "memory": 16 * 2**30}]
    check_feasible({gpu: "drqv2", Resources(8.0, 0.0, 2**30): "ad"}, nodes)
    with pytest.raises(AdaptBenchError, match="drqv2 needs 2 CPU, 2 GPU per run"):
        check_feasible({Resources(2.0, 2.0, 0): "drqv2"}, nodes)
    with pytest.raises(AdaptBenchError, match="32 GiB"):
        check_feasible({Resources(1.0, 0.0, 32 * 2**30): "big"}, nodes)


def test_pack_unpack_installs_only_missing(tmp_path):
    built = ArtifactCache(tmp_path / "a" / "artifacts").get_or_build(
        "data", {"k": 1}, lambda d: (d / "x.npy").write_bytes(b"\x00" * 1000))
    blob = pack_artifacts([built])
    assert unpack_artifacts(blob, [built.name], tmp_path / "b") == [built.name]
    copy = tmp_path / "b" / "artifacts" / built.name
    assert (copy / "x.npy").read_bytes() == b"\x00" * 1000
    assert json.loads((copy / "key.json").read_text()) == {"k": 1}
    # the copy is what ArtifactCache finds for that key: nothing is rebuilt
    assert ArtifactCache(tmp_path / "b" / "artifacts").get_or_build("data", {"k": 1}, lambda d: 1 / 0) == copy
    assert unpack_artifacts(blob, [built.name], tmp_path / "b") == []  # already there: left alone
    assert [p.name for p in (tmp_path / "b" / "artifacts").iterdir() if p.is_dir()] == [built.name]


# ---------------------------------------------------------------------------------------------- real cluster
@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what a driver needs: the plugin on PYTHONPATH
    talk: Path  # $RAYTEST_DIR of the workers
    node_cache: Path  # $RAYTEST_NODE_CACHE of the workers


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_head(head: subprocess.Popen) -> None:
    """Stop the head node this fixture started, and only it: `ray start --block` stops its daemons on
    SIGTERM (seconds); whatever of its process group is left after that is killed."""
    head.terminate()
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # its own session: the group id is its pid
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    if importlib.util.find_spec("ray") is None:
        pytest.skip(f"Ray is not installed ({INSTALL_HINT})")
    base = tmp_path_factory.mktemp("ray")
    site = base / "site"
    (site / "raytest_plugin-0.0.1.dist-info").mkdir(parents=True)
    (site / "raytest_plugin.py").write_text(PLUGIN)
    (site / "raytest_plugin-0.0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: raytest-plugin\nVersion: 0.0.1\n")
    (site / "raytest_plugin-0.0.1.dist-info" / "entry_points.txt").write_text(textwrap.dedent("""
        [adapt_bench.methods]
        raytest-slow = raytest_plugin:Slow
        raytest-boom = raytest_plugin:Boom
        raytest-shared = raytest_plugin:Shared
        """))
    pythonpath = str(site)  # the workers import bench itself from the installed distribution
    talk, node_cache = base / "talk", base / "node-cache"
    port, client, dash, agent = _free_ports(4)
    # ports outside Ray's worker range (10002-19999) come from the OS; none is fixed, so runs never collide
    head_env = {**os.environ, "PYTHONPATH": pythonpath, "RAYTEST_DIR": str(talk),
                "RAYTEST_NODE_CACHE": str(node_cache), "RAY_USAGE_STATS_ENABLED": "0"}
    # Ray's Unix sockets live under its temp dir and a socket path may not exceed 107 bytes: keep it short
    ray_tmp = Path(tempfile.mkdtemp(prefix="abray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    log = open(base / "head.log", "w")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--ray-client-server-port", str(client), "--dashboard-port", str(dash),
         "--dashboard-agent-listen-port", str(agent), "--num-cpus", "2", "--include-dashboard=false",
         "--temp-dir", str(ray_tmp), "--disable-usage-stats"],
        env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in (base / "head.log").read_text():
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray start --head failed:\n{(base / 'head.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield Cluster(f"127.0.0.1:{port}", {"PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0"},
                      talk, node_cache)
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _args(res: Path, cache: Path, *extra: str) -> list[str]:
    return ["run", "--results-dir", str(res), "--cache-dir", str(cache), *extra]


def _comparable(store: ResultsStore) -> dict[str, tuple]:
    """Per run id: what must not depend on the executor (no timings, hosts or thread counts)."""
    out = {}
    for rec in store.iter_records():
        assert not isinstance(rec, Exception), rec
        m = rec.meta
        out[rec.run_id] = (m["status"], m["method"], m["task"], m["seed"], m["preset"], json.dumps(m["config"]),
                           json.dumps(m["references"], sort_keys=True), rec.curve.to_json())
    return out


@needs_ray
def test_ray_results_equal_local_and_artifacts_built_once(cluster, tmp_path):
    plan = ["--methods", "random,oracle,raytest-shared", "--tasks", "DarkRoom-v0,DarkKeyToDoor-v0", "--seeds", "2"]
    local = bench_cli(*_args(tmp_path / "local", tmp_path / "local-cache", *plan),
                      env={**cluster.env, "RAYTEST_DIR": str(tmp_path / "local-talk")}, check=True)
    assert "12 to run" in local.stderr
    res, cache = tmp_path / "ray", tmp_path / "ray-cache"
    # '$RAYTEST_NODE_CACHE' is expanded by each worker: a cache the driver never sees, so artifacts are packed
    ray_args = _args(res, cache, *plan, "--executor", "ray", "--address", cluster.address,
                     "--worker-cache-dir", "$RAYTEST_NODE_CACHE")
    proc = bench_cli(*ray_args, env=cluster.env, check=True)
    assert "Ray cluster: 1 node(s), 2 CPU(s)" in proc.stderr
    assert "shipped to the workers" in proc.stderr and "[12/12]" in proc.stderr
    assert _comparable(ResultsStore(res)) == _comparable(ResultsStore(tmp_path / "local"))
    assert len(ResultsStore(res).run_ids()) == 12
    # one build per task, by the prepare tasks, in the workers' cache; the driver built nothing
    builds = sorted(p.name.split("-")[1] for p in cluster.talk.glob("build-*"))
    assert builds == ["DarkKeyToDoor", "DarkRoom"], builds
    assert len([p for p in (cluster.node_cache / "artifacts").glob("raytest-data-*") if p.is_dir()]) == 2
    assert not (cache / "artifacts").exists()
    again = bench_cli(*ray_args, env=cluster.env, check=True)
    assert "12 already stored, 0 to run" in again.stderr


SHIP_DRIVER = """
import sys
import ray
from bench.ray_executor import _Shipment, _prepare_task, _run_task
from bench.runner import Cell

address, built_on, other_node = sys.argv[1:]
cell = Cell("raytest-shared", "DarkKeyToDoor-v0", 5, "smoke", None)
(err, names), blob = _prepare_task(cell, built_on, 1, "cpu", True)  # here, as on the node that prepared
assert err is None and len(names) == 1 and blob, (err, names)
ray.init(address=address, logging_level="ERROR")
shipment = _Shipment(names, [ray.put(blob)])
meta, rows = ray.get(ray.remote(_run_task).remote(cell, other_node, 1, "cpu", shipment, None))
print(meta["status"], names[0], rows[0]["value"])
"""


@needs_ray
def test_shipped_artifact_is_installed_on_a_node_without_it(cluster, tmp_path):
    """The path of a multi-node cluster: the run's node lacks the artifact and installs the prepared tar."""
    built_on, other_node = tmp_path / "prepare-node", tmp_path / "other-node"
    before = set(cluster.talk.glob("build-*"))
    proc = subprocess.run([sys.executable, "-c", SHIP_DRIVER, cluster.address, str(built_on), str(other_node)],
                          cwd=ROOT, env={**os.environ, **cluster.env, "RAYTEST_DIR": str(tmp_path / "talk")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status, name, value = proc.stdout.split()[-3:]
    assert status == "ok" and float(value) == len("DarkKeyToDoor-v0") + 5
    assert len(list((tmp_path / "talk").glob("build-*"))) == 1  # built once, by the prepare
    assert set(cluster.talk.glob("build-*")) == before  # the Ray worker installed it instead of building
    installed = other_node / "artifacts" / name
    assert (installed / "data.txt").read_text() == (built_on / "artifacts" / name / "data.txt").read_text()
    assert (installed / "key.json").is_file()


def _wait_for(pattern: str, where: Path, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        hits = sorted(where.glob(pattern)) if where.is_dir() else []
        if hits:
            return hits[0]
        time.sleep(0.1)
    raise AssertionError(f"no {pattern} in {where} after {timeout}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@needs_ray
def test_killed_worker_is_retried_and_method_errors_are_stored(cluster, tmp_path, spawn):
    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "bench.cli", *_args(res, tmp_path / "cache", "--methods", "raytest-slow,raytest-boom",
                                                     "--tasks", "DarkRoom-v0", "--seeds", "1", "--first-seed", "11",
                                                     "--executor", "ray", "--address", cluster.address)]
    proc = spawn(cmd, cwd=ROOT, env={**os.environ, **cluster.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = _wait_for("slow-11-*.pid", cluster.talk)
    os.kill(int(first.name.split("-")[2].removesuffix(".pid")), signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err  # the method that raised is a failed run
    # the progress line shows running runs, their place reported by the worker through the progress actor
    assert re.search(r"\] .*raytest-\w+/DarkRoom-v0/seed11 0% on \S+ pid \d+", err), err
    store = ResultsStore(res)
    records = {store.read(i).meta["method"]: store.read(i) for i in store.run_ids()}
    slow, boom = records["raytest-slow"], records["raytest-boom"]
    assert slow.status == "ok"
    assert slow.curve["value"].tolist() == [2.0]  # it ran twice: the kill, then Ray's retry
    assert len(list(cluster.talk.glob("slow-11-*.pid"))) == 2
    assert boom.status == "failed" and boom.meta["reason"] == "RuntimeError: exploded on a Ray worker"
    assert "Traceback" in boom.meta["traceback"] and "raytest_plugin.py" in boom.meta["traceback"]
    assert not list((res / "runs").glob(".tmp-*"))


@needs_ray
def test_ctrl_c_cancels_outstanding_runs_then_resume(cluster, tmp_path, spawn):
    res = tmp_path / "res"
    args = _args(res, tmp_path / "cache", "--methods", "raytest-slow,random", "--tasks", "DarkRoom-v0",
                 "--seeds", "1", "--first-seed", "21", "--executor", "ray", "--address", cluster.address)
    proc = spawn([sys.executable, "-m", "bench.cli", *args], cwd=ROOT, env={**os.environ, **cluster.env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = _wait_for("slow-21-*.pid", cluster.talk)
    worker = int(first.name.split("-")[2].removesuffix(".pid"))
    store = ResultsStore(res)
    deadline = time.time() + 120
    while not store.run_ids() and time.time() < deadline:  # let the random run finish and be stored
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)  # 60 s timed out with two training runs on the 2 cores
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert [store.read_meta(i)["method"] for i in store.run_ids()] == ["random"]  # only complete records
    assert not list((res / "runs").glob(".tmp-*"))
    deadline = time.time() + 30
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(worker), "the cancelled run's worker is still running"
    resumed = bench_cli(*args, env=cluster.env, check=True)
    assert "1 already stored, 1 to run" in resumed.stderr
    slow = [store.read(i) for i in store.run_ids() if store.read_meta(i)["method"] == "raytest-slow"]
    assert len(slow) == 1 and slow[0].status == "ok"
    assert isinstance(slow[0].curve, pd.DataFrame) and slow[0].curve["value"].tolist() == [2.0]


def test_builtin_methods_declare_their_resources():
    """DrQ-v2 asks for its replay's memory and, at the paper preset, a GPU; AD / ED a GPU at the paper preset (where a
    cluster has none, ``--device auto`` drops it: :func:`placed_resources`)."""
    walker = run_resources(Cell("drqv2", "DMC-walker-walk-v0", 0, "paper", None))
    # walker-walk's paper budget: 1.1M frames at action repeat 2 = 550k agent steps, plus one slot per episode start
    # (500 agent steps an episode): the replay's own capacity, under the 1M buffer
    slots = 550_000 + 550_000 // 500 + 2
    assert walker == Resources(1.0, 1.0, slots * 3 * 84 * 84 + 3 * 2**30)
    quadruped = run_resources(Cell("drqv2-noaug", "DMC-quadruped-run-v0", 0, "paper", None))
    assert quadruped.memory == 100_000 * 3 * 84 * 84 + 3 * 2**30  # the reference's 100k buffer there
    quick = run_resources(Cell("drqv2", "DMC-cartpole-swingup-v0", 0, "quick", None))
    assert quick.num_gpus == 0 and quick.memory < 2**30
    for method in ("ad", "ed"):
        assert run_resources(Cell(method, "DarkRoom-v0", 0, "paper", None)) == Resources(1.0, 1.0, 0)
        assert run_resources(Cell(method, "DarkRoom-v0", 0, "quick", None)) == Resources(1.0, 0.0, 0)
    assert placed_resources(walker, "auto", False).num_gpus == 0
