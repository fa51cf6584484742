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
for by the return of later ones. ``num_trials`` trials run in lockstep through the family's batched core (finished
episodes restart with ``core.reset(mask)``; a trial that ends early, on terminating tasks, idles as masked
padding). With ``segment_steps=None`` (paper) each PPO batch is a whole trial and BPTT is exact from the zero
state; a shorter segment (quick) updates every ``segment_steps`` steps, the trial and its hidden state go on
across segments, GAE bootstraps from the value at the cut and BPTT is truncated there (CleanRL's ``ppo_lstm``).
Evaluation runs one trial of ``budget.eval_episodes`` episodes on every held-out task, batched, with frozen
weights and sampled actions (the shared in-context protocol of ``bench.evaluation``).

Paper settings (``Config`` defaults): GRU 256, gamma 0.99, batches of ~250k steps (tabular MDPs) / 50k (visual
navigation, 2 x 16 5x5 stride-2 convs), up to ~2.5e8 steps, from the RL² paper's appendix tables as we recall
them (not re-checked against the PDF here); GAE lambda 0.99 from the visual-navigation table (0.3, the
bandit/MDP value, made PPO collapse on Dark Room in our runs). The AD paper (Laskin et al. 2022) uses RL² as a
baseline without listing its hyper-parameters.

Known behaviour: the meta-learned prior covers the *train* tasks best. With a per-cell observation table (an
``nn.Embedding`` over Dark Room's 81 cells, this module before session 10) RL² learnt the 64 train goals' cells
and barely improved on the 17 held-out ones (quick, 5M steps, held-out ~6% -> ~10% of the optimum; seed 0, 100
episodes: 3.9 -> 5.4 normalised). Embedded as (x, y) (:mod:`baselines.grid`) it does improve there (seeds 0 / 1 / 2,
first 10 -> last 10 of 100 episodes: 14.2 -> 39.9, 13.8 -> 18.0, 6.9 -> 14.4), still far below AD, whose data come
from a learner without a prior.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.grid import GridEmbedding, env_grid_size, grid_fields_ignored
from baselines.plasticity import FAUMonitor, watch_layers
from bench.evaluation import eval_tasks, log_in_context
from bench.method import RunContext
from bench.registry import AdaptBenchError, load_target
from tasks.spec import TaskSpec


# ------------------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    """RL² settings; the defaults are the paper's (RL² Appendix tables for the tabular-MDP and visual-navigation
    experiments) where they carry over. TRPO's mean-KL step (0.01) has no PPO counterpart: PPO's usual clip,
    epochs and learning rate stand in for it."""

    total_env_steps: int = 250_000_000
    """Meta-training environment steps on cell-index tasks (RL² tabular MDPs: up to 1000 iterations x 250k)."""
    pixel_total_env_steps: int = 250_000_000
    """Meta-training environment steps on pixel tasks (RL² visual navigation: up to 5000 iterations x 50k). A
    separate budget because a conv encoder over every frame costs ~100x a grid step on a CPU."""
    episodes_per_trial: int | None = None
    """Episodes per training trial; None = the evaluation trial length ``budget.eval_episodes``, so the policy is
    trained for the horizon it is scored on (RL² trains and tests with the same number of episodes n)."""
    num_trials: int = 128
    """Trials run in lockstep, each on a train task drawn uniformly with replacement (with 100-episode Dark Room
    trials, 128 x 2000 = 256k steps per batch, RL²'s 250k)."""
    pixel_num_trials: int = 10
    """Trials in lockstep on pixel tasks (RL² visual navigation: 50k steps per batch = 10 trials of 5000)."""
    segment_steps: int | None = None
    """Steps per PPO batch; None = the whole trial (RL²: full-trial batches, exact BPTT). A shorter segment updates
    every ``segment_steps`` x trials steps with truncated BPTT from the stored state; GAE bootstraps across it."""
    hidden: int = 256
    """GRU units (RL² Appendix: a GRU of 256 units in every experiment)."""
    embed: int = 256
    """Width of the input embedding phi(s, a, r, d) fed to the GRU (RL² Sec. 2.2)."""
    obs_embed: int = 64
    """Observation embedding: width of the cell-index embedding; output width of the conv encoder for pixels."""
    cell_embedding: bool = False
    """Grid tasks: add a per-cell table to the column + row embedding of the agent's (x, y) (``baselines.grid``).
    Off: with a per-cell table (an ``nn.Embedding`` over cells) RL² learnt the train goals' cells and did not improve
    on held-out Dark Room goals (quick, seed 0: 3.9 -> 5.4 over 100 episodes; without it 14.2 -> 39.9)."""
    conv_channels: int = 16
    """Filters of the two 5x5 stride-2 conv layers of the pixel encoder (RL² visual navigation: 2 x 16)."""
    gamma: float = 0.99
    """Discount, applied across episode boundaries within a trial (RL² Appendix: 0.99)."""
    gae_lambda: float = 0.99
    """GAE lambda (RL² visual navigation, the closest task to a hidden-goal room: 0.99; bandits/tabular MDPs
    used 0.3, which let the value function's errors drive PPO into collapse here)."""
    lr: float = 3e-4
    """Adam learning rate (PPO's usual value; TRPO has none)."""
    update_epochs: int = 4
    """PPO epochs over each batch."""
    num_minibatches: int = 4
    """Minibatches per epoch; a minibatch is a set of whole trial segments (BPTT along each)."""
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
    checkpoint_every: int = 10
    """Trial batches between checkpoints in ``ctx.checkpoint_dir`` (a killed run resumes from the last one)."""

    def validate(self) -> None:
        for name in ("total_env_steps", "pixel_total_env_steps", "num_trials", "pixel_num_trials", "hidden",
                     "embed", "obs_embed", "conv_channels", "update_epochs", "num_minibatches", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("episodes_per_trial", "segment_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if min(self.num_trials, self.pixel_num_trials) < self.num_minibatches:
            raise ValueError(f"num_minibatches ({self.num_minibatches}) exceeds the trials per batch")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"total_env_steps": 4_000, "pixel_total_env_steps": 1_200, "num_trials": 8, "pixel_num_trials": 4,
              "segment_steps": 40, "hidden": 32, "embed": 32, "obs_embed": 16, "conv_channels": 8,
              "update_epochs": 2, "num_minibatches": 2},
    # Chosen by measurement on 1 CPU thread (2-core machine shared with other jobs): Dark Room 5M steps in
    # ~3-4.5 min, Key-to-Door about the same, Watermaze 150k pixel steps in ~3 min.
    "quick": {"total_env_steps": 5_000_000, "pixel_total_env_steps": 150_000, "num_trials": 128,
              "pixel_num_trials": 16, "segment_steps": 200, "num_minibatches": 2, "hidden": 64, "embed": 64,
              "obs_embed": 32, "gae_lambda": 0.95, "lr": 1e-3},
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

    def __init__(self, obs_space: gym.Space, num_actions: int, cfg: Config, grid_size: int | None = None) -> None:
        super().__init__()
        self.num_actions = num_actions
        if isinstance(obs_space, gym.spaces.Discrete) and grid_size is not None:  # cell y * size + x: (x, y)
            self.obs_encoder: nn.Module = GridEmbedding(grid_size, cfg.obs_embed, cfg.cell_embedding)
        elif isinstance(obs_space, gym.spaces.Discrete):
            self.obs_encoder = nn.Embedding(int(obs_space.n), cfg.obs_embed)
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


def fau_layers(agent: RL2Agent) -> list[tuple[str, nn.Module]]:
    """The ReLU layers whose FAU is logged: the input embedding ``phi`` and, on pixels, the encoder's convs."""
    layers = [("phi", m) for m in agent.phi if isinstance(m, nn.ReLU)]
    if isinstance(agent.obs_encoder, PixelEncoder):
        layers += [(f"encoder{j}", m) for j, m in enumerate(m for m in agent.obs_encoder.conv
                                                             if isinstance(m, nn.ReLU))]
    return layers


class RL2Error(AdaptBenchError, ValueError):
    """A task RL² cannot run (no batched core, continuous actions, unsupported observations)."""


# -------------------------------------------------------------------------------------------------- trials
@dataclass
class Segment:
    """A stretch of lockstep trials, time-major ``(T, B)``; steps after a trial's last episode are padding.

    ``obs[t]``, ``prev_*[t]`` are the inputs at step ``t``; ``h0`` the GRU state before step 0 (zero at a trial's
    start); ``last_value`` the value after the segment (0 where the trial is over, the trial's terminal).
    """

    obs: torch.Tensor
    prev_action: torch.Tensor
    prev_reward: torch.Tensor
    prev_done: torch.Tensor
    action: torch.Tensor
    logprob: torch.Tensor
    value: torch.Tensor
    reward: torch.Tensor
    valid: torch.Tensor
    h0: torch.Tensor
    last_value: torch.Tensor
    new_trial: bool
    """The segment starts a trial (``h0`` is zero)."""
    episode_returns: np.ndarray | None
    """``(B, episodes)`` undiscounted return of every episode, set on the segment that ends the trials."""


class TrialRunner:
    """Runs one trial per env of a batched core, all in lockstep, in segments of at most ``segment`` steps.

    A trial is ``episodes`` episodes of one task: finished episodes restart with ``core.reset(mask)``, the GRU
    state is carried across their boundaries and only zeroed when a new trial starts (new tasks from
    ``sample_tasks``, a new core). A trial that ends before the others (terminating tasks) idles as padding.
    """

    def __init__(self, agent: RL2Agent, spec: TaskSpec, episodes: int, sample_tasks: Callable[[], list[Any]],
                 gen: torch.Generator, device: str) -> None:
        self.agent, self.spec, self.episodes, self.sample_tasks = agent, spec, episodes, sample_tasks
        self.gen, self.device = gen, device
        self.core: Any = None
        self.max_trial_steps = episodes * spec.episode_length

    @property
    def trial_over(self) -> bool:
        return self.core is None or bool((self.ep_index >= self.episodes).all())

    def start_trial(self) -> None:
        self.core = load_target(self.spec.batched_core)(self.spec, list(self.sample_tasks()))  # type: ignore[arg-type]
        n = self.core.num_envs
        self.obs = self.core.reset()
        self.h = self.agent.initial_state(n)  # the only place the hidden state is reset
        self.prev_a = np.full(n, -1, dtype=np.int64)
        self.prev_r, self.prev_d = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self.ep_index = np.zeros(n, dtype=np.int64)  # episode each trial is in; == episodes once it is over
        self.ep_returns = np.zeros((n, self.episodes))
        self.t = 0

    def _inputs(self) -> tuple[torch.Tensor, ...]:
        dev = self.device
        return (torch.from_numpy(self.obs).to(dev)[None], torch.from_numpy(self.prev_a).to(dev)[None],
                torch.from_numpy(self.prev_r).to(dev)[None], torch.from_numpy(self.prev_d).to(dev)[None])

    @torch.no_grad()
    def collect(self, max_steps: int | None = None, store: bool = True) -> Segment:
        """Step up to ``max_steps`` (default: to the trial's end); a finished trial is replaced by a new one first.

        ``store=False`` keeps no per-step buffers (evaluation): only ``episode_returns`` is meaningful.
        """
        new_trial = self.trial_over
        if new_trial:
            self.start_trial()
        n, episodes = self.core.num_envs, self.episodes
        steps = min(max_steps or self.max_trial_steps, self.max_trial_steps - self.t)
        T = steps if store else 0
        buf = {"obs": np.empty((T, *self.obs.shape), self.obs.dtype), "prev_action": np.full((T, n), -1),
               "action": np.zeros((T, n), np.int64), "valid": np.zeros((T, n), bool)}
        for k in ("prev_reward", "prev_done", "logprob", "value", "reward"):
            buf[k] = np.zeros((T, n), np.float32)
        h0, t = self.h.clone(), 0
        while t < steps and not self.trial_over:
            live = self.ep_index < episodes
            logits, value, self.h = self.agent(*self._inputs(), self.h)
            probs = torch.softmax(logits[0].float(), dim=-1).cpu()
            action = torch.multinomial(probs, 1, generator=self.gen).squeeze(-1).numpy()
            if store:
                buf["obs"][t], buf["prev_action"][t], buf["action"][t] = self.obs, self.prev_a, action
                buf["prev_reward"][t], buf["prev_done"][t], buf["valid"][t] = self.prev_r, self.prev_d, live
                buf["logprob"][t] = np.log(np.maximum(probs.numpy()[np.arange(n), action], 1e-12))
                buf["value"][t] = value[0].cpu().numpy()
            self.obs, reward, terminated, truncated = self.core.step(action)
            reward = np.where(live, reward, 0.0).astype(np.float32)
            ended = (terminated | truncated) & live
            self.ep_returns[live, self.ep_index[live]] += reward[live]
            self.ep_index += ended
            restart = ended & (self.ep_index < episodes)
            if restart.any():
                self.obs = self.core.reset(restart)
            if store:
                buf["reward"][t] = reward
            self.prev_a = np.where(live, action, self.prev_a)
            self.prev_r, self.prev_d = reward, ended.astype(np.float32)
            t += 1
            self.t += 1
        if self.t >= self.max_trial_steps and not self.trial_over:
            raise RL2Error(f"a trial did not finish {episodes} episodes within {self.max_trial_steps} steps")
        _, last_value, _ = self.agent(*self._inputs(), self.h)
        last_value = torch.where(torch.from_numpy(self.ep_index < episodes), last_value[0].cpu(), 0.0)
        tensors = {k: torch.from_numpy(v[:t]) for k, v in buf.items()}
        return Segment(**tensors, h0=h0, last_value=last_value, new_trial=new_trial,
                       episode_returns=self.ep_returns.copy() if self.trial_over else None)


def trial_gae(reward: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, last_value: torch.Tensor,
              gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over trials ``(T, B)``: no cut at episode boundaries; a trial's last valid step is terminal, and a
    segment that stops mid-trial bootstraps from ``last_value`` (0 for trials that are over).

    Returns ``(advantages, returns)``, zero on padding steps.
    """
    adv = torch.zeros_like(reward)
    next_value, next_adv = last_value.clone(), torch.zeros(reward.shape[1])
    for t in reversed(range(reward.shape[0])):
        # a padding step after the trial contributes nothing, so the last valid step bootstraps from 0
        delta = reward[t] + gamma * next_value - value[t]
        adv[t] = torch.where(valid[t], delta + gamma * lam * next_adv, 0.0)
        next_value = torch.where(valid[t], value[t], 0.0)
        next_adv = adv[t]
    return adv, (adv + value) * valid


class RewardScaler:
    """Divides rewards by a running std of the discounted return (CleanRL's ``NormalizeReward``); the return is
    accumulated across segments and restarted with each trial, the unit over which RL² discounts."""

    def __init__(self, gamma: float) -> None:
        self.gamma, self.count, self.mean, self.var = gamma, 1e-4, 0.0, 1.0
        self.acc: torch.Tensor | None = None

    def __call__(self, seg: Segment) -> torch.Tensor:
        if self.acc is None or seg.new_trial:
            self.acc = torch.zeros(seg.reward.shape[1])
        rets = torch.zeros_like(seg.reward)
        for t in range(seg.reward.shape[0]):
            self.acc = self.acc * self.gamma + seg.reward[t]
            rets[t] = self.acc
        x = rets[seg.valid].double().numpy()
        if x.size:
            b_mean, b_var, b_count = float(x.mean()), float(x.var()), x.size
            delta, total = b_mean - self.mean, self.count + b_count
            self.mean += delta * b_count / total
            self.var = (self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total
            self.count = total
        return seg.reward / float(np.sqrt(self.var) + 1e-8)

    def state(self) -> list[float]:
        return [self.count, self.mean, self.var]


# ---------------------------------------------------------------------------------------------------- PPO
class PPO:
    """PPO-clip on whole trials; ``update`` returns a metrics dict and never logs."""

    def __init__(self, agent: RL2Agent, cfg: Config, device: str) -> None:
        self.agent, self.cfg, self.device = agent, cfg, device
        self.opt = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)
        # fraction of active units of the ReLU layers on the loss's own forward passes (padding steps included);
        # the GRU's tanh state has no "inactive" side, so it is not counted
        self.fau = FAUMonitor()
        self.fau_groups = tuple(watch_layers(self.fau, fau_layers(agent)))

    def loss(self, batch: Segment, adv: torch.Tensor, ret: torch.Tensor, idx: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO loss of the trials ``idx`` of ``batch``, the GRU re-run over the segment from its stored start
        state (exact BPTT when the segment is the whole trial, truncated at the segment start otherwise)."""
        cfg, dev = self.cfg, self.device
        logits, value, _ = self.agent(batch.obs[:, idx].to(dev), batch.prev_action[:, idx].to(dev),
                                      batch.prev_reward[:, idx].to(dev), batch.prev_done[:, idx].to(dev),
                                      batch.h0[:, idx].to(dev))
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

    def update(self, batch: Segment, adv: torch.Tensor, ret: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        B = batch.valid.shape[1]
        sums: dict[str, float] = {}
        count = 0
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(B, generator=gen).chunk(cfg.num_minibatches):
                with self.fau.record(*self.fau_groups):
                    loss, info = self.loss(batch, adv, ret, idx)
                self.opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.agent.parameters(), cfg.max_grad_norm)
                self.opt.step()
                for k, v in info.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {**{k: v / count for k, v in sums.items()}, **self.fau.take_all()}


# ----------------------------------------------------------------------------------------------------- method
def evaluate(agent: RL2Agent, spec: TaskSpec, tasks: Any, episodes: int, gen: torch.Generator,
             device: str) -> np.ndarray:
    """``(len(tasks), episodes)`` returns of one in-context trial per task, frozen weights, actions sampled."""
    was_training = agent.training
    agent.eval()
    try:
        runner = TrialRunner(agent, spec, episodes, lambda: list(tasks), gen, device)
        returns = runner.collect(store=False).episode_returns
    finally:
        agent.train(was_training)
    if returns is None:  # collect() without a step limit runs the trial to its end
        raise RL2Error("the evaluation trial did not finish")
    return returns


class RL2Method:
    """RL² (GRU + PPO over multi-episode trials); see the module docstring."""

    name = "rl2"
    Config = Config
    presets = PRESETS

    def run_id_ignores(self, task: TaskSpec) -> tuple[str, ...]:
        """The grid embedding's switch stays out of the run ids of tasks without a grid (:mod:`baselines.grid`)."""
        return grid_fields_ignored(task)

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
        grid = env_grid_size(env)
        env.close()
        pixels = spec.observation == "pixels"
        total = cfg.pixel_total_env_steps if pixels else cfg.total_env_steps
        n_trials = cfg.pixel_num_trials if pixels else cfg.num_trials
        episodes = cfg.episodes_per_trial or ctx.budget.eval_episodes
        if episodes < 1:
            raise RL2Error(f"a trial needs at least one episode, got {episodes} (episodes_per_trial / eval_episodes)")
        device = ctx.device
        gen = torch.Generator().manual_seed(int(ctx.rng.integers(2**62)))
        agent = RL2Agent(obs_space, num_actions, cfg, grid).to(device)
        ppo = PPO(agent, cfg, device)
        scaler = RewardScaler(cfg.gamma)
        state: dict[str, Any] = {"trials": 0, "env_steps": 0, "rows": []}
        ckpt = ctx.checkpoint_dir / "rl2.pt"
        if ckpt.is_file():  # a killed run picks up at its last finished trial batch, logged rows included
            saved = torch.load(ckpt, map_location=device, weights_only=True)
            agent.load_state_dict(saved["agent"])
            ppo.opt.load_state_dict(saved["opt"])
            gen.set_state(saved["gen"])
            ctx.rng.bit_generator.state = saved["rng"]
            scaler.count, scaler.mean, scaler.var = saved["scaler"]
            state = {k: saved[k] for k in state}
            for step, metrics in state["rows"]:
                ctx.log(step, metrics)

        def sample_tasks() -> list[Any]:
            return [train[i] for i in ctx.rng.integers(len(train), size=n_trials)]

        runner = TrialRunner(agent, spec, episodes, sample_tasks, gen, device)
        t0, steps0 = time.time(), state["env_steps"]
        while state["env_steps"] < total or not runner.trial_over:  # always finish the trial batch in flight
            seg = runner.collect(cfg.segment_steps)
            reward = scaler(seg) if cfg.norm_reward else seg.reward
            adv, ret = trial_gae(reward, seg.value, seg.valid, seg.last_value, cfg.gamma, cfg.gae_lambda)
            metrics = ppo.update(seg, adv, ret, gen)
            state["env_steps"] += int(seg.valid.sum())
            metrics["charts/sps"] = (state["env_steps"] - steps0) / max(time.time() - t0, 1e-9)
            if seg.episode_returns is not None:  # a batch of trials just ended
                ep = seg.episode_returns
                state["trials"] += len(ep)
                metrics |= {"charts/trial_return": float(ep.sum(1).mean()),
                            "charts/first_episode_return": float(ep[:, 0].mean()),
                            "charts/last_episode_return": float(ep[:, -1].mean())}
            ctx.log(state["env_steps"], metrics)
            state["rows"].append((state["env_steps"], metrics))
            ctx.progress(0.95 * min(state["env_steps"] / total, 1.0), f"{state['env_steps']}/{total} env steps")
            if runner.trial_over and (state["trials"] // n_trials) % cfg.checkpoint_every == 0:
                tmp = ckpt.with_suffix(".tmp")  # written aside and renamed: a kill never leaves half a file
                torch.save({"agent": agent.state_dict(), "opt": ppo.opt.state_dict(), "gen": gen.get_state(),
                            "rng": ctx.rng.bit_generator.state, "scaler": scaler.state(), **state}, tmp)
                os.replace(tmp, ckpt)
        returns = evaluate(agent, spec, eval_tasks(ctx), ctx.budget.eval_episodes, gen, device)
        log_in_context(ctx, returns)
        ctx.progress(1.0, "evaluated")
