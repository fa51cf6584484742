"""The plasticity fixes Ma et al. (ICLR 2024, arXiv 2310.07418) compare with augmentation (Fig. 2: weight decay,
L2-Init, LayerNorm, Shrink & Perturb, CReLU), augmentation in a window of training (Fig. 6) and a frozen pretrained
encoder (Fig. 4): switches on the DrQ-v2 agent, off by default, and the registered variants end to end at smoke."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from baselines import drqv2
from baselines.drqv2 import (
    Config,
    CReLU,
    DrQV2,
    DrQV2Agent,
    DrQV2NoAug,
    Trainer,
    pretrain_config,
    pretrained_encoder,
    weight_init,
)
from baselines.plasticity import fresh_copy
from bench import cli
from bench.config import ConfigError, config_to_dict, resolve_config
from bench.method import ArtifactCache, RunContext, RunLogger
from bench.methods import get_method
from bench.store import ResultsStore
from tasks import get_task
from tasks.spec import Budget
from tests.test_drqv2 import SMALL, TASK, _batch, _ctx, _Killed, _ShortEpisodes

NEW = ["drqv2-noaug-wd", "drqv2-noaug-l2init", "drqv2-noaug-layernorm", "drqv2-noaug-shrinkperturb",
       "drqv2-noaug-crelu", "drqv2-aug-early", "drqv2-aug-late", "drqv2-frozen", "drqv2-noaug-frozen"]
# what defines each variant, at every preset (Shrink & Perturb's interval is scaled to the budget, never off)
DEFINING = {
    "drqv2-noaug-wd": {"augment": False, "weight_decay": 0.01},
    "drqv2-noaug-l2init": {"augment": False, "l2_init": 1e-3},
    "drqv2-noaug-layernorm": {"augment": False, "head_layernorm": True},
    "drqv2-noaug-shrinkperturb": {"augment": False, "sp_alpha": 0.8, "sp_sigma": 0.2},
    "drqv2-noaug-crelu": {"augment": False, "crelu": True},
    "drqv2-aug-early": {"augment": True, "augment_from": 0.0, "augment_until": 0.5},
    "drqv2-aug-late": {"augment": True, "augment_from": 0.5, "augment_until": 1.0},
    "drqv2-frozen": {"augment": True, "freeze_encoder": True, "pretrain_encoder": True},
    "drqv2-noaug-frozen": {"augment": False, "freeze_encoder": True, "pretrain_encoder": True},
}
OFF = {"augment_from": 0.0, "augment_until": 1.0, "weight_decay": 0.0, "l2_init": 0.0, "head_layernorm": False,
       "crelu": False, "sp_interval_frames": 0, "freeze_encoder": False, "pretrain_encoder": False}


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _agent(seed: int = 0, total_frames: int | None = None, **changes) -> DrQV2Agent:
    torch.manual_seed(seed)
    return DrQV2Agent((9, 84, 84), 1, dataclasses.replace(SMALL, **changes), total_frames=total_frames)


# ---------------------------------------------------------------------------------------------- configs
def test_switches_are_off_by_default():
    cfg = Config()
    assert {k: getattr(cfg, k) for k in OFF} == OFF
    assert not cfg.windowed_augment


@pytest.mark.parametrize("preset", ["smoke", "quick", "paper"])
def test_each_variant_differs_from_drqv2_only_in_its_switches(preset):
    base = config_to_dict(resolve_config(DrQV2(), preset))
    for name, defining in DEFINING.items():
        method = get_method(name)
        cfg = config_to_dict(resolve_config(method, preset))
        assert {k: cfg[k] for k in defining} == defining, (name, preset)  # no preset overrides them
        changed = {k for k in cfg if cfg[k] != base[k]}
        budget_scaled = {"sp_interval_frames"} | ({"seed_frames"} if preset == "smoke" else set())
        assert changed <= set(defining) | budget_scaled, (name, preset, changed)
    sp = config_to_dict(resolve_config(get_method("drqv2-noaug-shrinkperturb"), preset))["sp_interval_frames"]
    assert sp == {"smoke": 900, "quick": 10_000, "paper": 200_000}[preset]


@pytest.mark.parametrize(("changes", "match"), [
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"l2_init": -1e-3}, "l2_init"),
    ({"sp_interval_frames": -1}, "sp_interval_frames"),
    ({"sp_alpha": 1.5}, "sp_alpha"),
    ({"sp_sigma": -0.2}, "sp_sigma"),
    ({"augment_from": 0.6, "augment_until": 0.5}, "augment_from < augment_until"),
    ({"augment_until": 1.5}, "augment_until"),
    ({"augment_from": -0.1}, "augment_from"),
    ({"augment": False, "augment_until": 0.5}, "augment is false"),
])
def test_bad_switch_values_are_rejected(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(Config(), **changes).validate()


def test_overrides_are_validated_and_a_window_needs_the_frame_budget():
    with pytest.raises(ConfigError, match="augment is false"):
        resolve_config(DrQV2NoAug(), "smoke", {"augment_until": "0.5"})
    with pytest.raises(ConfigError, match="sp_alpha"):
        resolve_config(get_method("drqv2-noaug-shrinkperturb"), "smoke", {"sp_alpha": "2"})
    with pytest.raises(ValueError, match="total_frames"):
        _agent(augment_until=0.5)


# ---------------------------------------------------------------------------------------------- off = before
def test_all_switches_off_gives_bit_identical_updates():
    """Every switch at its off value, spelled out, against the default config: same modules, same optimisers, the
    same numbers after several updates (with an injection in between, which rebuilds heads through _mlp)."""
    runs = []
    for explicit in (False, True):
        agent = _agent(0, 1000, **OFF) if explicit else _agent(0)
        rng, metrics = np.random.default_rng(0), []
        for i in range(3):
            if i == 2:
                agent.inject()
            torch.manual_seed(100 + i)
            metrics.append(agent.update(_batch(rng), 10_000))
        runs.append((agent, metrics))
    (a, ma), (b, mb) = runs
    assert ma == mb and set(ma[0]) == {"losses/critic", "losses/q1", "losses/target_q", "losses/actor"}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() == {"encoder", "actor", "critic", "critic_target", "encoder_opt", "actor_opt",
                                      "critic_opt"}
    for net in ("encoder", "actor", "critic", "critic_target"):
        assert sa[net].keys() == sb[net].keys()
        assert all(torch.equal(sa[net][k], sb[net][k]) for k in sa[net])
    for opt in ("encoder_opt", "actor_opt", "critic_opt"):
        assert type(getattr(a, opt)) is type(getattr(b, opt)) is torch.optim.Adam
        for pid, state in sa[opt]["state"].items():
            assert all(torch.equal(v, sb[opt]["state"][pid][k]) for k, v in state.items())
    # the published heads, module for module
    assert [type(m) for m in a.actor.policy] == [torch.nn.Linear, torch.nn.ReLU] * 2 + [torch.nn.Linear]
    assert a.fau.mean("critic") == b.fau.mean("critic") and a.fau.mean("actor") == b.fau.mean("actor")


# ---------------------------------------------------------------------------------------------- the fixes
def test_shrink_perturb_moves_the_weights_by_exactly_the_stated_amounts():
    alpha, sigma = 0.7, 0.4
    agent = _agent(0, sp_alpha=alpha, sp_sigma=sigma, sp_interval_frames=900)
    agent.update(_batch(np.random.default_rng(0)), 10_000)  # weights away from their init
    before = {n: copy.deepcopy(getattr(agent, n)) for n in ("encoder", "actor", "critic")}
    opt_state = copy.deepcopy(agent.critic_opt.state_dict()["state"])
    torch.manual_seed(5)
    agent.shrink_perturb()
    torch.manual_seed(5)  # the same fresh draws: encoder, actor, critic, in that order, each with its own init
    fresh = {n: fresh_copy(before[n], weight_init) for n in ("encoder", "actor", "critic")}
    for name, old in before.items():
        new_params, fresh_params = dict(getattr(agent, name).named_parameters()), dict(fresh[name].named_parameters())
        for k, p in old.named_parameters():
            assert torch.equal(new_params[k], alpha * p + sigma * fresh_params[k]), (name, k)
            if p.dim() > 1:  # a real fresh draw, neither the old weights nor their initialisation
                assert not torch.equal(fresh_params[k], p)
    init = _agent(0)  # the agent's own initialisation (same seed)
    assert not torch.equal(fresh["critic"].Q1[0].weight, init.critic.Q1[0].weight)
    for k, v in agent.critic.state_dict().items():
        assert torch.equal(agent.critic_target.state_dict()[k], v)  # the target follows the critic
    for pid, state in opt_state.items():  # Adam's moments are kept
        assert all(torch.equal(v, agent.critic_opt.state_dict()["state"][pid][k]) for k, v in state.items())
    agent.update(_batch(np.random.default_rng(1)), 10_000)


def test_l2_init_penalty_is_zero_at_init_and_its_gradient_pulls_towards_theta0():
    lam = 1e-2
    agents = [_agent(0, l2_init=lam), _agent(0)]
    assert agents[0].l2_init_loss("encoder", "critic", "actor").item() == 0.0
    gen = torch.Generator().manual_seed(3)
    deltas = {}
    for agent in agents:  # both moved identically away from their (identical) initialisation
        with torch.no_grad():
            for n in ("encoder", "actor", "critic"):
                for k, p in getattr(agent, n).named_parameters():
                    d = deltas.setdefault((n, k), 0.01 * torch.randn(p.shape, generator=gen))
                    p.add_(d)
    penalty = agents[0].l2_init_loss("actor")
    expected = lam * sum(d.pow(2).sum() for (n, _), d in deltas.items() if n == "actor")
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    rng = np.random.default_rng(0)
    batch = _batch(rng)
    for agent in agents:
        torch.manual_seed(7)
        agent.update(batch, 10_000)
    # the critic loss's gradient (encoder and critic) differs from the unpenalised one by exactly 2 lambda (theta -
    # theta_0): the penalty pulls each parameter straight back towards its initial value
    for n in ("encoder", "critic"):
        with_l2, plain = dict(getattr(agents[0], n).named_parameters()), dict(getattr(agents[1], n).named_parameters())
        for k in with_l2:
            torch.testing.assert_close(with_l2[k].grad - plain[k].grad, 2 * lam * deltas[(n, k)], rtol=1e-4,
                                       atol=1e-7)
    actor = agents[0].actor
    actor.zero_grad()
    agents[0].l2_init_loss("actor").backward()
    with torch.no_grad():  # one gradient step on the penalty alone shrinks the distance to theta_0
        dist = agents[0].l2_init_loss("actor").item()
        for p in actor.parameters():
            p.sub_(10.0 * p.grad)
        assert agents[0].l2_init_loss("actor").item() < dist
    assert {"losses/l2_init_critic", "losses/l2_init_actor"} <= set(agents[0].update(_batch(rng), 10_000))


def test_weight_decay_shrinks_parameters_with_zero_gradient():
    wd = 0.1
    agent, plain = _agent(0, weight_decay=wd), _agent(0)
    for a in (agent, plain):
        for net, opt in (("encoder", "encoder_opt"), ("actor", "actor_opt"), ("critic", "critic_opt")):
            before = _params(getattr(a, net))
            for p in getattr(a, net).parameters():
                p.grad = torch.zeros_like(p)
            getattr(a, opt).step()
            for k, p in getattr(a, net).named_parameters():
                factor = 1.0 - SMALL.lr * wd if a is agent else 1.0  # decoupled: theta -= lr * wd * theta
                torch.testing.assert_close(p.detach(), before[k] * factor, rtol=1e-7, atol=0.0)
    assert isinstance(agent.critic_opt, torch.optim.AdamW) and agent.critic_opt.defaults["weight_decay"] == wd
    assert type(plain.critic_opt) is torch.optim.Adam


@pytest.mark.parametrize("switch", ["head_layernorm", "crelu"])
def test_layernorm_and_crelu_heads_build_update_and_report_fau(switch):
    agent = _agent(0, **{switch: True})
    hidden = SMALL.hidden_dim
    for mlp in (agent.actor.policy, agent.critic.Q1, agent.critic.Q2):
        linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 3
        if switch == "crelu":
            assert [type(m) for m in mlp].count(CReLU) == 2 and not any(isinstance(m, torch.nn.ReLU) for m in mlp)
            assert linears[1].in_features == linears[2].in_features == 2 * hidden  # the input width doubled
        else:
            kinds = [type(m) for m in mlp]
            assert kinds == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.ReLU] * 2 + [torch.nn.Linear]
    assert len(agent.critic.relus()) == 4
    assert all(isinstance(m, CReLU if switch == "crelu" else torch.nn.ReLU) for m in agent.critic.relus())
    rng = np.random.default_rng(0)
    agent.update(_batch(rng), 10_000)
    for group in ("critic", "actor", "encoder"):
        fau = agent.fau.take(group)
        assert fau is not None and 0.0 < fau <= (0.5 if switch == "crelu" and group != "encoder" else 1.0)
    agent.inject()  # the injected heads are built the same way, and the FAU follows them
    assert all(isinstance(m, CReLU if switch == "crelu" else torch.nn.ReLU) for m in agent.critic.relus())
    agent.update(_batch(rng), 10_000)
    assert 0.0 < agent.fau.take("critic") <= 1.0


def test_crelu_fau_counts_its_positive_outputs():
    layer, x = CReLU(), torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    mon = drqv2.FAUMonitor()
    mon.watch("g", [layer])
    with mon.record("g"):
        out = layer(x)
    assert out.tolist() == [[1.0, 0.0, 0.0, 3.0, 0.0, 2.0, 0.0, 0.0]]
    assert mon.mean("g") == 3 / 8


# ---------------------------------------------------------------------------------------------- training stages
@pytest.mark.parametrize(("start", "until"), [(0.0, 0.5), (0.5, 1.0), (0.25, 0.75)])
def test_augmentation_is_applied_exactly_inside_its_window(start, until):
    total = 1000
    agent = _agent(0, total, augment_from=start, augment_until=until)
    frames = np.arange(0, total, 2)
    got = np.array([agent.augmenting(int(f)) for f in frames])
    np.testing.assert_array_equal(got, (frames >= start * total) & (frames < until * total))
    seen = []
    agent.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    batch = _batch(np.random.default_rng(0))
    raw = torch.as_tensor(batch["obs"]).float()
    for frame in (int(start * total) - 2, int(start * total), int(until * total) - 2, int(until * total)):
        if not 0 <= frame < total:
            continue
        seen.clear()
        metrics = agent.update(batch, frame)
        on = start * total <= frame < until * total
        assert metrics["charts/augment"] == float(on)
        assert torch.equal(seen[0], raw) is not on  # the encoder sees shifted images exactly inside the window
    assert not _agent(0, total, augment=False).augmenting(300)
    assert "charts/augment" not in _agent(0, total).update(batch, 10)  # only windowed runs log it


# ---------------------------------------------------------------------------------------------- frozen encoder
def test_frozen_encoder_never_changes_while_the_heads_learn():
    # with every switch that could touch it: weight decay, L2-Init, Shrink & Perturb
    agent = _agent(0, freeze_encoder=True, weight_decay=0.1, l2_init=1e-2, sp_interval_frames=900)
    encoder, actor, critic = _params(agent.encoder), _params(agent.actor), _params(agent.critic)
    assert not any(p.requires_grad for p in agent.encoder.parameters())
    rng = np.random.default_rng(0)
    for i in range(3):
        agent.update(_batch(rng), 10_000)
        if i == 1:
            agent.shrink_perturb()
    assert all(torch.equal(p, encoder[k]) for k, p in agent.encoder.named_parameters())
    assert not agent.encoder_opt.state  # never stepped
    assert all(not torch.equal(p, actor[k]) for k, p in agent.actor.named_parameters() if p.dim() > 1)
    assert all(not torch.equal(p, critic[k]) for k, p in agent.critic.named_parameters() if p.dim() > 1)
    assert agent.fau.mean("encoder") is not None  # still read on the loss's forward pass


def _pretrain_ctx(tmp_path, seed: int, config: Config) -> RunContext:
    return RunContext(task=get_task(TASK), seed=seed, preset="smoke", config=config, device="cpu", log=RunLogger(),
                      budget=Budget(train_steps=300, eval_episodes=1, eval_every=0),
                      checkpoint_dir=tmp_path / f"ckpt{seed}", cache=ArtifactCache(tmp_path / "cache"),
                      rng=np.random.default_rng(seed))


def test_pretrained_encoder_is_built_once_shared_and_loaded_frozen(tmp_path, monkeypatch):
    frozen = dataclasses.replace(SMALL, seed_frames=100, batch_size=2, freeze_encoder=True, pretrain_encoder=True)
    noaug = dataclasses.replace(frozen, augment=False)
    assert pretrain_config(frozen) == pretrain_config(noaug)  # the pretraining is augmented drqv2 for both
    assert pretrain_config(frozen).augment and not pretrain_config(noaug).freeze_encoder
    builds = []
    train = drqv2._Pretraining.train
    monkeypatch.setattr(drqv2._Pretraining, "train", lambda self: (builds.append(self.ctx.seed), train(self))[1])
    torch.manual_seed(11)
    rng_before = torch.get_rng_state()
    first = pretrained_encoder(_pretrain_ctx(tmp_path, 1, frozen), frozen)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's global generators are left as they were
    second = pretrained_encoder(_pretrain_ctx(tmp_path, 2, noaug), noaug)  # another method, another seed
    assert builds == [drqv2.PRETRAIN_SEED]  # built once, with the fixed pretraining seed
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    artifacts = [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert [p.name.startswith("drqv2-encoder-") for p in artifacts] == [True]  # no leftover checkpoints
    torch.manual_seed(drqv2.PRETRAIN_SEED)
    untrained = drqv2.Encoder((9, 84, 84)).state_dict()
    assert any(not torch.equal(first[k], untrained[k]) for k in first)  # it was trained

    ctx = _pretrain_ctx(tmp_path, 3, frozen)
    trainer = _ShortEpisodes(ctx, frozen, encoder_state=first)
    trainer.train()  # a run on the frozen encoder: 100 updates of the heads
    assert all(torch.equal(v, first[k]) for k, v in trainer.agent.encoder.state_dict().items())
    assert any(r["key"] == "eval/return" for r in ctx.log.rows)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_checkpoint_resume_keeps_the_window_shrink_perturb_and_l2_init(tmp_path, monkeypatch):
    """Augmentation until frame 300 of 600, Shrink & Perturb at 250 and 500, L2-Init, weight decay, LayerNorm: a
    run killed after its checkpoint at 400 and resumed gives exactly the rows of the uninterrupted run."""
    cfg = dataclasses.replace(SMALL, seed_frames=100, batch_size=2, augment_until=0.5, sp_interval_frames=250,
                              l2_init=1e-3, weight_decay=0.01, head_layernorm=True)
    full = _ctx(tmp_path / "full", tmp_path / "cache", cfg)
    _ShortEpisodes(full, cfg).train()
    save, saves = Trainer.save_checkpoint, []

    def save_then_die(self):
        save(self)
        saves.append(self.frame)
        if len(saves) == 2:
            raise _Killed

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        _ShortEpisodes(_ctx(tmp_path / "ckpt", tmp_path / "cache", cfg), cfg).train()
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    resumed = _ctx(tmp_path / "ckpt", tmp_path / "cache", cfg)
    _ShortEpisodes(resumed, cfg).train()
    a, b = pd.DataFrame(full.log.rows), pd.DataFrame(resumed.log.rows)
    assert list(zip(a.axis, a.step, a.key)) == list(zip(b.axis, b.step, b.key))
    np.testing.assert_array_equal(a.value.to_numpy(), b.value.to_numpy())
    assert b[b.key == "charts/shrink_perturb_frame"].value.tolist() == [250.0, 500.0]
    augment = b[b.key == "charts/augment"].set_index("step").value
    # an episode's row averages its updates: those of frames 100-298 augment, those from frame 300 on do not
    assert augment.to_dict() == {200: 1.0, 300: 1.0, 400: 0.0, 500: 0.0, 600: 0.0}


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_every_new_variant_runs_end_to_end_at_smoke(tmp_path):
    rc = cli.main(["run", "--methods", ",".join(NEW), "--tasks", TASK, "--preset", "smoke", "--seeds", "1",
                   "--torch-threads", "1", "--results-dir", str(tmp_path / "res"),
                   "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    records = {r.meta["method"]: r for r in ResultsStore(tmp_path / "res").iter_records()}
    assert set(records) == set(NEW)
    for name, rec in records.items():
        assert rec.status == "ok", (name, rec.meta["reason"])
        curve = rec.curve
        assert curve[curve.key == "eval/return"].step.tolist() == [0, 500, 1000]
        fau = curve[curve.key.isin(["fau/critic", "fau/encoder", "fau/actor"])]
        assert len(fau) == 3 and fau.value.between(0.0, 1.0).all() and (fau.value > 0).all(), name
        for field, value in DEFINING[name].items():
            assert rec.meta["config"][field] == value
    sp = records["drqv2-noaug-shrinkperturb"]
    assert sp.curve[sp.curve.key == "charts/shrink_perturb_frame"].value.tolist() == [900.0]
    assert sp.meta["deviations"]["sp_interval_frames"] == [200_000, 900]
    early, late = (records[m].curve for m in ("drqv2-aug-early", "drqv2-aug-late"))
    early, late = (float(c[c.key == "charts/augment"].value.iloc[0]) for c in (early, late))
    assert 0.0 < early < 0.5 < late < 1.0 and early + late == pytest.approx(1.0)  # complementary windows
    encoders = [p for p in (tmp_path / "cache" / "artifacts").glob("drqv2-encoder-*") if p.is_dir()]
    assert len(encoders) == 1 and (encoders[0] / "encoder.pt").is_file()  # one pretraining for both methods
