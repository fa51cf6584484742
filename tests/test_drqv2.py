"""DrQ-v2 and its plasticity switches: augmentation, replay (stacking, n-step), FAU hooks, Reset, Plasticity
Injection, ARR, checkpoint / resume, and every registered variant end to end at the smoke preset."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from baselines import drqv2
from baselines.drqv2 import (
    QUICK,
    QUICK_STD_BUDGET,
    Config,
    DrQV2,
    DrQV2Agent,
    DrQV2ARR,
    DrQV2NoAug,
    Linear,
    RandomShiftsAug,
    Trainer,
)
from baselines.plasticity import AdaptiveReplayRatio, FAUMonitor, UpdateSchedule
from baselines.replay import EmptyReplayError, FrameReplay
from bench import cli
from bench.config import config_to_dict, resolve_config
from bench.method import ArtifactCache, RunContext, RunLogger
from bench.runner import check_task_presets, make_plan, paper_deviations, seed_everything
from tasks import get_task
from tasks.spec import Budget

VARIANTS = ["drqv2", "drqv2-noaug", "drqv2-rr1", "drqv2-rr2", "drqv2-arr", "drqv2-noaug-reset", "drqv2-noaug-inject"]
TASK = "DMC-cartpole-swingup-v0"
SMALL = dataclasses.replace(Config(), **drqv2.SMOKE)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("preset", ["smoke", "quick", "paper"])
def test_aug_is_the_only_difference_from_noaug(preset):
    with_aug = config_to_dict(resolve_config(DrQV2(), preset))
    without = config_to_dict(resolve_config(DrQV2NoAug(), preset))
    assert {k for k in with_aug if with_aug[k] != without[k]} == {"augment"}
    assert with_aug["augment"] is True and without["augment"] is False


def test_paper_defaults_and_task_overrides():
    cfg = Config()
    assert (cfg.hidden_dim, cfg.feature_dim, cfg.lr, cfg.batch_size, cfg.nstep, cfg.tau) == (1024, 50, 1e-4, 256, 3,
                                                                                           0.01)
    assert (cfg.seed_frames, cfg.std_schedule, cfg.std_clip, cfg.replay_ratio) == (4000, Linear(1.0, 0.1, 200_000),
                                                                                   0.3, 0.5)
    method = DrQV2()
    walker = resolve_config(method, "paper", task="DMC-walker-walk-v0")
    assert (walker.nstep, walker.batch_size) == (1, 512)
    quad = resolve_config(method, "paper", task="DMC-quadruped-run-v0")
    assert quad.buffer_size == 100_000 and quad.std_schedule == Linear(1.0, 0.1, 1_000_000)  # a medium task
    assert resolve_config(method, "paper", task=TASK) == cfg
    # a preset's explicit value wins over the per-task one; the others still apply
    quick = resolve_config(method, "quick")
    quick_walker = resolve_config(method, "quick", task="DMC-walker-walk-v0")
    assert (quick_walker.batch_size, quick_walker.nstep) == (quick.batch_size, 1)
    assert resolve_config(method, "quick", task="DMC-walker-run-v0").std_schedule == quick.std_schedule  # medium,
    # but quick sets the std (40k-frame budget)
    # and the command line wins over both
    assert resolve_config(method, "quick", {"nstep": "3"}, task="DMC-walker-walk-v0").nstep == 3
    assert Linear(1.0, 0.1, 100)(0) == 1.0 and Linear(1.0, 0.1, 100)(50) == pytest.approx(0.55)
    assert Linear(1.0, 0.1, 100)(10**6) == pytest.approx(0.1)


def test_quick_keeps_the_papers_exploration_schedule_on_tasks_with_a_longer_quick_budget():
    """Quick's 20k-frame std schedule is for its 40k-frame budget; a task with a longer quick budget (100k frames)
    explores as the paper's run does over those frames: the easy tasks' 200k-frame schedule, the medium ones' 1M."""
    method = DrQV2()
    assert resolve_config(method, "quick", task=TASK).std_schedule == Linear(1.0, 0.1, 20_000)  # 40k frames
    for task, frames in [("DMC-finger-spin-v0", 200_000), ("DMC-ball_in_cup-catch-v0", 200_000),
                         ("DMC-reacher-easy-v0", 1_000_000), ("DMC-cheetah-run-v0", 1_000_000)]:
        assert get_task(task).budget("quick").train_steps > QUICK_STD_BUDGET
        cfg = resolve_config(method, "quick", task=task)
        assert cfg.std_schedule == Linear(1.0, 0.1, frames) == resolve_config(method, "paper", task=task).std_schedule
        assert "std_schedule" not in paper_deviations(method, cfg, task)
        assert (cfg.batch_size, cfg.hidden_dim) == (32, 256)  # the rest of quick holds
    assert "std_schedule" in paper_deviations(method, resolve_config(method, "quick", task=TASK), TASK)
    # both agents of the augmentation comparison, and the variants built on QUICK, explore alike
    assert resolve_config(DrQV2NoAug(), "quick", task="DMC-finger-spin-v0").std_schedule == Linear(1.0, 0.1, 200_000)
    # a method whose quick preset sets its own schedule keeps it
    own = type("OwnStd", (DrQV2,), {"name": "drqv2-own-std",
                                    "presets": {"quick": {**QUICK, "std_schedule": Linear(1.0, 0.2, 5_000)}}})()
    assert resolve_config(own, "quick", task="DMC-finger-spin-v0").std_schedule == Linear(1.0, 0.2, 5_000)


