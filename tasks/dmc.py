"""DeepMind Control pixel tasks as DrQ-v2 uses them (Yarats et al. 2021, arXiv 2107.09645).

## Description

A DeepMind Control Suite task (Tassa et al. 2018, arXiv 1801.00690) through ``dm_control``, wrapped the
way facebookresearch/drqv2 ``dmc.py`` wraps it: actions rescaled to ``[-1, 1]``, every action repeated
twice, the observation a stack of the last three 84x84 RGB camera frames. One generic env class,
:class:`DMCEnv`, serves every task through its ``domain`` / ``task`` kwargs.

## Observation

``Box(0, 255, (3 * frame_stack, size, size), uint8)`` = ``(9, 84, 84)``: the last ``frame_stack`` RGB
frames, channels first, oldest first, rendered from ``camera_id`` (0; 2 for quadruped, DrQ-v2's
zoomed-in camera). After ``reset`` the stack holds the first frame ``frame_stack`` times (DrQ-v2's
``FrameStackWrapper``).

Frames are rendered *cheaply* by default (``fast_render=True``): the offscreen buffer is shrunk from
DMC's 640x480 to ``size x size``, multisample anti-aliasing is turned off and the shadow map goes from
2048 to 512 texels. Measured with Mesa's software EGL on 2 shared CPU cores over 7 tasks x 40 states,
a frame renders ~2.4x faster (25.4 -> 10.8 ms on average; whole env steps 2.5-2.7x faster in
``tests/bench_dmc.py``) and a pixel changes by 0.83 on average in [0, 255] units (per task 0.57-1.59,
reacher-easy the largest: its thin links alias most); only edge pixels change (4-12% of them), shadows
are not visibly different. Keeping 4x MSAA at 84x84 changes pixels by only 0.02 but is just ~1.3x
faster (here 1 and 2 samples render exactly as 4); shadow maps below 512 gain nothing more.
``fast_render`` is part of the registered kwargs, so the task version pins it; ``fast_render=False``
gives DMC's default pixels.

## Action

``Box(-1, 1, (d,), float32)``, clipped to ``[-1, 1]`` and mapped linearly onto the task's actuator range
(all ``[-1, 1]`` except quadruped, whose ranges DrQ-v2 also rescales with ``action_scale.Wrapper``).

## Reward

DMC's per-control-step reward in ``[0, 1]``, summed over the ``action_repeat`` physics control steps of an
agent step, so an episode returns at most 1000.

## Termination

None of these tasks terminates; an episode is 1000 control steps = 500 agent steps and then ``truncated``
is True (DMC's own time limit; no ``TimeLimit`` wrapper is needed). Stepping past it raises
``gymnasium.error.ResetNeeded``.

## Rendering backend

MuJoCo needs an OpenGL backend, and ``dm_control`` picks it **once**, from ``MUJOCO_GL``, when its
``dm_control._render`` module is first imported (importing ``dm_control.suite`` does that). Nothing is
chosen at import of this module. When an env is made (or a random reference computed) and dm_control's
renderer is not imported yet: a set ``MUJOCO_GL`` is honoured; an unset one is filled with the first of
``egl``, ``osmesa`` that renders a tiny scene in a probe subprocess (~0.5 s, once per process), because a
failed backend import cannot be undone in-process (it pins ``PYOPENGL_PLATFORM``). If dm_control was
imported earlier, its choice stands. Any failure raises :class:`RenderBackendError` saying what was tried
and how to fix it.

## Registered ids

``DMC-<domain>-<task>-v0`` for cartpole-swingup, reacher-easy, finger-spin, ball_in_cup-catch,
cheetah-run, walker-walk, walker-run, quadruped-run (see :data:`SPECS`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from bench.registry import AdaptBenchError, UnknownNameError
from tasks.spec import Budget, Reference, TaskSpec

__all__ = ["AUTO_BACKENDS", "SPECS", "DMCEnv", "RenderBackendError", "ensure_render_backend", "random_return"]

AUTO_BACKENDS: tuple[str, ...] = ("egl", "osmesa")
"""Backends tried, in order, when ``MUJOCO_GL`` is unset (GLFW needs a display, so it is not tried)."""

# dm_control's names for "rendering disabled" (dm_control/_render/constants.py NO_RENDERER, canonical first)
_NO_RENDERER = ("off", "disable", "disabled", "false", "0")
_FIX = (
    "Fix: install an OpenGL backend for MuJoCo - EGL (Debian/Ubuntu: `apt-get install libegl1`, plus Mesa's "
    "software renderer `libegl-mesa0` on a machine without a GPU) or OSMesa (`apt-get install libosmesa6`) - "
    "or set MUJOCO_GL to a backend that works here (`egl`, `osmesa`, or `glfw` with a display) before "
    "starting Python."
)
# Renders one frame through exactly the code path the env uses (dm_control Physics -> MuJoCo context).
_PROBE = (
    "from dm_control import mujoco\n"
    "xml = '<mujoco><worldbody><light pos=\"0 0 1\"/><geom size=\"0.1\"/></worldbody></mujoco>'\n"
    "mujoco.Physics.from_xml_string(xml).render(8, 8)\n"
)


class RenderBackendError(AdaptBenchError, RuntimeError):
    """No OpenGL backend for MuJoCo's offscreen rendering works in this process."""


