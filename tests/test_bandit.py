"""Adversarial Bandit: the flipped task distributions, core == env, UCB histories, references, a smoke run."""

from __future__ import annotations

import hashlib
import json
import shutil

import gymnasium as gym
import numpy as np
import pytest

import tasks
from baselines import histories, ucb
from bench.cli import main
from bench.method import ArtifactCache
from bench.store import ResultsStore
from tasks import bandit as bd
from tasks.references import get_references
from tests.test_gridworld import _rollout

OOD, ID = "AdversarialBandit-v0", "AdversarialBanditID-v0"
# sha256 of repr((train, OOD test, ID test)): an accidental change of a split must fail here (new version instead)
SPLIT_HASH = "5e80a4a5c3a564fb"


@pytest.fixture(scope="module")
def ood() -> tasks.TaskSpec:
    return tasks.get_task(OOD)


@pytest.fixture(scope="module")
def idd() -> tasks.TaskSpec:
    return tasks.get_task(ID)


def _best(split) -> np.ndarray:
    return np.asarray(split).argmax(axis=1)


# ---------------------------------------------------------------------------------------------- distributions


def test_splits_are_fixed_and_disjoint(ood: tasks.TaskSpec, idd: tasks.TaskSpec) -> None:
    assert (len(ood.train_tasks), len(ood.test_tasks), len(idd.test_tasks)) == (1000, 100, 100)
    assert ood.train_tasks == idd.train_tasks
    digest = hashlib.sha256(repr((ood.train_tasks, ood.test_tasks, idd.test_tasks)).encode()).hexdigest()[:16]
    assert digest == SPLIT_HASH
    everything = ood.train_tasks + ood.test_tasks + idd.test_tasks
    assert len(set(everything)) == len(everything)


def test_every_task_has_one_clearly_best_arm(ood: tasks.TaskSpec, idd: tasks.TaskSpec) -> None:
    p = np.asarray(ood.train_tasks + ood.test_tasks + idd.test_tasks)
    assert p.shape[1] == bd.NUM_ARMS
    np.testing.assert_allclose(p * 100, np.round(p * 100), atol=1e-9)  # hundredths, as documented
    best = p.max(axis=1)
    others = np.sort(p, axis=1)[:, :-1]
    assert (best >= 0.5).all() and (best <= 1.0).all() and (others >= 0).all() and (others <= 0.49).all()


def test_best_arm_parity_flips_between_train_and_test(ood: tasks.TaskSpec, idd: tasks.TaskSpec) -> None:
    odd = lambda split: float(np.mean(_best(split) % 2 == 1))
    # 0.95 in expectation: binomial 95% ranges for 1,000 and 100 tasks
    assert 0.93 <= odd(ood.train_tasks) <= 0.97
    assert odd(ood.test_tasks) <= 0.10  # out of distribution: the best arm is even
    assert odd(idd.test_tasks) >= 0.90  # in distribution: odd, as in training
    # all five arms of the favoured parity get to be best
    assert set(_best(ood.train_tasks)) >= set(bd.ODD_ARMS) and set(_best(ood.test_tasks)) >= set(bd.EVEN_ARMS)


def test_draw_tasks_follows_the_favoured_parity() -> None:
    drawn = bd.draw_tasks(np.random.default_rng(0), 4000, bd.EVEN_ARMS)
    assert abs(np.mean(_best(drawn) % 2 == 0) - 0.95) < 0.015


# ---------------------------------------------------------------------------------------------- env and core


def _env_rollout(spec: tasks.TaskSpec, task, actions: list[int], seed: int) -> list[tuple]:
    env = spec.make(task)
    try:
        return _rollout(env, actions, seed)  # the grid worlds' step-by-step recorder
    finally:
        env.close()


