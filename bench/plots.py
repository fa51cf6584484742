"""Leaderboard plots (seaborn). Each plot function takes data and returns the figure; ``save_all`` saves.

As in rliable's ``plot_utils.py``: the caller owns the file; axes are labelled with units and the preset is in
every title.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)  # headless; does nothing if a backend is already in use

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench import scoring  # noqa: E402
from bench.leaderboard import aggregate_matrices, score_matrices  # noqa: E402


def _wrap(title: str, fig: plt.Figure) -> str:
    """``title`` broken into lines that fit ``fig``'s width at a 10-pt font (a long block title was clipped)."""
    return textwrap.fill(title, max(40, int(fig.get_figwidth() * 13)))


def method_palette(methods) -> dict[str, tuple[float, float, float]]:
    """One colour per method name, the same in every plot (methods sorted by name)."""
    names = sorted(set(methods))
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))


def _facet_curves(curves: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, title: str,
                  log_x: bool = False) -> plt.Figure:
    tasks = sorted(curves["task"].unique())
    cols = min(4, len(tasks))
    rows = int(np.ceil(len(tasks) / cols))
    # at least 8 in wide: one task's panel must still fit an experiment's long title and its legend
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 8.0), 3.4 * rows + 0.4), squeeze=False)
    methods = sorted(curves["method"].unique())
    palette = method_palette(methods)
    for ax, task in zip(axes.flat, tasks):
        d = curves[curves["task"] == task]
        sns.lineplot(data=d, x=x, y=y, hue="method", hue_order=[m for m in methods if m in set(d["method"])],
                     palette=palette, errorbar=("ci", 95), n_boot=500, seed=0, ax=ax)
        ax.set_title(task, fontsize=10)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=palette[m], label=m) for m in methods]
    per_row = 4 if cols == 1 else 6
    fig.legend(handles=handles, loc="lower center", ncol=min(per_row, len(methods)), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 if len(methods) <= per_row else 0.13, 1, 1))  # room for 1 or 2 legend rows
    return fig


def in_context_curves(curves: pd.DataFrame, preset: str) -> plt.Figure:
    """Normalised return per in-context episode on held-out tasks; bands: 95% CI over seeds. The episode axis is
    logarithmic (episode 1 = the first): the source learner's hundreds of learning episodes would otherwise squash
    the in-context methods' 20-100 episodes into a sliver at the left of the same panel."""
    curves = curves.assign(episode=curves["step"] + 1)
    return _facet_curves(curves, "episode", "score", "episode on the held-out task (log scale)",
                         "normalised return (%)", f"In-context learning on held-out tasks — preset `{preset}`",
                         log_x=True)


def control_curves(curves: pd.DataFrame, preset: str) -> plt.Figure:
    """Evaluation return against environment frames; bands: 95% CI over seeds."""
    return _facet_curves(curves, "step", "raw", "environment frames", "episode return",
                         f"Learning curves — preset `{preset}`")


def metric_curves(extras: pd.DataFrame, key: str, preset: str, ylabel: str) -> plt.Figure:
    d = extras[extras["key"] == key]
    return _facet_curves(d, "step", "value", "environment frames", ylabel, f"{key} — preset `{preset}`")


# The pooled FAU each method family logs: DrQ-v2's critic (the quantity the plasticity paper tracks) and the
# pooled hidden layers of every other torch method (AD/ED's feed-forward GELUs, RL²'s ReLU embedding, A2C's layer).
FAU_POOLED = ("fau/critic", "fau/hidden")