def _probe_backend(backend: str) -> str | None:
    """Try ``MUJOCO_GL=backend`` in a fresh interpreter; ``None`` if it renders, else the error's last line."""
    env = {**os.environ, "MUJOCO_GL": backend}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return repr(exc)
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"probe exited with status {proc.returncode}"


def ensure_render_backend() -> str:
    """Choose MuJoCo's OpenGL backend before ``dm_control`` imports its renderer; return the backend's name.

    Sets ``os.environ["MUJOCO_GL"]`` when it is unset (see the module docstring); raises
    :class:`RenderBackendError` when no backend can work.
    """
    render = sys.modules.get("dm_control._render")
    if render is None:
        requested = os.environ.get("MUJOCO_GL")
        if requested is None:
            failures: dict[str, str] = {}
            for candidate in AUTO_BACKENDS:
                error = _probe_backend(candidate)
                if error is None:
                    os.environ["MUJOCO_GL"] = candidate
                    break
                failures[candidate] = error
            else:
                tried = "; ".join(f"MUJOCO_GL={name}: {err}" for name, err in failures.items())
                raise RenderBackendError(
                    f"No OpenGL backend for MuJoCo rendering works: MUJOCO_GL is unset and every backend "
                    f"tried failed ({tried}). {_FIX}"
                )
        try:
            import dm_control._render as render
        except Exception as exc:  # PyOpenGL fails with ImportError, AttributeError, its own errors, ...
            raise RenderBackendError(
                f"dm_control could not load the OpenGL backend MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: "
                f"{type(exc).__name__}: {str(exc).rstrip('.')}. {_FIX}"
            ) from exc
    backend = render.BACKEND
    if backend is None or backend in _NO_RENDERER:
        raise RenderBackendError(
            f"dm_control's renderer was loaded with no usable OpenGL backend (backend {backend!r}, "
            f"MUJOCO_GL={os.environ.get('MUJOCO_GL', '<unset>')!r}); pixel DMC tasks cannot render in this process. "
            f"If dm_control was imported before a backend was chosen, make the DMC env (or set MUJOCO_GL) "
            f"before importing dm_control. {_FIX}"
        )
    return backend


def _load_suite():
    """``dm_control.suite``, imported only after a rendering backend has been chosen."""
    ensure_render_backend()
    from dm_control import suite

    return suite


