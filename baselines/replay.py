"""A frame replay buffer for pixel RL: single frames stored once, stacks and n-step returns built on sampling.

DrQ-v2's reference buffer (facebookresearch/drqv2 ``replay_buffer.py``) keeps every stacked observation
(9x84x84 = 64 kB per transition) and leaks RAM; here each agent step stores its newest 3x84x84 frame once
(21 kB) in a ring of ``capacity`` slots, one slot per observation, and a sampled transition is assembled
from slot indices:

* **Frame stacking**: the observation at episode time ``t`` is the frames of slots ``a - min(k, t)`` for
  ``k = S-1 .. 0``, i.e. the stack repeats the episode's first frame before ``t = S-1``, exactly as the env's
  reset fills its stack (``tasks/dmc.py``).
* **n-step returns**: ``R = sum_{j<k} gamma^j r_{a+j}`` and ``discount = gamma^k * d``, where the window
  ``k = min(n, steps to the episode's end)`` stops at an episode's last observation, ``d = 0`` only when the
  episode *terminated* inside the window and 1 when it was *truncated* by a time limit (DMC episodes end by
  time limit, so the target bootstraps through it), and ``next_obs`` is the observation of slot ``a + k``.
  Unlike the reference (which samples only windows fully inside an episode) the last ``n - 1`` transitions of
  an episode are sampled too, with a shorter window.

The buffer persists as immutable ``.npz`` chunks of new slots plus a JSON-able manifest (:meth:`save` /
:meth:`load`), so a checkpoint writes only what was added since the previous one; :class:`RunCheckpoints` keeps a
run's newest checkpoint (tensors, JSON state, RNG states) next to the chunks it references. No pickles.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.registry import AdaptBenchError

_FIELDS = ("frames", "actions", "rewards", "discounts", "t", "last")


class CheckpointError(AdaptBenchError):
    """A checkpoint in the run's checkpoint directory that cannot be resumed from."""


class EmptyReplayError(ValueError):
    """Sampling from a buffer that holds no complete transition yet."""