def test_task_settings_reach_the_plan_id_and_deviations():
    """The reference's per-task settings are in a run's config and id (a walker run's record says n-step 1) and
    count as deviations only where the preset departs from the paper *on that task*."""
    plan = make_plan(["drqv2"], ["DMC-walker-walk-v0", TASK], [0], "quick")
    walker, cartpole = plan.cells
    assert walker.config["nstep"] == 1 and cartpole.config["nstep"] == 3
    assert walker.run_id.split(".")[-1] != make_plan(["drqv2"], ["DMC-walker-walk-v0"], [0], "quick",
                                                     {"drqv2": {"nstep": "3"}}).cells[0].run_id.split(".")[-1]
    method = DrQV2()
    at_paper = resolve_config(method, "paper", task="DMC-walker-walk-v0")
    assert paper_deviations(method, at_paper, "DMC-walker-walk-v0") == {}
    quick = paper_deviations(method, resolve_config(method, "quick", task="DMC-walker-walk-v0"), "DMC-walker-walk-v0")
    assert quick["batch_size"] == [512, 32] and "nstep" not in quick
    # every entry names a registered task and a real field (the plan's check)
    check_task_presets(method)
    assert "DMC-walker-run-v0" in method.task_presets["quick"]


def test_plugin_dmc_task_gets_its_domains_reference_settings(monkeypatch):
    """A control task registered by a plugin gets the settings of its DMC domain like a built-in one."""
    import dataclasses as dc

    import tasks

    stand = dc.replace(get_task("DMC-walker-walk-v0"), id="Plugin-walker-stand-v0",
                       kwargs={**get_task("DMC-walker-walk-v0").kwargs, "task": "stand"})
    monkeypatch.setattr(tasks, "list_tasks", lambda: [stand])
    assert DrQV2().task_presets["quick"] == {"Plugin-walker-stand-v0": {"nstep": 1}}
    # the reference's hard tasks (humanoid) too, though the registry ships none
    run = dc.replace(stand, id="Plugin-humanoid-run-v0", kwargs={**stand.kwargs, "domain": "humanoid", "task": "run"})
    monkeypatch.setattr(tasks, "list_tasks", lambda: [run])
    assert DrQV2().task_presets["paper"] == {"Plugin-humanoid-run-v0": {
        "std_schedule": Linear(1.0, 0.1, 4_000_000), "lr": 8e-5, "feature_dim": 100}}
    assert DrQV2().task_presets["quick"] == {"Plugin-humanoid-run-v0": {"lr": 8e-5, "feature_dim": 100}}


def test_quick_arr_interval_is_a_recorded_deviation():
    method = DrQV2ARR()
    deviations = paper_deviations(method, resolve_config(method, "quick"))
    assert deviations["arr_interval_episodes"] == [50, 5]
    assert deviations["arr_from_first_update"] == [False, True]
    assert paper_deviations(method, resolve_config(method, "paper")) == {}