def _load_dm_env(domain: str, task: str, seed: int | None = None):
    """``suite.load(domain, task)``; unknown names raise :class:`UnknownNameError` with close matches."""
    suite = _load_suite()
    domains = sorted({d for d, _ in suite.ALL_TASKS})
    if domain not in domains:
        raise UnknownNameError("DMC domain", domain, domains, "See dm_control.suite.ALL_TASKS.")
    tasks = sorted(t for d, t in suite.ALL_TASKS if d == domain)
    if task not in tasks:
        raise UnknownNameError(f"`{domain}` task", task, tasks, "See dm_control.suite.ALL_TASKS.")
    # visualize_reward=False as in DrQ-v2: otherwise body colours change with the reward and leak it
    return suite.load(domain, task, task_kwargs={"random": seed}, visualize_reward=False)


class _ActionMap:
    """``[-1, 1]`` agent actions -> the dm_control action spec's range (clipping first)."""

    def __init__(self, dm_action_spec: Any) -> None:
        self.shape: tuple[int, ...] = tuple(dm_action_spec.shape)
        self.low = np.broadcast_to(np.asarray(dm_action_spec.minimum, np.float64), self.shape)
        self.high = np.broadcast_to(np.asarray(dm_action_spec.maximum, np.float64), self.shape)

    def __call__(self, action: Any) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != self.shape:
            raise ValueError(f"action must have shape {self.shape}, got shape {a.shape}: {action!r}")
        a = np.clip(a, -1.0, 1.0)
        return self.low + (a + 1.0) * 0.5 * (self.high - self.low)