class FrameReplay:
    """Ring buffer of observations (one frame each) with the action, reward and discount that followed them.

    ``capacity`` counts slots (observations); an episode of ``L`` agent steps takes ``L + 1`` slots.
    Arrays, ``C = capacity``: ``frames (C, c, H, W) uint8``, ``actions (C, A) float32`` (the action taken at
    this observation), ``rewards (C,) float32`` and ``discounts (C,) float32`` (what followed it: discount 0 if
    the episode terminated), ``t (C,) int32`` (time step in the episode), ``last (C,) bool`` (the episode ended
    at this observation, so no action follows it).
    """

    def __init__(
        self,
        capacity: int,
        frame_shape: tuple[int, int, int],
        action_dim: int,
        frame_stack: int,
        nstep: int,
        discount: float,
        rng: np.random.Generator,
    ) -> None:
        for name, value in (("capacity", capacity), ("frame_stack", frame_stack), ("nstep", nstep)):
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if capacity < frame_stack + nstep + 1:
            raise ValueError(f"capacity {capacity} is too small for frame_stack {frame_stack} and nstep {nstep}")
        self.capacity, self.frame_stack, self.nstep = int(capacity), int(frame_stack), int(nstep)
        self.gamma = float(discount)
        self.frame_shape, self.action_dim = tuple(frame_shape), int(action_dim)
        self.rng = rng
        c = self.capacity
        # np.zeros maps pages lazily: memory grows with what is written, not with capacity
        self.frames = np.zeros((c, *self.frame_shape), np.uint8)
        self.actions = np.zeros((c, self.action_dim), np.float32)
        self.rewards = np.zeros(c, np.float32)
        self.discounts = np.ones(c, np.float32)
        self.t = np.zeros(c, np.int32)
        self.last = np.zeros(c, bool)
        self.n_written = 0  # absolute slots written so far; slot a lives at a % capacity
        self._saved_upto = 0  # slots before this are final and already in a saved chunk
        self._chunks: list[tuple[str, int, int]] = []  # (file, first slot, end slot) of the saved chunks

    # ------------------------------------------------------------------------------------------ writing
    def _write(self, frame: np.ndarray, t: int, last: bool) -> None:
        i = self.n_written % self.capacity
        self.frames[i] = frame
        self.t[i], self.last[i] = t, last
        self.actions[i], self.rewards[i], self.discounts[i] = 0.0, 0.0, 1.0
        self.n_written += 1

    def add_first(self, obs: np.ndarray) -> None:
        """The observation returned by ``reset`` (stacked, channels first); its newest frame is stored."""
        if self.n_written and not self.last[(self.n_written - 1) % self.capacity]:
            raise ValueError("add_first() called before the previous episode ended (add() with terminated/truncated)")
        self._write(self._newest(obs), 0, False)

    def add(self, action: np.ndarray, reward: float, terminated: bool, truncated: bool, next_obs: np.ndarray) -> None:
        """One env step from the newest stored observation: its action, reward, end flags and next observation."""
        if not self.n_written or self.last[(self.n_written - 1) % self.capacity]:
            raise ValueError("add() needs an episode in progress: call add_first() with the reset observation")
        prev = (self.n_written - 1) % self.capacity
        self.actions[prev] = np.asarray(action, np.float32).reshape(self.action_dim)
        self.rewards[prev] = reward
        self.discounts[prev] = 0.0 if terminated else 1.0
        self._write(self._newest(next_obs), int(self.t[prev]) + 1, bool(terminated or truncated))

    def _newest(self, obs: np.ndarray) -> np.ndarray:
        frame = np.asarray(obs)[-self.frame_shape[0]:]
        if frame.shape != self.frame_shape:
            raise ValueError(f"observation of shape {np.shape(obs)} has no newest frame of shape {self.frame_shape}")
        return frame

    def __len__(self) -> int:
        """Slots currently held (observations, not transitions)."""
        return min(self.n_written, self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer's arrays at full capacity."""
        return sum(getattr(self, f).nbytes for f in _FIELDS)

    # ------------------------------------------------------------------------------------------ sampling
    def _windows(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For absolute source slots ``a``: validity, window length k, n-step reward and discount."""
        c, n = self.capacity, self.nstep
        lo = max(0, self.n_written - c)
        steps = a[:, None] + np.arange(n)  # slots whose action/reward may enter the window
        ends = self.last[(steps + 1) % c]  # the episode ended at the observation after step j
        # step j is in the window unless the episode ended at an earlier step's next observation
        inside = np.ones_like(ends)
        inside[:, 1:] = np.cumsum(ends[:, :-1], axis=1) == 0
        k = inside.sum(axis=1)
        rewards = self.rewards[steps % c] * inside
        discounts = self.discounts[steps % c]
        reward = (rewards * self.gamma ** np.arange(n)).sum(axis=1)
        # only the window's last step can end the episode, so its discount alone decides termination
        discount = self.gamma**k * discounts[np.arange(len(a)), k - 1]
        t = self.t[a % c]
        valid = (
            (a - np.minimum(self.frame_stack - 1, t) >= lo)  # the stack's frames are still held
            & ~self.last[a % c]  # an action follows this observation
            & (a + k <= self.n_written - 1)  # the window's next observation is written
        )
        return valid, k, reward.astype(np.float32), discount.astype(np.float32)

    def _stack(self, a: np.ndarray) -> np.ndarray:
        c, s = self.capacity, self.frame_stack
        back = np.minimum(np.arange(s - 1, -1, -1)[None, :], self.t[a % c][:, None])
        frames = self.frames[(a[:, None] - back) % c]  # (B, S, c, H, W)
        return frames.reshape(len(a), s * self.frame_shape[0], *self.frame_shape[1:])

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of n-step transitions, uniform over the complete ones held.

        Returns ``obs (B, S*c, H, W) uint8``, ``action (B, A) float32``, ``reward (B, 1)``, ``discount (B, 1)``
        (float32) and ``next_obs`` like ``obs``.
        """
        lo = max(0, self.n_written - self.capacity)
        if self.n_written - lo < 2:
            raise EmptyReplayError(f"the buffer holds {self.n_written - lo} observation(s), no transition")
        a = np.empty(batch_size, np.int64)
        k = np.empty(batch_size, np.int64)
        reward = np.empty(batch_size, np.float32)
        discount = np.empty(batch_size, np.float32)
        todo = np.arange(batch_size)
        for _ in range(100):  # rejection sampling: invalid slots are a small fraction of the ring
            draw = self.rng.integers(lo, self.n_written - 1, size=len(todo))
            ok, kk, rr, dd = self._windows(draw)
            done = todo[ok]
            a[done], k[done], reward[done], discount[done] = draw[ok], kk[ok], rr[ok], dd[ok]
            todo = todo[~ok]
            if not len(todo):
                break
        else:
            raise EmptyReplayError(f"no complete {self.nstep}-step transition among {self.n_written - lo} slots")
        return {
            "obs": self._stack(a),
            "action": self.actions[a % self.capacity],
            "reward": reward[:, None],
            "discount": discount[:, None],
            "next_obs": self._stack(a + k),
        }

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> dict[str, Any]:
        """Write the slots added since the last save as one chunk file; return the JSON-able manifest.

        Chunks are immutable and written atomically (tmp file, then rename); the manifest names the chunks that
        still hold live slots, so older ones can be deleted once a checkpoint using the manifest is committed.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        chunks = [ch for ch in self._chunks if ch[2] > self.n_written - self.capacity]
        start, end = self._saved_upto, self.n_written
        if end > start:
            name = f"chunk-{start:012d}-{end:012d}.npz"
            idx = np.arange(max(start, end - self.capacity), end) % self.capacity
            tmp = directory / f".tmp-{os.getpid()}-{name}"
            with open(tmp, "wb") as fh:
                np.savez(fh, **{f: getattr(self, f)[idx] for f in _FIELDS})
            os.replace(tmp, directory / name)
            chunks.append((name, max(start, end - self.capacity), end))
        # the newest slot's action is written by the next add() unless its episode ended: save it again then
        head_final = end == 0 or bool(self.last[(end - 1) % self.capacity])
        self._saved_upto = end if head_final else end - 1
        self._chunks = chunks
        return {
            "capacity": self.capacity,
            "n_written": self.n_written,
            "saved_upto": self._saved_upto,
            "chunks": [list(ch) for ch in chunks],
            "rng": self.rng.bit_generator.state,
        }

    def load(self, directory: Path, manifest: dict[str, Any]) -> None:
        """Restore the contents and sampling RNG saved with ``manifest`` (from :meth:`save`)."""
        if manifest["capacity"] != self.capacity:
            raise ValueError(f"checkpoint replay capacity {manifest['capacity']} != buffer capacity {self.capacity}")
        n = int(manifest["n_written"])
        for name, start, end in manifest["chunks"]:
            with np.load(Path(directory) / name, allow_pickle=False) as data:
                first = max(int(start), n - self.capacity)
                skip = first - int(start)
                idx = np.arange(first, int(end)) % self.capacity
                for f in _FIELDS:
                    getattr(self, f)[idx] = data[f][skip:]
        self.n_written, self._saved_upto = n, int(manifest["saved_upto"])
        self._chunks = [tuple(ch) for ch in manifest["chunks"]]
        self.rng.bit_generator.state = manifest["rng"]

    @staticmethod
    def chunk_names(manifest: dict[str, Any]) -> set[str]:
        return {ch[0] for ch in manifest["chunks"]}


class RunCheckpoints:
    """A run's checkpoints under ``root``: ``ckpt-<step>/`` with ``state.pt`` (tensors and torch's RNG, read back with
    ``torch.load(weights_only=True)``) and ``state.json``, plus the replay chunks under ``replay/``.

    A checkpoint is written into a tmp dir and renamed into place, so a kill leaves either the previous or the new
    one; after the rename, older checkpoints and chunks no longer referenced are deleted.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save(self, step: int, tensors: dict[str, Any], state: dict[str, Any], replay: FrameReplay,
             generators: dict[str, np.random.Generator]) -> None:
        """Checkpoint ``step``: ``tensors``, JSON-able ``state``, ``replay`` and the RNG states: ``generators``
        (numpy, JSON-able), python's and numpy's global ones, torch's (and CUDA's)."""
        for stale in [*self.root.glob(".tmp-*"), *self.root.glob("replay/.tmp-*")]:  # left by a killed process
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        manifest = replay.save(self.root / "replay")
        tmp = self.root / f".tmp-ckpt-{os.getpid()}"
        tmp.mkdir(parents=True)
        rngs = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            rngs["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save({**tensors, **rngs}, tmp / "state.pt")
        legacy = np.random.get_state()
        state = {**state, "replay": manifest, "rng": {
            "generators": {k: g.bit_generator.state for k, g in generators.items()}, "python": random.getstate(),
            "numpy_global": [legacy[0], legacy[1].tolist(), *legacy[2:]]}}
        (tmp / "state.json").write_text(json.dumps(state))
        final = self.root / f"ckpt-{step:012d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.root.glob("ckpt-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        live = FrameReplay.chunk_names(manifest)
        for chunk in (self.root / "replay").glob("chunk-*"):
            if chunk.name not in live:
                chunk.unlink(missing_ok=True)

    def load(self, device: torch.device | str = "cpu") -> tuple[dict, dict] | None:
        """``(state, tensors)`` of the newest checkpoint, or ``None`` if there is none. The caller restores the
        replay (:meth:`load_replay`) and the RNGs (:meth:`restore_rngs`) once it built its modules."""
        found = sorted(self.root.glob("ckpt-*"))
        if not found:
            return None
        try:
            state = json.loads((found[-1] / "state.json").read_text())
            return state, torch.load(found[-1] / "state.pt", weights_only=True, map_location=device)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot read checkpoint {found[-1]}: {e}. Delete it to start the run afresh.") from e

    def load_replay(self, replay: FrameReplay, state: dict[str, Any]) -> None:
        try:
            replay.load(self.root / "replay", state["replay"])
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot restore the replay of the checkpoint in {self.root}: {e}") from e

    @staticmethod
    def restore_rngs(state: dict[str, Any], tensors: dict[str, Any],
                     generators: dict[str, np.random.Generator]) -> None:
        """Set ``generators`` and the global python / numpy / torch RNGs to the checkpoint's states."""
        rng = state["rng"]
        for key, gen in generators.items():
            gen.bit_generator.state = rng["generators"][key]
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        legacy = rng["numpy_global"]
        np.random.set_state((legacy[0], np.asarray(legacy[1], np.uint32), *legacy[2:]))
        torch.set_rng_state(tensors["torch_rng"].cpu())
        if "cuda_rng" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in tensors["cuda_rng"]])
