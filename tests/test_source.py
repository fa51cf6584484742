"""The source RL algorithm (batched A2C) and the learning-history / expert datasets built from it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from baselines import histories as H
from baselines.source import Config, SourceMethod, train_learners
from bench.cli import main
from bench.config import ConfigError, apply_overrides, resolve_config
from bench.method import ArtifactCache
from bench.methods import get_method
from bench.store import ResultsStore
from tasks import get_task
from tasks.gridworld import DARK_ROOM_SPLIT, DarkRoomCore, optimal_return
from tasks.watermaze import WatermazeCore

DARK_ROOM = get_task("DarkRoom-v0")
KEY_TO_DOOR = get_task("DarkKeyToDoor-v0")
MAZE = get_task("PixelWatermaze-v0")
FAST = Config(lr=1e-2, hidden=32)


def _params(result) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in result.learner.net.named_parameters()}


# ------------------------------------------------------------------------------------------- the learner
def test_learners_are_independent_per_task() -> None:
    """Changing task 0 (its goal, hence its rewards) leaves every other task's parameters bit-identical."""
    goals = np.array(DARK_ROOM_SPLIT[0][:4])
    other = goals.copy()
    other[0] = (4, 4)  # the start cell: task 0 now earns rewards from its first steps
    assert tuple(goals[0]) != (4, 4)
    runs = [train_learners(DarkRoomCore(g), FAST, 3, episode_length=20, steps=400) for g in (goals, other)]
    a, b = (_params(r) for r in runs)
    for name in a:
        np.testing.assert_array_equal(a[name][1:], b[name][1:], err_msg=name)
    assert any(not np.array_equal(a[name][0], b[name][0]) for name in a)
    assert runs[0].episode_returns[1:] == runs[1].episode_returns[1:]


def test_gradients_are_per_task() -> None:
    """The summed loss gives each task the gradient of its own loss: task 0's rewards never reach task 1."""
    from baselines.source import BatchedA2C, Rollout, adapter_for

    core = DarkRoomCore(np.array(DARK_ROOM_SPLIT[0][:2]))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 81, (2, 20))
    ro = Rollout(x=x, x_next=np.roll(x, -1, 1), actions=rng.integers(0, 5, (2, 20)),
                 rewards=np.zeros((2, 20), np.float32), terminated=np.zeros((2, 20), bool),
                 done=np.zeros((2, 20), bool))
    grads = []
    for r0 in (0.0, 1.0):
        ro.rewards[0] = r0
        learner = BatchedA2C(2, adapter_for(core), FAST, seed=0)
        loss, _ = learner.losses(ro)
        loss.backward()
        grads.append([p.grad.clone() for p in learner.net.parameters()])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0[1], g1[1])
    assert any(not torch.equal(g0[0], g1[0]) for g0, g1 in zip(*grads))


def test_learner_learns_dark_room() -> None:
    goals = np.array(DARK_ROOM_SPLIT[0][:4])
    res = train_learners(DarkRoomCore(goals), FAST, 0, episode_length=20, steps=3000)
    ret = np.array(res.episode_returns)
    assert ret.shape == (4, 150)
    early, late = ret[:, :30].mean(), ret[:, -30:].mean()
    assert early < 2.0 and late > early + 4.0, (early, late)


def test_run_stops_after_episodes_on_variable_length_episodes() -> None:
    core = get_task("DarkKeyToDoor-v0")
    res = train_learners(H.make_core(core, core.train_tasks[:3]), FAST, 0, episode_length=50, episodes=5)
    assert min(len(r) for r in res.episode_returns) >= 5 and res.steps <= 5 * 50


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="subsample"):
        apply_overrides(Config(), {"subsample": "0"}, "method `source-a2c`")
    with pytest.raises(ConfigError, match="gamma"):
        apply_overrides(Config(), {"gamma": "1.5"}, "method `source-a2c`")
    assert "episodes" not in Config().generator_key()


# ------------------------------------------------------------------------------------------- datasets
@pytest.fixture
def counted(monkeypatch):
    """Count calls of the learning-history generator (a build), keeping its behaviour."""
    calls = []
    original = H._generate_learning

    def wrapper(*args, **kwargs):
        calls.append(args[0].id)
        return original(*args, **kwargs)

    monkeypatch.setattr(H, "_generate_learning", wrapper)
    return calls


