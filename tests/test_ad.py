"""Algorithm Distillation / Expert Distillation: the KV cache is exact, evaluation never touches the weights, the
model learns, bad contexts are refused, and ``ad`` / ``ed`` run end to end through the CLI at the smoke preset."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from baselines import ad
from bench.cli import main
from bench.config import ConfigError, apply_overrides, resolve_config
from bench.method import ArtifactCache, RunContext, RunLogger
from bench.methods import get_method
from bench.registry import load_target
from bench.store import ResultsStore
from tasks import get_task

DARK_ROOM = get_task("DarkRoom-v0")
TINY = ad.Config(embed_dim=32, num_layers=2, num_heads=4, ff_dim=64, context_episodes=2.0,
                 attention_dropout=0.0, embedding_dropout=0.0, residual_dropout=0.0)


def epsilon_expert_rollout(core, episodes: int, epsilon, num_actions: int, rng: np.random.Generator) -> dict:
    """Histories of an epsilon-random expert on a batched core: ``epsilon[k]`` is the chance of a uniform random
    action in episode ``k`` (falling from 1 to 0 it makes a synthetic learning history, as AD-epsilon does,
    arXiv 2312.12275). Every env runs until the last one has finished ``episodes`` (Key-to-Door episodes end at
    different steps), so each row is one unbroken history of ``(n, T)`` arrays."""
    eps = np.broadcast_to(np.asarray(epsilon, dtype=np.float64), (episodes,))
    n = core.num_envs
    obs = core.reset()
    count = np.zeros(n, np.int64)
    out: dict[str, list[np.ndarray]] = {"obs": [], "actions": [], "rewards": [], "dones": []}
    while (count < episodes).any():
        explore = rng.random(n) < eps[np.minimum(count, episodes - 1)]
        act = np.where(explore, rng.integers(0, num_actions, n), core.expert_actions()).astype(np.int64)
        nxt, reward, term, trunc = core.step(act)
        done = term | trunc
        for key, value in (("obs", obs), ("actions", act), ("rewards", reward), ("dones", done)):
            out[key].append(value)
        count += done
        obs = core.reset(done) if done.any() else nxt
    return {k: np.stack(v, axis=1) for k, v in out.items()}


def synthetic_histories(spec, tasks, episodes: int, expert: bool, seed: int = 0) -> SimpleNamespace:
    """The expert (ED data) or an epsilon-expert with epsilon falling from 1 to 0 (a stand-in learning history),
    with the arrays of ``baselines.histories.Histories``."""
    core = load_target(spec.batched_core)(spec, list(tasks))
    eps = np.zeros(episodes) if expert else np.linspace(1.0, 0.0, episodes)
    n_actions = int(spec.make(tasks[0]).action_space.n)
    data = epsilon_expert_rollout(core, episodes, eps, n_actions, np.random.default_rng(seed))
    return SimpleNamespace(**data, tasks=tuple(tasks))


def _core(spec, tasks):
    return load_target(spec.batched_core)(spec, list(tasks))


@pytest.fixture
def synthetic_data(monkeypatch):
    """Replace the cached source histories with fast synthetic ones, so this file tests AD's own code."""
    calls = []

    def fake(ctx, expert):
        calls.append(expert)
        # expert Key-to-Door episodes are short: more of them fill the same context
        return synthetic_histories(ctx.task, ctx.task.train_split(ctx.preset), episodes=30 if expert else 8,
                                   expert=expert)

    monkeypatch.setattr(ad, "load_histories", fake)
    return calls


def test_cached_logits_equal_full_recompute() -> None:
    """Every incremental logit equals a full forward pass over the context since the last refill, across refills,
    and equals the exact one-step-sliding recompute until the window first fills."""
    torch.manual_seed(0)
    model = ad.ADTransformer(TINY, 12, 5, (), 81).eval()
    with torch.no_grad():
        for p in model.parameters():  # a random model far from the near-zero initialisation
            p.add_(torch.randn_like(p) * 0.3)
        tokens = torch.randn(3, 40, TINY.embed_dim)
        cache = model.new_cache(3, keep_fraction=0.5)
        recompute = ad._Context(model, 3, dataclasses.replace(TINY, kv_cache=False))
        starts = set()
        for t in range(40):
            cached = model.step(tokens[:, t], cache)
            full = model(tokens[:, cache.start: t + 1])[:, -1]
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
            sliding = recompute.push(tokens[:, t])
            if t < 12:
                torch.testing.assert_close(cached, sliding, rtol=1e-4, atol=1e-5)
            starts.add(cache.start)
    assert starts == {0, 6, 12, 18, 24, 30}  # refilled with the last 6 of 12 steps each time it was full