def test_core_matches_env_step_for_step(ood: tasks.TaskSpec) -> None:
    task = ood.test_tasks[3]
    actions = [int(a) for a in np.random.default_rng(1).integers(0, bd.NUM_ARMS, 250)]
    # Gymnasium seeds np_random as default_rng(seed); the env's core draws its reward noise from np_random
    core = bd.BanditCore([task], seed=np.random.default_rng(5))
    core.reset()
    out = []
    for a in actions:
        obs, r, term, trunc = core.step(np.array([a]))
        out.append((int(obs[0]), float(r[0]), bool(term[0]), bool(trunc[0])))
        if term[0] or trunc[0]:
            core.reset()
    assert _env_rollout(ood, task, actions, seed=5) == out
    # 100 pulls per episode, never terminated
    assert [i for i, s in enumerate(out) if s[3]] == [99, 199] and not any(s[2] for s in out)


def test_env_determinism_and_sampled_tasks(ood: tasks.TaskSpec) -> None:
    actions = [int(a) for a in np.random.default_rng(2).integers(0, bd.NUM_ARMS, 300)]
    assert _env_rollout(ood, None, actions, 9) == _env_rollout(ood, None, actions, 9)
    env = ood.make()  # probs=None: a train task at every reset, never a held-out one
    seen = set()
    for s in range(20):
        env.reset(seed=s)
        seen.add(env.unwrapped.task)
    env.close()
    assert len(seen) > 1 and seen <= set(ood.train_tasks)


def test_core_freezes_finished_episodes_and_expert_is_best_arm(ood: tasks.TaskSpec) -> None:
    core = bd.core_for(ood, ood.test_tasks[:3])
    core.reset()
    np.testing.assert_array_equal(core.expert_actions(), _best(ood.test_tasks[:3]))
    for _ in range(100):
        _, _, _, trunc = core.step(core.expert_actions())
    assert trunc.all() and core.done.all()
    _, reward, term, trunc = core.step(np.zeros(3, dtype=np.int64))
    assert not reward.any() and not term.any() and not trunc.any()
    core.reset(np.array([True, False, False]))
    assert core.done.tolist() == [False, True, True]
    with pytest.raises(bd.InvalidArmError, match="arm 10"):
        core.step(np.array([0, 10, 0]))
    with pytest.raises(bd.BanditTaskError):
        bd.BanditCore([(0.5,) * 9])
    with pytest.raises(bd.BanditTaskError, match=r"\[0, 1\]"):
        gym.make(ood.gym_id, probs=(1.5,) + (0.1,) * 9)


def test_oracle_pulls_the_best_arm_and_earns_its_probability(ood: tasks.TaskSpec) -> None:
    env = ood.make(ood.test_tasks[0])
    env.reset(seed=0)
    assert bd.planner(env) == int(_best(ood.test_tasks[:1])[0])
    total = 0.0
    for _ in range(20):  # 2,000 pulls: within 4 standard deviations of 100 * max(p) per episode
        env.reset()
        total += sum(env.step(bd.planner(env))[1] for _ in range(100))
    env.close()
    p = max(ood.test_tasks[0])
    assert abs(total / 20 - 100 * p) < 4 * 100 * np.sqrt(p * (1 - p) / 2000)


# ---------------------------------------------------------------------------------------------- references


def test_references_are_exact_on_a_hand_made_task(ood: tasks.TaskSpec) -> None:
    hand = [(0.1,) * 9 + (0.9,), (0.5,) + (0.0,) * 9]
    # uniform pulls: 100 * mean(p) = 100 * (1.8 / 10 + 0.5 / 10) / 2; best arm: 100 * (0.9 + 0.5) / 2
    assert bd.random_return(ood, hand, 1, 0) == pytest.approx(11.5)
    assert bd.optimal_return(ood, hand) == pytest.approx(70.0)