def test_dataset_built_once_and_keyed(tmp_path, counted) -> None:
    cache = ArtifactCache(tmp_path)
    first = H.build_learning(DARK_ROOM, "smoke", cache)
    again = H.build_learning(DARK_ROOM, "smoke", cache)
    assert counted == ["DarkRoom-v0"]
    np.testing.assert_array_equal(np.asarray(first.actions), np.asarray(again.actions))
    assert isinstance(again.dones, np.memmap)
    # another task version, another preset with the same budget, or another generator setting: new artifacts
    v1 = dataclasses.replace(DARK_ROOM, id="DarkRoom-v1")
    H.build_learning(v1, "smoke", cache)
    same_budget = dataclasses.replace(DARK_ROOM, budgets={**DARK_ROOM.budgets, "quick": DARK_ROOM.budget("smoke")})
    H.build_learning(same_budget, "quick", cache)
    assert len(counted) == 3
    # another `subsample` is another artifact, cut from the cached full history without learning again
    sub = H.build_learning(DARK_ROOM, "smoke", cache, config=dataclasses.replace(H.source_config("smoke"), subsample=2))
    assert len(counted) == 3 and sub.subsample == 2
    np.testing.assert_array_equal(sub.episode_returns, first.episode_returns[:, ::2])
    assert len([p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 4


def test_dataset_does_not_depend_on_the_global_seed(tmp_path) -> None:
    torch.manual_seed(1)
    a = H.build_learning(DARK_ROOM, "smoke", ArtifactCache(tmp_path / "a"))
    torch.manual_seed(2)
    np.random.seed(2)
    b = H.build_learning(DARK_ROOM, "smoke", ArtifactCache(tmp_path / "b"))
    for name in ("obs", "actions", "rewards", "dones"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)


def test_truncated_file_is_detected_and_rebuilt(tmp_path, counted) -> None:
    cache = ArtifactCache(tmp_path)
    hist = H.build_learning(DARK_ROOM, "smoke", cache)
    expected = np.asarray(hist.obs)
    path = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert H.validate(path)
    del hist
    data = (path / "obs.npy").read_bytes()
    (path / "obs.npy").write_bytes(data[: len(data) // 2])
    assert not H.validate(path)
    rebuilt = H.build_learning(DARK_ROOM, "smoke", cache)
    assert counted == ["DarkRoom-v0", "DarkRoom-v0"]
    np.testing.assert_array_equal(np.asarray(rebuilt.obs), expected)
    # a file of the right length but another shape than the manifest is rejected too
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["arrays"]["actions"]["shape"][1] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert not H.validate(path)


def _replay(core, hist: H.Histories, task: int, steps: int) -> None:
    """Re-run task ``task``'s actions in a fresh core: observations, rewards and dones must match."""
    core.reset()
    for t in range(steps):
        obs = core.observe()[0] if isinstance(core, WatermazeCore) else core.cell[0]
        np.testing.assert_array_equal(hist.obs[task, t], obs)
        _, r, term, trunc = core.step(np.array([hist.actions[task, t]], dtype=np.int64))
        assert hist.rewards[task, t] == r[0] and hist.dones[task, t] == (term | trunc)[0]
        if (term | trunc)[0]:
            core.reset()


@pytest.mark.parametrize("spec", [DARK_ROOM, KEY_TO_DOOR, MAZE], ids=lambda s: s.id)
def test_history_format(tmp_path, spec) -> None:
    hist = H.build_learning(spec, "smoke", ArtifactCache(tmp_path))
    tasks = spec.train_split("smoke")
    steps = spec.budget("smoke").train_steps
    assert hist.tasks == tuple(tasks) and hist.kind == "learning" and hist.episode_length == spec.episode_length
    assert hist.actions.shape == hist.rewards.shape == hist.dones.shape == (len(tasks), steps)
    assert hist.actions[0, :5].dtype == np.int64 and hist.rewards[0, :5].dtype == np.float32
    assert hist.dones.dtype == bool
    if spec is MAZE:
        assert hist.obs.shape == (len(tasks), steps, 54, 54, 3) and hist.obs[0, :2].dtype == np.uint8
    else:
        assert hist.obs.shape == (len(tasks), steps) and hist.obs[0, :2].dtype == np.int64
    if spec is KEY_TO_DOOR:  # episodes end at the door or after 50 steps
        for row in np.asarray(hist.dones):
            gaps = np.diff(np.r_[-1, np.flatnonzero(row)])
            assert gaps.max() <= spec.episode_length
    else:  # fixed-length episodes
        expected = (np.arange(steps) % spec.episode_length) == spec.episode_length - 1
        assert (np.asarray(hist.dones) == expected).all()
        assert hist.episode_returns.shape == (len(tasks), steps // spec.episode_length)
    ends = np.flatnonzero(hist.dones[0])
    np.testing.assert_allclose(hist.episode_returns[0, : len(ends)],
                               np.diff(np.cumsum(hist.rewards[0])[ends], prepend=0))
    core = H.make_core(spec, [tasks[1]])
    _replay(core, hist, 1, min(steps, 300))


def test_subsample_keeps_every_kth_episode() -> None:
    res = train_learners(DarkRoomCore(np.array(DARK_ROOM_SPLIT[0][:2])), FAST, 0, episode_length=20, steps=400,
                         record=True)
    arrays = {"obs": res.visible, "actions": res.actions, "rewards": res.rewards, "dones": res.dones}
    sub = H._subsample(arrays, 3)
    assert sub["dones"].shape == (2, 7 * 20)  # episodes 0, 3, ..., 18
    np.testing.assert_array_equal(sub["actions"][:, 20:40], res.actions[:, 60:80])
    np.testing.assert_array_equal(H._episode_returns(sub["rewards"], sub["dones"]),
                                  np.array(res.episode_returns)[:, ::3])


@pytest.mark.parametrize("spec", [DARK_ROOM, KEY_TO_DOOR, MAZE], ids=lambda s: s.id)
def test_expert_histories_are_optimal(tmp_path, spec) -> None:
    hist = H.build_expert(spec, "smoke", ArtifactCache(tmp_path), steps=500)
    tasks = spec.train_split("smoke")
    assert hist.kind == "expert" and hist.actions.shape == (len(tasks), 500)
    if spec is MAZE:
        from tasks.watermaze import optimal_returns

        optimum = optimal_returns(tasks)
    else:
        optimum = np.array([optimal_return(spec, [t]) for t in tasks])
    ret = hist.episode_returns
    np.testing.assert_array_equal(np.where(np.isnan(ret), optimum[:, None], ret), np.broadcast_to(optimum[:, None],
                                                                                                 ret.shape))
    assert (~np.isnan(ret)).sum(axis=1).min() >= 500 // spec.episode_length


def test_plot_histories(tmp_path) -> None:
    hist = H.build_learning(DARK_ROOM, "smoke", ArtifactCache(tmp_path))
    fig = H.plot_histories(hist, n_sample=3)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) >= 4


# ------------------------------------------------------------------------------------------- the method
def test_source_method_is_registered() -> None:
    method = get_method("source-a2c")
    assert isinstance(method, SourceMethod)
    assert method.supports(DARK_ROOM) is True and method.supports(get_task("DMC-cartpole-swingup-v0")) is not True
    assert resolve_config(method, "quick") == Config()


def test_source_method_end_to_end(tmp_path) -> None:
    res = tmp_path / "results"
    code = main(["run", "--methods", "source-a2c", "--tasks", "DarkRoom-v0", "--preset", "smoke", "--seeds", "1",
                 "--torch-threads", "1",
                 "--results-dir", str(res), "--cache-dir", str(tmp_path / "cache")])
    store = ResultsStore(res)
    (run_id,) = store.run_ids()
    rec = store.read(run_id)
    assert code == 0 and rec.status == "ok", rec.meta["reason"]
    ev = rec.curve[(rec.curve.key == "eval/return") & (rec.curve.axis == "episode")]
    budget = DARK_ROOM.budget("smoke")
    assert list(ev.step) == list(range(budget.train_steps // DARK_ROOM.episode_length))
    assert {"losses/policy", "losses/value", "losses/entropy"} <= set(rec.curve[rec.curve.axis == "env_step"].key)
