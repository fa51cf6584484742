"""RL² (baselines/rl2.py): memory across episodes within a trial, frozen evaluation, PPO, end-to-end runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.rl2 import PPO, Config, RL2Agent, RL2Method, TrialRunner, evaluate, trial_gae
from bench.cli import main
from bench.config import ConfigError, resolve_config
from bench.method import ArtifactCache, RunContext, RunLogger
from bench.store import ResultsStore
from tasks import get_task

SMALL = {"hidden": 16, "embed": 16, "obs_embed": 8, "conv_channels": 4}


def _agent(spec, **kw) -> RL2Agent:
    torch.manual_seed(0)
    env = spec.make(spec.train_tasks[0])
    agent = RL2Agent(env.observation_space, int(env.action_space.n), Config(**{**SMALL, **kw}))
    env.close()
    return agent


def _runner(agent, spec, tasks, episodes) -> TrialRunner:
    return TrialRunner(agent, spec, episodes, lambda: list(tasks), torch.Generator().manual_seed(0), "cpu")


class _Recorder:
    """Records the hidden state going into and coming out of every GRU call."""

    def __init__(self, agent: RL2Agent) -> None:
        self.h_in: list[torch.Tensor] = []
        self.h_out: list[torch.Tensor] = []
        agent.gru.register_forward_pre_hook(lambda m, args: self.h_in.append(args[1].detach().clone()))
        agent.gru.register_forward_hook(lambda m, args, out: self.h_out.append(out[1].detach().clone()))


def test_hidden_state_carried_across_episodes_and_reset_between_trials():
    spec = get_task("DarkRoom-v0")
    agent = _agent(spec)
    rec = _Recorder(agent)
    runner = _runner(agent, spec, spec.train_tasks[:3], episodes=3)
    seg = runner.collect()  # one whole trial: 3 episodes x 20 steps, then one call for the bootstrap value
    L = spec.episode_length
    assert seg.valid.shape == (3 * L, 3) and seg.valid.all()
    assert len(rec.h_in) == 3 * L + 1
    assert torch.count_nonzero(rec.h_in[0]) == 0, "a trial starts from the zero state"
    # the episode boundaries are real: the done flag is raised and the agent is back on the start cell
    start_cell = runner.core.start_cell
    for b in (L, 2 * L):
        assert (seg.prev_done[b] == 1).all() and (seg.obs[b] == start_cell).all()
        assert (seg.prev_done[b - 1] == 0).all()
    # every step (boundaries included) receives exactly the state the previous step produced
    for t in range(1, 3 * L + 1):
        torch.testing.assert_close(rec.h_in[t], rec.h_out[t - 1], rtol=0, atol=0)
    assert all(torch.count_nonzero(rec.h_in[b]) > 0 for b in (L, 2 * L))
    # the policy at an episode start depends on the carried state: with a zero state it would act differently
    inputs = (seg.obs[L:L + 1], seg.prev_action[L:L + 1], seg.prev_reward[L:L + 1], seg.prev_done[L:L + 1])
    with torch.no_grad():
        carried = agent(*inputs, rec.h_out[L - 1])[0]
        fresh = agent(*inputs, agent.initial_state(3))[0]
    stored = torch.log_softmax(carried, -1)[0].gather(-1, seg.action[L][:, None]).squeeze(-1)
    torch.testing.assert_close(stored, seg.logprob[L])
    assert not torch.allclose(carried, fresh)
    # the next trial starts from zero again, whatever the last one ended with
    assert runner.trial_over and torch.count_nonzero(runner.h) > 0
    rec.h_in.clear()
    assert runner.collect(5).new_trial
    assert torch.count_nonzero(rec.h_in[0]) == 0 and torch.count_nonzero(rec.h_in[1]) > 0


def test_segments_resume_the_carried_state_for_truncated_bptt():
    """A segment that stops mid-trial hands its final state to the next one; re-running the GRU from the stored
    ``h0`` reproduces the behaviour policy exactly (what the PPO ratio needs)."""
    spec = get_task("DarkKeyToDoor-v0")
    agent = _agent(spec)
    runner = _runner(agent, spec, spec.train_tasks[:4], episodes=2)
    first = runner.collect(30)
    second = runner.collect(30)
    assert first.new_trial and not second.new_trial
    assert torch.count_nonzero(first.h0) == 0 and torch.count_nonzero(second.h0) > 0
    assert (first.last_value != 0).all()  # mid-trial: GAE bootstraps from the value after the segment
    with torch.no_grad():
        logits, _, _ = agent(second.obs, second.prev_action, second.prev_reward, second.prev_done, second.h0)
    logp = torch.log_softmax(logits, -1).gather(-1, second.action[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, second.logprob)


def test_trial_gae_runs_across_episodes_and_stops_at_the_trial_end():
    g, lam = 0.5, 0.5
    reward = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    value = torch.zeros(3, 2)
    valid = torch.tensor([[True, True], [True, True], [True, False]])  # env 1's trial ended after step 1
    adv, ret = trial_gae(reward, value, valid, torch.tensor([4.0, 9.0]), g, lam)
    # env 0 bootstraps from last_value 4 (trial goes on); env 1's last valid step is terminal (9 ignored)
    a2 = 0 + g * 4.0
    a1 = 1 + g * lam * a2
    a0 = 0 + g * lam * a1
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(adv[:, 1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(ret, adv)


def test_evaluation_does_not_change_parameters():
    spec = get_task("DarkRoom-v0")
    agent = _agent(spec)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    returns = evaluate(agent, spec, spec.test_tasks[:3], 4, torch.Generator().manual_seed(1), "cpu")
    assert returns.shape == (3, 4)
    assert agent.training  # mode restored
    for k, v in agent.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in agent.parameters())


def test_ppo_update_reduces_the_loss_on_a_fixed_batch():
    spec = get_task("DarkRoom-v0")
    cfg = Config(**SMALL, lr=3e-3, update_epochs=4, num_minibatches=2, num_trials=8, pixel_num_trials=8)
    agent = _agent(spec)
    runner = _runner(agent, spec, spec.train_tasks[:8], episodes=3)
    seg = runner.collect()
    adv, ret = trial_gae(seg.reward, seg.value, seg.valid, seg.last_value, cfg.gamma, cfg.gae_lambda)
    ppo = PPO(agent, cfg, "cpu")
    every = torch.arange(8)
    before = ppo.loss(seg, adv, ret, every)[0].item()
    info = ppo.update(seg, adv, ret, torch.Generator().manual_seed(0))
    after = ppo.loss(seg, adv, ret, every)[0].item()
    assert after < before
    assert {"losses/policy", "losses/value", "losses/entropy", "losses/approx_kl"} <= set(info)


def _ctx(spec, preset: str, cfg: Config, tmp_path: Path, seed: int = 0) -> RunContext:
    torch.manual_seed(seed)
    return RunContext(task=spec, seed=seed, preset=preset, budget=spec.budget(preset), config=cfg, device="cpu",
                      log=RunLogger(), checkpoint_dir=tmp_path / "ckpt", cache=ArtifactCache(tmp_path / "cache"),
                      rng=np.random.default_rng(seed))


def test_agent_learns_a_tiny_dark_room(tmp_path):
    """One train goal next to the start, trials of 2 episodes: plain RL inside RL² must find and keep it."""
    spec = dataclasses.replace(get_task("DarkRoom-v0"), train_tasks=((4, 3),))
    cfg = Config(**SMALL, total_env_steps=24_000, num_trials=32, episodes_per_trial=2, lr=3e-3, gae_lambda=0.95,
                 num_minibatches=2)
    ctx = _ctx(spec, "smoke", cfg, tmp_path)
    ctx.checkpoint_dir.mkdir()
    RL2Method().run(ctx)
    first = [r["value"] for r in ctx.log.rows if r["key"] == "charts/first_episode_return"]
    assert first[0] < 2 and np.mean(first[-3:]) > 8, first  # random ~1; the optimum is 19 (goal 1 step away)


def test_checkpoint_resume_replays_rows(tmp_path):
    spec = get_task("DarkRoom-v0")
    cfg = dataclasses.replace(resolve_config(RL2Method(), "smoke"), checkpoint_every=1)
    ctx = _ctx(spec, "smoke", cfg, tmp_path)
    ctx.checkpoint_dir.mkdir()
    RL2Method().run(ctx)
    assert (ctx.checkpoint_dir / "rl2.pt").is_file()
    again = _ctx(spec, "smoke", cfg, tmp_path)  # same dir: a resumed run loads the (final) checkpoint
    RL2Method().run(again)
    assert again.log.rows == ctx.log.rows


def test_bad_config_and_unsupported_tasks():
    with pytest.raises(ConfigError, match="episodes_per_trial"):
        resolve_config(RL2Method(), "smoke", {"episodes_per_trial": "0"})
    with pytest.raises(ConfigError, match="num_minibatches"):
        resolve_config(RL2Method(), "smoke", {"num_minibatches": "64"})
    reason = RL2Method().supports(get_task("DMC-cartpole-swingup-v0"))
    assert isinstance(reason, str) and "in-context" in reason
    assert RL2Method().supports(get_task("PixelWatermaze-v0")) is True


@pytest.mark.parametrize("task", ["DarkRoom-v0", "PixelWatermaze-v0"])
def test_smoke_run_end_to_end(task, tmp_path, cache_dir):
    results = tmp_path / "results"
    assert main(["run", "--methods", "rl2", "--tasks", task, "--preset", "smoke", "--results-dir", str(results),
                 "--cache-dir", str(cache_dir), "--torch-threads", "1"]) == 0
    store = ResultsStore(results)
    (run_id,) = store.run_ids()
    record = store.read(run_id)
    assert record.status == "ok"
    curve = record.curve
    evals = curve[curve["key"] == "eval/return"]
    assert (evals["axis"] == "episode").all()
    assert list(evals["step"]) == list(range(get_task(task).budget("smoke").eval_episodes))
    train = curve[curve["axis"] == "env_step"]
    assert {"losses/policy", "losses/value", "charts/trial_return"} <= set(train["key"])


def test_grid_tasks_embed_the_agents_x_and_y_and_other_discrete_tasks_a_table():
    """On Dark Room RL² embeds the cell as (x, y) (:mod:`baselines.grid`), a per-cell table only with
    ``cell_embedding``; a discrete observation without a grid keeps its ``nn.Embedding``."""
    import gymnasium as gym

    from baselines.grid import GridEmbedding, env_grid_size

    env = get_task("DarkRoom-v0").make((0, 0))
    grid = env_grid_size(env)
    assert grid == 9
    agent = RL2Agent(env.observation_space, 5, Config(**SMALL), grid)
    assert isinstance(agent.obs_encoder, GridEmbedding) and agent.obs_encoder.cell is None
    agent = RL2Agent(env.observation_space, 5, Config(**SMALL, cell_embedding=True), grid)
    assert agent.obs_encoder.cell is not None
    agent = RL2Agent(gym.spaces.Discrete(7), 5, Config(**SMALL))
    assert type(agent.obs_encoder) is torch.nn.Embedding and agent.obs_encoder.num_embeddings == 7