def test_evaluation_keeps_weights_frozen() -> None:
    torch.manual_seed(1)
    model = ad.build_model(dataclasses.replace(TINY, attention_dropout=0.5), DARK_ROOM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # evaluation must switch dropout off itself
    returns, prompt = ad.evaluate_in_context(model, _core(DARK_ROOM, DARK_ROOM.test_tasks[:3]), 3, TINY,
                                             np.random.default_rng(0))
    assert returns.shape == (3, 3) and prompt.shape == (3, 0)
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_demonstration_prompt_fills_context_first() -> None:
    """Prompt episodes of the expert (epsilon 0) score the optimum; the in-context episodes follow them."""
    cfg = dataclasses.replace(TINY, prompt_episodes=2, prompt_epsilon=0.0)
    model = ad.build_model(cfg, DARK_ROOM)
    tasks = DARK_ROOM.test_tasks[:4]
    returns, prompt = ad.evaluate_in_context(model, _core(DARK_ROOM, tasks), 2, cfg, np.random.default_rng(0))
    from tasks.gridworld import optimal_return

    assert returns.shape == (4, 2) and prompt.shape == (4, 2)
    assert prompt.mean() == pytest.approx(optimal_return(DARK_ROOM, tasks))


def test_model_learns_a_tiny_dataset() -> None:
    """Expert episodes of two goals: the model must read the goal from earlier episodes in its context."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, learning_rate=3e-3, batch_size=16, train_steps=150, warmup_fraction=0.05)
    model = ad.build_model(cfg, DARK_ROOM)
    data = synthetic_histories(DARK_ROOM, DARK_ROOM.train_tasks[:2], episodes=12, expert=True)
    sampler = ad.WindowSampler(data, model.context_len, model.num_actions)
    opt, sched = ad.make_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    history = [ad.update(model, opt, sched, ad.to_torch(sampler.sample(16, rng), "cpu"), 1.0)
               for _ in range(cfg.train_steps)]
    first, last = history[0], history[-10:]
    assert np.mean([m["losses/action_ce"] for m in last]) < 0.3 * first["losses/action_ce"]
    assert np.mean([m["losses/action_accuracy"] for m in last]) > 0.85


def test_gapped_windows_skip_episodes() -> None:
    """With a gap of 6 steps a window goes on with the first episode starting >= 6 steps after the last one
    started, and marks each junction as a new episode; episodes of different lengths (Key-to-Door) included."""
    dones = np.zeros((2, 60), bool)
    dones[0, 2::3] = True
    ends = np.cumsum([2, 5, 1, 4, 3, 6, 2, 7, 3, 5, 4, 2, 6, 3]) - 1
    dones[1, ends[ends < 60]] = True
    episode = np.concatenate([np.zeros((2, 1), int), np.cumsum(dones, 1)[:, :-1]], 1)
    starts = [np.concatenate([[0], np.flatnonzero(d[:-1]) + 1]) for d in dones]
    data = SimpleNamespace(obs=episode, actions=np.arange(120).reshape(2, 60) % 5, rewards=np.zeros((2, 60)),
                           dones=dones)
    sampler = ad.WindowSampler(data, 10, 5, gap=6)
    rng = np.random.default_rng(0)
    for row in (0, 1):
        for _ in range(20):
            cols = sampler._gapped(row, rng)
            kept = list(dict.fromkeys(episode[row, cols]))
            assert len(kept) >= 2
            for a, b in zip(kept, kept[1:]):
                assert starts[row][b] >= starts[row][a] + 6 > starts[row][b - 1]  # the first one that far on
    batch = sampler.sample(50, rng)
    assert (batch["first"][:, 1:] == (np.diff(batch["obs"], axis=1) > 0)).all()  # junctions start episodes
    # every start from which a full gapped window exists is drawn, and only those
    firsts = {int(sampler._gapped(0, rng)[0]) for _ in range(2000)}
    assert firsts == set(range(42))  # the last: step 41 of episode 13 (1 step), then 3 of episodes 15, 17, 19
    # a gap no window can bridge (expert Key-to-Door: short episodes) falls back to consecutive episodes
    cols = ad.WindowSampler(data, 10, 5, gap=100)._gapped(1, rng)
    assert (np.diff(cols) == 1).all()


def test_killed_training_resumes_from_its_checkpoint(tmp_path) -> None:
    """Killed after step 7 with a checkpoint at step 5, the resumed run ends with the uninterrupted run's weights
    (batches depend on (seed, step) only; dropout off, so nothing else is random)."""
    cfg = dataclasses.replace(TINY, train_steps=10, checkpoint_every=5, batch_size=4, log_every=2)
    data = synthetic_histories(DARK_ROOM, DARK_ROOM.train_tasks[:2], episodes=6, expert=False)

    def run(ckpt_dir, kill_at=None):
        torch.manual_seed(0)
        model = ad.build_model(cfg, DARK_ROOM)
        sampler = ad.WindowSampler(data, model.context_len, model.num_actions)

        def progress(fraction, message):
            if kill_at is not None and f"step {kill_at}/" in message:
                raise KeyboardInterrupt

        ctx = RunContext(task=DARK_ROOM, seed=3, preset="smoke", budget=DARK_ROOM.budget("smoke"), config=cfg,
                         device="cpu", log=RunLogger(), checkpoint_dir=ckpt_dir, cache=ArtifactCache(tmp_path),
                         rng=np.random.default_rng(3))
        ctx.progress = progress  # unthrottled (RunContext.progress is rate-limited), to stop at an exact step
        returned.append(ad.train(ctx, model, sampler, cfg))
        return model, ctx.log.rows

    returned: list = []
    straight, rows = run(tmp_path / "a")
    assert [r["step"] for r in rows if r["key"] == "losses/action_ce"] == [2, 4, 6, 8, 10]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_at=7)
    resumed, rows = run(tmp_path / "b")
    assert [r["step"] for r in rows if r["key"] == "losses/action_ce"] == [6, 8, 10]
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    # train() returns every row, those before the resume from the checkpoint (what shared_training stores)
    assert [step for step, _ in returned[-1]] == [step for step, _ in returned[0]] == [2, 4, 6, 8, 10]


def test_context_shorter_than_an_episode_is_refused() -> None:
    with pytest.raises(ConfigError, match="shorter than one episode"):  # at config validation (the harness)
        apply_overrides(ad.Config(), {"context_episodes": "0.5"}, "method `ad`")
    with pytest.raises(ConfigError, match="shorter than one episode"):  # a config built without validation
        ad.Config(context_episodes=0.5).context_len(DARK_ROOM)
    # a cap in steps depends on the task's episode length: 40 steps hold 2 Dark Room episodes, not one Key-to-Door
    capped = ad.Config(max_context_steps=40)
    assert capped.context_len(DARK_ROOM) == 40 and ad.Config(context_episodes=1.5).context_len(DARK_ROOM) == 30
    with pytest.raises(ConfigError, match=r"shorter than one DarkKeyToDoor-v0 episode \(50 steps\)"):
        capped.context_len(get_task("DarkKeyToDoor-v0"))
    with pytest.raises(ConfigError, match="fewer than the context"):
        ad.WindowSampler(SimpleNamespace(obs=np.zeros((2, 30), np.int64), actions=np.zeros((2, 30), np.int64),
                                         rewards=np.zeros((2, 30)), dones=np.zeros((2, 30), bool)), 40, 5)


def test_context_length_ablation_variants() -> None:
    """ad-ctx<k> (paper Fig. 7) differ from ad in the context only, at every preset; only the ablation switch lets
    a context shorter than an episode through."""
    contexts = {}
    for name, episodes in (("ad-ctx0.5", 0.5), ("ad-ctx1", 1.0), ("ad-ctx2", 2.0), ("ad-ctx4", 4.0)):
        method = get_method(name)
        for preset in ("smoke", "quick", "paper"):
            cfg = resolve_config(method, preset)
            assert cfg.context_episodes == episodes and cfg.max_context_steps == 0
            base = resolve_config(get_method("ad"), preset)
            differ = {k for k, v in vars(cfg).items() if vars(base)[k] != v}
            assert differ <= {"context_episodes", "max_context_steps", "partial_context"}
        contexts[name] = resolve_config(method, "quick").context_len(DARK_ROOM)
        assert method.expert_data is False and method.supports(DARK_ROOM) is True
    assert contexts == {"ad-ctx0.5": 10, "ad-ctx1": 20, "ad-ctx2": 40, "ad-ctx4": 80}
    assert ad.Config(context_episodes=0.5, partial_context=True).context_len(DARK_ROOM) == 10
    with pytest.raises(ConfigError, match="positive"):
        apply_overrides(ad.Config(), {"context_episodes": "0"}, "method `ad`")


def test_sliding_context_variants_evaluate_ads_trained_model(tmp_path) -> None:
    """ad-keep<k> differ from ad in slide_keep only (an evaluation field), at every preset, and evaluate the model
    ad trained: the second run trains nothing (the model's file is untouched) and replays ad's training rows."""
    assert "slide_keep" in ad.EVAL_ONLY_FIELDS
    for name, keep in (("ad-keep0.75", 0.75), ("ad-keep0.9", 0.9)):
        method = get_method(name)
        assert method.trains_as == "ad" and method.expert_data is False
        for preset in ("smoke", "quick", "paper"):
            cfg, base = resolve_config(method, preset), resolve_config(get_method("ad"), preset)
            assert cfg.slide_keep == keep and base.slide_keep == 0.5
            assert {k for k, v in vars(cfg).items() if vars(base)[k] != v} == {"slide_keep"}
    res, cache = tmp_path / "results", tmp_path / "cache"
    args = ["--tasks", "DarkRoom-v0", "--seeds", "1", "--preset", "smoke", "--results-dir", str(res),
            "--cache-dir", str(cache)]
    assert main(["run", "--methods", "ad", *args]) == 0
    (model,) = (cache / "artifacts").glob("model-ad-*[!k]")  # not the .lock
    stamp = (model / "model.pt").stat().st_mtime_ns
    assert main(["run", "--methods", "ad-keep0.9", *args]) == 0
    assert list((cache / "artifacts").glob("model-*[!k]")) == [model]
    assert (model / "model.pt").stat().st_mtime_ns == stamp
    store = ResultsStore(res)
    by_method = {store.read_meta(i)["method"]: store.read(i).curve for i in store.run_ids()}
    train = [c[c["key"].str.startswith("losses/")].reset_index(drop=True) for c in by_method.values()]
    assert len(train[0]) > 0 and train[0][["step", "key", "value"]].equals(train[1][["step", "key", "value"]])
    with pytest.raises(ConfigError, match="slide_keep"):
        apply_overrides(resolve_config(get_method("ad-keep0.9"), "smoke"), {"slide_keep": "1"}, "method").validate()


def test_key_to_door_keeps_more_context_at_quick_and_the_keep_variants_their_own() -> None:
    """At quick, AD and ED on Key-to-Door keep 90% of the context when the cache slides (its 100-step cap holds two
    episodes; half of it, one); Dark Room and the other presets keep the default half; the keep variants keep their
    own value on every task, and an explicit --set still wins."""
    kd, dr = "DarkKeyToDoor-v0", "DarkRoom-v0"
    for name in ("ad", "ed", "ad-prompt", "ed-prompt"):
        method = get_method(name)
        assert resolve_config(method, "quick", task=kd).slide_keep == 0.9
        assert resolve_config(method, "quick", task=dr).slide_keep == 0.5
        assert resolve_config(method, "paper", task=kd).slide_keep == 0.5
        assert resolve_config(method, "quick", {"slide_keep": "0.5"}, task=kd).slide_keep == 0.5
        # nothing else changes with the task
        a, b = resolve_config(method, "quick", task=kd), resolve_config(method, "quick", task=dr)
        assert {k for k, v in vars(a).items() if vars(b)[k] != v} == {"slide_keep"}
    # the keep variants hold their own value everywhere; the context-length variants, which lift the 100-step cap
    # the setting answers, keep the default
    for name, keep in (("ad-keep0.5", 0.5), ("ad-keep0.75", 0.75), ("ad-keep0.9", 0.9), ("ad-ctx4", 0.5),
                       ("ad-ctx1", 0.5)):
        for task in (kd, dr):
            assert resolve_config(get_method(name), "quick", task=task).slide_keep == keep
    assert get_method("ad-keep0.5").trains_as == "ad"
    # Key-to-Door's cells record the setting in their config (and so in their ids); Dark Room's do not change
    # (tests/test_committed_results.py checks the stored ids)
    from bench.runner import make_plan

    cells = {c.task: c for c in make_plan(["ad"], [dr, kd], [0], "quick").cells}
    assert cells[kd].config["slide_keep"] == 0.9 and cells[dr].config["slide_keep"] == 0.5


def test_prompt_variants_evaluate_their_bases_model_after_a_demonstration() -> None:
    """ad-prompt / ed-prompt differ from ad / ed in the prompt fields only (evaluation-only), at every preset, and
    evaluate their base's trained model: the demonstration-prompting comparison (paper Fig. 5) is one model,
    prompted and not."""
    assert {"prompt_episodes", "prompt_epsilon"} <= set(ad.EVAL_ONLY_FIELDS)
    for name, base_name in (("ad-prompt", "ad"), ("ed-prompt", "ed")):
        method, base = get_method(name), get_method(base_name)
        assert method.trains_as == base_name and method.expert_data is base.expert_data
        for preset in ("smoke", "quick", "paper"):
            cfg, ref = resolve_config(method, preset), resolve_config(base, preset)
            assert (cfg.prompt_episodes, cfg.prompt_epsilon) == (4, 0.5) and ref.prompt_episodes == 0
            assert {k for k, v in vars(cfg).items() if vars(ref)[k] != v} == {"prompt_episodes", "prompt_epsilon"}


def test_prompted_run_logs_the_demonstrators_level_and_the_leaderboard_shows_it(tmp_path) -> None:
    """A prompted ED run (smoke) reuses ed's model, logs the prompt's return, and the experiment table gives its
    normalised score in a column of its own (absent for the unprompted run)."""
    from bench.leaderboard import Experiment, experiment_table, load_scores

    res, cache = tmp_path / "results", tmp_path / "cache"
    args = ["--tasks", "DarkRoom-v0", "--seeds", "1", "--preset", "smoke", "--results-dir", str(res),
            "--cache-dir", str(cache)]
    assert main(["run", "--methods", "ed,ed-prompt", *args]) == 0
    assert len([p for p in (cache / "artifacts").glob("model-*") if not p.name.endswith(".lock")]) == 1
    store = ResultsStore(res)
    curves = {store.read_meta(i)["method"]: store.read(i).curve for i in store.run_ids()}
    assert (curves["ed-prompt"]["key"] == "charts/prompt_return").sum() == 1
    assert not (curves["ed"]["key"] == "charts/prompt_return").any()
    runs = load_scores(res)[0].set_index("method")
    assert np.isfinite(runs.loc["ed-prompt", "prompt"]) and np.isnan(runs.loc["ed", "prompt"])
    table = experiment_table(runs.reset_index(), Experiment("s", "e", "t", ["ed", "ed-prompt"], ["DarkRoom-v0"]),
                             0, 200).set_index("method")
    assert table.loc["ed", "demonstration prompt"] == "–" and table.loc["ed-prompt", "demonstration prompt"] != "–"


def test_cli_refuses_short_context(tmp_path, capsys, synthetic_data) -> None:
    common = ["--preset", "smoke", "--seeds", "1", "--results-dir", str(tmp_path / "r"),
              "--cache-dir", str(tmp_path / "c")]
    code = main(["run", "--methods", "ad", "--tasks", "DarkRoom-v0", "--set", "ad.context_episodes=0.5", *common])
    assert code != 0 and "shorter than one episode" in capsys.readouterr().err  # refused before any run starts
    # the per-task check: the run fails with the explanation as its reason, before loading any data
    main(["run", "--methods", "ad", "--tasks", "DarkKeyToDoor-v0", "--set", "ad.max_context_steps=30", *common])
    store = ResultsStore(tmp_path / "r")
    (meta,) = [store.read_meta(i) for i in store.run_ids()]
    assert meta["status"] == "failed" and "shorter than one DarkKeyToDoor-v0 episode" in meta["reason"]
    assert not synthetic_data


def test_ed_is_ad_with_expert_data() -> None:
    a, e = get_method("ad"), get_method("ed")
    assert (a.expert_data, e.expert_data) == (False, True)
    assert a.Config is e.Config and resolve_config(a, "quick") == resolve_config(e, "quick")
    assert a.supports(get_task("DMC-cartpole-swingup-v0")) is not True


def test_ad_and_ed_run_end_to_end_at_smoke(tmp_path, synthetic_data) -> None:
    res = tmp_path / "results"
    code = main(["run", "--methods", "ad,ed", "--tasks", "DarkRoom-v0,DarkKeyToDoor-v0", "--preset", "smoke",
                 "--seeds", "1", "--results-dir", str(res), "--cache-dir", str(tmp_path / "cache")])
    store = ResultsStore(res)
    records = [store.read(i) for i in store.run_ids()]
    assert code == 0 and len(records) == 4, [(r.meta["task"], r.meta["reason"]) for r in records]
    # each (method, task) group's dataset is loaded once by the prepare step, then by each of its runs
    assert sorted(synthetic_data) == [False] * 4 + [True] * 4
    for rec in records:
        assert rec.status == "ok", rec.meta["reason"]
        curve = rec.curve
        ev = curve[(curve.key == "eval/return") & (curve.axis == "episode")]
        assert list(ev.step) == list(range(get_task(rec.meta["task"]).budget("smoke").eval_episodes))
        assert {"losses/action_ce", "losses/action_accuracy"} <= set(curve[curve.axis == "env_step"].key)


def test_pixel_maze_runs(synthetic_data) -> None:
    """The conv encoder path: a few gradient steps and an in-context evaluation on the pixel maze."""
    spec = get_task("PixelWatermaze-v0")
    cfg = resolve_config(get_method("ad"), "smoke")
    model = ad.build_model(cfg, spec)
    assert isinstance(model.obs_emb, ad.PixelEncoder)
    data = synthetic_histories(spec, spec.train_tasks[:2], episodes=3, expert=False)
    sampler = ad.WindowSampler(data, model.context_len, model.num_actions)
    opt, sched = ad.make_optimizer(model, cfg)
    metrics = ad.update(model, opt, sched, ad.to_torch(sampler.sample(2, np.random.default_rng(0)), "cpu"), 1.0)
    assert np.isfinite(metrics["losses/action_ce"])
    returns, _ = ad.evaluate_in_context(model, _core(spec, spec.test_tasks[:2]), 2, cfg, np.random.default_rng(0))
    assert returns.shape == (2, 2)


def test_view_table_batches_encode_each_distinct_frame_once() -> None:
    """Maze histories store view indices + a table of frames: the deduplicated encoder pass gives the tokens and
    gradients of encoding every step's frame."""
    from baselines.histories import ArrayView

    spec = get_task("PixelWatermaze-v0")
    cfg = resolve_config(get_method("ad"), "smoke")
    torch.manual_seed(0)
    model = ad.build_model(cfg, spec)
    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, (7, 54, 54, 3), dtype=np.uint8)  # 7 distinct frames
    n, t = 3, 4 * spec.episode_length
    dones = np.zeros((n, t), bool)
    dones[:, spec.episode_length - 1 :: spec.episode_length] = True
    data = SimpleNamespace(obs=ArrayView(rng.integers(0, 7, (n, t)).astype(np.uint8), np.uint8, table),
                           actions=rng.integers(0, 3, (n, t)), rewards=np.zeros((n, t), np.float32), dones=dones)
    sampler = ad.WindowSampler(data, model.context_len, model.num_actions)
    assert sampler.view_table is not None
    batch = ad.to_torch(sampler.sample(4, np.random.default_rng(1)), "cpu")
    assert "obs_index" in batch and "obs" not in batch
    frames = sampler.view_table[batch["obs_index"]]  # what the env would show at every step

    def grads(dedup: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.eval()  # no dropout: both passes see the same network
        model.zero_grad()
        if dedup:
            distinct, inverse = torch.unique(batch["obs_index"], return_inverse=True)
            assert len(distinct) <= 7
            emb = model.obs_emb(sampler.view_table[distinct])[inverse]
            tokens = model.embed(None, batch["prev_action"], batch["prev_reward"], batch["first"], emb)
        else:
            tokens = model.embed(frames, batch["prev_action"], batch["prev_reward"], batch["first"])
        model(tokens).square().sum().backward()
        return tokens.detach(), [p.grad.clone() for p in model.obs_emb.parameters()]

    (tok_a, grad_a), (tok_b, grad_b) = grads(True), grads(False)
    torch.testing.assert_close(tok_a, tok_b)
    for a, b in zip(grad_a, grad_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    opt, sched = ad.make_optimizer(model, cfg)
    metrics = ad.update(model, opt, sched, batch, 1.0, view_table=sampler.view_table)
    assert np.isfinite(metrics["losses/action_ce"])


def test_real_histories_end_to_end(tmp_path, capsys) -> None:
    """With the real source histories (``baselines.histories``): the prepare step builds each dataset, with its
    progress, before the runs."""
    res = tmp_path / "results"
    code = main(["run", "--methods", "ad,ed", "--tasks", "DarkRoom-v0", "--preset", "smoke", "--seeds", "1",
                 "--results-dir", str(res), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "preparing ad/DarkRoom-v0: ok" in text and "preparing ed/DarkRoom-v0: ok" in text, text
    assert re.search(r"preparing ad/DarkRoom-v0 \d+% learning histories: A2C step", text), text  # its progress
    built = {p.name.split("-")[3] for p in (tmp_path / "cache" / "artifacts").glob("histories-DarkRoom-v0-*")}
    assert {"learning", "expert"} <= built, built
    store = ResultsStore(res)
    metas = [store.read_meta(i) for i in store.run_ids()]
    assert code == 0 and [m["status"] for m in metas] == ["ok", "ok"], [m["reason"] for m in metas]


def test_grid_embedding_reads_x_and_y_and_a_cell_table_only_when_asked():
    """The default embeds a Dark Room cell as column + row entries (the paper's (x, y)): two cells in one row
    share that row's entry, so the embedding is additive in x and y; ``cell_embedding`` adds a per-cell table."""
    spec = get_task("DarkRoom-v0")
    cfg = dataclasses.replace(TINY, context_episodes=1.0)
    emb = ad.build_model(cfg, spec).obs_emb
    assert isinstance(emb, ad.GridEmbedding) and emb.cell is None
    cells = torch.tensor([0 * 9 + 0, 0 * 9 + 3, 5 * 9 + 0, 5 * 9 + 3])  # (x, y) = (0,0), (3,0), (0,5), (3,5)
    e = emb(cells)
    torch.testing.assert_close(e[3] - e[2], e[1] - e[0])  # moving 3 columns is one vector, whatever the row
    with_cells = ad.build_model(dataclasses.replace(cfg, cell_embedding=True), spec).obs_emb
    assert with_cells.cell is not None and with_cells.cell.num_embeddings == 81
    e = with_cells(cells)
    assert not torch.allclose(e[3] - e[2], e[1] - e[0])


def test_the_grid_switch_is_in_grid_tasks_run_ids_only():
    """``cell_embedding`` (AD, ED, RL²) changes the run id of a Dark Room run and leaves that of a bandit or
    pixel-maze run (whose model has no grid embedding) alone, so their stored runs are still found."""
    from bench.runner import make_plan

    def ids(method: str, task: str, **over: str) -> str:
        plan = make_plan([method], [task], [0], "quick", {method: over} if over else None)
        return plan.cells[0].run_id

    for method in ("ad", "ed", "rl2"):
        assert ids(method, "DarkRoom-v0") != ids(method, "DarkRoom-v0", cell_embedding="true")
        assert ids(method, "DarkKeyToDoor-v0") != ids(method, "DarkKeyToDoor-v0", cell_embedding="true")
        assert ids(method, "PixelWatermaze-v0") == ids(method, "PixelWatermaze-v0", cell_embedding="true")
    assert ids("ad", "AdversarialBandit-v0") == ids("ad", "AdversarialBandit-v0", cell_embedding="true")