# ---------------------------------------------------------------------------------------------- augmentation
def _grid_sample_shift(x: torch.Tensor, shift: torch.Tensor, pad: int) -> torch.Tensor:
    """The reference's RandomShiftsAug (facebookresearch/drqv2) for given integer shifts ``(n, 2)``."""
    n, _, h, _ = x.shape
    x = F.pad(x, (pad,) * 4, mode="replicate")
    eps = 1.0 / (h + 2 * pad)
    arange = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad)[:h]
    arange = arange.unsqueeze(0).repeat(h, 1).unsqueeze(2)
    base = torch.cat([arange, arange.transpose(1, 0)], dim=2).unsqueeze(0).repeat(n, 1, 1, 1)
    grid = base + shift.float().view(n, 1, 1, 2) * 2.0 / (h + 2 * pad)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def test_random_shift_is_a_replicate_padded_crop():
    x = torch.randint(0, 256, (64, 9, 84, 84)).float()
    aug = RandomShiftsAug(4)
    torch.manual_seed(0)
    out = aug(x)
    torch.manual_seed(0)
    shift = torch.randint(0, 9, (64, 2))  # the draws the augmentation made
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="edge")  # replicate = numpy's edge
    for i in range(64):
        dx, dy = shift[i].tolist()
        np.testing.assert_array_equal(out[i].numpy(), padded[i, :, dy:dy + 84, dx:dx + 84])
    assert len({tuple(s) for s in shift.tolist()}) > 20  # shifts vary per image
    # the reference's grid_sample formulation gives the same image up to its bilinear weights' rounding
    torch.testing.assert_close(out, _grid_sample_shift(x, shift, 4), atol=0.01, rtol=0)  # pixels in [0, 255]


def test_obs_and_next_obs_are_shifted_independently():
    x = torch.randint(0, 256, (32, 9, 84, 84)).float()
    aug = RandomShiftsAug(4)
    a, b = aug(x), aug(x)  # the agent calls it once for obs, once for next obs
    assert sum(not torch.equal(a[i], b[i]) for i in range(32)) > 20
    assert torch.equal(RandomShiftsAug(0)(x), x)


# ---------------------------------------------------------------------------------------------- replay
def _frame(episode: int, t: int) -> np.ndarray:
    f = np.zeros((3, 4, 4), np.uint8)
    f[0], f[1] = episode, t  # identifies the slot: channel 0 = episode, channel 1 = time step
    return f


def _fill(rb: FrameReplay, lengths: list[int], terminate_last: bool = False) -> dict[tuple[int, int], float]:
    """Episodes of the given lengths; reward of step t in episode e is e * 100 + t. Returns the rewards."""
    rewards = {}
    for e, length in enumerate(lengths):
        rb.add_first(np.concatenate([_frame(e, 0)] * 3))
        for t in range(length):
            r = e * 100 + t
            rewards[(e, t)] = r
            end = t == length - 1
            rb.add([t / 10], r, terminate_last and end, end and not terminate_last,
                   np.concatenate([_frame(e, max(t + 1 - k, 0)) for k in (2, 1, 0)]))
    return rewards


@pytest.mark.parametrize("terminated", [False, True])
def test_nstep_returns_at_episode_ends(terminated):
    n, gamma, length = 3, 0.9, 5
    rb = FrameReplay(100, (3, 4, 4), 1, 3, n, gamma, np.random.default_rng(0))
    rewards = _fill(rb, [length, length], terminate_last=terminated)
    batch = rb.sample(512)
    seen = set()
    for i in range(512):
        e, t = int(batch["obs"][i, -3, 0, 0]), int(batch["obs"][i, -2, 0, 0])
        k = min(n, length - t)  # the window stops at the episode's end
        expected = sum(gamma**j * rewards[(e, t + j)] for j in range(k))
        assert batch["reward"][i, 0] == pytest.approx(expected, rel=1e-6)
        ends_inside = t + k == length
        assert batch["discount"][i, 0] == pytest.approx(0.0 if terminated and ends_inside else gamma**k)
        assert (int(batch["next_obs"][i, -3, 0, 0]), int(batch["next_obs"][i, -2, 0, 0])) == (e, t + k)
        assert batch["action"][i, 0] == pytest.approx(t / 10)
        seen.add((e, t))
    assert seen == {(e, t) for e in range(2) for t in range(length)}  # the last steps are sampled too


