"""DrQ-v2 (Yarats et al. 2021, https://arxiv.org/abs/2107.09645) with the plasticity diagnostics of Ma et al. 2024
("Revisiting Plasticity in Visual RL", https://arxiv.org/abs/2310.07418): FAU, replay ratio, Adaptive Replay
Ratio, Reset and Plasticity Injection, as switches on one agent; and, as switches too, the plasticity fixes the
paper compares with augmentation (Fig. 2: weight decay, L2-Init, LayerNorm, Shrink & Perturb, CReLU), augmentation
in a window of training only (Fig. 6) and a frozen pretrained encoder (Fig. 4).

Structure and settings follow facebookresearch/drqv2 (``drqv2.py``, ``cfgs/config.yaml``, ``cfgs/task/*.yaml``):
augmentation, encoder, actor, critic, agent; :class:`Trainer` is the reference's ``train.py`` loop on a pixel DMC
task (``tasks/dmc.py``), with evaluation rows, FAU and ARR logged through ``ctx.log`` against frames, and
checkpoint / resume in ``ctx.checkpoint_dir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.plasticity import (
    AdaptiveReplayRatio,
    CReLU,
    FAUMonitor,
    InjectedHead,
    UpdateSchedule,
    l2_init_penalty,
    reinitialize,
    shrink_perturb,
    snapshot,
)
from baselines.replay import CheckpointError, FrameReplay, RunCheckpoints
from bench.config import OMIT_DEFAULT_FROM_RUN_ID, identity_dict, run_id_omissions
from bench.evaluation import EVAL_KEY, control_eval_points, evaluate_episodes
from bench.method import RunContext, RunLogger
from bench.registry import AdaptBenchError
from tasks.spec import TaskSpec


@dataclass(frozen=True)
class Linear:
    """A linear schedule from ``start`` to ``end`` over ``frames`` frames, then constant (DrQ-v2 ``linear(a,b,n)``)."""

    start: float
    end: float
    frames: int

    def __call__(self, frame: int) -> float:
        mix = min(max(frame / self.frames, 0.0), 1.0) if self.frames > 0 else 1.0
        return (1.0 - mix) * self.start + mix * self.end


@dataclass
class Config:
    """DrQ-v2 as published (``cfgs/config.yaml``, ``cfgs/task/easy.yaml``); frames = agent steps x action repeat 2."""

    augment: bool = True
    """Random-shift augmentation of obs and next obs; the only difference between drqv2 and drqv2-noaug."""
    aug_pad: int = 4
    """Pixels of replicate padding before the random shift (``RandomShiftsAug(pad=4)``)."""
    image_size: int = 84
    """Side of the rendered square observation in pixels (DrQ-v2: 84); passed to the task's ``size`` setting."""
    feature_dim: int = 50
    """Width of the actor's and critic's Linear-LayerNorm-Tanh trunk."""
    hidden_dim: int = 1024
    """Width of the two hidden ReLU layers of the actor and of each Q head."""
    lr: float = 1e-4
    """Adam learning rate of encoder, actor and critic."""
    batch_size: int = 256
    """Transitions per update (walker tasks: 512)."""
    nstep: int = 3
    """n of the n-step TD target (walker tasks: 1)."""
    discount: float = 0.99
    """Discount gamma."""
    tau: float = 0.01
    """Polyak rate of the target critic (``critic_target_tau``)."""
    seed_frames: int = 4000
    """Frames of uniform random actions before the first update (``num_seed_frames``, ``num_expl_steps`` x 2)."""
    std_schedule: Linear = Linear(1.0, 0.1, 200_000)
    """Exploration std against frames (easy: linear(1.0, 0.1, 100k agent steps); medium tasks: 500k steps)."""
    std_clip: float = 0.3
    """Clip of the target-policy and actor-loss action noise (``stddev_clip``)."""
    buffer_size: int = 1_000_000
    """Replay capacity in observations (``replay_buffer_size``; quadruped-run: 100k)."""
    replay_ratio: float = 0.5
    """Updates per agent step, each on a fresh batch (DrQ-v2: one update every 2 steps)."""
    arr: bool = False
    """Adaptive Replay Ratio: start at ``replay_ratio``, switch once to ``arr_high_ratio`` (Ma et al. Sec. 6)."""
    arr_high_ratio: float = 2.0
    """Replay ratio after ARR's switch."""
    arr_interval_episodes: int = 50
    """Episodes between ARR's comparisons of the critic's FAU (paper: 50 episodes = 50k frames)."""
    arr_threshold: float = 0.001
    """ARR switches when the critic's FAU changed by at most this between two comparisons."""
    arr_from_first_update: bool = dataclasses.field(default=False, metadata=OMIT_DEFAULT_FROM_RUN_ID)
    """Count ARR's interval from the episode of the first update (reference: from the run's first episode)."""
    reset_interval_frames: int = 0
    """Reset: re-initialise actor and critic (all but the encoder) every this many frames; 0 = never."""
    inject_at_frame: int = 0
    """Plasticity Injection into the critic's Q heads at this frame; 0 = never."""
    augment_from: float = 0.0
    """With ``augment``: augment only while ``augment_from <= frame / run's frames < augment_until`` (Fig. 6)."""
    augment_until: float = 1.0
    """End of that window, as a fraction of the run's frame budget; (0, 1) = always, as published."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) on every parameter of encoder, actor and critic; 0 = plain Adam."""
    l2_init: float = 0.0
    """L2-Init strength lambda: each loss += lambda ||theta - theta_0||^2 over the networks it trains; 0 = off."""
    head_layernorm: bool = False
    """LayerNorm after each hidden Linear of the actor's policy MLP and both Q heads, before the activation."""
    crelu: bool = False
    """CReLU [relu(x), relu(-x)] for the hidden ReLUs of actor and Q heads; the next Linear takes twice the width."""
    sp_interval_frames: int = 0
    """Shrink & Perturb of encoder, actor and critic every this many frames; 0 = never."""
    sp_alpha: float = 0.8
    """Shrink & Perturb: theta <- sp_alpha * theta + sp_sigma * theta_fresh (a fresh draw of the same init)."""
    sp_sigma: float = 0.2
    """Shrink & Perturb: weight of the fresh initialisation."""
    freeze_encoder: bool = False
    """The encoder never changes (requires_grad off, no optimiser step); alone: a frozen random encoder."""
    pretrain_encoder: bool = False
    """Start from the encoder of an augmented drqv2 run on the same task (see :func:`pretrained_encoder`)."""

    def validate(self) -> None:
        positive = ("image_size", "feature_dim", "hidden_dim", "batch_size", "nstep", "buffer_size",
                    "arr_interval_episodes", "lr", "replay_ratio", "arr_high_ratio", "discount", "tau")
        for name in positive + ("aug_pad", "seed_frames", "reset_interval_frames", "inject_at_frame"):
            value = getattr(self, name)
            if value < 0 or (name in positive and value <= 0) or (name in ("discount", "tau") and value > 1):
                raise ValueError(f"{name} must be {'> 0' if name in positive else '>= 0'}"
                                 f"{' and <= 1' if name in ('discount', 'tau') else ''}, got {value!r}")
        for name in ("weight_decay", "l2_init", "sp_interval_frames", "sp_sigma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.sp_alpha <= 1.0:
            raise ValueError(f"sp_alpha must be in [0, 1] (the fraction of the weights kept), got {self.sp_alpha!r}")
        if not 0.0 <= self.augment_from < self.augment_until <= 1.0:
            raise ValueError(f"the augmentation window needs 0 <= augment_from < augment_until <= 1, got "
                             f"augment_from={self.augment_from!r}, augment_until={self.augment_until!r}")
        if not self.augment and self.windowed_augment:
            raise ValueError(f"augment_from={self.augment_from!r} / augment_until={self.augment_until!r} set a "
                             f"window for the augmentation, but augment is false: set augment=true or leave the window "
                             f"at 0, 1")

    @property
    def windowed_augment(self) -> bool:
        """Augmentation limited to a window of training (Ma et al. Fig. 6) rather than always on or off."""
        return (self.augment_from, self.augment_until) != (0.0, 1.0)


# Smoke: seconds (CI). Quick: the task's 40k-frame budget on one core of a 2-core CPU. An update's cost is the
# encoder's convolutions, linear in the batch and the image area, plus the heads. CPU ms per update, one thread,
# measured here (`OMP_NUM_THREADS=1 pytest tests/bench_drqv2.py -k updates_per_second --benchmark-only -s`):
#     84 px, hidden 1024, batch 32: 192    84 px, hidden 256, batch 32: 205    84 px, hidden 256, batch 64: 375
#     64 px, hidden 1024, batch 32: 119    64 px, hidden 256, batch 32:  97    64 px, hidden 256, batch 64: 191
# so quick renders 64 px (the range: 64 or 84), keeps 2 x 256 ReLU units per head and batch 32: ~9k updates
# at replay ratio 0.5 cost ~15 CPU min instead of ~29 at 84 px / 1024 (2.0x). The exploration-noise schedule is rescaled
# from 200k to 20k frames to end inside the budget. Ratio 2 is ~4x the updates.
SMOKE: dict[str, Any] = {"hidden_dim": 32, "feature_dim": 16, "batch_size": 4, "seed_frames": 800,
                         "std_schedule": Linear(1.0, 0.1, 1000), "arr_interval_episodes": 1, "arr_threshold": 1.0}
QUICK: dict[str, Any] = {"batch_size": 32, "hidden_dim": 256, "image_size": 64,
                         "std_schedule": Linear(1.0, 0.1, 20_000)}
# ... for a quick budget of 40k frames. A task given a longer quick budget (tasks/dmc.py's _QUICK_FRAMES: 100k
# frames on finger-spin, reacher-easy, ball_in_cup-catch, cheetah-run) keeps the paper's schedule instead (easy
# tasks: 200k frames, std 1.0 -> 0.55 over a 100k run; medium: 1M), so its quick run explores as the first 100k
# frames of the paper's run do. With the 20k schedule the noise sat at its 0.1 floor for 80% of such a run, and
# whether an agent found finger-spin's reward at all decided it (results/README.md). A method whose quick preset
# sets another schedule keeps its own.
QUICK_STD_BUDGET = 40_000

# cfgs/task/*.yaml: per-task settings of the reference, by domain ("walker-*") or task. They reach a run's config
# through the harness's task_presets (DrQV2.task_presets), so its id, stored config and deviations carry them.
_MEDIUM = {"acrobot-swingup", "cartpole-swingup_sparse", "cheetah-run", "finger-turn_easy", "finger-turn_hard",
           "hopper-hop", "quadruped-walk", "quadruped-run", "reacher-easy", "reacher-hard", "walker-run"}
_TASK_SETTINGS: dict[str, dict[str, Any]] = {
    **{name: {"std_schedule": Linear(1.0, 0.1, 1_000_000)} for name in _MEDIUM},  # medium: 500k agent steps
    "walker-*": {"nstep": 1, "batch_size": 512},
    # hard (humanoid_stand / walk / run): std over 2M agent steps, lr 8e-5, feature_dim 100
    "humanoid-*": {"std_schedule": Linear(1.0, 0.1, 4_000_000), "lr": 8e-5, "feature_dim": 100},
}
_TASK_SETTINGS["quadruped-run"] = {**_TASK_SETTINGS["quadruped-run"], "buffer_size": 100_000}


def reference_task_settings(domain: str, task: str) -> dict[str, Any]:
    """The reference's settings for DMC ``domain``-``task`` (its domain's, then its own)."""
    return {**_TASK_SETTINGS.get(f"{domain}-*", {}), **_TASK_SETTINGS.get(f"{domain}-{task}", {})}


def reference_task_presets(presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``task_presets`` (``{preset: {task id: {field: value}}}``) holding the reference's per-task settings for every
    registered DMC pixel task, plugin tasks included (by their ``domain`` / ``task`` kwargs), at every preset. A
    field the preset sets itself keeps the preset's value: quick's batch of 32 and 20k-frame std schedule hold on
    walker and the medium tasks, whose n-step 1 and buffer settings still apply, except that a task whose quick budget
    is longer than ``QUICK_STD_BUDGET`` frames keeps the reference's schedule at quick."""
    from bench.config import PRESETS
    from tasks import list_tasks

    table: dict[str, dict[str, dict[str, Any]]] = {}
    for spec in list_tasks():
        domain, name = spec.kwargs.get("domain"), spec.kwargs.get("task")
        if spec.family != "control" or not isinstance(domain, str) or not isinstance(name, str):
            continue
        settings = reference_task_settings(domain, name)
        for preset in PRESETS:
            own = presets.get(preset, {})
            entry = {k: v for k, v in settings.items() if k not in own}
            if (preset == "quick" and own.get("std_schedule") == QUICK["std_schedule"]
                    and spec.budgets["quick"].train_steps > QUICK_STD_BUDGET):
                entry["std_schedule"] = settings.get("std_schedule", Config.std_schedule)  # the paper's, truncated
            if entry:
                table.setdefault(preset, {})[spec.id] = entry
    return table


# ---------------------------------------------------------------------------------------------- networks
def weight_init(m: nn.Module) -> None:
    """DrQ-v2 ``utils.weight_init``: orthogonal weights (ReLU gain for convolutions), zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight.data)
        if m.bias is not None:
            m.bias.data.fill_(0.0)
    elif isinstance(m, nn.Conv2d):
        nn.init.orthogonal_(m.weight.data, nn.init.calculate_gain("relu"))
        if m.bias is not None:
            m.bias.data.fill_(0.0)


class RandomShiftsAug(nn.Module):
    """Pad by ``pad`` pixels (replicate), then crop back at a random integer offset per image.

    The reference draws integer shifts and samples them with ``grid_sample`` at pixel centres, which copies
    pixels: a crop is the same image, exactly, and on a CPU 4x cheaper than ``grid_sample`` and 12x cheaper than
    one advanced-indexing gather (``tests/bench_drqv2.py``). Each call draws new shifts, so obs and next obs
    (two calls) are shifted independently.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.pad == 0:
            return x
        padded = F.pad(x, (self.pad,) * 4, mode="replicate")
        shift = torch.randint(0, 2 * self.pad + 1, (n, 2), device=x.device).tolist()  # (dx, dy) per image
        return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dx, dy) in enumerate(shift)])


