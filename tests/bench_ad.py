"""Speed of AD's in-context evaluation with the KV cache against recomputing the context, and its training throughput.

Run: ``python -m pytest tests/bench_ad.py --benchmark-only -p no:cacheprovider`` (the default addopts skip
benchmarks). Both are measured in one run, on the quick preset's model and Dark Room context (4 episodes = 80
steps), over 32 Dark Room goals at once (the 17 held-out ones and 15 train ones; the issue's reference setting),
through :func:`baselines.ad.evaluate_in_context` (environment stepping and action sampling included). 400 steps
per round (20 episodes; a quick run evaluates 100) are mostly with a full context, as an evaluation is, and make
the cache refill 8 times at ``ad``'s ``slide_keep`` 0.5 (more often at the 0.75 and 0.9 of ``ad-keep0.75`` /
``ad-keep0.9``, which re-prefill a longer context more often). The ratio of steps/s is
reported for each, at one and two torch threads, and asserted >= 10x at ``ad``'s setting and one thread (see
:func:`test_kv_cache_vs_recompute`). Key-to-Door, where ``ad`` keeps 0.9 at quick (its per-task preset), is
reported beside it (:func:`test_kv_cache_vs_recompute_key_to_door`); training throughput (tokens/s) is reported
only.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from baselines import ad
from bench.config import resolve_config
from bench.registry import load_target
from tasks import get_task
from tests.test_ad import synthetic_histories

SPEC = get_task("DarkRoom-v0")
GOALS = SPEC.test_split("quick") + SPEC.train_split("quick")[:15]
EPISODES = 20
MIN_RATIO = 10.0


def _quick_model(**changes) -> tuple[ad.Config, ad.ADTransformer]:
    cfg = dataclasses.replace(resolve_config(ad.AlgorithmDistillation(), "quick"), **changes)
    torch.manual_seed(0)
    return cfg, ad.build_model(cfg, SPEC)


def _eval_seconds(cfg: ad.Config, model: ad.ADTransformer, spec=SPEC, tasks=GOALS, episodes=EPISODES) -> float:
    core = load_target(spec.batched_core)(spec, tasks)
    start = time.perf_counter()
    ad.evaluate_in_context(model, core, episodes, cfg, np.random.default_rng(0))
    return time.perf_counter() - start


@pytest.fixture
def torch_threads(request):
    """Run the test at ``request.param`` torch threads, restoring the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True)
@pytest.mark.parametrize("keep", [ad.Config.slide_keep, 0.75, 0.9])
def test_kv_cache_vs_recompute(benchmark, capsys: pytest.CaptureFixture, keep: float, torch_threads: int) -> None:
    """The ratio is asserted at one torch thread, the harness's setting for an evaluation (one thread per worker,
    two workers on two cores) and that of the issue's reference figures (~24 ms recomputing, ~1.8 ms cached). At two
    threads it is reported only: the recomputed window's matmuls gain from the second core, the cached step (a
    few hundred small ops) does not."""
    cfg, model = _quick_model(slide_keep=keep)
    core = load_target(SPEC.batched_core)(SPEC, GOALS)
    steps = EPISODES * SPEC.episode_length
    benchmark.pedantic(lambda: ad.evaluate_in_context(model, core, EPISODES, cfg, np.random.default_rng(0)),
                       rounds=5, warmup_rounds=1)
    cached_sps = steps / benchmark.stats.stats.min
    slow_cfg = dataclasses.replace(cfg, kv_cache=False)
    recompute_sps = steps / min(_eval_seconds(slow_cfg, model) for _ in range(2))
    ratio = cached_sps / recompute_sps
    benchmark.extra_info.update(context_steps=model.context_len, tasks=core.num_envs, slide_keep=keep,
                                threads=torch_threads,
                                cached_steps_per_s=cached_sps,
                                recompute_steps_per_s=recompute_sps, ratio=ratio)
    with capsys.disabled():
        print(f"\nAD in-context evaluation, {core.num_envs} tasks, context {model.context_len} steps, "
              f"slide_keep {keep}, {torch_threads} thread(s): cached {cached_sps:.0f} steps/s, recompute "
              f"{recompute_sps:.0f} steps/s, ratio {ratio:.1f}x")
    if keep == ad.Config.slide_keep and torch_threads == 1:  # the headline method's evaluation, as the harness runs it
        assert ratio >= MIN_RATIO