def test_random_reference_matches_uniform_pulls(ood: tasks.TaskSpec) -> None:
    test = ood.test_split("quick")
    core = bd.core_for(ood, list(test) * 20)  # 20 episodes of uniform pulls per held-out task
    core.reset()
    rng, total = np.random.default_rng(0), 0.0
    while not core.done.all():
        total += core.step(rng.integers(0, bd.NUM_ARMS, core.num_envs))[1].sum()
    exact = bd.random_return(ood, test, 1, 0)
    assert abs(total / core.num_envs - exact) < 0.5  # the std of the mean over 2,000 episodes is ~0.1


@pytest.mark.parametrize("task_id", [OOD, ID])
def test_stored_references(task_id: str, tmp_path) -> None:
    spec = tasks.get_task(task_id)
    p = np.asarray(spec.test_split("quick"))
    refs = get_references(spec, "quick", tmp_path)
    assert refs.random == pytest.approx(100 * p.mean()) and refs.reference == pytest.approx(100 * p.max(1).mean())
    assert 25 < refs.random < 35 and 65 < refs.reference < 85
    assert refs.random_source.startswith("computed: expected return")  # exact, not "measured" by rollouts


def test_a2c_source_method_refuses_a_task_with_its_own_source(ood: tasks.TaskSpec) -> None:
    from bench.methods import get_method

    reason = get_method("source-a2c").supports(ood)
    assert isinstance(reason, str) and "baselines.ucb:learning_histories" in reason


# ---------------------------------------------------------------------------------------------- UCB histories


def test_ucb_learns_across_episodes(ood: tasks.TaskSpec) -> None:
    train = ood.train_tasks[:64]
    out = ucb.learning_histories(ood, train, 30 * bd.HORIZON, seed=0)
    assert set(out) == {"obs", "actions", "rewards", "dones"}
    assert all(a.shape == (64, 3000) for a in out.values())
    assert not out["obs"].any() and out["dones"].sum() == 64 * 30
    returns = out["rewards"].reshape(64, 30, bd.HORIZON).sum(-1).mean(0)  # mean over tasks per episode
    assert returns[-5:].mean() > returns[:5].mean() + 10
    # counts persist across episodes: after 30 episodes UCB mostly pulls the best arm
    last = out["actions"][:, -bd.HORIZON:]
    assert np.mean(last == _best(train)[:, None]) > 0.6
    # every arm is tried once, in a random order, before any is pulled twice
    first = np.sort(out["actions"][:, : bd.NUM_ARMS], axis=1)
    np.testing.assert_array_equal(first, np.tile(np.arange(bd.NUM_ARMS), (64, 1)))
    again = ucb.learning_histories(ood, train, 30 * bd.HORIZON, seed=0)
    assert all(np.array_equal(out[k], again[k]) for k in out)