def test_incomplete_windows_and_stale_slots_are_never_sampled():
    n = 3
    rb = FrameReplay(20, (3, 4, 4), 1, 3, n, 0.99, np.random.default_rng(1))
    with pytest.raises(EmptyReplayError):
        rb.sample(4)
    _fill(rb, [6, 6, 6])  # 21 slots in a ring of 20: the first episode's first frame is overwritten
    rb.add_first(np.concatenate([_frame(3, 0)] * 3))
    rb.add([0.0], 1.0, False, False, np.concatenate([_frame(3, 0), _frame(3, 0), _frame(3, 1)]))
    batch = rb.sample(2000)
    episodes, steps = batch["obs"][:, 0::3, 0, 0], batch["obs"][:, 1::3, 0, 0]  # per stacked frame
    # every stacked frame belongs to the sampled episode and is contiguous up to the clamp at t = 0
    for i in range(2000):
        e, t = int(episodes[i, -1]), int(steps[i, -1])
        assert set(episodes[i].tolist()) == {e}, "a stack mixes episodes"
        assert steps[i].tolist() == [max(t - 2, 0), max(t - 1, 0), t]
        assert e != 3, "the in-progress episode has no complete 3-step window yet"
        assert not (e == 0 and t < 2), "stacks needing overwritten frames are not sampled"


def test_stack_on_sampling_equals_the_envs_stacked_obs():
    env = get_task(TASK).make()
    rb = FrameReplay(200, (3, 84, 84), 1, 3, 1, 0.99, np.random.default_rng(0))
    obs, _ = env.reset(seed=3)
    rb.add_first(obs)
    seen = [obs]
    rng = np.random.default_rng(0)
    for _ in range(12):
        a = rng.uniform(-1, 1, 1).astype(np.float32)
        obs, r, term, trunc, _ = env.step(a)
        rb.add(a, r, term, trunc, obs)
        seen.append(obs)
    env.close()
    stacked = rb._stack(np.arange(len(seen)))
    for i, expected in enumerate(seen):
        np.testing.assert_array_equal(stacked[i], expected)
    per_transition = 9 * 84 * 84 * 2  # the reference stores obs and next_obs stacked
    assert rb.frames[0].nbytes * 6 == per_transition  # one frame per slot: 6x less


def test_replay_save_load_is_incremental_and_exact(tmp_path):
    def make():
        return FrameReplay(30, (3, 4, 4), 1, 3, 2, 0.9, np.random.default_rng(5))

    a = make()
    _fill(a, [4, 5])  # slots 0..10
    first = a.save(tmp_path)
    _fill(a, [7, 8])  # slots 11..27
    second = a.save(tmp_path)
    assert [c[1:] for c in second["chunks"]] == [[0, 11], [11, 28]]  # only the new slots are written
    _fill(a, [14])  # slots 28..42 wrap the ring of 30: slots 0..12 are overwritten
    manifest = a.save(tmp_path)
    assert first["chunks"][0][0] not in FrameReplay.chunk_names(manifest)  # no live slot left in it
    assert [c[1:] for c in manifest["chunks"]] == [[11, 28], [28, 43]]  # the older one partly live
    b = make()
    b.load(tmp_path, manifest)
    for field in ("frames", "actions", "rewards", "discounts", "t", "last"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    sa, sb = a.sample(64), b.sample(64)  # the sampling RNG is restored too
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key])


# ---------------------------------------------------------------------------------------------- agent
def _batch(rng: np.random.Generator, n: int = 8, size: int = 84) -> dict[str, np.ndarray]:
    return {"obs": rng.integers(0, 256, (n, 9, size, size), dtype=np.uint8),
            "action": rng.uniform(-1, 1, (n, 1)).astype(np.float32),
            "reward": rng.uniform(0, 1, (n, 1)).astype(np.float32),
            "discount": np.full((n, 1), 0.99**3, np.float32),
            "next_obs": rng.integers(0, 256, (n, 9, size, size), dtype=np.uint8)}


def _fau_direct(layers: list[torch.Tensor]) -> float:
    return sum(int((x > 0).sum()) for x in layers) / sum(x.numel() for x in layers)


