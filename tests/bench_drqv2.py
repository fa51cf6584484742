"""Speed and memory of DrQ-v2 on a pixel DMC task, at the quick and the paper network sizes, in one run.

Run: ``python -m pytest tests/bench_drqv2.py --benchmark-only -s`` (the default addopts skip benchmarks), with one
torch thread (``OMP_NUM_THREADS=1``), as a worker of a 2-core sweep runs. Reported, never asserted as wall-clock
limits:

* updates/s at the quick and paper sizes and their ratio (one update = encoder on obs and next obs, critic,
  actor and target on one batch), and the grid of image size x hidden width x batch that chose the quick preset
  (the table beside ``QUICK`` in ``baselines/drqv2.py``);
* frames/s of the whole training loop (render, act, update at replay ratio 0.5; evaluation excluded) at the quick
  size, measured, and at the paper size, from the measured parts;
* what one step costs, by part (env step with rendering, act, sample, update), and the estimated cost of one quick
  run;
* replay memory per 100k frames, from the buffer's arrays, against the reference's stacked storage;
* channels-last against NCHW convolutions for the encoder (NCHW is kept: channels-last saved at most ~5% of the
  encoder's time and nothing measurable of a whole update here).

Times are CPU seconds of this process (best of a few), except pytest-benchmark's own table (wall clock).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.drqv2 import Config, DrQV2, DrQV2Agent, Encoder, Trainer
from baselines.replay import FrameReplay
from bench.config import resolve_config
from bench.method import ArtifactCache, RunContext, RunLogger
from tasks import get_task
from tasks.spec import Budget

TASK = "DMC-cartpole-swingup-v0"
QUICK = resolve_config(DrQV2(), "quick")
PAPER = Config()


@functools.cache
def _filled_replay(size: int = 84, slots: int = 1500) -> FrameReplay:
    """A replay of random ``size`` x ``size`` frames, built once per size (sampling reads its frames, never writes
    them)."""
    rng = np.random.default_rng(0)
    rb = FrameReplay(slots + 10, (3, size, size), 1, 3, 3, 0.99, np.random.default_rng(0))
    while rb.n_written < slots - 501:
        rb.add_first(rng.integers(0, 256, (9, size, size), dtype=np.uint8))
        for t in range(500):
            frame = rng.integers(0, 256, (9, size, size), dtype=np.uint8)
            rb.add(rng.uniform(-1, 1, 1), 0.5, False, t == 499, frame)
    return rb


def _best(fn, rounds: int) -> float:
    """Least CPU seconds of this process over ``rounds`` calls: on a shared machine wall-clock times swing with the
    other users' load (2x and more here), CPU time much less; with one torch thread it is what an idle core takes."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def _update_seconds(cfg: Config, rounds: int) -> float:
    """Least CPU seconds of one update at ``cfg``'s sizes (its image size included)."""
    rb = _filled_replay(cfg.image_size)
    agent = DrQV2Agent((9, cfg.image_size, cfg.image_size), 1, cfg)
    return _best(lambda: agent.update(rb.sample(cfg.batch_size), 10**6), rounds)


