"""The results store: one directory per run, written atomically, read back verified.

Layout under the results root (default ``results/``)::

    runs/<run_id>/meta.json      metadata, status, config, versions, references, checksum of the curve
    runs/<run_id>/curve.parquet  evaluation rows: axis, step, key, value

A run directory is assembled under ``runs/.tmp-<run_id>-<pid>-<nonce>/`` and renamed into place in one
``os.rename``, so a reader never sees a half-written run and a process killed with SIGKILL leaves only a
``.tmp-*`` directory, which the next sweep removes. Nothing here is a pickle: JSON and Parquet only.

``runs/.locks/<run_id>.lock`` is the claim a running cell holds (:meth:`ResultsStore.claim`): two ``bench run``
drivers on one results directory never compute the same run at once. A lock dies with its process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.registry import AdaptBenchError

SCHEMA = 1
CURVE_COLUMNS = ["axis", "step", "key", "value"]


class StoreError(AdaptBenchError):
    """The results root cannot be used (not writable, not a directory)."""


class CorruptRecordError(AdaptBenchError):
    """A stored run that fails verification; the message names the path and what is wrong."""


@dataclass
class RunRecord:
    run_id: str
    meta: dict[str, Any]
    curve: pd.DataFrame

    @property
    def status(self) -> str:
        return self.meta["status"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# flock(2) fails with these where the file system has no locks (some FUSE and sshfs mounts, Lustre mounted without
# `flock`): a lock is then an optimisation we do without, not a reason to stop a sweep.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created) while the block runs; if another process or open file
    holds it, call ``on_wait`` and wait. A lock dies with its process, so a crash never leaves a stale one. On a
    file system without locks, warn and go on unlocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            warnings.warn(f"{path.parent}: the file system does not support file locks ({e.strerror}); going on "
                          "without them, so two processes may build or run the same thing twice", RuntimeWarning,
                          stacklevel=3)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ResultsStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"

    def ensure_writable(self) -> None:
        """Fail early, before any run starts, if the store cannot be written."""
        try:
            self.runs.mkdir(parents=True, exist_ok=True)
            probe = self.runs / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"results directory `{self.root}` is not writable: {e.strerror or e}") from None

    def cleanup_stale(self) -> list[Path]:
        """Remove ``.tmp-*`` directories left by processes that no longer exist (killed runs)."""
        removed = []
        if not self.runs.is_dir():
            return removed
        for tmp in self.runs.glob(".tmp-*"):
            try:
                pid = int(tmp.name.split("-")[-2])
            except (ValueError, IndexError):
                pid = -1
            if pid <= 0 or not _pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed

    # ------------------------------------------------------------------ writing
    def write(self, run_id: str, meta: dict[str, Any], rows: list[dict[str, Any]] | pd.DataFrame) -> Path:
        """Store a run atomically; replaces an existing record of the same id (a retried failure)."""
        self.runs.mkdir(parents=True, exist_ok=True)
        tmp = self.runs / f".tmp-{run_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            curve = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=CURVE_COLUMNS)
            curve = curve.astype({"axis": "string", "step": "int64", "key": "string", "value": "float64"})
            curve.to_parquet(tmp / "curve.parquet", index=False)
            meta = dict(meta, schema=SCHEMA, run_id=run_id, curve_sha256=_sha256(tmp / "curve.parquet"),
                        curve_rows=len(curve))
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True, default=str)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            final = self.runs / run_id
            if final.exists():  # a failed run being retried: move the old one aside, then swap
                trash = self.runs / f".tmp-{run_id}-{os.getpid()}-old{uuid.uuid4().hex[:6]}"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.runs)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self, run_id: str) -> None:
        shutil.rmtree(self.runs / run_id, ignore_errors=True)

    @contextlib.contextmanager
    def claim(self, run_id: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold ``run_id``'s run lock while the block runs; if another process holds it, call ``on_wait`` and
        wait for it. The caller re-reads :meth:`status` inside the block: the holder may have stored the run.

        A :func:`file_lock`, so a driver killed by SIGKILL releases it; a resumed sweep is never blocked.
        """
        with file_lock(self.runs / ".locks" / f"{run_id}.lock", on_wait):
            yield

    # ------------------------------------------------------------------ reading
    def read_meta(self, run_id: str) -> dict[str, Any]:
        path = self.runs / run_id / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise CorruptRecordError(f"run record `{path.parent}` has no meta.json") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptRecordError(f"run record `{path}` is not valid JSON ({e})") from None
        missing = [k for k in ("run_id", "status", "method", "task", "seed", "preset", "curve_sha256") if k not in meta]
        if not isinstance(meta, dict) or missing:
            raise CorruptRecordError(f"run record `{path}` lacks fields {missing}")
        if meta["run_id"] != run_id:
            raise CorruptRecordError(f"run record `{path}` says it is run `{meta['run_id']}`")
        return meta

    def _checked_meta(self, run_id: str) -> tuple[dict[str, Any], Path]:
        """The meta and the curve's path, the curve matching its checksum (else :class:`CorruptRecordError`)."""
        meta = self.read_meta(run_id)
        path = self.runs / run_id / "curve.parquet"
        if not path.is_file():
            raise CorruptRecordError(f"run record `{path.parent}` has no curve.parquet")
        if _sha256(path) != meta["curve_sha256"]:
            raise CorruptRecordError(f"`{path}` does not match its checksum in meta.json (truncated or edited)")
        return meta, path

    def read(self, run_id: str) -> RunRecord:
        """Load and verify a run; a truncated or edited curve raises :class:`CorruptRecordError`."""
        meta, path = self._checked_meta(run_id)
        try:
            curve = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for damaged files
            raise CorruptRecordError(f"`{path}` cannot be read as Parquet ({e})") from None
        if list(curve.columns) != CURVE_COLUMNS or len(curve) != meta.get("curve_rows", len(curve)):
            raise CorruptRecordError(f"`{path}` has columns {list(curve.columns)} / {len(curve)} rows, not as recorded")
        return RunRecord(run_id, meta, curve)

    def status(self, run_id: str) -> str:
        """``missing``, ``ok``, ``failed`` or ``corrupt``: the meta, and the curve's checksum (a truncated or edited
        curve is ``corrupt``, so ``bench run`` computes the run again instead of counting it stored)."""
        if not (self.runs / run_id).exists():
            return "missing"
        try:
            return self._checked_meta(run_id)[0]["status"]
        except CorruptRecordError:
            return "corrupt"

    def run_ids(self) -> list[str]:
        if not self.runs.is_dir():
            return []
        return sorted(p.name for p in self.runs.iterdir() if p.is_dir() and not p.name.startswith("."))

    def iter_records(self) -> Iterator[RunRecord | CorruptRecordError]:
        """Every stored run, verified; a corrupt one is yielded as its error (named, not loaded)."""
        for run_id in self.run_ids():
            try:
                yield self.read(run_id)
            except CorruptRecordError as e:
                yield e