def test_kv_cache_vs_recompute_key_to_door(benchmark, capsys: pytest.CaptureFixture) -> None:
    """The same ratio on Key-to-Door at ``ad``'s quick setting there (its per-task preset: a 100-step context, 90%
    kept when the cache slides, so a re-prefill of 90 steps every 10), over 32 of its held-out tasks, one thread.
    Reported, not asserted: keeping more context is what the setting buys with speed."""
    spec = get_task("DarkKeyToDoor-v0")
    cfg = resolve_config(ad.AlgorithmDistillation(), "quick", task=spec.id)
    torch.manual_seed(0)
    model, tasks, episodes = ad.build_model(cfg, spec), spec.test_split("quick")[:32], 8
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.pedantic(lambda: _eval_seconds(cfg, model, spec, tasks, episodes), rounds=3, warmup_rounds=1)
        cached = benchmark.stats.stats.min
        slow_cfg = dataclasses.replace(cfg, kv_cache=False)
        recompute = min(_eval_seconds(slow_cfg, model, spec, tasks, episodes) for _ in range(2))
    finally:
        torch.set_num_threads(before)
    benchmark.extra_info.update(context_steps=model.context_len, tasks=len(tasks), slide_keep=cfg.slide_keep,
                                threads=1, ratio=recompute / cached)
    with capsys.disabled():
        print(f"\nAD in-context evaluation, Key-to-Door, {len(tasks)} tasks, context {model.context_len} steps, "
              f"slide_keep {cfg.slide_keep}, 1 thread: cached {cached:.2f} s, recompute {recompute:.2f} s for "
              f"{episodes} episodes, ratio {recompute / cached:.1f}x")



def test_training_throughput(benchmark, capsys: pytest.CaptureFixture) -> None:
    """Tokens (= environment steps of history) per second of AD training at the quick preset's batch."""
    cfg, model = _quick_model()
    data = synthetic_histories(SPEC, SPEC.train_tasks[:8], episodes=20, expert=False)
    sampler = ad.WindowSampler(data, model.context_len, model.num_actions)
    opt, sched = ad.make_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    batches = [ad.to_torch(sampler.sample(cfg.batch_size, rng), "cpu") for _ in range(4)]

    def steps() -> None:
        for batch in batches:
            ad.update(model, opt, sched, batch, cfg.grad_clip)

    benchmark.pedantic(steps, rounds=3, warmup_rounds=1)
    per_step = benchmark.stats.stats.min / len(batches)
    tokens = cfg.batch_size * model.context_len / per_step
    benchmark.extra_info.update(steps_per_s=1 / per_step, tokens_per_s=tokens, threads=torch.get_num_threads())
    with capsys.disabled():
        print(f"\nAD training, batch {cfg.batch_size} x {model.context_len} tokens, {torch.get_num_threads()} "
              f"thread(s): {1 / per_step:.2f} steps/s, {tokens:.0f} tokens/s")


@pytest.mark.parametrize("torch_threads", [1], indirect=True)
def test_fau_overhead(benchmark, capsys: pytest.CaptureFixture, torch_threads: int) -> None:
    """What reading FAU costs a training step: :func:`baselines.ad.update` recording every block's GELU and their
    pool (AD's :func:`baselines.ad.train`) against the same steps without, interleaved, minimum over rounds.

    A layer watched by its own group and the pool is counted once per forward pass (one hook per module); counting
    it per group with ``(x > 0).sum()`` cost 16% of a step, now 4.5% (measured here, session 13). Asserted < 10%."""
    from baselines.plasticity import FAUMonitor, watch_layers

    cfg, model = _quick_model()
    data = synthetic_histories(SPEC, SPEC.train_tasks[:8], episodes=20, expert=False)
    sampler = ad.WindowSampler(data, model.context_len, model.num_actions)
    opt, sched = ad.make_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    batches = [ad.to_torch(sampler.sample(cfg.batch_size, rng), "cpu") for _ in range(3)]
    fau = FAUMonitor()
    groups = tuple(watch_layers(fau, ad.fau_layers(model)))
    times: dict[bool, list[float]] = {True: [], False: []}

    def rounds() -> None:
        for _ in range(4):
            for with_fau in (False, True):
                start = time.perf_counter()
                for batch in batches:
                    ad.update(model, opt, sched, batch, cfg.grad_clip, *((fau, groups) if with_fau else ()))
                times[with_fau].append(time.perf_counter() - start)
        fau.take_all()

    benchmark.pedantic(rounds, rounds=1, warmup_rounds=1)
    ratio = min(times[True]) / min(times[False])
    benchmark.extra_info.update(fau_overhead=ratio - 1)
    with capsys.disabled():
        print(f"\nAD training step with FAU / without, 1 thread: {ratio:.3f} "
              f"({min(times[False]) / len(batches) * 1e3:.0f} ms per step without)")
    assert ratio < 1.10