def test_updates_per_second_quick_vs_paper(benchmark, capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    rb = _filled_replay(QUICK.image_size)
    agent = DrQV2Agent((9, QUICK.image_size, QUICK.image_size), 1, QUICK)
    benchmark.pedantic(lambda: agent.update(rb.sample(QUICK.batch_size), 10**6), rounds=4, warmup_rounds=1)
    quick_s = _update_seconds(QUICK, rounds=6)
    paper_s = _update_seconds(PAPER, rounds=2)
    # the grid that chose the quick preset: what image size, head width and batch each cost
    grid = {(size, hidden, batch): _update_seconds(dataclasses.replace(QUICK, image_size=size, hidden_dim=hidden,
                                                                       batch_size=batch), rounds=4)
            for size in (84, 64) for hidden, batch in ((1024, 32), (256, 32), (256, 64))}
    sample_s = _best(lambda: rb.sample(QUICK.batch_size), rounds=20)
    info = {"quick_updates_per_s": 1 / quick_s, "paper_updates_per_s": 1 / paper_s,
            "paper_over_quick": paper_s / quick_s, "sample_s": sample_s,
            **{f"update_ms_{s}px_h{h}_b{b}": t * 1e3 for (s, h, b), t in grid.items()}}
    benchmark.extra_info.update(info)
    with capsys.disabled():
        print(f"\nupdate: quick ({QUICK.image_size} px, hidden {QUICK.hidden_dim}, batch {QUICK.batch_size}) "
              f"{quick_s * 1e3:.0f} ms = {1 / quick_s:.1f}/s; paper ({PAPER.image_size} px, hidden {PAPER.hidden_dim}, "
              f"batch {PAPER.batch_size}) {paper_s:.2f} s = {paper_s / quick_s:.1f}x; "
              f"sampling a quick batch {sample_s * 1e3:.1f} ms")
        for (size, hidden, batch), t in grid.items():
            print(f"  {size} px, hidden {hidden}, batch {batch}: {t * 1e3:.0f} ms = {t / quick_s:.2f}x of quick")


def test_training_loop_frames_per_second(benchmark, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """The whole loop at the quick size (evaluation excluded), and its parts for the estimate of one quick run."""
    torch.set_num_threads(1)
    spec = get_task(TASK)
    frames = 200
    cfg = dataclasses.replace(QUICK, seed_frames=20)  # updates from the 11th agent step on

    cpu: list[float] = []

    def loop() -> None:
        start = time.process_time()  # CPU seconds of this process: what the loop costs on an idle machine
        ctx = RunContext(task=spec, seed=0, preset="quick", budget=Budget(frames + cfg.seed_frames, 1), config=cfg,
                         device="cpu", log=RunLogger(), checkpoint_dir=tmp_path / f"ck{time.monotonic_ns()}",
                         cache=ArtifactCache(tmp_path / "cache"), rng=np.random.default_rng(0))
        trainer = Trainer(ctx, cfg, checkpoint_every=10**9)
        trainer.evaluate = lambda frame: setattr(trainer, "evals_done", trainer.evals_done + 1)
        trainer.save_checkpoint = lambda: None
        trainer.train()
        cpu.append(time.process_time() - start)

    benchmark.pedantic(loop, rounds=2, warmup_rounds=0)
    loop_s = benchmark.stats.stats.min  # includes making two envs (~1 s); amortised over a real run

    env = spec.make(size=QUICK.image_size)
    agent = DrQV2Agent(env.observation_space.shape, 1, QUICK)
    obs, _ = env.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, (50, 1)).astype(np.float32)
    step_s = _best(lambda: [env.step(a) for a in actions], rounds=3) / len(actions)
    act_s = _best(lambda: agent.act(obs, 10**6, explore=True), rounds=50)
    env.close()
    update_quick = _update_seconds(QUICK, rounds=4)
    update_paper = _update_seconds(PAPER, rounds=1)
    repeat = 2

    def fps(update_s: float, ratio: float = 0.5) -> float:
        return repeat / (step_s + act_s + ratio * update_s)

    budget = spec.budget("quick")
    steps = budget.train_steps // repeat
    updates = (budget.train_steps - QUICK.seed_frames) // repeat * QUICK.replay_ratio
    evals = (budget.train_steps // budget.eval_every + 1) * budget.eval_episodes * spec.episode_length
    quick_run_s = steps * (step_s + act_s) + updates * update_quick + evals * (step_s + act_s)
    info = {"loop_frames_per_s_quick": (frames + cfg.seed_frames) / loop_s,
            "loop_frames_per_cpu_s_quick": (frames + cfg.seed_frames) / min(cpu),
            "model_frames_per_s_quick": fps(update_quick), "model_frames_per_s_paper": fps(update_paper),
            "env_step_s": step_s, "act_s": act_s,
            "update_quick_s": update_quick, "update_paper_s": update_paper, "quick_run_min_rr0.5": quick_run_s / 60,
            "quick_run_min_rr2": (quick_run_s + 3 * updates * update_quick) / 60}
    benchmark.extra_info.update(info)
    with capsys.disabled():
        print(f"\nloop (quick size, rr 0.5, no eval): {info['loop_frames_per_s_quick']:.1f} frames/s measured "
              f"({info['loop_frames_per_cpu_s_quick']:.1f} per CPU second of this process), "
              f"{info['model_frames_per_s_quick']:.1f} from its parts; paper size "
              f"{info['model_frames_per_s_paper']:.2f} frames/s\nper agent step: env step + render "
              f"{step_s * 1e3:.1f} ms, act {act_s * 1e3:.1f} ms, update "
              f"{update_quick * 1e3:.0f} ms (quick) / {update_paper:.2f} s (paper)\none quick run ({budget.train_steps}"
              f" frames, {int(updates)} updates, {evals} eval steps): ~{info['quick_run_min_rr0.5']:.0f} min at rr 0.5,"
              f" ~{info['quick_run_min_rr2']:.0f} min at rr 2")


def test_replay_memory_per_100k_frames(benchmark, capsys: pytest.CaptureFixture) -> None:
    steps = 100_000 // 2  # frames / action repeat
    slots = steps + steps // 500  # one slot per agent step plus one per episode start
    rb = benchmark(lambda: FrameReplay(slots, (3, 84, 84), 6, 3, 3, 0.99, np.random.default_rng(0)))
    ours = rb.nbytes
    reference = steps * 9 * 84 * 84 + slots * (6 * 4 + 4 + 4)  # drqv2 keeps every stacked observation
    benchmark.extra_info.update(bytes_per_100k_frames=ours, reference_bytes=reference, ratio=reference / ours)
    with capsys.disabled():
        print(f"\nreplay per 100k frames: {ours / 2**30:.2f} GiB (one 3x84x84 frame per slot) vs the reference's "
              f"{reference / 2**30:.2f} GiB of stacked observations ({reference / ours:.1f}x); 1M-frame buffer: "
              f"{ours * 10 / 2**30:.1f} GiB")


def test_channels_last_encoder(benchmark, capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    x = torch.randint(0, 256, (QUICK.batch_size, 9, 84, 84)).float()
    nchw = Encoder((9, 84, 84))
    cl = Encoder((9, 84, 84)).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def step(enc, inp) -> None:
        enc.zero_grad()
        enc(inp).sum().backward()

    benchmark.pedantic(lambda: step(nchw, x), rounds=3, warmup_rounds=1)
    nchw_s, cl_s = _best(lambda: step(nchw, x), rounds=8), _best(lambda: step(cl, x_cl), rounds=8)
    benchmark.extra_info.update(nchw_s=nchw_s, channels_last_s=cl_s, speedup=nchw_s / cl_s)
    with capsys.disabled():
        print(f"\nencoder forward+backward, batch {QUICK.batch_size}: NCHW {nchw_s * 1e3:.0f} ms, channels-last "
              f"{cl_s * 1e3:.0f} ms ({nchw_s / cl_s:.2f}x)")