def _repeat(dm_env: Any, action: np.ndarray, repeat: int) -> tuple[float, Any]:
    """Step ``dm_env`` up to ``repeat`` times with ``action``; the summed reward and the last time step."""
    reward = 0.0
    for _ in range(repeat):
        ts = dm_env.step(action)
        reward += float(ts.reward or 0.0)
        if ts.last():  # the time limit can fall inside a repeat
            break
    return reward, ts


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class DMCEnv(gym.Env[np.ndarray, np.ndarray]):
    """A DeepMind Control task from pixels, DrQ-v2 style; see the module docstring for every section."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        domain: str,
        task: str,
        camera_id: int = 0,
        frame_stack: int = 3,
        action_repeat: int = 2,
        size: int = 84,
        fast_render: bool = True,
        render_mode: str | None = None,
    ) -> None:
        self.frame_stack = _positive_int("frame_stack", frame_stack)
        self.action_repeat = _positive_int("action_repeat", action_repeat)
        self.size = _positive_int("size", size)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.domain, self.task = domain, task
        # the task's RandomState is reseeded from self.np_random at every reset, so its seed here is moot
        self._env = _load_dm_env(domain, task)
        physics = self._env.physics
        if isinstance(camera_id, bool) or not isinstance(camera_id, int | np.integer) or not (
            -1 <= camera_id < physics.model.ncam
        ):
            raise ValueError(f"camera_id must be an int in [-1, {physics.model.ncam}) for {domain}, got {camera_id!r}")
        self.camera_id = int(camera_id)
        self.fast_render = bool(fast_render)
        vis = physics.model.vis
        if self.fast_render:
            # MuJoCo sizes its offscreen buffers from these when the render context is created (first
            # render), so they must be set before it; see the module docstring for the measured effect.
            vis.global_.offwidth = vis.global_.offheight = self.size
            vis.quality.offsamples = 0
            vis.quality.shadowsize = 512
        else:
            vis.global_.offwidth = max(int(vis.global_.offwidth), self.size)
            vis.global_.offheight = max(int(vis.global_.offheight), self.size)
        self._act = _ActionMap(self._env.action_spec())
        self.action_space = spaces.Box(-1.0, 1.0, self._act.shape, np.float32)
        self.observation_space = spaces.Box(0, 255, (3 * self.frame_stack, self.size, self.size), np.uint8)
        fps = round(1.0 / (self._env.control_timestep() * self.action_repeat))
        self.metadata = {**self.metadata, "render_fps": fps}
        self._frames: deque[np.ndarray] = deque(maxlen=self.frame_stack)
        self._done = True
        self._camera: Any = None
        try:  # create the GL context now, so that a backend problem fails at make time with a clear error
            self._render_frame()
        except Exception as exc:  # mujoco.FatalError, PyOpenGL and EGL errors share no base class
            import dm_control._render as render

            raise RenderBackendError(
                f"MuJoCo could not render with OpenGL backend {render.BACKEND!r} "
                f"(MUJOCO_GL={os.environ.get('MUJOCO_GL', '<unset>')!r}): "
                f"{type(exc).__name__}: {str(exc).rstrip('.')}. If dm_control was imported before a backend "
                f"was chosen it may have picked one that cannot work here; set MUJOCO_GL before importing "
                f"dm_control. {_FIX}"
            ) from exc

    def _render_frame(self) -> np.ndarray:
        """The current camera image, channels first ``(3, size, size)`` uint8.

        ``physics.render`` builds a ``Camera`` (and allocates and frees an ``MjvScene``) on every call; one camera
        kept for the env's lifetime renders the same pixels (tested) without that cost per frame."""
        physics = self._env.physics
        if self._camera is None or self._camera._physics is not physics:
            from dm_control.mujoco.engine import Camera

            self._free_camera()
            self._camera = Camera(physics, height=self.size, width=self.size, camera_id=self.camera_id)
        return np.ascontiguousarray(self._camera.render().transpose(2, 0, 1))

    def _free_camera(self) -> None:
        if self._camera is not None:
            self._camera._scene.free()
            self._camera = None

    def _obs(self) -> np.ndarray:
        return np.concatenate(self._frames, axis=0)  # a new array each step: never reused

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        # dm_control draws the initial state from the task's RandomState; reseeding it in place from
        # np_random makes the same gym seed give the same episodes (and keeps one source of randomness)
        self._env.task.random.seed(int(self.np_random.integers(2**32)))
        self._env.reset()
        frame = self._render_frame()
        for _ in range(self.frame_stack):  # DrQ-v2 fills the stack with the first frame
            self._frames.append(frame)
        self._done = False
        return self._obs(), {}

    def step(self, action: np.ndarray):
        if self._done:
            # dm_env would silently start a new, unseeded episode here
            raise gym.error.ResetNeeded("the episode is over (or never started): call reset() before step()")
        reward, ts = _repeat(self._env, self._act(action), self.action_repeat)
        self._frames.append(self._render_frame())
        # DMC signals the time limit with discount 1 and a true termination with discount 0
        terminated = bool(ts.last() and ts.discount == 0.0)
        truncated = bool(ts.last() and not terminated)
        self._done = terminated or truncated
        return self._obs(), reward, terminated, truncated, {}

    def render(self) -> np.ndarray | None:
        """The latest camera frame, ``(size, size, 3)`` uint8 (no extra render), for ``render_mode="rgb_array"``."""
        if self.render_mode != "rgb_array":
            return None
        if not self._frames:
            return self._render_frame().transpose(1, 2, 0).copy()
        return self._frames[-1].transpose(1, 2, 0).copy()

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            self._free_camera()
            env.physics.free()  # frees the GL context now rather than at garbage collection
            self._env = None


def random_return(spec: TaskSpec, tasks: tuple[Any, ...], episodes: int, seed: int) -> float:
    """Mean return of uniform random ``[-1, 1]`` actions over ``episodes`` episodes, **without rendering**.

    Steps the dm_control env directly (state only, ~100x cheaper than pixels) with the spec's action
    repeat, so the returns are those of :class:`DMCEnv` under the same actions. ``tasks`` is empty (a control
    family has no task split).
    """
    kw = spec.kwargs
    rng = np.random.default_rng(seed)
    dm_env = _load_dm_env(kw["domain"], kw["task"], seed=int(rng.integers(2**32)))
    act = _ActionMap(dm_env.action_spec())
    repeat = _positive_int("action_repeat", kw.get("action_repeat", 2))
    returns = []
    for _ in range(_positive_int("episodes", episodes)):
        ts, total = dm_env.reset(), 0.0
        while not ts.last():
            reward, ts = _repeat(dm_env, act(rng.uniform(-1.0, 1.0, act.shape)), repeat)
            total += reward
        returns.append(total)
    return float(np.mean(returns))


