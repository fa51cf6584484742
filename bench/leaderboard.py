"""Leaderboards from stored runs only: ``results/leaderboard.md`` + ``.csv`` and the plots.

Per run (see DESIGN.md "Scores"):

* in-context families: the ``eval/return`` curve over in-context episodes (mean over held-out tasks) is
  normalised with the run's stored references; *first* = episode 0, *final* = mean over the last 10% of
  episodes, *improvement* = final - first, *episodes to plateau* = episodes until the 10-episode trailing mean
  reaches 90% of final (:func:`bench.scoring.episodes_to_plateau`; for the source learner, learning episodes on
  the held-out task). The final score enters the aggregates.
* control families: *final* = the last evaluation, *AUC* = normalised area under the learning curve, and the
  critic's FAU at the end of training where the method logs ``fau/critic``.

Aggregates (IQM, mean, median, optimality gap) over a ``(num_seeds, num_tasks)`` matrix per method with
stratified-bootstrap 95% intervals from a seeded Generator, so regenerating gives identical tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench import scoring
from bench.evaluation import EVAL_KEY, TASK_KEY_PREFIX
from bench.store import CorruptRecordError, ResultsStore

FAU_KEY = "fau/critic"
ARR_SWITCH_KEY = "charts/arr_switch_frame"
PROMPT_KEY = "charts/prompt_return"  # mean raw return of the demonstration episodes of a prompted evaluation
PLATEAU_MIN_FINAL = 5.0
"""Episodes to plateau are reported only for a final normalised score above this (random's final is ~0)."""


@dataclass
class LeaderboardReport:
    markdown_path: Path
    csv_path: Path
    plot_paths: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def run_scores(record) -> tuple[dict, pd.DataFrame]:
    """One run's summary row and its normalised ``eval/return`` curve (columns step, raw, score)."""
    meta, curve = record.meta, record.curve
    refs = meta["references"]
    ev = curve[curve["key"] == EVAL_KEY].sort_values("step")
    steps = ev["step"].to_numpy()
    raw = ev["value"].to_numpy(dtype=float)
    score = scoring.normalize(raw, refs["random"], refs["reference"])
    row = {"method": meta["method"], "task": meta["task"], "family": meta["family"], "seed": meta["seed"],
           "preset": meta["preset"], "run_id": meta["run_id"],
           "deviation_items": tuple(f"{k}={v[1]} (paper {v[0]})"
                                    for k, v in sorted((meta.get("deviations") or {}).items()))}
    row["deviations"] = "; ".join(row["deviation_items"])
    if meta["family"] == "in-context":
        row.update(first=float(score[0]), final=float(scoring.final_window_mean(score)),
                   raw_final=float(scoring.final_window_mean(raw)))
        row["improvement"] = row["final"] - row["first"]
        prompt = curve[curve["key"] == PROMPT_KEY]["value"].to_numpy(dtype=float)  # demonstration prompting
        row["prompt"] = float(scoring.normalize(prompt, refs["random"], refs["reference"]).mean()) if len(
            prompt) else np.nan
        # defined only above the random level's noise (random's final is ~0 +- a few points)
        row["plateau"] = scoring.episodes_to_plateau(score, min_final=PLATEAU_MIN_FINAL)
    else:
        row.update(final=float(score[-1]), raw_final=float(raw[-1]), auc=float(scoring.auc(steps, score)))
        fau = curve[curve["key"] == FAU_KEY].sort_values("step")
        row["fau_critic"] = float(fau["value"].iloc[-1]) if len(fau) else np.nan
        # Adaptive Replay Ratio: the frame of its one switch (NaN: it never came)
        row["arr"] = bool((meta.get("config") or {}).get("arr"))
        switch = curve[curve["key"] == ARR_SWITCH_KEY]["value"]
        row["arr_switch_frame"] = float(switch.iloc[0]) if len(switch) else np.nan
    frame = pd.DataFrame({"method": meta["method"], "task": meta["task"], "seed": meta["seed"],
                          "family": meta["family"], "preset": meta["preset"], "step": steps, "raw": raw,
                          "score": score})
    return row, frame


def load_scores(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[str]]:
    """Summary rows, curves and other logged metrics of every ok run; messages name failed and corrupt ones."""
    store = ResultsStore(results_dir)
    rows, curves, extras, messages = [], [], [], []
    for rec in store.iter_records():
        if isinstance(rec, CorruptRecordError):
            messages.append(f"skipped corrupt record: {rec}")
            continue
        if rec.status != "ok":
            messages.append(f"skipped failed run {rec.run_id}: {rec.meta.get('reason')}")
            continue
        row, frame = run_scores(rec)
        rows.append(row)
        curves.append(frame)
        keys = rec.curve["key"]  # the per-task rows are read by `bench per-task`, not here
        other = rec.curve[(keys != EVAL_KEY) & ~keys.str.startswith(TASK_KEY_PREFIX)].assign(
            method=rec.meta["method"], task=rec.meta["task"], seed=rec.meta["seed"],
            family=rec.meta["family"], preset=rec.meta["preset"])
        extras.append(other)
    cat = lambda xs: pd.concat(xs, ignore_index=True) if xs else pd.DataFrame()
    return pd.DataFrame(rows), cat(curves), cat(extras), messages


def score_matrix(runs: pd.DataFrame, column: str = "final") -> tuple[np.ndarray, list[str], list[int]]:
    """``(num_seeds, num_tasks)`` of one method, over the seeds every one of its tasks has."""
    pivot = runs.pivot_table(index="seed", columns="task", values=column, aggfunc="mean").dropna(axis=0)
    return pivot.to_numpy(dtype=float), list(pivot.columns), list(pivot.index)


def score_matrices(runs: pd.DataFrame, methods: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{method: (num_seeds, num_tasks)}`` final scores, in ``methods`` order (default: sorted)."""
    names = methods or sorted(runs["method"].unique())
    return {m: score_matrix(runs[runs["method"] == m])[0] for m in names}


def aggregate_matrices(runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """:func:`score_matrices` of the methods that have a seed every one of their tasks has; a method with none (seed 0
    on one task, seed 1 on another) has no aggregate score: the table shows "–", the plots leave it out."""
    return {m: a for m, a in score_matrices(runs).items() if a.size}


def _mean_ci(vals: np.ndarray, seed: int, reps: int) -> scoring.Interval:
    """Mean of one method's per-seed values with its stratified-bootstrap 95% interval."""
    return scoring.stratified_bootstrap_ci({"x": np.asarray(vals, float)[:, None]}, scoring.mean, reps, 0.95,
                                           seed)["x"]


def _fmt(iv: scoring.Interval | None, digits: int = 1) -> str:
    if iv is None:
        return "–"
    return f"{iv.point:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def family_table(runs: pd.DataFrame, seed: int, reps: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Markdown-ready table (methods as rows, sorted by IQM) and long CSV rows, for one family x preset."""
    family = runs["family"].iloc[0]
    seeds_of = {m: score_matrix(g)[2] for m, g in runs.groupby("method")}
    matrices = aggregate_matrices(runs)
    computed = {name: scoring.stratified_bootstrap_ci(matrices, fn, reps, 0.95, seed) if matrices else {}
                for name, fn in scoring.AGGREGATES.items()}
    aggregates = {name: {m: by_method.get(m) for m in seeds_of} for name, by_method in computed.items()}
    tasks = sorted(runs["task"].unique())
    table, csv = [], []
    for m, seeds in seeds_of.items():
        g = runs[runs["method"] == m]
        line = {"method": m, "IQM": _fmt(aggregates["IQM"][m]), "Mean": _fmt(aggregates["Mean"][m]),
                "Median": _fmt(aggregates["Median"][m]), "Opt. gap": _fmt(aggregates["Optimality gap"][m]),
                "_iqm": aggregates["IQM"][m].point if aggregates["IQM"][m] else -math.inf}
        for name, iv in ((n, aggregates[n][m]) for n in aggregates if aggregates[n][m]):
            csv.append({"method": m, "task": f"aggregate/{name}", "metric": "final", "value": iv.point,
                        "ci_low": iv.low, "ci_high": iv.high, "seeds": len(seeds)})
        extra_metrics = ["first", "improvement", "plateau"] if family == "in-context" else ["auc", "fau_critic"]
        common = g[g["seed"].isin(seeds)]  # a seed's mean over tasks, on the seeds every task has (as the aggregates)
        for metric in extra_metrics:
            vals = common.groupby("seed")[metric].mean().dropna().to_numpy()
            label = {"first": "First ep.", "improvement": "In-context impr.", "plateau": "Episodes to plateau",
                     "auc": "AUC", "fau_critic": "Critic FAU"}[metric]
            line[label] = "–"  # the column keeps its place where no run has the metric
            if len(vals):
                iv = _mean_ci(vals, seed, reps)
                line[label] = _fmt(iv, 3 if metric == "fau_critic" else 1)
                csv.append({"method": m, "task": "aggregate/Mean", "metric": metric, "value": iv.point,
                            "ci_low": iv.low, "ci_high": iv.high, "seeds": len(vals)})
        for t in tasks:
            vals = g[g["task"] == t]["final"].to_numpy()
            if not len(vals):
                line[t] = "–"
                continue
            iv = _mean_ci(vals, seed, reps)
            line[t] = _fmt(iv)
            raw = g[g["task"] == t]["raw_final"].mean()
            csv.append({"method": m, "task": t, "metric": "final", "value": iv.point, "ci_low": iv.low,
                        "ci_high": iv.high, "seeds": len(vals), "raw_return": raw})
        more = {t: n for t, n in g.groupby("task")["seed"].nunique().items() if n != len(seeds)}
        line["Seeds"] = str(len(seeds)) + (f" ({', '.join(f'{t}: {n}' for t, n in sorted(more.items()))})"
                                           if more else "")  # a task column's own count where it has more
        line["Deviations from paper"] = _method_deviations(g)
        table.append(line)
    df = pd.DataFrame(table).sort_values(["_iqm", "method"], ascending=[False, True]).drop(columns="_iqm")
    return df, pd.DataFrame(csv)


def _method_deviations(g: pd.DataFrame) -> str:
    """One method's deviations over its runs: a setting every task shares once, a task's own (a per-task preset)
    followed by the tasks that have it, so each stays readable beside the others."""
    tasks_of: dict[str, set[str]] = {}
    for task, items in zip(g["task"], g["deviation_items"], strict=True):
        for item in items:
            tasks_of.setdefault(item, set()).add(task)
    every = set(g["task"])
    return "; ".join(item if tasks_of[item] == every else f"{item} on {', '.join(sorted(tasks_of[item]))}"
                     for item in sorted(tasks_of)) or "–"


def raw_table(runs: pd.DataFrame) -> pd.DataFrame:
    table = runs.pivot_table(index="method", columns="task", values="raw_final", aggfunc="mean")
    return table.map(lambda v: "–" if pd.isna(v) else f"{v:.4g}")  # a method not run on a task shows a dash


def arr_switch_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per ARR run: method, task, preset, seed, the frame of the switch ("no switch" if it never came)."""
    if "arr" not in runs:
        return pd.DataFrame()
    r = runs[runs["arr"].fillna(False).astype(bool)].sort_values(["preset", "method", "task", "seed"])
    return pd.DataFrame({
        "Method": r["method"], "Task": r["task"], "Preset": r["preset"], "Seed": r["seed"],
        "Switch frame": [("no switch" if math.isnan(f) else f"{int(f):,}") for f in r["arr_switch_frame"]],
        "Deviations from paper": r["deviations"].replace("", "–")})


@dataclass
class Experiment:
    """One named block of an ablation suite (``[[<suite>.parts]]`` with ``name``/``title`` in suites.toml)."""

    suite: str
    name: str
    title: str
    methods: list[str]
    tasks: list[str]
    own: list[str] = field(default_factory=list)
    """Its methods that no other experiment lists (the others are shared references such as random, drqv2), and the
    ablation variants that no other experiment lists on one of its tasks."""

    @property
    def tag(self) -> str:
        return f"{self.suite}-{self.name}"


def experiments() -> list[Experiment]:
    """The experiments of every suite of several blocks, their method and task names expanded. A block naming a
    method that is not installed keeps its other methods (a leaderboard never fails on a missing plugin)."""
    from bench.registry import UnknownNameError
    from bench.runner import expand_methods, expand_tasks, headline_methods, suites

    out = []
    for suite in suites().values():
        if len(suite.parts) <= 1:
            continue
        for (methods, tasks), (name, title) in zip(suite.parts, suite.experiments):
            names = []
            for m in methods:
                try:
                    names += expand_methods([m])
                except UnknownNameError:  # an uninstalled plugin's method: nothing of it can be in the results
                    continue
            out.append(Experiment(suite.name, name, title, names, expand_tasks(list(tasks))))
    headline = headline_methods()
    for exp in out:
        # own: listed by no other experiment; or, for a variant outside the headline suites (never a shared
        # reference such as random), on a task no other experiment lists it with (a block per task)
        listed = {m for e in out if e is not exp for m in e.methods}
        pairs = {(m, t) for e in out if e is not exp for m in e.methods for t in e.tasks}
        exp.own = [m for m in exp.methods if m not in listed
                   or (m not in headline and any((m, t) not in pairs for t in exp.tasks))]
    return out


def experiment_runs(runs: pd.DataFrame, exp: Experiment) -> pd.DataFrame:
    """The runs of ``exp`` in each preset where at least one of its own methods ran (references alone, such as
    random or drqv2 from a headline suite, do not make an experiment)."""
    if runs.empty:
        return runs
    r = runs[runs["method"].isin(exp.methods) & runs["task"].isin(exp.tasks)]
    presets = set(r[r["method"].isin(exp.own)]["preset"])
    return r[r["preset"].isin(presets)]


def experiment_table(runs: pd.DataFrame, exp: Experiment, seed: int, reps: int) -> pd.DataFrame:
    """Methods in the experiment's order; per task the final normalised score (mean and 95% CI over seeds) with
    the raw return, the in-context first episode or the critic's final FAU, and the seeds; where runs were prompted
    with demonstrations, the prompt's normalised score."""
    rows = []
    prompted = "prompt" in runs and runs["prompt"].notna().any()
    for m in [m for m in exp.methods if m in set(runs["method"])]:
        for t in [t for t in exp.tasks if t in set(runs["task"])]:
            g = runs[(runs["method"] == m) & (runs["task"] == t)]
            if g.empty:
                continue

            def ci(col: str, digits: int = 1, g: pd.DataFrame = g) -> str:
                vals = g[col].dropna().to_numpy(dtype=float)
                return _fmt(_mean_ci(vals, seed, reps), digits) if len(vals) else "–"

            row = {"method": m, "task": t, "final": ci("final"), "raw final": f"{g['raw_final'].mean():.4g}"}
            if g["family"].iloc[0] == "in-context":
                if prompted:  # the demonstrator's level, beside what the model made of it
                    row["demonstration prompt"] = ci("prompt")
                row.update({"first episode": ci("first"), "in-context impr.": ci("improvement")})
            else:
                row["critic FAU (end)"] = ci("fau_critic", 3)
            row["seeds"] = ", ".join(str(s) for s in sorted(g["seed"]))
            rows.append(row)
    return pd.DataFrame(rows)


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def build_leaderboard(results_dir: str | Path, out_dir: str | Path | None = None, plots: bool = True,
                      seed: int = 0, reps: int = 2000) -> LeaderboardReport:
    out = Path(out_dir or results_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, curves, extras, messages = load_scores(results_dir)
    md = ["# adapt-bench leaderboard", "",
          "Generated by `bench leaderboard` from the run records under `runs/` only; regenerating gives the same "
          "tables. Scores are normalised: 100 · (R − R_random) / (R_reference − R_random) per task, with the "
          f"references stored in each run. Intervals: stratified bootstrap, 95%, {reps} replicates, seed {seed}.", ""]
    csv_parts = []
    report = LeaderboardReport(out / "leaderboard.md", out / "leaderboard.csv", messages=messages)
    if runs.empty:
        md.append("No completed runs yet. Run `bench run --suite smoke` first.")
    for (family, preset), g in (() if runs.empty else runs.groupby(["family", "preset"], sort=True)):
        what = ("final = mean normalised score over the last 10% of in-context episodes on held-out tasks; "
                "first = the first in-context episode; in-context impr. = final − first; episodes to plateau = "
                "episodes until the 10-episode trailing mean reaches 90% of final, shown for a final above "
                f"{PLATEAU_MIN_FINAL:g} (the source learner: its learning episodes on the held-out task)"
                if family == "in-context" else
                "final = normalised return at the last evaluation; AUC = normalised area under the learning curve; "
                "critic FAU = fraction of active units of the critic at the end of training")
        table, csv = family_table(g, seed, reps)
        md += [f"## {family} — preset `{preset}`", "", what + ". Seeds: those every task of the method has (the "
               "aggregates and the columns beside them use these); a task column uses all of its task's seeds, "
               "counted in brackets where there are more.", "", _md(table), "",
               "Raw returns (final, mean over seeds):", "", _md(raw_table(g).reset_index()), ""]
        csv_parts.append(csv.assign(family=family, preset=preset))
    switches = arr_switch_table(runs)
    if not switches.empty:
        md += ["## Adaptive Replay Ratio: the switch of each run", "",
               "ARR starts at the low replay ratio and switches once to the high one when the critic's FAU changed by "
               "at most the threshold between two checks; the check interval (paper: every 50 episodes) is in the "
               "deviations column where a preset rescaled it.", "", _md(switches), ""]
    if not runs.empty:
        for exp in experiments():
            for preset, g in experiment_runs(runs, exp).groupby("preset", sort=True):
                md += [f"## Experiment `{exp.tag}` — preset `{preset}`", "", f"{exp.title}. "
                       "final: normalised score (mean, 95% CI over seeds) as in the tables above; plot: "
                       f"`plots/{exp.tag}-{preset}-curves.png`.", "", _md(experiment_table(g, exp, seed, reps)), ""]
    if messages:
        md += ["## Not included", ""] + [f"- {m}" for m in messages] + [""]
    report.markdown_path.write_text("\n".join(md))
    csv_all = pd.concat(csv_parts, ignore_index=True) if csv_parts else pd.DataFrame()
    if not csv_all.empty:
        first = ["family", "preset", "method", "task", "metric"]
        csv_all = csv_all[first + [c for c in csv_all.columns if c not in first]]
        csv_all = csv_all.sort_values(first, kind="stable")
    csv_all.to_csv(report.csv_path, index=False, float_format="%.6g")
    if plots and not runs.empty:
        from bench import plots as plotting

        report.plot_paths = plotting.save_all(runs, curves, extras, out / "plots", seed=seed, reps=reps)
    return report