def test_histories_use_the_task_source_and_a2c_elsewhere(ood: tasks.TaskSpec, tmp_path) -> None:
    cache = ArtifactCache(tmp_path / "artifacts")
    hist = histories.build_learning(ood, "smoke", cache)
    steps = ood.budget("smoke").train_steps
    assert (hist.n_tasks, hist.steps) == (4, steps) and hist.kind == "learning"
    ret = hist.episode_returns
    assert ret.shape == (4, steps // bd.HORIZON) and ret[:, -3:].mean() > ret[:, :2].mean()
    (path,) = [p for p in (tmp_path / "artifacts").iterdir() if p.is_dir()]
    key = json.loads((path / "key.json").read_text())
    assert key["generator"] == {"algorithm": "baselines.ucb:learning_histories", "subsample": 1}
    expert = histories.build_expert(ood, "smoke", cache)
    np.testing.assert_array_equal(np.asarray(expert.actions), np.repeat(_best(hist.tasks)[:, None], steps, 1))


class _Captured(Exception):
    pass


class _KeyOnly:
    """A cache that records the key it is asked for and builds nothing."""

    def get_or_build(self, name, key, build, validate=None):
        raise _Captured(key)


def test_other_tasks_keep_the_a2c_generator_key() -> None:
    """Grid worlds have no source_learner: their key is the one they always had, so cached data stay valid."""
    others = [s for s in tasks.list_tasks() if s.family == "in-context" and not s.id.startswith("Adversarial")]
    assert others and all(s.source_learner is None for s in others)
    with pytest.raises(_Captured) as got:
        histories.build_learning(tasks.get_task("DarkRoom-v0"), "smoke", _KeyOnly())  # type: ignore[arg-type]
    key = got.value.args[0]
    assert set(key) == {"kind", "format", "task", "task_version", "preset", "train_tasks", "steps", "generator",
                        "data_seed"}
    assert key["generator"] == {"algorithm": "a2c", **histories.source_config("smoke").generator_key()}


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_smoke_run_of_the_in_context_methods(tmp_path, cache_dir) -> None:
    res = tmp_path / "results"
    code = main(["run", "--methods", "ad,ed,rl2,random,oracle", "--tasks", f"{OOD},{ID}", "--preset", "smoke",
                 "--seeds", "1", "--results-dir", str(res), "--cache-dir", str(cache_dir)])
    store = ResultsStore(res)
    metas = [store.read_meta(i) for i in store.run_ids()]
    assert code == 0 and len(metas) == 10
    assert [(m["method"], m["task"], m["reason"]) for m in metas if m["status"] != "ok"] == []
    for run_id in store.run_ids():  # one `eval/return` row per in-context episode (smoke: 4), on held-out tasks
        curve = store.read(run_id).curve
        rows = curve[(curve["key"] == "eval/return") & (curve["axis"] == "episode")]
        assert len(rows) == 4 and np.isfinite(rows["value"]).all(), run_id


def _loss_rows(store: ResultsStore, run_id: str):
    curve = store.read(run_id).curve
    rows = curve[curve["key"].str.startswith(("losses/", "fau/"))]
    return rows.sort_values(["step", "key"])[["step", "key", "value"]].reset_index(drop=True)


def test_in_and_out_of_distribution_runs_share_one_trained_model(tmp_path) -> None:
    """AD paper Fig. 3 evaluates one trained model in and out of distribution: the two bandit ids have the same
    train split, so each seed trains once (the second run replays the stored training rows); a new seed, ED's
    other data, or a corrupt stored model each train their own."""
    res, cache = tmp_path / "results", tmp_path / "cache"
    args = ["--preset", "smoke", "--results-dir", str(res), "--cache-dir", str(cache)]
    assert main(["run", "--methods", "ad", "--tasks", f"{OOD},{ID}", "--seeds", "1", *args]) == 0
    models = sorted((cache / "artifacts").glob("model-ad-*[!k]"))
    assert len(models) == 1, models
    store = ResultsStore(res)
    by_task = {store.read_meta(i)["task"]: i for i in store.run_ids()}
    first, second = _loss_rows(store, by_task[OOD]), _loss_rows(store, by_task[ID])
    assert len(first) > 0
    assert first.equals(second)  # the same training rows in both logs
    stamp = (models[0] / "model.pt").stat().st_mtime_ns

    assert main(["run", "--methods", "ad,ed", "--tasks", ID, "--seeds", "2", *args]) == 0
    assert (models[0] / "model.pt").stat().st_mtime_ns == stamp  # seed 0 of ad was stored: not retrained
    assert len(list((cache / "artifacts").glob("model-ad-*[!k]"))) == 2  # seed 1
    assert len(list((cache / "artifacts").glob("model-ed-*[!k]"))) == 2

    (models[0] / "model.pt").write_bytes(b"truncated")
    shutil.rmtree(res)
    assert main(["run", "--methods", "ad", "--tasks", OOD, "--seeds", "1", *args]) == 0
    assert (models[0] / "model.pt").stat().st_size > 100  # detected and retrained, never loaded
    meta = ResultsStore(res).read_meta(ResultsStore(res).run_ids()[0])
    assert meta["status"] == "ok"