_NO_AUG = nn.Identity()  # outside an augmentation window


class Encoder(nn.Module):
    """Four 3x3 convolutions with 32 channels, the first with stride 2, on ``obs / 255 - 0.5``."""

    def __init__(self, obs_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.convnet = nn.Sequential(
            nn.Conv2d(obs_shape[0], 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
        )
        side = (obs_shape[1] - 3) // 2 + 1 - 6
        self.repr_dim = 32 * side * side  # 32 x 35 x 35 at 84 px
        self.apply(weight_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.convnet(obs.float() / 255.0 - 0.5).flatten(1)


def _trunk(repr_dim: int, feature_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


def _mlp(inp: int, hidden: int, out: int, layernorm: bool = False, crelu: bool = False) -> nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear; ``layernorm``: a LayerNorm after each hidden Linear, before its activation;
    ``crelu``: CReLU for the ReLUs, so the Linear after each takes ``2 x hidden`` inputs (Abbas et al. 2023)."""
    if not (layernorm or crelu):  # the published heads, module for module
        return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                             nn.ReLU(inplace=True), nn.Linear(hidden, out))
    width = 2 * hidden if crelu else hidden
    layers: list[nn.Module] = []
    for n_in in (inp, width):
        layers.append(nn.Linear(n_in, hidden))
        if layernorm:
            layers.append(nn.LayerNorm(hidden))
        layers.append(CReLU() if crelu else nn.ReLU(inplace=True))
    return nn.Sequential(*layers, nn.Linear(width, out))


def _activations(mlp: nn.Module) -> list[nn.Module]:
    """The hidden activation layers of an MLP, whose outputs the FAU counts (ReLU, or CReLU)."""
    return [m for m in mlp if isinstance(m, (nn.ReLU, CReLU))]


class Actor(nn.Module):
    """Deterministic policy mean ``tanh(mu)``; the agent adds clipped Gaussian noise (``TruncatedNormal``)."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int, hidden_dim: int, layernorm: bool = False,
                 crelu: bool = False) -> None:
        super().__init__()
        self.trunk = _trunk(repr_dim, feature_dim)
        self.policy = _mlp(feature_dim, hidden_dim, action_dim, layernorm, crelu)
        self.apply(weight_init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.policy(self.trunk(h)))


class Critic(nn.Module):
    """Twin Q heads on a shared trunk, the action concatenated to the trunk's features."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int, hidden_dim: int, layernorm: bool = False,
                 crelu: bool = False) -> None:
        super().__init__()
        self.head_dims = (feature_dim + action_dim, hidden_dim)
        self.head_options = {"layernorm": layernorm, "crelu": crelu}
        self.trunk = _trunk(repr_dim, feature_dim)
        self.Q1 = _mlp(*self.head_dims, 1, **self.head_options)
        self.Q2 = _mlp(*self.head_dims, 1, **self.head_options)
        self.apply(weight_init)

    def forward(self, h: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.trunk(h), action], dim=-1)
        return self.Q1(x), self.Q2(x)

    def relus(self) -> list[nn.Module]:
        """The hidden ReLU (or CReLU) layers whose FAU is the critic's (after injection: those of the learning
        heads)."""
        heads = [q.fresh if isinstance(q, InjectedHead) else q for q in (self.Q1, self.Q2)]
        return [m for q in heads for m in _activations(q)]


def _adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this torch has it (10x faster on a CPU than the per-tensor loop);
    ``weight_decay > 0``: AdamW, decay decoupled from the gradient (Loshchilov & Hutter 2019), ``theta -= lr * wd *
    theta`` each step on every parameter given (biases and LayerNorm gains included)."""
    params = list(params)
    opt, kwargs = (torch.optim.AdamW, {"weight_decay": weight_decay}) if weight_decay else (torch.optim.Adam, {})
    try:
        return opt(params, lr=lr, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # an older torch without CPU support for the fused kernel
        return opt(params, lr=lr, **kwargs)


def sample_action(mu: torch.Tensor, std: float, clip: float | None) -> torch.Tensor:
    """DrQ-v2 ``TruncatedNormal.sample``: ``mu`` + (clipped) noise, clamped to (-1, 1) with a straight-through
    gradient to ``mu``."""
    eps = torch.randn_like(mu) * std
    if clip is not None:
        eps = eps.clamp(-clip, clip)
    x = mu + eps
    return x - x.detach() + x.clamp(-1.0 + 1e-6, 1.0 - 1e-6).detach()


# ---------------------------------------------------------------------------------------------- agent
class DrQV2Agent:
    """Encoder, actor, twin critic and target critic; only the critic's loss trains the encoder.

    ``total_frames`` (the run's frame budget) is needed only by an augmentation window (``augment_from`` /
    ``augment_until``): whether a batch is augmented depends on ``frame / total_frames`` alone.
    """

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, cfg: Config, device: str = "cpu",
                 total_frames: int | None = None) -> None:
        self.cfg, self.device = cfg, torch.device(device)
        if cfg.windowed_augment and not (total_frames and total_frames > 0):
            raise ValueError(f"an augmentation window (augment_from={cfg.augment_from}, augment_until="
                             f"{cfg.augment_until}) needs the run's frame budget: pass total_frames > 0")
        self.total_frames = total_frames
        self.encoder = Encoder(obs_shape).to(self.device)
        dims = (self.encoder.repr_dim, action_dim, cfg.feature_dim, cfg.hidden_dim)
        heads = {"layernorm": cfg.head_layernorm, "crelu": cfg.crelu}
        self.actor = Actor(*dims, **heads).to(self.device)
        self.critic = Critic(*dims, **heads).to(self.device)
        self.critic_target = Critic(*dims, **heads).to(self.device)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.encoder_opt, self.actor_opt, self.critic_opt = (
            _adam(m.parameters(), cfg.lr, cfg.weight_decay) for m in (self.encoder, self.actor, self.critic))
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)  # and update_critic never steps encoder_opt
        # L2-Init's theta_0 (checkpointed with the agent; a loaded pretrained encoder becomes its own theta_0)
        self.l2_anchors = {n: snapshot(getattr(self, n)) for n in ("encoder", "actor", "critic")} if cfg.l2_init else {}
        self.aug: nn.Module = RandomShiftsAug(cfg.aug_pad) if cfg.augment else nn.Identity()
        self.injected = False
        self.fau = FAUMonitor()
        self.fau.watch("encoder", [m for m in self.encoder.convnet if isinstance(m, nn.ReLU)])
        self.fau.watch("actor", _activations(self.actor.policy))
        self.fau.watch("critic", self.critic.relus())

    def augmenting(self, frame: int) -> bool:
        """Whether the update at ``frame`` augments its batch (always with ``augment`` and no window)."""
        if not self.cfg.augment:
            return False
        if not self.cfg.windowed_augment:
            return True
        assert self.total_frames  # checked in __init__
        return self.cfg.augment_from <= frame / self.total_frames < self.cfg.augment_until

    def load_encoder(self, state: dict[str, torch.Tensor]) -> None:
        """Load a (pretrained) encoder; with L2-Init it becomes the encoder's theta_0."""
        self.encoder.load_state_dict(state)
        if self.l2_anchors:
            self.l2_anchors["encoder"] = snapshot(self.encoder)

    def l2_init_loss(self, *names: str) -> torch.Tensor:
        """L2-Init's penalty ``l2_init * ||theta - theta_0||^2`` over the networks ``names``."""
        return self.cfg.l2_init * sum(l2_init_penalty(getattr(self, n), self.l2_anchors[n]) for n in names)

    @torch.no_grad()
    def act(self, obs: np.ndarray, frame: int, explore: bool) -> np.ndarray:
        """The policy's mean action (evaluation) or one with N(0, std(frame)) noise, unclipped (exploration)."""
        mu = self.actor(self.encoder(torch.as_tensor(obs, device=self.device).unsqueeze(0)))
        if explore:
            mu = sample_action(mu, self.cfg.std_schedule(frame), clip=None)
        return mu[0].cpu().numpy()

    def update(self, batch: dict[str, np.ndarray], frame: int) -> dict[str, float]:
        """One update of critic (with encoder), actor and target on ``batch``; returns the losses and Q values."""
        obs, action, reward, discount, next_obs = (
            torch.as_tensor(batch[k], device=self.device) for k in ("obs", "action", "reward", "discount", "next_obs"))
        augmenting = self.augmenting(frame)
        aug = self.aug if augmenting else _NO_AUG
        obs, next_obs = aug(obs.float()), aug(next_obs.float())  # two draws: independent shifts
        with self.fau.record("encoder"):
            h = self.encoder(obs)
        with torch.no_grad():
            next_h = self.encoder(next_obs)
        std = self.cfg.std_schedule(frame)
        metrics = self.update_critic(h, action, reward, discount, next_h, std)
        metrics.update(self.update_actor(h.detach(), std))
        with torch.no_grad():
            for target, param in zip(self.critic_target.parameters(), self.critic.parameters(), strict=True):
                target.lerp_(param, self.cfg.tau)
        if self.cfg.windowed_augment:
            metrics["charts/augment"] = float(augmenting)  # per episode: the fraction of augmented updates
        return metrics

    def update_critic(self, h, action, reward, discount, next_h, std: float) -> dict[str, float]:
        with torch.no_grad():
            next_action = sample_action(self.actor(next_h), std, self.cfg.std_clip)
            target_q = reward + discount * torch.min(*self.critic_target(next_h, next_action))
        with self.fau.record("critic"):  # the FAU of the forward pass this loss makes, on the training batch
            q1, q2 = self.critic(h, action)
        loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        extra: dict[str, float] = {}
        total = loss
        if self.cfg.l2_init:  # this loss trains the encoder and the critic
            penalty = self.l2_init_loss("encoder", "critic")
            total, extra["losses/l2_init_critic"] = loss + penalty, penalty.item()
        self.encoder_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        total.backward()
        self.critic_opt.step()
        if not self.cfg.freeze_encoder:
            self.encoder_opt.step()
        return {"losses/critic": loss.item(), "losses/q1": q1.mean().item(), "losses/target_q": target_q.mean().item(),
                **extra}

    def update_actor(self, h: torch.Tensor, std: float) -> dict[str, float]:
        with self.fau.record("actor"):
            mu = self.actor(h)
        q1, q2 = self.critic(h, sample_action(mu, std, self.cfg.std_clip))
        loss = -torch.min(q1, q2).mean()
        extra: dict[str, float] = {}
        total = loss
        if self.cfg.l2_init:
            penalty = self.l2_init_loss("actor")
            total, extra["losses/l2_init_actor"] = loss + penalty, penalty.item()
        self.actor_opt.zero_grad(set_to_none=True)
        # gradients for the actor only: the reference also fills the critic's, which its next update zeroes unused
        total.backward(inputs=list(self.actor.parameters()))
        self.actor_opt.step()
        return {"losses/actor": loss.item(), **extra}

    def reset_heads(self) -> None:
        """Reset (Nikishin et al. 2022): actor and critic re-drawn (target follows), encoder and buffer kept."""
        reinitialize(self.actor, weight_init, [self.actor_opt])
        reinitialize(self.critic, weight_init, [self.critic_opt])
        self.critic_target.load_state_dict(self.critic.state_dict())

    def shrink_perturb(self) -> None:
        """Shrink & Perturb (Ash & Adams 2020) of encoder (unless frozen), actor and critic, in that order:
        ``theta <- sp_alpha * theta + sp_sigma * theta_fresh``, ``theta_fresh`` a new draw of the network's own init;
        then the target critic is set equal to the critic. Adam's moments are kept; the buffer too."""
        for module in (self.encoder, self.actor, self.critic):
            shrink_perturb(module, weight_init, self.cfg.sp_alpha, self.cfg.sp_sigma)
        self.critic_target.load_state_dict(self.critic.state_dict())

    def inject(self) -> None:
        """Plasticity Injection into both Q heads of critic and target; their outputs are unchanged now."""
        if self.injected:
            raise AdaptBenchError("plasticity was already injected into this critic")
        fresh_params = []
        for name in ("Q1", "Q2"):
            fresh = _mlp(*self.critic.head_dims, 1, **self.critic.head_options).to(self.device)
            fresh.apply(weight_init)
            setattr(self.critic, name, InjectedHead(getattr(self.critic, name), fresh))
            target_fresh = _mlp(*self.critic.head_dims, 1, **self.critic.head_options).to(self.device)
            target_fresh.load_state_dict(fresh.state_dict())
            setattr(self.critic_target, name, InjectedHead(getattr(self.critic_target, name), target_fresh))
            fresh_params += list(fresh.parameters())
        self.critic_opt.add_param_group({"params": fresh_params})
        self.fau.watch("critic", self.critic.relus())
        self.injected = True

    def state_dict(self) -> dict[str, Any]:
        names = ("encoder", "actor", "critic", "critic_target", "encoder_opt", "actor_opt", "critic_opt")
        state = {name: getattr(self, name).state_dict() for name in names}
        if self.l2_anchors:
            state["l2_anchors"] = self.l2_anchors
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name == "l2_anchors":
                self.l2_anchors = {k: {n: t.to(self.device) for n, t in v.items()} for k, v in value.items()}
            else:
                getattr(self, name).load_state_dict(value)


# ---------------------------------------------------------------------------------------------- training
class _Greedy:
    """The evaluation policy for :func:`bench.evaluation.evaluate_episodes`: the mean action."""

    def __init__(self, agent: DrQV2Agent, frame: int) -> None:
        self.agent, self.frame = agent, frame
        self.begin_task = self.observe = lambda *args: None

    def act(self, env: Any, obs: np.ndarray) -> np.ndarray:
        return self.agent.act(obs, self.frame, explore=False)


class Trainer:
    """The reference's ``train.py`` loop: seed frames of uniform actions, then act, update ``replay_ratio``
    times per agent step, step the env; evaluate every ``budget.eval_every`` frames and at the end.

    Per training episode it logs ``charts/episode_return``, ``charts/replay_ratio``, the mean losses and
    ``fau/critic``, ``fau/encoder``, ``fau/actor`` (mean over the episode's updates). A checkpoint is written
    at the first episode end after every ``checkpoint_every`` frames (default: ``eval_every``) and at the end;
    at an episode end the env holds no state worth saving but its RNG.
    """

    def __init__(self, ctx: RunContext, cfg: Config, checkpoint_every: int | None = None,
                 encoder_state: dict[str, torch.Tensor] | None = None) -> None:
        cfg.validate()
        torch.set_num_threads(ctx.torch_threads)
        self.ctx, self.cfg = ctx, cfg
        self.checkpoint_every = checkpoint_every or ctx.budget.eval_every or ctx.budget.train_steps
        # the render size is the method's setting (a smaller image is a quick-preset budget); a task without a
        # `size` setting renders at its own size, which must then be the configured one (else the run's recorded
        # deviations would name a size it never saw)
        size = {"size": cfg.image_size} if "size" in ctx.task.kwargs else {}
        self.env, self.eval_env = ctx.task.make(**size), ctx.task.make(**size)
        self.repeat = action_repeat(ctx.task)
        obs_shape = self.env.observation_space.shape
        if tuple(obs_shape[-2:]) != (cfg.image_size, cfg.image_size):
            self.env.close()
            self.eval_env.close()
            raise ValueError(f"{ctx.task.id} renders {obs_shape[-2]}x{obs_shape[-1]} observations and has no `size` "
                             f"setting, but image_size is {cfg.image_size}: set image_size={obs_shape[-1]} "
                             f"(--set image_size={obs_shape[-1]}) for this task")
        action_dim = int(self.env.action_space.shape[0])
        self.agent = DrQV2Agent(obs_shape, action_dim, cfg, ctx.device, total_frames=ctx.budget.train_steps)
        if encoder_state is not None:  # a pretrained encoder (a resumed run then loads the same one, checkpointed)
            self.agent.load_encoder(encoder_state)
        stack = int(ctx.task.kwargs.get("frame_stack", 3))
        capacity = replay_slots(ctx.task, ctx.budget.train_steps, cfg.buffer_size)
        self.rng, replay_rng = (np.random.default_rng(ctx.rng.integers(2**63)) for _ in range(2))
        self.replay = FrameReplay(max(capacity, stack + cfg.nstep + 1), (obs_shape[0] // stack, *obs_shape[1:]),
                                  action_dim, stack, cfg.nstep, cfg.discount, replay_rng)
        self.schedule = UpdateSchedule(cfg.replay_ratio)
        self.arr = AdaptiveReplayRatio(cfg.replay_ratio, cfg.arr_high_ratio, cfg.arr_interval_episodes,
                                       cfg.arr_threshold, cfg.arr_from_first_update) if cfg.arr else None
        self.frame = self.episode = self.evals_done = self.last_checkpoint = self._episode_updates = 0
        self.checkpoints = RunCheckpoints(ctx.checkpoint_dir)
        self._sums: dict[str, float] = {}  # sums of the update metrics of the episode in progress

    # -------------------------------------------------------------------------------------- loop
    def train(self) -> None:
        try:
            self._train()
        finally:  # a failed run must not keep its GL contexts
            self.env.close()
            self.eval_env.close()

    def _train(self) -> None:
        ctx, cfg, total = self.ctx, self.cfg, self.ctx.budget.train_steps
        points = control_eval_points(ctx)
        self.resume()
        obs, episode_return = None, 0.0
        while True:
            while self.evals_done < len(points) and points[self.evals_done] <= self.frame:
                self.evaluate(points[self.evals_done])
            if self.frame >= total:
                break
            if obs is None:  # episode start
                obs, _ = self.env.reset(seed=ctx.seed if self.episode == 0 else None)
                self.replay.add_first(obs)
                episode_return = 0.0
            if self.frame < cfg.seed_frames:
                action = self.rng.uniform(-1.0, 1.0, self.env.action_space.shape).astype(np.float32)
            else:
                action = self.agent.act(obs, self.frame, explore=True)
                for _ in range(self.schedule.due()):
                    metrics = self.agent.update(self.replay.sample(cfg.batch_size), self.frame)
                    self._episode_updates += 1
                    self._sums = {k: self._sums.get(k, 0.0) + v for k, v in metrics.items()}
                    if self.arr is not None and self.arr.previous is None:
                        self.arr.start(self.agent.fau.mean("critic"), self.episode)
            obs, reward, terminated, truncated, _ = self.env.step(action)
            self.replay.add(action, reward, terminated, truncated, obs)
            self.frame += self.repeat
            episode_return += float(reward)
            every = cfg.reset_interval_frames
            if every and self.frame // every > (self.frame - self.repeat) // every and self.frame < total:
                self.agent.reset_heads()
            every = cfg.sp_interval_frames
            if every and self.frame // every > (self.frame - self.repeat) // every and self.frame < total:
                self.agent.shrink_perturb()
                ctx.log(self.frame, {"charts/shrink_perturb_frame": self.frame})
            if cfg.inject_at_frame and self.frame >= cfg.inject_at_frame and not self.agent.injected:
                self.agent.inject()
            if terminated or truncated:
                self.end_episode(episode_return)
                obs = None
            ctx.progress(self.frame / total, f"frame {self.frame}")

    def end_episode(self, episode_return: float) -> None:
        self.episode += 1
        row = {"charts/episode_return": episode_return, "charts/replay_ratio": self.schedule.ratio}
        if self._episode_updates:
            row.update({k: v / self._episode_updates for k, v in self._sums.items()})
        for group in ("critic", "encoder", "actor"):
            value = self.agent.fau.take(group)
            if value is not None:
                row[f"fau/{group}"] = value
        if self.arr is not None and self.arr.end_episode(self.episode, row.get("fau/critic"), self.frame):
            self.schedule.ratio = self.arr.ratio
            row["charts/arr_switch_frame"] = self.frame
        self.ctx.log(self.frame, row)
        self._sums, self._episode_updates = {}, 0
        every = self.checkpoint_every
        if self.frame // every > self.last_checkpoint // every or self.frame >= self.ctx.budget.train_steps:
            self.save_checkpoint()

    def evaluate(self, frame: int) -> None:
        ret = evaluate_episodes(self.ctx, self.eval_env, _Greedy(self.agent, frame), self.ctx.budget.eval_episodes)
        self.ctx.log(frame, {EVAL_KEY: ret})
        self.evals_done += 1

    # -------------------------------------------------------------------------------------- checkpoints
    def _generators(self) -> dict[str, np.random.Generator]:
        return {"ctx": self.ctx.rng, "trainer": self.rng, "env": self.env.unwrapped.np_random}

    def save_checkpoint(self) -> None:
        """Networks, optimisers, replay, RNG states, counters and the rows logged so far (see RunCheckpoints)."""
        counters = {"frame": self.frame, "episode": self.episode, "evals_done": self.evals_done,
                    "injected": self.agent.injected, "schedule": self.schedule.state_dict(),
                    "arr": None if self.arr is None else self.arr.state_dict()}
        state = {"config": dataclasses.asdict(self.cfg), "counters": counters, "rows": list(self.ctx.log.rows)}
        self.checkpoints.save(self.frame, {"agent": self.agent.state_dict()}, state, self.replay, self._generators())
        self.last_checkpoint = self.frame

    def resume(self) -> None:
        """Continue from the newest checkpoint in ``ctx.checkpoint_dir``, if any, and re-log its rows."""
        found = self.checkpoints.load(self.agent.device)
        if found is None:
            return
        state, tensors = found
        omit = run_id_omissions(self.cfg)  # a checkpoint written before a later field existed lacks it
        saved = {k: v for k, v in state["config"].items() if k not in omit}
        if saved != json.loads(json.dumps(identity_dict(self.cfg))):
            raise CheckpointError(f"checkpoint in {self.checkpoints.root} was written with another config; delete "
                                  f"it to start afresh")
        self.checkpoints.load_replay(self.replay, state)
        counters = state["counters"]
        if counters["injected"]:
            self.agent.inject()  # rebuild the injected heads before loading their weights
        self.agent.load_state_dict(tensors["agent"])
        self.frame, self.episode, self.evals_done = counters["frame"], counters["episode"], counters["evals_done"]
        self.schedule.load_state_dict(counters["schedule"])
        if self.arr is not None:
            self.arr.load_state_dict(counters["arr"])
        self.last_checkpoint = self.frame
        self.env.unwrapped.np_random = np.random.Generator(np.random.PCG64())  # its state is restored next
        self.checkpoints.restore_rngs(state, tensors, self._generators())
        for row in state["rows"]:  # the harness keeps rows in memory: the resumed run re-logs the stored ones
            self.ctx.log(row["step"], {row["key"]: row["value"]}, axis=row["axis"])


# ---------------------------------------------------------------------------------------------- pretrained encoder
PRETRAIN_SEED = 7418
"""Seed of the encoder pretraining run (from the paper's arXiv id): a constant, not ``ctx.seed``, so every seed of
drqv2-frozen and drqv2-noaug-frozen shares one pretrained encoder."""
ENCODER_FORMAT = 1
"""Version of the pretrained-encoder artifact; part of its cache key."""
# the hyper-parameters a pretraining run takes from the run it serves; every other field (the plasticity switches,
# ARR, Reset, Injection, the frozen encoder itself) is drqv2's default, augmentation on
_SHARED = ("aug_pad", "image_size", "feature_dim", "hidden_dim", "lr", "batch_size", "nstep", "discount", "tau",
           "seed_frames", "std_schedule", "std_clip", "buffer_size", "replay_ratio")


def pretrain_config(cfg: Config) -> Config:
    """The encoder pretraining run's config: drqv2 as published (augmented, no plasticity switch) with ``cfg``'s
    shared hyper-parameters (``cfg`` the run's, with its task's settings)."""
    return dataclasses.replace(Config(), **{name: getattr(cfg, name) for name in _SHARED})


class _Pretraining(Trainer):
    """A Trainer that makes no evaluation episodes: the pretraining run's product is its encoder, not a score."""

    def evaluate(self, frame: int) -> None:
        self.evals_done += 1


@contextlib.contextmanager
def _own_global_rngs(seed: int) -> Iterator[None]:
    """The block runs with python's, numpy's and torch's global generators seeded from ``seed``; the caller's states
    are put back afterwards, so a run does the same whether or not it had to build a shared artifact first."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _valid_encoder(path: Path) -> bool:
    try:
        state = torch.load(path / "encoder.pt", weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return False
    return (isinstance(state, dict) and bool(state)
            and all(k.startswith("convnet.") and isinstance(v, torch.Tensor) for k, v in state.items()))


def pretrained_encoder(ctx: RunContext, cfg: Config) -> dict[str, torch.Tensor]:
    """The final encoder ``state_dict`` of an augmented drqv2 run on ``ctx.task``, built once into ``ctx.cache``.

    Ma et al. (Fig. 4) freeze an ImageNet-pretrained encoder; nothing can be downloaded here, so the stand-in is an
    in-domain encoder: drqv2 with augmentation (:func:`pretrain_config`) trained for the run's own frame budget on
    the same task, seed :data:`PRETRAIN_SEED`. The artifact is keyed by task id and version, preset, budget and the
    pretraining config, so drqv2-frozen and drqv2-noaug-frozen (which differ only in switches the pretraining
    resets) and all their seeds share it. The pretraining run checkpoints like a run (next to the artifact, removed
    once it is built) so a killed build resumes, and it uses its own global RNG states (:func:`_own_global_rngs`).
    """
    pre = pretrain_config(cfg)
    budget = dataclasses.replace(ctx.budget, eval_every=0)  # no evaluation rows are made (see _Pretraining)
    key = {"kind": "drqv2-encoder", "format": ENCODER_FORMAT, "task": ctx.task.id, "task_version": ctx.task.version,
           "preset": ctx.preset, "budget": dataclasses.asdict(budget), "config": identity_dict(pre),
           "seed": PRETRAIN_SEED}
    name = f"drqv2-encoder-{ctx.task.id}"
    target = ctx.cache.path_for(name, key)
    checkpoints = target.parent / f".ckpt-{target.name}"

    def build(out: Path) -> None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        pre_ctx = RunContext(task=ctx.task, seed=PRETRAIN_SEED, preset=ctx.preset, budget=budget, config=pre,
                             device=ctx.device, log=RunLogger(), checkpoint_dir=checkpoints, cache=ctx.cache,
                             rng=np.random.default_rng(PRETRAIN_SEED), torch_threads=ctx.torch_threads,
                             progress_fn=lambda f, msg: ctx.progress(f, f"pretraining the encoder: {msg}"))
        with _own_global_rngs(PRETRAIN_SEED):
            trainer = _Pretraining(pre_ctx, pre, checkpoint_every=ctx.budget.eval_every or budget.train_steps)
            trainer.train()
        torch.save({k: v.cpu() for k, v in trainer.agent.encoder.state_dict().items()}, out / "encoder.pt")
        returns = [r["value"] for r in pre_ctx.log.rows if r["key"] == "charts/episode_return"]
        (out / "pretraining.json").write_text(json.dumps({
            "frames": trainer.frame, "episodes": trainer.episode, "seed": PRETRAIN_SEED,
            "last_episode_returns": returns[-10:]}, indent=1))
        shutil.rmtree(checkpoints, ignore_errors=True)

    path = ctx.cache.get_or_build(name, key, build, _valid_encoder)
    return torch.load(path / "encoder.pt", weights_only=True, map_location=ctx.device)


def action_repeat(task: TaskSpec) -> int:
    return int(task.kwargs.get("action_repeat", 2))


def replay_slots(task: TaskSpec, frames: int, buffer_size: int) -> int:
    """Frames the replay holds in a run of ``frames`` env frames: one per agent step plus one per episode start,
    never more than ``buffer_size`` (nor than the run can fill)."""
    steps = frames // action_repeat(task)
    return min(buffer_size, steps + steps // task.episode_length + 2)


# ---------------------------------------------------------------------------------------------- methods
class DrQV2:
    """DrQ-v2 on DMC pixels, logging FAU of critic, encoder and actor (Yarats et al. 2021; Ma et al. 2024)."""

    name = "drqv2"
    Config: type[Config] = Config
    presets: dict[str, dict[str, Any]] = {"smoke": SMOKE, "quick": QUICK}

    @property
    def task_presets(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The reference's per-task settings (:func:`reference_task_presets` of this method's presets)."""
        return reference_task_presets(self.presets)

    def supports(self, task: TaskSpec) -> bool | str:
        if task.family != "control" or task.observation != "pixels" or task.actions != "continuous":
            return f"{self.name} needs a control task with pixel observations and continuous actions"
        return True

    def resources(self, task: TaskSpec, preset: str, config: Config) -> dict[str, float]:
        """What one run asks of a Ray node: one CPU (the reference is one process); at the paper preset a GPU
        (``--device auto`` drops it where the cluster has none) and the replay's frames (one 3-channel frame per
        agent step, up to ``buffer_size``; :class:`Trainer`) plus 3 GiB for the process, at the other presets the
        replay plus 0.5 GiB."""
        slots = replay_slots(task, task.budget(preset).train_steps, config.buffer_size)
        overhead = 3 * 2**30 if preset == "paper" else 2**29
        return {"num_cpus": 1, "num_gpus": 1 if preset == "paper" else 0,
                "memory": slots * 3 * config.image_size ** 2 + overhead}

    def run(self, ctx: RunContext) -> None:
        cfg = ctx.config  # with the task's reference settings (task_presets)
        encoder = pretrained_encoder(ctx, cfg) if cfg.pretrain_encoder else None
        Trainer(ctx, cfg, encoder_state=encoder).train()


class DrQV2NoAug(DrQV2):
    """DrQ-v2 without random-shift augmentation (the only difference from drqv2)."""

    name = "drqv2-noaug"

    @dataclass
    class Config(Config):
        augment: bool = False
        """Random-shift augmentation off: the only difference from drqv2."""


class DrQV2RR1(DrQV2):
    """DrQ-v2 at replay ratio 1 (one update per agent step)."""

    name = "drqv2-rr1"

    @dataclass
    class Config(Config):
        replay_ratio: float = 1.0
        """One update per agent step (Ma et al. Fig. 7)."""


class DrQV2RR2(DrQV2):
    """DrQ-v2 at replay ratio 2 (two updates per agent step, each on a fresh batch)."""

    name = "drqv2-rr2"

    @dataclass
    class Config(Config):
        replay_ratio: float = 2.0
        """Two updates per agent step, each on a fresh batch (Ma et al.'s high RR)."""


class DrQV2ARR(DrQV2):
    """DrQ-v2 with Adaptive Replay Ratio: 0.5, then 2 once the critic's FAU settles (Ma et al. 2024)."""

    name = "drqv2-arr"
    # quick: the paper's 50-episode interval rescaled to 5 (40 episodes in the budget), counted from the first
    # update: counted from the first episode, the first check (episode 5) would compare the first update's FAU with
    # one episode of training (the 4,000 seed frames fill episodes 1-4), which let session 6's seed 0 switch at once
    presets = {"smoke": SMOKE, "quick": {**QUICK, "arr_interval_episodes": 5, "arr_from_first_update": True}}

    @dataclass
    class Config(Config):
        arr: bool = True
        """Adaptive Replay Ratio on: 0.5 until the critic's FAU settles, then 2."""


class DrQV2NoAugReset(DrQV2):
    """DrQ-v2 without augmentation, with periodic Reset of actor and critic (encoder and buffer kept)."""

    name = "drqv2-noaug-reset"
    presets = {"smoke": {**SMOKE, "reset_interval_frames": 900}, "quick": {**QUICK, "reset_interval_frames": 10_000}}

    @dataclass
    class Config(DrQV2NoAug.Config):
        reset_interval_frames: int = 200_000
        """Reset every 200k frames, ~10 resets in a 2M-frame run (Ma et al. Fig. 1 follows Nikishin et al. 2022)."""


class DrQV2NoAugInject(DrQV2):
    """DrQ-v2 without augmentation, with Plasticity Injection into the critic's Q heads once."""

    name = "drqv2-noaug-inject"
    presets = {"smoke": {**SMOKE, "inject_at_frame": 900}, "quick": {**QUICK, "inject_at_frame": 20_000}}

    @dataclass
    class Config(DrQV2NoAug.Config):
        inject_at_frame: int = 1_000_000
        """Plasticity Injection into the critic at 1M frames (the authors' Plasticity-Injection_Torch default)."""


# -- Plasticity fixes compared with augmentation (Ma et al. Fig. 2), each on drqv2-noaug -------------------------------
# The strengths are our choices, not the paper's (its text gives none we could use): see each field's docstring.
class DrQV2NoAugWeightDecay(DrQV2):
    """DrQ-v2 without augmentation, with decoupled weight decay (AdamW) on encoder, actor and critic."""

    name = "drqv2-noaug-wd"

    @dataclass
    class Config(DrQV2NoAug.Config):
        weight_decay: float = 0.01
        """AdamW's decoupled decay on every parameter; 0.01 is torch.optim.AdamW's default (our choice, untuned):
        at lr 1e-4 the weights shrink by 1e-6 per update."""


class DrQV2NoAugL2Init(DrQV2):
    """DrQ-v2 without augmentation, with L2-Init: each loss is pulled towards its networks' initial parameters."""

    name = "drqv2-noaug-l2init"

    @dataclass
    class Config(DrQV2NoAug.Config):
        l2_init: float = 1e-3
        """lambda of lambda ||theta - theta_0||^2 (Kumar et al. 2023 tune it per benchmark; 1e-3 is our untuned
        choice), on encoder + critic for the critic loss and on the actor for the actor loss."""


class DrQV2NoAugLayerNorm(DrQV2):
    """DrQ-v2 without augmentation, with LayerNorm in the hidden layers of the actor's MLP and both Q heads."""

    name = "drqv2-noaug-layernorm"

    @dataclass
    class Config(DrQV2NoAug.Config):
        head_layernorm: bool = True
        """LayerNorm after each hidden Linear of actor and Q heads, before the ReLU."""


class DrQV2NoAugShrinkPerturb(DrQV2):
    """DrQ-v2 without augmentation, with periodic Shrink & Perturb of encoder, actor and critic."""

    name = "drqv2-noaug-shrinkperturb"
    # the interval is scaled to the budget like drqv2-noaug-reset's (a recorded deviation), never switched off
    presets = {"smoke": {**SMOKE, "sp_interval_frames": 900}, "quick": {**QUICK, "sp_interval_frames": 10_000}}

    @dataclass
    class Config(DrQV2NoAug.Config):
        sp_interval_frames: int = 200_000
        """Every 200k frames, the interval of drqv2-noaug-reset (our choice); sp_alpha 0.8 / sp_sigma 0.2 (our
        choice) interpolate towards a fresh init as later replay-ratio work does (alpha + sigma = 1)."""


class DrQV2NoAugCReLU(DrQV2):
    """DrQ-v2 without augmentation, with CReLU in the hidden layers of the actor's MLP and both Q heads."""

    name = "drqv2-noaug-crelu"

    @dataclass
    class Config(DrQV2NoAug.Config):
        crelu: bool = True
        """CReLU activations; the Linear after each takes 2 x hidden_dim inputs (more parameters, same width)."""


# -- Training stages (Ma et al. Fig. 6): augmentation early only, or late only ------------------------------------
# At smoke the seed frames end at 800 of 1000 frames, after the switch at 500: the smoke preset starts updating at
# 400 so that both windows are exercised (a recorded deviation; the window itself is never overridden).
_STAGE_PRESETS: dict[str, dict[str, Any]] = {"smoke": {**SMOKE, "seed_frames": 400}, "quick": QUICK}


class DrQV2AugEarly(DrQV2):
    """DrQ-v2 with augmentation in the first half of training only."""

    name = "drqv2-aug-early"
    presets = _STAGE_PRESETS

    @dataclass
    class Config(Config):
        augment_until: float = 0.5
        """Augmentation switched off at half the run's frames (the fraction is our choice)."""


class DrQV2AugLate(DrQV2):
    """DrQ-v2 with augmentation in the second half of training only."""

    name = "drqv2-aug-late"
    presets = _STAGE_PRESETS

    @dataclass
    class Config(Config):
        augment_from: float = 0.5
        """Augmentation switched on at half the run's frames (the fraction is our choice)."""


# -- Frozen pretrained encoder (Ma et al. Fig. 4) ---------------------------------------------------------------
class DrQV2Frozen(DrQV2):
    """DrQ-v2 heads trained with augmentation on a frozen encoder pretrained by an augmented drqv2 run."""

    name = "drqv2-frozen"

    @dataclass
    class Config(Config):
        freeze_encoder: bool = True
        """The encoder never changes."""
        pretrain_encoder: bool = True
        """It is the final encoder of an augmented drqv2 run on the task (not ImageNet: see pretrained_encoder)."""

    def prepare(self, ctx: RunContext) -> None:
        """Build the shared pretrained encoder once, before the runs (shared with drqv2-noaug-frozen)."""
        pretrained_encoder(ctx, ctx.config)


class DrQV2NoAugFrozen(DrQV2Frozen):
    """DrQ-v2 heads trained without augmentation on the same frozen pretrained encoder as drqv2-frozen."""

    name = "drqv2-noaug-frozen"

    @dataclass
    class Config(DrQV2Frozen.Config):
        augment: bool = False
        """No augmentation for the heads' training."""
