from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One artifact/reference cache for the whole session (references are computed once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def results_dir(tmp_path) -> Path:
    return tmp_path / "results"


@pytest.fixture
def spawn():
    """``subprocess.Popen`` whose process is killed, reaped and its pipes closed when the test ends, passed or
    failed: a process left running after a timed-out ``communicate`` (seen under load) would otherwise fail a
    later test with an unraisable ResourceWarning."""
    procs: list[subprocess.Popen] = []

    def start(*args, **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(*args, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def bench_cli(*args: str, env: dict | None = None, check: bool = False, timeout: float = 600
              ) -> subprocess.CompletedProcess:
    """Run the real `bench` console entry point in a fresh interpreter."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"bench {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