# DrQ-v2 cfgs/task/{easy,medium}.yaml num_train_frames; the task -> difficulty map is cfgs/task/<task>.yaml
# (cup_catch is ball_in_cup-catch). Frames count physics control steps, i.e. agent steps x action repeat.
_EASY, _MEDIUM = 1_100_000, 3_100_000
_TASKS: tuple[tuple[str, str, int, str], ...] = (
    ("cartpole", "swingup", _EASY, "swing a pole up from hanging and balance it on a cart"),
    ("reacher", "easy", _MEDIUM, "move a two-link planar arm's tip onto a large random target"),
    ("finger", "spin", _EASY, "spin a hinged body with a planar finger"),
    ("ball_in_cup", "catch", _EASY, "swing a ball on a string into a cup"),
    ("cheetah", "run", _MEDIUM, "make a planar cheetah run forward"),
    ("walker", "walk", _EASY, "make a planar biped walk forward"),
    ("walker", "run", _MEDIUM, "make a planar biped run forward"),
    ("quadruped", "run", _MEDIUM, "make a 3D quadruped run forward"),
)
_REFERENCE = Reference(value=1000.0, source="cited: DMC episode return upper bound (Tassa et al. 2018)")
# The quick preset's frames: 40k by default (~20 min a DrQ-v2 run with two runs side by side on 2 cores). At 40k
# frames DrQ-v2 with and without augmentation had not separated on finger-spin (final 11 vs 1, critic FAU 0.385 vs
# 0.359 over 3 seeds, inside each other's spread): neither agent had learnt yet. At 100k frames (70-95 min a run, two
# side by side) the augmented agent learnt finger-spin on seed 0 (final 250 vs 0, critic FAU of the last 5 episodes
# 0.536 vs 0.296) but not on seed 1 (0 vs 0, FAU 0.238 vs 0.325); reacher-easy and ball_in_cup-catch (tried as the
# second task) did not separate at seed 0 (finals 80 vs 13 and 199 vs 200): results/README.md's 100k section. Those
# runs explored on quick's 20k-frame schedule; since a64a752 these tasks keep the paper's (baselines/drqv2.py,
# QUICK_STD_BUDGET). cheetah-run has 100k frames too (session 17): its reward is dense (forward speed), so an agent
# need not first stumble on a sparse reward before its critic has something to fit, as on finger-spin.
_QUICK_FRAMES = {("finger", "spin"): 100_000, ("reacher", "easy"): 100_000, ("ball_in_cup", "catch"): 100_000,
                 ("cheetah", "run"): 100_000}


def _spec(domain: str, task: str, paper_frames: int, what: str) -> TaskSpec:
    return TaskSpec(
        id=f"DMC-{domain}-{task}-v0",
        family="control",
        entry_point="tasks.dmc:DMCEnv",
        episode_length=500,  # 1000 control steps / action repeat 2
        observation="pixels",
        actions="continuous",
        reference=_REFERENCE,
        budgets={
            # smoke: one 500-step training episode, an evaluation episode after each half
            "smoke": Budget(train_steps=1_000, eval_episodes=1, eval_every=500),
            "quick": Budget(train_steps=_QUICK_FRAMES.get((domain, task), 40_000), eval_episodes=5, eval_every=10_000),
            # DrQ-v2 cfgs/config.yaml: eval_every_frames 10000, num_eval_episodes 10
            "paper": Budget(train_steps=paper_frames, eval_episodes=10, eval_every=10_000),
        },
        kwargs={
            "domain": domain,
            "task": task,
            "camera_id": 2 if domain == "quadruped" else 0,  # DrQ-v2 dmc.py: zoomed-in camera for quadruped
            "frame_stack": 3,
            "action_repeat": 2,
            "size": 84,
            "fast_render": True,
        },
        random_rollout="tasks.dmc:random_return",
        random_episodes=10,
        description=f"DeepMind Control {domain}-{task} from 84x84 pixels, DrQ-v2 setting: {what}.",
    )


SPECS: list[TaskSpec] = [_spec(*t) for t in _TASKS]
