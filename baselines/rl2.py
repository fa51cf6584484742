"""RL²: a recurrent policy meta-trained with PPO across trials of several episodes of one task.

Duan et al. 2016, "RL²: Fast Reinforcement Learning via Slow Reinforcement Learning",
https://arxiv.org/abs/1611.02779; Wang et al. 2016, "Learning to reinforcement learn", https://arxiv.org/abs/1611.05763.

The "fast" RL algorithm lives in the activations of a GRU. A **trial** is ``episodes_per_trial`` consecutive
episodes of one train task; the GRU's hidden state is carried across the episode boundaries inside a trial (so it
can remember where the reward was) and reset to zero between trials. The GRU sees, at every step, the tuple
``(s_t, a_{t-1}, r_{t-1}, d_{t-1})`` (RL² Sec. 2.2): an embedding of the observation, the previous action one-hot,
the previous reward and a flag that the previous step ended an episode (all zero at a trial's start).

The "slow" learner is PPO with GAE (clip objective, shared GRU trunk with policy and value heads) instead of the
paper's first-order TRPO; both are trust-region policy-gradient methods, PPO is the one in every modern RL² code
base. As in RL² (Sec. 2.1) the objective is the discounted return of the **whole trial**: the discount runs on
across episode boundaries and only the trial's last step is terminal, so exploring in an early episode is paid
for by the return of later ones. Each PPO update back-propagates through whole trials from the zero initial state
(exact BPTT, no truncation), batched across ``num_trials`` trials run in lockstep through the family's batched
core. Evaluation runs one trial of ``budget.eval_episodes`` episodes on every held-out task with frozen weights
(the shared in-context protocol of ``bench.evaluation``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.evaluation import EVAL_KEY
from bench.method import RunContext
from bench.registry import AdaptBenchError, load_target
from tasks.spec import TaskSpec


# ------------------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    """RL² settings; the defaults are the paper's (RL² Appendix, tabular-MDP and visual-navigation tables, as far
    as they carry over: their TRPO step size has no PPO counterpart and becomes PPO's usual clip / epochs)."""

    total_env_steps: int = 100_000_000
    """Environment steps of meta-training on observation-index tasks (RL²: up to 1000 iterations of 250k steps
    was ~2.5e8; 1e8 is our budget for Dark Room-sized tasks)."""
    pixel_total_env_steps: int = 25_000_000
    """Environment steps of meta-training on pixel tasks (RL² visual navigation: up to 5000 iterations x 50k;
    a conv encoder over every frame costs ~100x a grid step, so pixels get their own budget)."""
    episodes_per_trial: int | None = None
    """Episodes per training trial; None = the evaluation trial length ``budget.eval_episodes``, so the policy is
    trained for exactly the horizon it is scored on (RL² trains and tests with the same n)."""
    num_trials: int = 256
    """Trials run in lockstep per rollout, each on a train task drawn uniformly (with replacement)."""
    pixel_num_trials: int = 64
    """Trials per rollout on pixel tasks (stored frames: trials x trial length x 54x54x3 bytes)."""
    hidden: int = 256
    """GRU units (RL² Appendix: a GRU of 256 units in every experiment)."""
    embed: int = 256
    """Width of the input embedding phi(s, a, r, d) fed to the GRU (RL² Sec. 2.2)."""
    obs_embed: int = 64
    """Observation embedding: nn.Embedding width for cell indices; output width of the conv encoder for pixels."""
    conv_channels: int = 16
    """Filters of the two 5x5 stride-2 conv layers of the pixel encoder (RL² visual navigation: 2 x 16)."""
    gamma: float = 0.99
    """Discount, applied across episode boundaries within a trial (RL² Appendix: 0.99)."""
    gae_lambda: float = 0.3
    """GAE lambda (RL² Appendix, bandits and tabular MDPs: 0.3; visual navigation used 0.99)."""
    lr: float = 3e-4
    """Adam learning rate (PPO's usual value; TRPO has none)."""
    update_epochs: int = 4
    """PPO epochs over each batch of trials."""
    num_minibatches: int = 4
    """Minibatches per epoch; a minibatch is a set of whole trials (BPTT over the full trial)."""
    clip_coef: float = 0.2
    """PPO ratio clip."""
    ent_coef: float = 0.01
    """Entropy bonus."""
    vf_coef: float = 0.5
    """Value-loss weight."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    norm_reward: bool = True
    """Divide rewards by a running std of the discounted trial return (CleanRL's NormalizeReward), so the value
    targets stay O(1) whatever the reward scale (Dark Room pays up to 20 per episode)."""
    checkpoint_every: int = 50
    """PPO iterations between checkpoints in ``ctx.checkpoint_dir`` (a killed run resumes from the last one)."""

    def validate(self) -> None:
        for name in ("total_env_steps", "pixel_total_env_steps", "num_trials", "pixel_num_trials", "hidden",
                     "embed", "obs_embed", "conv_channels", "update_epochs", "num_minibatches", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.episodes_per_trial is not None and self.episodes_per_trial < 1:
            raise ValueError(f"episodes_per_trial must be >= 1 or None, got {self.episodes_per_trial}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if min(self.num_trials, self.pixel_num_trials) < self.num_minibatches:
            raise ValueError(f"num_minibatches ({self.num_minibatches}) exceeds the trials per rollout")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"total_env_steps": 4_000, "pixel_total_env_steps": 1_200, "num_trials": 8, "pixel_num_trials": 4,
              "hidden": 32, "embed": 32, "obs_embed": 16, "conv_channels": 8, "update_epochs": 2,
              "num_minibatches": 2},
    # Chosen by measurement on 1 CPU thread (see the report in README): ~4 min for Dark Room.
    "quick": {"total_env_steps": 3_000_000, "pixel_total_env_steps": 150_000, "num_trials": 64,
              "pixel_num_trials": 16, "hidden": 128, "embed": 128, "obs_embed": 32, "lr": 1e-3},
}


# ----------------------------------------------------------------------------------------------------- networks
class PixelEncoder(nn.Module):
    """RL² visual navigation: two 5x5 stride-2 conv layers and a linear layer; uint8 HWC frames in."""

    def __init__(self, shape: tuple[int, int, int], channels: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(shape[2], channels, 5, stride=2), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 5, stride=2), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            n = self.conv(torch.zeros(1, shape[2], shape[0], shape[1])).shape[1]
        self.fc = nn.Linear(n, out)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        lead = obs.shape[:-3]
        x = obs.reshape(-1, *obs.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0
        return F.relu(self.fc(self.conv(x))).reshape(*lead, -1)


class RL2Agent(nn.Module):
    """phi(s, a_prev, r_prev, d_prev) -> GRU -> (policy logits, value). Tensors are time-major ``(T, B, ...)``."""

    def __init__(self, obs_space: gym.Space, num_actions: int, cfg: Config) -> None:
        super().__init__()
        self.num_actions = num_actions
        if isinstance(obs_space, gym.spaces.Discrete):
            self.obs_encoder: nn.Module = nn.Embedding(int(obs_space.n), cfg.obs_embed)
        elif isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 3:
            self.obs_encoder = PixelEncoder(obs_space.shape, cfg.conv_channels, cfg.obs_embed)  # type: ignore[arg-type]
        else:
            raise RL2Error(f"RL² needs Discrete or (H, W, C) image observations, got {obs_space}")
        self.phi = nn.Sequential(nn.Linear(cfg.obs_embed + num_actions + 2, cfg.embed), nn.ReLU())
        self.gru = nn.GRU(cfg.embed, cfg.hidden)
        self.pi = nn.Linear(cfg.hidden, num_actions)
        self.v = nn.Linear(cfg.hidden, 1)
        nn.init.orthogonal_(self.pi.weight, 0.01)  # near-uniform initial policy (CleanRL's init)
        nn.init.zeros_(self.pi.bias)

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(1, batch, self.gru.hidden_size, device=self.pi.weight.device)

    def forward(self, obs: torch.Tensor, prev_action: torch.Tensor, prev_reward: torch.Tensor,
                prev_done: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``prev_action`` long with -1 = none (trial start); returns ``(logits, value, h_next)``."""
        a = F.one_hot(prev_action.clamp(min=0), self.num_actions).float() * (prev_action >= 0).unsqueeze(-1)
        x = torch.cat([self.obs_encoder(obs), a, prev_reward.unsqueeze(-1), prev_done.unsqueeze(-1)], dim=-1)
        out, h = self.gru(self.phi(x), h)
        return self.pi(out), self.v(out).squeeze(-1), h


class RL2Error(AdaptBenchError, ValueError):
    """A task RL² cannot run (no batched core, continuous actions, unsupported observations)."""


# -------------------------------------------------------------------------------------------------- trials
@dataclass
class Trials:
    """One batch of lockstep trials, time-major ``(T, B)``; steps after a trial's last episode are padding."""

    obs: torch.Tensor
    prev_action: torch.Tensor
    prev_reward: torch.Tensor
    prev_done: torch.Tensor
    action: torch.Tensor
    logprob: torch.Tensor
    value: torch.Tensor
    reward: torch.Tensor
    valid: torch.Tensor
    episode_returns: np.ndarray
    """``(B, episodes)`` undiscounted return of every episode of every trial."""


def run_trials(agent: RL2Agent, core: Any, episodes: int, max_steps: int, gen: torch.Generator,
               device: str) -> Trials:
    """Run one trial of ``episodes`` episodes per env of ``core`` with hidden state carried across episodes.

    Finished episodes are restarted with ``core.reset(mask)`` until every trial has ``episodes`` episodes; the
    GRU state starts at zero (a new trial) and is never reset inside the trial.
    """
    n = core.num_envs
    obs_np = core.reset()
    obs_buf = torch.empty((max_steps, *obs_np.shape), dtype=torch.from_numpy(obs_np).dtype)
    keys = ("prev_action", "action")
    longs = {k: torch.full((max_steps, n), -1, dtype=torch.long) for k in keys}
    floats = {k: torch.zeros(max_steps, n) for k in ("prev_reward", "prev_done", "logprob", "value", "reward")}
    valid = torch.zeros(max_steps, n, dtype=torch.bool)
    ep_returns = np.zeros((n, episodes))
    ep_index = np.zeros(n, dtype=np.int64)  # episode each trial is in; == episodes once the trial is over
    prev_a = torch.full((n,), -1, dtype=torch.long)
    prev_r, prev_d = torch.zeros(n), torch.zeros(n)
    h = agent.initial_state(n)
    t = 0
    with torch.no_grad():
        while t < max_steps and (ep_index < episodes).any():
            active = torch.from_numpy(ep_index < episodes)
            obs = torch.from_numpy(obs_np)
            logits, value, h = agent(obs.to(device)[None], prev_a.to(device)[None], prev_r.to(device)[None],
                                     prev_d.to(device)[None], h)
            probs = torch.softmax(logits[0].float().cpu(), dim=-1)
            action = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            obs_buf[t] = obs
            longs["prev_action"][t], longs["action"][t] = prev_a, action
            floats["prev_reward"][t], floats["prev_done"][t] = prev_r, prev_d
            floats["logprob"][t] = torch.log(probs.gather(-1, action[:, None]).squeeze(-1).clamp_min(1e-12))
            floats["value"][t] = value[0].cpu()
            valid[t] = active
            obs_np, reward, terminated, truncated = core.step(action.numpy())
            ended = (terminated | truncated) & active.numpy()
            live = active.numpy()
            ep_returns[live, ep_index[live]] += reward[live]
            floats["reward"][t] = torch.from_numpy(np.where(live, reward, 0.0).astype(np.float32))
            ep_index += ended
            restart = ended & (ep_index < episodes)
            if restart.any():
                obs_np = core.reset(restart)
            prev_a = torch.where(active, action, prev_a)
            prev_r = torch.from_numpy(np.where(live, reward, 0.0).astype(np.float32))
            prev_d = torch.from_numpy(ended.astype(np.float32))
            t += 1
    if (ep_index < episodes).any():
        raise RL2Error(f"a trial did not finish {episodes} episodes within {max_steps} steps")
    return Trials(obs_buf[:t], longs["prev_action"][:t], floats["prev_reward"][:t], floats["prev_done"][:t],
                  longs["action"][:t], floats["logprob"][:t], floats["value"][:t], floats["reward"][:t], valid[:t],
                  ep_returns)


def trial_gae(reward: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, gamma: float,
              lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over whole trials ``(T, B)``: no cut at episode boundaries, the trial's last valid step is terminal.

    Returns ``(advantages, returns)``, zero on padding steps.
    """
    T = reward.shape[0]
    adv = torch.zeros_like(reward)
    next_value, next_adv = torch.zeros(reward.shape[1]), torch.zeros(reward.shape[1])
    for t in reversed(range(T)):
        # a padding step after the trial contributes nothing, so the last valid step bootstraps from 0
        delta = reward[t] + gamma * next_value - value[t]
        adv[t] = torch.where(valid[t], delta + gamma * lam * next_adv, 0.0)
        next_value = torch.where(valid[t], value[t], 0.0)
        next_adv = adv[t]
    return adv, (adv + value) * valid


class RunningStd:
    """Running std of the discounted return, to scale rewards (CleanRL's ``NormalizeReward``)."""

    def __init__(self) -> None:
        self.count, self.mean, self.var = 1e-4, 0.0, 1.0

    def update(self, x: np.ndarray) -> None:
        b_mean, b_var, b_count = float(x.mean()), float(x.var()), x.size
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean += delta * b_count / total
        self.var = (self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return float(np.sqrt(self.var) + 1e-8)


def discounted_returns(reward: torch.Tensor, gamma: float) -> np.ndarray:
    """The running discounted return at every step ``(T, B)`` (what NormalizeReward tracks)."""
    out, acc = torch.zeros_like(reward), torch.zeros(reward.shape[1])
    for t in range(reward.shape[0]):
        acc = acc * gamma + reward[t]
        out[t] = acc
    return out.numpy()


# ---------------------------------------------------------------------------------------------------- PPO
class PPO:
    """PPO-clip on whole trials; ``update`` returns a metrics dict and never logs."""

    def __init__(self, agent: RL2Agent, cfg: Config, device: str) -> None:
        self.agent, self.cfg, self.device = agent, cfg, device
        self.opt = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)

    def loss(self, batch: Trials, adv: torch.Tensor, ret: torch.Tensor, idx: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO loss of the trials ``idx`` of ``batch`` (recomputed from the zero state through the whole trial)."""
        cfg, dev = self.cfg, self.device
        logits, value, _ = self.agent(batch.obs[:, idx].to(dev), batch.prev_action[:, idx].to(dev),
                                      batch.prev_reward[:, idx].to(dev), batch.prev_done[:, idx].to(dev),
                                      self.agent.initial_state(len(idx)))
        valid = batch.valid[:, idx].to(dev)
        n = valid.sum().clamp_min(1)
        logp_all = torch.log_softmax(logits, dim=-1)
        action = batch.action[:, idx].to(dev).clamp(min=0)
        logp = logp_all.gather(-1, action[..., None]).squeeze(-1)
        ratio = torch.exp(logp - batch.logprob[:, idx].to(dev))
        a = adv[:, idx].to(dev)
        a = (a - a[valid].mean()) / (a[valid].std() + 1e-8)
        pg = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef))
        pg_loss = (pg * valid).sum() / n
        v_loss = 0.5 * (((value - ret[:, idx].to(dev)) ** 2) * valid).sum() / n
        entropy = (-(logp_all.exp() * logp_all).sum(-1) * valid).sum() / n
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
        with torch.no_grad():
            log_ratio = logp - batch.logprob[:, idx].to(dev)
            approx_kl = (((ratio - 1) - log_ratio) * valid).sum() / n
            clipfrac = (((ratio - 1).abs() > cfg.clip_coef).float() * valid).sum() / n
        return loss, {"losses/policy": pg_loss.item(), "losses/value": v_loss.item(),
                      "losses/entropy": entropy.item(), "losses/approx_kl": approx_kl.item(),
                      "losses/clipfrac": clipfrac.item(), "losses/total": loss.item()}

    def update(self, batch: Trials, adv: torch.Tensor, ret: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        B = batch.valid.shape[1]
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(B, generator=gen).chunk(cfg.num_minibatches):
                loss, info = self.loss(batch, adv, ret, idx)
                self.opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.agent.parameters(), cfg.max_grad_norm)
                self.opt.step()
                for k, v in info.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {k: v / count for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------------- method
def make_core(spec: TaskSpec, tasks: Any) -> Any:
    return load_target(spec.batched_core)(spec, list(tasks))  # type: ignore[arg-type]


def evaluate(agent: RL2Agent, spec: TaskSpec, tasks: Any, episodes: int, gen: torch.Generator,
             device: str) -> np.ndarray:
    """``(len(tasks), episodes)`` returns of one in-context trial per task, frozen weights, actions sampled."""
    was_training = agent.training
    agent.eval()
    try:
        trials = run_trials(agent, make_core(spec, tasks), episodes, episodes * spec.episode_length, gen, device)
    finally:
        agent.train(was_training)
    return trials.episode_returns


class RL2Method:
    """RL² (GRU + PPO over multi-episode trials); see the module docstring."""

    name = "rl2"
    Config = Config
    presets = PRESETS

    def supports(self, task: TaskSpec) -> bool | str:
        if task.family != "in-context":
            return "RL² needs an in-context family (train and held-out tasks)"
        if task.actions != "discrete":
            return "this RL² has a categorical policy (discrete actions only)"
        if task.batched_core is None:
            return f"task `{task.id}` has no batched core to run trials in lockstep"
        if task.observation not in ("discrete", "pixels"):
            return f"observations of kind `{task.observation}` have no encoder here (discrete / pixels)"
        return True

    def run(self, ctx: RunContext) -> None:
        cfg: Config = ctx.config if ctx.config is not None else Config()
        spec = ctx.task
        reason = self.supports(spec)
        if reason is not True:
            raise RL2Error(f"rl2 cannot run `{spec.id}`: {reason}")
        train = spec.train_split(ctx.preset)
        env = spec.make(train[0])
        obs_space, num_actions = env.observation_space, int(env.action_space.n)  # type: ignore[attr-defined]
        env.close()
        pixels = spec.observation == "pixels"
        total = cfg.pixel_total_env_steps if pixels else cfg.total_env_steps
        n_trials = cfg.pixel_num_trials if pixels else cfg.num_trials
        episodes = cfg.episodes_per_trial or ctx.budget.eval_episodes
        if episodes < 1:
            raise RL2Error(f"a trial needs at least one episode, got {episodes} (episodes_per_trial / eval_episodes)")
        max_steps = episodes * spec.episode_length
        device = ctx.device
        gen = torch.Generator().manual_seed(int(ctx.rng.integers(2**62)))
        agent = RL2Agent(obs_space, num_actions, cfg).to(device)
        ppo = PPO(agent, cfg, device)
        rew_std = RunningStd()
        state = {"iteration": 0, "env_steps": 0, "rows": []}
        ckpt = ctx.checkpoint_dir / "rl2.pt"
        if ckpt.is_file():  # a killed run picks up where it stopped, rows included
            saved = torch.load(ckpt, map_location=device, weights_only=True)
            agent.load_state_dict(saved["agent"])
            ppo.opt.load_state_dict(saved["opt"])
            gen.set_state(saved["gen"])
            ctx.rng.bit_generator.state = saved["rng"]
            rew_std.count, rew_std.mean, rew_std.var = saved["rew_std"]
            state = {k: saved[k] for k in state}
            for step, metrics in state["rows"]:
                ctx.log(step, metrics)
        t0 = time.time()
        while state["env_steps"] < total:
            tasks = [train[i] for i in ctx.rng.integers(len(train), size=n_trials)]
            batch = run_trials(agent, make_core(spec, tasks), episodes, max_steps, gen, device)
            reward = batch.reward
            if cfg.norm_reward:
                rew_std.update(discounted_returns(reward, cfg.gamma)[batch.valid.numpy()])
                reward = reward / rew_std.std
            adv, ret = trial_gae(reward, batch.value, batch.valid, cfg.gamma, cfg.gae_lambda)
            metrics = ppo.update(batch, adv, ret, gen)
            state["iteration"] += 1
            state["env_steps"] += int(batch.valid.sum())
            ep = batch.episode_returns
            metrics |= {"charts/trial_return": float(ep.sum(1).mean()), "charts/first_episode_return":
                        float(ep[:, 0].mean()), "charts/last_episode_return": float(ep[:, -1].mean()),
                        "charts/sps": state["env_steps"] / max(time.time() - t0, 1e-9)}
            ctx.log(state["env_steps"], metrics)
            state["rows"].append((state["env_steps"], metrics))
            ctx.progress(0.95 * state["env_steps"] / total, f"{state['env_steps']}/{total} env steps")
            if state["iteration"] % cfg.checkpoint_every == 0:
                tmp = ckpt.with_suffix(".tmp")  # written aside and renamed: a kill never leaves half a file
                torch.save({"agent": agent.state_dict(), "opt": ppo.opt.state_dict(), "gen": gen.get_state(),
                            "rng": ctx.rng.bit_generator.state, "rew_std": (rew_std.count, rew_std.mean,
                            rew_std.var), **state}, tmp)
                os.replace(tmp, ckpt)
        returns = evaluate(agent, spec, spec.test_split(ctx.preset), ctx.budget.eval_episodes, gen, device)
        for k, value in enumerate(returns.mean(axis=0)):
            ctx.log(k, {EVAL_KEY: float(value)}, axis="episode")
        ctx.progress(1.0, "evaluated")

