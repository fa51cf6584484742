"""FAU for every torch method (issue 7): per-layer and pooled fractions of active units, read with forward hooks on
the loss's own forward pass, logged by AD, ED, RL² and the source learner, and plotted across families."""

from __future__ import annotations

import numpy as np
import torch

from baselines.plasticity import FAUMonitor, watch_layers
from bench.cli import main
from bench.leaderboard import load_scores
from bench.plots import fau_overview


def test_monitor_records_several_groups_and_pools():
    a, b = torch.nn.ReLU(), torch.nn.ReLU()
    mon = FAUMonitor()
    groups = watch_layers(mon, [("a", a), ("b", b)])
    assert groups == ["a", "b", "hidden"]
    with mon.record(*groups):
        a(torch.tensor([1.0, -1.0]))  # 1 of 2 active
        b(torch.tensor([1.0, 2.0, 3.0, -1.0, -2.0, -3.0]))  # 3 of 6
    b(torch.tensor([1.0, 1.0]))  # outside record: not counted
    assert mon.take_all() == {"fau/a": 0.5, "fau/b": 0.5, "fau/hidden": 4 / 8}
    assert mon.take_all() == {}  # nothing recorded since the last take


def test_a_module_in_several_groups_is_hooked_once_and_counted_in_each():
    """One forward hook per module, however many groups watch it (the count is shared, not recomputed); re-watching
    a group drops its old modules' hooks unless another group still watches them."""
    a, b, c = torch.nn.ReLU(), torch.nn.ReLU(), torch.nn.ReLU()
    mon = FAUMonitor()
    watch_layers(mon, [("a", a), ("b", b)])
    assert len(a._forward_hooks) == len(b._forward_hooks) == 1
    with mon.record("a"):  # only `a` records: the pool sees nothing
        a(torch.tensor([1.0, -1.0, 0.0, 2.0]))
    assert mon.take_all() == {"fau/a": 0.5}
    mon.watch("hidden", [b, c])  # the pool moves off `a`; `a` keeps its own group's hook
    assert len(a._forward_hooks) == len(b._forward_hooks) == len(c._forward_hooks) == 1
    mon.watch("a", [])
    assert len(a._forward_hooks) == 0
    with mon.record("a", "b", "hidden"):
        a(torch.tensor([1.0]))
        b(torch.tensor([1.0, -1.0]))
        c(torch.tensor([-1.0, -1.0]))
    assert mon.take_all() == {"fau/b": 0.5, "fau/hidden": 1 / 4}


def test_every_in_context_torch_method_logs_fau(results_dir, cache_dir, capsys):
    code = main(["run", "--methods", "ad,ed,rl2,source-a2c", "--tasks", "DarkRoom-v0", "--preset", "smoke",
                 "--seeds", "1", "--results-dir", str(results_dir), "--cache-dir", str(cache_dir)])
    assert code == 0, capsys.readouterr().out
    runs, _, extras, _ = load_scores(results_dir)
    assert set(runs["method"]) == {"ad", "ed", "rl2", "source-a2c"}
    expected = {"ad": {"fau/block0", "fau/hidden"}, "ed": {"fau/block0", "fau/hidden"},
                "rl2": {"fau/phi", "fau/hidden"}, "source-a2c": {"fau/hidden"}}
    for method, keys in expected.items():
        e = extras[(extras["method"] == method) & extras["key"].str.startswith("fau/")]
        assert keys <= set(e["key"]), (method, sorted(set(e["key"])))
        values = e["value"].to_numpy()
        assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
        assert values.max() > 0  # a network with no active unit at all would be a broken hook
    fig = fau_overview(extras)
    assert fig is not None and len(fig.axes[0].lines) >= 4