def test_fau_hooks_match_a_direct_computation_without_extra_forwards():
    torch.manual_seed(0)
    agent = DrQV2Agent((9, 84, 84), 1, SMALL)
    before = copy.deepcopy(agent)
    batch = _batch(np.random.default_rng(0))
    calls = {"encoder": 0, "critic": 0, "critic_target": 0, "actor": 0}
    for name in calls:
        getattr(agent, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    torch.manual_seed(1)
    agent.update(batch, 10_000)
    # no forward pass beyond those of the losses: encoder on obs and next obs, critic for its loss and the
    # actor's, the target once, the actor for the target action and its own loss
    assert calls == {"encoder": 2, "critic": 2, "critic_target": 1, "actor": 2}

    torch.manual_seed(1)  # the same augmentation draws as inside update()
    obs = before.aug(torch.as_tensor(batch["obs"]).float())
    x = obs / 255.0 - 0.5
    conv = []
    for m in before.encoder.convnet:
        x = m(x)
        if isinstance(m, torch.nn.ReLU):
            conv.append(x)
    h = x.flatten(1)
    z = torch.cat([before.critic.trunk(h), torch.as_tensor(batch["action"])], dim=-1)
    heads = []
    for q in (before.critic.Q1, before.critic.Q2):
        a1 = torch.relu(q[0](z))
        heads += [a1, torch.relu(q[2](a1))]
    p1 = torch.relu(before.actor.policy[0](before.actor.trunk(h)))
    actor = [p1, torch.relu(before.actor.policy[2](p1))]
    assert agent.fau.mean("critic") == pytest.approx(_fau_direct(heads), abs=1e-6)
    assert agent.fau.mean("encoder") == pytest.approx(_fau_direct(conv), abs=1e-6)
    assert agent.fau.mean("actor") == pytest.approx(_fau_direct(actor), abs=1e-6)
    assert agent.fau.take("critic") is not None and agent.fau.mean("critic") is None  # take() starts a new pool


def test_fau_monitor_records_only_inside_record():
    relu = torch.nn.ReLU()
    mon = FAUMonitor()
    mon.watch("g", [relu])
    relu(torch.tensor([1.0, -1.0]))
    assert mon.mean("g") is None
    with mon.record("g"):
        relu(torch.tensor([1.0, -1.0, 2.0, 3.0]))
    assert mon.mean("g") == 0.75
    with pytest.raises(KeyError):
        with mon.record("nope"):
            pass


def test_reset_reinitialises_heads_keeps_encoder():
    torch.manual_seed(0)
    agent = DrQV2Agent((9, 84, 84), 1, SMALL)
    agent.update(_batch(np.random.default_rng(0)), 10_000)
    enc = copy.deepcopy(agent.encoder.state_dict())
    enc_opt = copy.deepcopy(agent.encoder_opt.state_dict())
    actor, critic = copy.deepcopy(agent.actor.state_dict()), copy.deepcopy(agent.critic.state_dict())
    agent.reset_heads()
    for k, v in agent.encoder.state_dict().items():
        assert torch.equal(v, enc[k])
    assert agent.encoder_opt.state_dict()["state"].keys() == enc_opt["state"].keys()
    for old, new in ((actor, agent.actor.state_dict()), (critic, agent.critic.state_dict())):
        weights = [k for k in old if k.endswith("weight") and old[k].dim() == 2]
        assert all(not torch.equal(old[k], new[k]) for k in weights)
    for k, v in agent.critic.state_dict().items():
        assert torch.equal(v, agent.critic_target.state_dict()[k])
    assert not agent.actor_opt.state and not agent.critic_opt.state  # Adam's moments restart
    agent.update(_batch(np.random.default_rng(1)), 10_000)  # and it still trains


def test_injection_leaves_the_output_unchanged():
    torch.manual_seed(0)
    agent = DrQV2Agent((9, 84, 84), 1, SMALL)
    agent.update(_batch(np.random.default_rng(0)), 10_000)
    h = torch.randn(16, agent.encoder.repr_dim)
    a = torch.rand(16, 1) * 2 - 1
    with torch.no_grad():
        q_before, t_before = agent.critic(h, a), agent.critic_target(h, a)
    originals = copy.deepcopy(agent.critic.Q1.state_dict())
    agent.inject()
    with torch.no_grad():
        q_after, t_after = agent.critic(h, a), agent.critic_target(h, a)
    for x, y in zip(q_before + t_before, q_after + t_after):
        assert torch.equal(x, y)
    agent.update(_batch(np.random.default_rng(1)), 10_000)
    for k, v in originals.items():  # the trained heads are frozen; the fresh ones learn
        assert torch.equal(agent.critic.Q1.original.state_dict()[k], v)
    assert not torch.equal(agent.critic.Q1.fresh[0].weight, agent.critic.Q1.anchor[0].weight)
    assert agent.fau.mean("critic") is not None  # the FAU now watches the fresh heads
    with torch.no_grad():
        assert not torch.equal(agent.critic(h, a)[0], q_before[0])


# ---------------------------------------------------------------------------------------------- replay ratio
def test_update_schedule_counts():
    for ratio, expected in ((0.5, [1, 0, 1, 0]), (1.0, [1, 1, 1, 1]), (2.0, [2, 2, 2, 2])):
        sched = UpdateSchedule(ratio)
        got = [sched.due() for _ in range(8)]
        assert sum(got) == int(8 * ratio)
        assert got[:4] == expected
    with pytest.raises(ValueError):
        UpdateSchedule(0.0)


def test_arr_switches_once_when_fau_settles():
    arr = AdaptiveReplayRatio(low=0.5, high=2.0, interval=2, threshold=0.001)
    assert arr.ratio == 0.5 and not arr.end_episode(2, 0.4, 2000)  # no baseline before the first update
    arr.start(0.5)
    arr.start(0.9)  # only the first update's FAU counts
    # a fake per-episode critic FAU: falls, recovers, then settles
    faus = [0.45, 0.40, 0.30, 0.31, 0.36, 0.3605, 0.36, 0.3604, 0.36, 0.3]
    switched = [ep for ep, fau in enumerate(faus, 1) if arr.end_episode(ep, fau, ep * 1000)]
    # checks at episodes 2, 4, 6, 8: |0.40-0.5|, |0.31-0.40|, |0.3605-0.31|, |0.3604-0.3605| <= 0.001
    assert switched == [8] and arr.switched_at == 8000 and arr.ratio == 2.0
    assert not arr.end_episode(10, 0.3, 10_000)  # once
    clone = AdaptiveReplayRatio()
    clone.load_state_dict(arr.state_dict())
    assert clone == arr
    assert not AdaptiveReplayRatio(interval=1).end_episode(1, None, 0)


def test_arr_interval_counted_from_the_first_update():
    """Updates start after 4 seed episodes. Counted from the run's start (the reference) the first check, at
    episode 5, compares the first update's FAU with one episode of training; counted from the first update it is
    at episode 9, after 5 episodes of training, then every 5."""
    faus = {ep: 0.5 for ep in range(5, 30)}  # a critic whose FAU has not moved from the first update's 0.5
    for from_first, first_check in ((False, 5), (True, 9)):
        arr = AdaptiveReplayRatio(interval=5, threshold=0.001, from_first_update=from_first)
        for ep in range(1, 5):
            assert not arr.end_episode(ep, None, ep * 1000)  # seed episodes: no update, no FAU
        arr.start(0.5, episode=4)
        switched = [ep for ep, fau in faus.items() if arr.end_episode(ep, fau, ep * 1000)]
        assert switched == [first_check] and arr.switched_at == first_check * 1000
    arr = AdaptiveReplayRatio(interval=5, from_first_update=True)
    arr.start(0.5, episode=4)
    checked = []
    for ep in range(5, 30):
        before = arr.previous
        arr.end_episode(ep, 0.5 + ep / 100, ep * 1000)  # moving: never switches, every check updates `previous`
        if arr.previous != before:
            checked.append(ep)
    assert checked == [9, 14, 19, 24, 29] and arr.switched_at is None
    clone = AdaptiveReplayRatio()
    clone.load_state_dict(arr.state_dict())
    assert clone == arr and clone.first_update_episode == 4


# ---------------------------------------------------------------------------------------------- checkpoint
class _ShortEpisodes(Trainer):
    """Episodes of 50 agent steps (dm_control's own time limit shortened), so a test sees several."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for env in (self.env, self.eval_env):
            env.unwrapped._env._step_limit = 100  # control steps: 50 agent steps at action repeat 2


def _ctx(checkpoint_dir: Path, cache: Path, config: Config) -> RunContext:
    spec = get_task(TASK)
    seed_everything(7)  # as the harness does before every run
    budget = Budget(train_steps=600, eval_episodes=1, eval_every=200)
    return RunContext(task=spec, seed=7, preset="smoke", budget=budget, config=config, device="cpu", log=RunLogger(),
                      checkpoint_dir=checkpoint_dir, cache=ArtifactCache(cache), rng=np.random.default_rng(7))


class _Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    {"arr": True, "arr_interval_episodes": 1, "arr_threshold": 1.0, "arr_high_ratio": 1.0},  # switches at 400
    {"augment": False, "inject_at_frame": 300, "reset_interval_frames": 500},  # injected before, reset after
])
def test_checkpoint_resume_continues_the_curve_exactly(tmp_path, monkeypatch, variant):
    cfg = dataclasses.replace(SMALL, seed_frames=300, batch_size=2, **variant)
    full = _ctx(tmp_path / "full", tmp_path / "cache", cfg)
    _ShortEpisodes(full, cfg).train()  # checkpoints at frames 200, 400, 600

    save, saves = Trainer.save_checkpoint, []

    def save_then_die(self):
        save(self)
        saves.append(self.frame)
        if len(saves) == 2:
            raise _Killed  # the process dies right after its checkpoint at frame 400 of 600

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    killed = _ctx(tmp_path / "ckpt", tmp_path / "cache", cfg)
    with pytest.raises(_Killed):
        _ShortEpisodes(killed, cfg).train()
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    assert [p.name for p in (tmp_path / "ckpt").glob("ckpt-*")] == ["ckpt-000000000400"]  # older ones removed
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))

    resumed = _ctx(tmp_path / "ckpt", tmp_path / "cache", cfg)
    trainer = _ShortEpisodes(resumed, cfg)
    trainer.train()
    a, b = pd.DataFrame(full.log.rows), pd.DataFrame(resumed.log.rows)
    assert list(zip(a.axis, a.step, a.key)) == list(zip(b.axis, b.step, b.key))  # no gap, no repeat
    assert not b.duplicated(["axis", "step", "key"]).any()
    assert b[b.key == "eval/return"].step.tolist() == [0, 200, 400, 600]
    # exact determinism: the same seed gives the same values after a kill and resume
    np.testing.assert_array_equal(a.value.to_numpy(), b.value.to_numpy())
    if cfg.arr:
        assert b[b.key == "charts/arr_switch_frame"].value.tolist() == [400.0]  # stored in the checkpoint
        assert trainer.schedule.ratio == 1.0
    else:
        assert trainer.agent.injected


def test_checkpoint_written_with_another_config_is_refused(tmp_path):
    cfg = resolve_config(DrQV2(), "smoke", task=TASK)
    trainer = Trainer(_ctx(tmp_path / "ckpt", tmp_path / "cache", cfg), cfg)
    trainer.replay.add_first(np.zeros((9, 84, 84), np.uint8))
    trainer.save_checkpoint()
    other_cfg = dataclasses.replace(cfg, lr=1e-3)
    other = Trainer(_ctx(tmp_path / "ckpt", tmp_path / "cache", other_cfg), other_cfg)
    with pytest.raises(drqv2.CheckpointError, match="another config"):
        other.resume()
    # a checkpoint written before a later field (OMIT_DEFAULT_FROM_RUN_ID) existed still resumes at its default...
    (state_file,) = (tmp_path / "ckpt").glob("ckpt-*/state.json")
    state = json.loads(state_file.read_text())
    del state["config"]["arr_from_first_update"]
    state_file.write_text(json.dumps(state))
    same = Trainer(_ctx(tmp_path / "ckpt", tmp_path / "cache", cfg), cfg)
    same.resume()
    # ...and is refused by a run that sets the field
    later_cfg = dataclasses.replace(cfg, arr_from_first_update=True)
    later = Trainer(_ctx(tmp_path / "ckpt", tmp_path / "cache", later_cfg), later_cfg)
    with pytest.raises(drqv2.CheckpointError, match="another config"):
        later.resume()
    for t in (trainer, other, same, later):
        t.env.close()
        t.eval_env.close()


def test_arr_flag_keeps_the_stored_drqv2_run_ids():
    """``arr_from_first_update`` came after the committed runs: at its default it stays out of the run id (the
    plan finds those runs), and drqv2-arr's quick preset, which sets it, gets new ids."""
    from bench.runner import make_plan

    cell = make_plan(["drqv2"], [TASK], [0], "quick").cells[0]
    assert cell.config["arr_from_first_update"] is False and cell.id_omit == ("arr_from_first_update",)
    before = dataclasses.replace(cell, config={k: v for k, v in cell.config.items() if k != "arr_from_first_update"},
                                 id_omit=())
    assert cell.run_id == before.run_id
    arr = make_plan(["drqv2-arr"], [TASK], [0], "quick").cells[0]
    assert arr.config["arr_from_first_update"] is True and arr.id_omit == ()


@pytest.mark.slow
def test_arr_before_its_switch_is_drqv2_and_counts_from_the_first_update(tmp_path):
    """ARR that never switches (threshold below any FAU change) logs exactly DrQ-v2's curve, and the Trainer hands
    the episode of the first update to the rule (3 seed episodes of 100 frames here)."""
    cfg = dataclasses.replace(SMALL, seed_frames=300, batch_size=2)
    arr_cfg = dataclasses.replace(cfg, arr=True, arr_interval_episodes=1, arr_threshold=0.0,
                                  arr_from_first_update=True)
    rows = []
    for i, c in enumerate((cfg, arr_cfg)):
        ctx = _ctx(tmp_path / f"ckpt{i}", tmp_path / "cache", c)
        trainer = _ShortEpisodes(ctx, c)
        trainer.train()
        rows.append(pd.DataFrame(ctx.log.rows))
    assert trainer.arr.from_first_update and trainer.arr.first_update_episode == 3
    assert trainer.arr.switched_at is None and trainer.schedule.ratio == cfg.replay_ratio
    a, b = rows
    assert list(zip(a.step, a.key)) == list(zip(b.step, b.key))
    np.testing.assert_array_equal(a.value.to_numpy(), b.value.to_numpy())


def test_image_size_sets_the_rendered_observation(tmp_path):
    """The quick preset renders 64 px: env, eval env, replay frames and the encoder all follow ``image_size``."""
    assert resolve_config(DrQV2(), "quick").image_size == 64 and Config().image_size == 84
    cfg = dataclasses.replace(SMALL, image_size=48)
    trainer = Trainer(_ctx(tmp_path / "ckpt", tmp_path / "cache", cfg), cfg)
    try:
        assert trainer.env.observation_space.shape == trainer.eval_env.observation_space.shape == (9, 48, 48)
        assert trainer.env.reset(seed=0)[0].shape == (9, 48, 48)
        assert trainer.replay.frames.shape[1:] == (3, 48, 48)
        assert trainer.agent.encoder.repr_dim == 32 * 17 * 17  # 48 -> 23 -> 21 -> 19 -> 17
    finally:
        trainer.env.close()
        trainer.eval_env.close()
    assert "image_size" in drqv2._SHARED  # a pretrained encoder is built at the size of the run it serves
    # a task with no `size` setting renders its own size: another image_size is refused, not silently ignored
    ctx = _ctx(tmp_path / "ckpt2", tmp_path / "cache", cfg)
    fixed = {k: v for k, v in ctx.task.kwargs.items() if k != "size"}
    ctx = dataclasses.replace(ctx, task=dataclasses.replace(ctx.task, kwargs=fixed))
    with pytest.raises(ValueError, match="renders 84x84 observations and has no `size` setting"):
        Trainer(ctx, cfg)
    with pytest.raises(ValueError, match="image_size"):
        dataclasses.replace(SMALL, image_size=0).validate()


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_arr_variant_end_to_end_at_smoke(tmp_path):
    # Every variant runs the smoke suite in tests/test_registry.py; this run checks what the records hold.
    rc = cli.main(["run", "--methods", "drqv2-arr", "--tasks", TASK, "--preset", "smoke", "--seeds", "1",
                   "--torch-threads", "1", "--results-dir", str(tmp_path / "res"),
                   "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    from bench.store import ResultsStore

    store = ResultsStore(tmp_path / "res")
    records = {r.meta["method"]: r for r in store.iter_records()}
    assert set(records) == {"drqv2-arr"}
    for name, rec in records.items():
        assert rec.status == "ok", (name, rec.meta["reason"])
        curve = rec.curve
        assert curve[curve.key == "eval/return"].step.tolist() == [0, 500, 1000]
        assert {"fau/critic", "fau/encoder", "fau/actor", "charts/episode_return"} <= set(curve.key)
    arr = records["drqv2-arr"].curve
    assert arr[arr.key == "charts/arr_switch_frame"].value.tolist() == [1000.0]  # smoke's threshold 1.0
    assert not (tmp_path / "cache" / "checkpoints" / records["drqv2-arr"].run_id).exists()  # removed after success
    # the leaderboard lists each ARR run's switch frame
    from bench.leaderboard import build_leaderboard

    md = build_leaderboard(tmp_path / "res", tmp_path / "board", plots=False).markdown_path.read_text()
    section = md.split("## Adaptive Replay Ratio: the switch of each run", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| drqv2-arr"))
    assert "| 1,000 |" in row and "arr_interval_episodes=1 (paper 50)" in row