def fau_overview(extras: pd.DataFrame) -> plt.Figure | None:
    """Every method's pooled FAU against its own training progress (step / last logged step of the run, so
    gradient steps, environment steps and frames share one axis), averaged over tasks and seeds in 20 bins:
    the cross-family view (plasticity and in-context methods side by side). ``None`` if no run logs FAU."""
    d = extras[extras["key"].isin(FAU_POOLED)] if not extras.empty else extras
    if d.empty:
        return None
    d = d.copy()
    runs = ["method", "task", "seed", "preset", "key"]
    d["progress"] = d["step"] / d.groupby(runs)["step"].transform("max").clip(lower=1)
    d["progress"] = (np.minimum(np.floor(d["progress"] * 20), 19) + 0.5) / 20
    d["method"] = d["method"] + " (" + d["family"] + ", " + d["key"].str.removeprefix("fau/") + ")"
    d = d.groupby(["method", "task", "seed", "preset", "progress"], as_index=False)["value"].mean()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sns.lineplot(data=d, x="progress", y="value", hue="method", style="preset", errorbar=("ci", 95),
                 n_boot=200, seed=0, ax=ax)
    ax.set(xlabel="fraction of training", ylabel="fraction of active units", ylim=(0, 1.02),
           title="FAU of every torch method (pooled hidden layers; DrQ-v2: critic)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def interval_estimates(intervals: dict[str, dict[str, scoring.Interval]], title: str) -> plt.Figure:
    """rliable-style interval plot: one panel per aggregate, one bar per method (point and 95% CI)."""
    names = list(intervals)
    methods = sorted(next(iter(intervals.values())), key=lambda m: -intervals["IQM"][m].point)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 0.5 * len(methods) + 1.6), squeeze=False)
    colors = method_palette(methods)
    for ax, name in zip(axes.flat, names):
        for i, m in enumerate(methods):
            iv = intervals[name][m]
            ax.barh(i, iv.high - iv.low, left=iv.low, height=0.6, color=colors[m], alpha=0.75)
            ax.vlines(iv.point, i - 0.3, i + 0.3, color="black", lw=1.5)
        ax.set_yticks(range(len(methods)), methods if ax is axes.flat[0] else [""] * len(methods))
        ax.set_title(name)
        ax.set_ylim(len(methods) - 0.5, -0.5)  # best method on top
        ax.set_xlabel("normalised score (%)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def probability_of_improvement(pois: dict[tuple[str, str], scoring.Interval], title: str) -> plt.Figure:
    """P(X > Y) with 95% CI for each pair (X, Y)."""
    pairs = list(pois)
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(pairs) + 1.6))
    for i, (x, y) in enumerate(pairs):
        iv = pois[(x, y)]
        ax.barh(i, iv.high - iv.low, left=iv.low, height=0.6, color="tab:blue", alpha=0.7)
        ax.vlines(iv.point, i - 0.3, i + 0.3, color="black", lw=1.5)
    ax.set_yticks(range(len(pairs)), [f"P({x} > {y})" for x, y in pairs])
    ax.axvline(0.5, color="grey", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of improvement")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save_all(runs: pd.DataFrame, curves: pd.DataFrame, extras: pd.DataFrame, out: Path, seed: int = 0,
             reps: int = 2000) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(fig: plt.Figure, name: str) -> None:
        path = out / name
        # no timestamp or version in the file, so a regenerated plot is byte-identical
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        paths.append(path)

    from bench.runner import headline_methods

    shown = headline_methods()
    with sns.axes_style("whitegrid"):
        for (family, preset), g in curves.groupby(["family", "preset"], sort=True):
            tag = f"{family}-{preset}"
            # the headline suites' methods (ablation variants have their experiments' figures); all if none is one
            headline = g[g["method"].isin(shown)]
            fig = (in_context_curves if family == "in-context" else control_curves)(
                headline if not headline.empty else g, preset)
            save(fig, f"{tag}-curves.png")
            r = runs[(runs["family"] == family) & (runs["preset"] == preset)]
            matrices = aggregate_matrices(r)
            if matrices:
                intervals = {n: scoring.stratified_bootstrap_ci(matrices, fn, reps, 0.95, seed)
                             for n, fn in scoring.AGGREGATES.items()}
                save(interval_estimates(intervals, f"Aggregate scores ({family}) — preset `{preset}`"),
                     f"{tag}-aggregates.png")
                ranked = sorted(matrices, key=lambda m: -intervals["IQM"][m].point)
                best, pois = ranked[0], {}
                for other in ranked[1:]:
                    common = _common_tasks(r, best, other)
                    if common:
                        x, y = score_matrices(r[r["task"].isin(common)], [best, other]).values()
                        if x.size and y.size:
                            pois[(best, other)] = scoring.stratified_bootstrap_poi(x, y, reps, 0.95, seed)
                if pois:
                    save(probability_of_improvement(pois, f"Probability of improvement ({family}) — preset `{preset}`"),
                         f"{tag}-improvement-probability.png")
            e = extras[(extras["family"] == family) & (extras["preset"] == preset)] if not extras.empty else extras
            if family == "control" and not e.empty:
                for key in sorted(k for k in e["key"].unique() if k.startswith("fau/")):
                    fig = metric_curves(e, key, preset, "fraction of active units")
                    save(fig, f"{tag}-{key.replace('/', '-')}.png")
        from bench.leaderboard import experiment_runs, experiments

        for exp in experiments():  # one figure per ablation experiment (suites.toml blocks)
            for preset, r in experiment_runs(runs, exp).groupby("preset", sort=True):
                c = curves[(curves["preset"] == preset) & curves["method"].isin(exp.methods)
                           & curves["task"].isin(exp.tasks)]
                in_context = r["family"].iloc[0] == "in-context"
                fig = (in_context_curves if in_context else control_curves)(c, preset)
                fig.suptitle(_wrap(f"{exp.title} — preset `{preset}`", fig), fontsize=10)
                save(fig, f"{exp.tag}-{preset}-curves.png")
                e = extras[(extras["preset"] == preset) & extras["method"].isin(exp.methods)
                           & extras["task"].isin(exp.tasks)] if not extras.empty else extras
                if not in_context and not e.empty and (e["key"] == "fau/critic").any():
                    fig = metric_curves(e, "fau/critic", preset, "critic fraction of active units")
                    fig.suptitle(_wrap(f"Critic FAU: {exp.title} — preset `{preset}`", fig), fontsize=10)
                    save(fig, f"{exp.tag}-{preset}-fau-critic.png")
    overview = fau_overview(extras)
    if overview is not None:
        save(overview, "fau-all-methods.png")
    return paths


def _common_tasks(runs: pd.DataFrame, a: str, b: str) -> list[str]:
    ta = set(runs[runs["method"] == a]["task"])
    tb = set(runs[runs["method"] == b]["task"])
    return sorted(ta & tb)
