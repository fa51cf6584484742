"""The source RL algorithm of Algorithm Distillation: batched A2C, one independent learner per task.

Paper: AD, Laskin et al. 2022, https://arxiv.org/abs/2210.14215 (Sec. 5: A3C generates the learning histories of
the Dark environments). A2C is the synchronous form of A3C (Mnih et al. 2016, https://arxiv.org/abs/1602.01783).

Why A2C and not PPO: A2C *is* the paper's A3C without the asynchrony, so its histories have the same character
(on-policy, one small gradient step per rollout, a policy that drifts gradually). PPO reuses each rollout for
several epochs of clipped updates and converges in far fewer episodes, which is the known failure mode for AD:
a history that jumps from random to optimal leaves nothing for the context to distil.

Why independent learners: AD distils *many single-task learning runs*. Every task ``i`` has its own parameters
(stacked tensors ``(n_tasks, ...)`` applied with gathers and ``einsum``), its own gradient-norm clip and its own
Adam moments (Adam is elementwise), and the loss is the *sum* of per-task losses, so
``d loss / d theta_i = d loss_i / d theta_i``. Action sampling draws one uniform number per task and step, so a
task's random stream never depends on another task's policy either. ``tests/test_source.py`` checks this.

What the learner sees: the source only has to *generate* histories, and the histories store what the env shows
(the cell index, or the maze's pixels); AD sees only that. The learner itself gets a one-hot of

* Dark Room: the cell (the env's own observation);
* Dark Key-to-Door: the privileged pair (cell, has_key) from the core. With the cell alone the optimal policy is
  not Markov (the same cell needs different actions before and after the key) and a feed-forward A2C stalls;
* the pixel maze: the core's privileged pose (cell, direction). A per-task CNN for each of the 38 train
  platforms is far too slow on a CPU, and the pose determines the image exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.evaluation import log_in_context
from bench.method import RunContext
from bench.registry import AdaptBenchError, load_target
from tasks.spec import TaskSpec

__all__ = ["BatchedA2C", "Config", "CoreAdapter", "SourceError", "SourceMethod", "TrainResult", "adapter_for",
           "train_learners"]


class SourceError(AdaptBenchError, ValueError):
    """A task the source learner cannot run (no batched core, unknown core type) or a bad setting."""


@dataclass
class Config:
    """A2C settings. The AD paper gives no A3C hyper-parameters, so the defaults are ours, tuned so that on Dark
    Room (quick: 64 goals x 1,000 episodes) the mean return rises from random (0.3 in the first 10 episodes) to
    near-optimal (16.3 of 16.5 in the last 10%) with the rise spread over episodes ~100-500."""

    lr: float = 2e-3
    """Adam step size of every task's learner."""
    gamma: float = 0.95
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda for the advantages (1 = Monte-Carlo returns, 0 = one-step TD)."""
    ent_coef: float = 0.02
    """Entropy bonus weight; keeps early episodes exploratory."""
    vf_coef: float = 0.5
    """Value-loss weight."""
    max_grad_norm: float = 0.5
    """Clip of each task's *own* gradient norm (a global clip would couple the tasks)."""
    hidden: int = 64
    """Width of the ReLU hidden layer on the one-hot input."""
    rollout_steps: int = 0
    """Steps per task between updates; 0 = one episode length."""
    subsample: int = 1
    """Learning histories keep episodes 0, k, 2k, ... (the AD paper's remedy when consecutive episodes differ too
    little for a finite context to see the improvement). The ``source`` method's own curve is never subsampled."""
    episodes: int = 0
    """``source`` method only: episodes learnt on each held-out task; 0 = ``budget.train_steps // episode length``
    (the source gets the same per-task budget on a held-out task as on a train task)."""

    def validate(self) -> None:
        for name in ("lr", "vf_coef"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        for name in ("ent_coef", "max_grad_norm", "rollout_steps", "episodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("hidden", "subsample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    def generator_key(self) -> dict[str, Any]:
        """The fields that determine a learning history (``episodes`` only concerns the method's own run)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "episodes"}


# --------------------------------------------------------------------------------------------- learner input
@dataclass(frozen=True)
class CoreAdapter:
    """How the learner and the histories read a family's batched core.

    ``learner_input(core) -> (n,) int`` indexes the one-hot the learner sees (``n_inputs`` values);
    ``visible(core) -> (n,) int`` is the compact index of what the *env* shows (``n_visible`` values): the cell
    for grid worlds, the pose for the pixel maze, whose image ``views[pose]`` is rendered on read.
    """

    n_inputs: int
    n_visible: int
    n_actions: int
    learner_input: Callable[[Any], np.ndarray]
    visible: Callable[[Any], np.ndarray]
    encoding: str
    """``"index"`` (the visible index is the observation) or ``"watermaze-pose"`` (rendered to pixels)."""


def adapter_for(core: Any) -> CoreAdapter:
    """The :class:`CoreAdapter` of a batched core of one of the built-in in-context families."""
    from tasks import gridworld, watermaze

    if isinstance(core, gridworld.KeyToDoorCore):
        c = core.size * core.size
        return CoreAdapter(2 * c, c, gridworld.NUM_ACTIONS, lambda k: k.cell + c * k.has_key, lambda k: k.cell,
                           "index")
    if isinstance(core, gridworld.GridCore):
        c = core.size * core.size
        return CoreAdapter(c, c, gridworld.NUM_ACTIONS, lambda k: k.cell, lambda k: k.cell, "index")
    if isinstance(core, watermaze.WatermazeCore):
        return CoreAdapter(watermaze.NUM_STATES, watermaze.NUM_STATES, watermaze.NUM_ACTIONS,
                           lambda k: k.state, lambda k: k.state, "watermaze-pose")
    raise SourceError(f"the source learner has no input encoding for core type {type(core).__name__}")


# --------------------------------------------------------------------------------------------- the network
class BatchedActorCritic(torch.nn.Module):
    """``n`` independent actor-critics ``one-hot(x) -> relu(hidden) -> (logits, value)``, stacked on axis 0.

    The first layer on a one-hot input is a row gather, so the network never builds the one-hot.
    """

    def __init__(self, n: int, n_inputs: int, n_actions: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()

        def randn(*shape: int, std: float) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=generator) * std)

        # unit-variance pre-activations; a near-zero policy head so every learner starts (almost) uniform
        self.w_in = randn(n, n_inputs, hidden, std=1.0)
        self.b_in = torch.nn.Parameter(torch.zeros(n, hidden))
        self.w_pi = randn(n, hidden, n_actions, std=0.01 / math.sqrt(hidden))
        self.b_pi = torch.nn.Parameter(torch.zeros(n, n_actions))
        self.w_v = randn(n, hidden, std=1.0 / math.sqrt(hidden))
        self.b_v = torch.nn.Parameter(torch.zeros(n))
        self.register_buffer("rows", torch.arange(n)[:, None], persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(n, L)`` input indices -> ``(n, L, hidden)``."""
        return torch.relu(self.w_in[self.rows, x] + self.b_in[:, None])

    def forward(self, x: torch.Tensor, return_hidden: bool = False) -> tuple[torch.Tensor, ...]:
        """``x``: ``(n, L)`` -> logits ``(n, L, actions)``, values ``(n, L)`` (and the ReLU layer ``(n, L, hidden)``
        with ``return_hidden``)."""
        h = self.features(x)
        logits = torch.einsum("nlh,nha->nla", h, self.w_pi) + self.b_pi[:, None]
        value = torch.einsum("nlh,nh->nl", h, self.w_v) + self.b_v[:, None]
        return (logits, value, h) if return_hidden else (logits, value)

    @torch.no_grad()
    def policy_table(self) -> np.ndarray:
        """Action probabilities of every input, ``(n, n_inputs, actions)`` float64 (fixed within a rollout)."""
        h = torch.relu(self.w_in + self.b_in[:, None])
        logits = torch.einsum("nlh,nha->nla", h, self.w_pi) + self.b_pi[:, None]
        return torch.softmax(logits.double(), dim=-1).numpy()


@dataclass
class Rollout:
    """One rollout of every task, arrays ``(n, L)``: learner inputs before / after each step, actions, rewards,
    terminations and episode ends (``done = terminated | truncated``)."""

    x: np.ndarray
    x_next: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    done: np.ndarray


class BatchedA2C:
    """A2C over ``n`` independent learners; :meth:`update` returns a metrics dict and never logs."""

    def __init__(self, n: int, adapter: CoreAdapter, cfg: Config, seed: int) -> None:
        self.cfg = cfg
        generator = torch.Generator().manual_seed(int(seed))  # never the global RNG: data must not follow ctx.seed
        self.net = BatchedActorCritic(n, adapter.n_inputs, adapter.n_actions, cfg.hidden, generator)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, eps=1e-5)

    def policy_table(self) -> np.ndarray:
        return self.net.policy_table()

    def losses(self, ro: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """The sum over tasks of each task's A2C loss (GAE advantages, bootstrapped at truncation)."""
        cfg = self.cfg
        x, x_next = torch.from_numpy(ro.x), torch.from_numpy(ro.x_next)
        logits, values, hidden = self.net(x, return_hidden=True)
        with torch.no_grad():
            _, next_values = self.net(x_next)
            rewards = torch.from_numpy(ro.rewards)
            # a truncated episode (time limit) still bootstraps from its last state; a terminated one does not
            delta = rewards + cfg.gamma * next_values * torch.from_numpy(~ro.terminated) - values
            carry = cfg.gamma * cfg.gae_lambda * torch.from_numpy(~ro.done).to(delta.dtype)
            adv = torch.zeros_like(delta)
            last = torch.zeros(delta.shape[0])
            for t in range(delta.shape[1] - 1, -1, -1):
                last = delta[:, t] + carry[:, t] * last
                adv[:, t] = last
            returns = adv + values
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, torch.from_numpy(ro.actions)[..., None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        pg = -(logp * adv).mean(1)
        vf = 0.5 * (values - returns).pow(2).mean(1)
        ent = entropy.mean(1)
        loss = (pg + cfg.vf_coef * vf - cfg.ent_coef * ent).sum()
        metrics = {"losses/policy": pg.mean().item(), "losses/value": vf.mean().item(),
                   "losses/entropy": ent.mean().item(),
                   # fraction of active units of the one hidden ReLU layer, on the loss's own forward pass
                   "fau/hidden": (hidden > 0).float().mean().item()}
        return loss, metrics

    def update(self, ro: Rollout) -> dict[str, float]:
        loss, metrics = self.losses(ro)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        if self.cfg.max_grad_norm > 0:
            params = [p for p in self.net.parameters() if p.grad is not None]
            # (n,): each task's own gradient norm
            sq = sum(p.grad.pow(2).reshape(p.shape[0], -1).sum(1) for p in params)
            norm = sq.sqrt()
            scale = (self.cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad.mul_(scale.view(-1, *([1] * (p.dim() - 1))))
            metrics["losses/grad_norm"] = float(norm.mean())
        self.opt.step()
        return metrics


# --------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    """What :func:`train_learners` returns. ``episode_returns[i]``: the returns of task ``i``'s completed
    episodes in order. With ``record`` the per-step arrays ``(n, steps)`` of the whole history."""

    episode_returns: list[list[float]]
    steps: int
    learner: BatchedA2C
    """The learners after the last update (their parameters: ``learner.net``)."""
    visible: np.ndarray | None = None
    actions: np.ndarray | None = None
    rewards: np.ndarray | None = None
    dones: np.ndarray | None = None


def train_learners(
    core: Any,
    cfg: Config,
    seed: int,
    *,
    episode_length: int,
    steps: int | None = None,
    episodes: int | None = None,
    record: bool = False,
    progress: Callable[[float, str], None] | None = None,
    on_update: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Run one independent A2C learner per env of ``core`` (one env per task), with automatic resets.

    Stops after ``steps`` steps per task, or once every task has completed ``episodes`` episodes. ``seed`` fixes
    the initial parameters and the action sampling. ``on_update(step, metrics)`` sees every update's metrics.
    """
    if (steps is None) == (episodes is None):
        raise SourceError("give exactly one of steps and episodes")
    adapter = adapter_for(core)
    n = core.num_envs
    rollout = cfg.rollout_steps or episode_length
    learner = BatchedA2C(n, adapter, cfg, seed)
    rng = np.random.default_rng(seed)
    rows = np.arange(n)
    # episodes never last longer than episode_length, so `episodes` episodes fit in this many steps
    limit = steps if steps is not None else episodes * episode_length  # type: ignore[operator]
    vis_dtype = np.uint8 if adapter.n_visible <= 256 else np.uint16
    rec = None
    if record:
        rec = dict(visible=np.zeros((n, limit), vis_dtype), actions=np.zeros((n, limit), np.uint8),
                   rewards=np.zeros((n, limit), np.float32), dones=np.zeros((n, limit), bool))
    returns: list[list[float]] = [[] for _ in range(n)]
    ep_return = np.zeros(n)
    core.reset()
    t = 0
    while t < limit:
        length = min(rollout, limit - t)
        buf = Rollout(x=np.zeros((n, length), np.int64), x_next=np.zeros((n, length), np.int64),
                      actions=np.zeros((n, length), np.int64), rewards=np.zeros((n, length), np.float32),
                      terminated=np.zeros((n, length), bool), done=np.zeros((n, length), bool))
        cum = np.cumsum(learner.policy_table(), axis=-1)
        for k in range(length):
            x = adapter.learner_input(core)
            if rec is not None:
                rec["visible"][:, t] = adapter.visible(core)
            # inverse-CDF sampling with one uniform per task: no task's draws depend on another's policy
            u = rng.random(n)
            a = np.minimum((cum[rows, x] < u[:, None]).sum(axis=1), adapter.n_actions - 1).astype(np.int64)
            _, r, term, trunc = core.step(a)
            done = term | trunc
            buf.x[:, k], buf.x_next[:, k], buf.actions[:, k] = x, adapter.learner_input(core), a
            buf.rewards[:, k], buf.terminated[:, k], buf.done[:, k] = r, term, done
            if rec is not None:
                rec["actions"][:, t], rec["rewards"][:, t], rec["dones"][:, t] = a, r, done
            ep_return += r
            if done.any():
                for i in np.flatnonzero(done):
                    returns[i].append(float(ep_return[i]))
                ep_return[done] = 0.0
                core.reset(done)
            t += 1
        metrics = learner.update(buf)
        if on_update is not None:
            on_update(t, metrics)
        if progress is not None:
            progress(t / limit, f"A2C step {t}/{limit} per task")
        if episodes is not None and min(len(r) for r in returns) >= episodes:
            break
    out = TrainResult(episode_returns=returns, steps=t, learner=learner)
    if rec is not None:
        out.visible, out.actions = rec["visible"][:, :t], rec["actions"][:, :t]
        out.rewards, out.dones = rec["rewards"][:, :t], rec["dones"][:, :t]
    return out


def make_core(spec: TaskSpec, tasks: Sequence[Any]) -> Any:
    """The family's batched core running ``tasks`` (one env per task)."""
    if spec.batched_core is None:
        raise SourceError(f"task `{spec.id}` has no batched core; the source learner needs one")
    return load_target(spec.batched_core)(spec, list(tasks))


# --------------------------------------------------------------------------------------------- the method
class SourceMethod:
    """The source algorithm on the leaderboard: A2C learns every held-out task from scratch; its learning curve
    (mean return over held-out tasks of episode ``k``) is logged as ``eval/return`` at ``axis="episode"``, the
    same axis as AD's in-context episodes, so "AD needs fewer episodes than its source" reads off one plot."""

    name = "source-a2c"
    Config = Config
    # quick = the defaults (tuned for the quick budgets); smoke: a smaller, faster learner so that even 100
    # smoke episodes show learning
    presets = {"smoke": {"hidden": 32, "lr": 1e-2}, "quick": {}}

    def supports(self, task: TaskSpec) -> bool | str:
        if task.family != "in-context":
            return f"`{task.id}` is not an in-context task"
        if task.batched_core is None:
            return f"`{task.id}` has no batched core"
        if task.source_learner is not None:
            return f"`{task.id}`'s source algorithm is `{task.source_learner}`, not A2C"
        return True

    def run(self, ctx: RunContext) -> None:
        cfg: Config = ctx.config if ctx.config is not None else Config()
        spec = ctx.task
        test = spec.test_split(ctx.preset)
        episodes = cfg.episodes or max(1, ctx.budget.train_steps // spec.episode_length)
        core = make_core(spec, test)
        every = max(1, episodes // 100)

        def on_update(step: int, metrics: dict[str, float]) -> None:
            if (step // (cfg.rollout_steps or spec.episode_length)) % every == 0:
                ctx.log(step, metrics, axis="env_step")

        result = train_learners(core, cfg, ctx.seed, episode_length=spec.episode_length, episodes=episodes,
                                progress=ctx.progress, on_update=on_update)
        log_in_context(ctx, np.array([r[:episodes] for r in result.episode_returns]))  # (held-out tasks, episodes)
