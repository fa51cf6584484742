"""The `bench` command line: list, run, leaderboard, histories, per-task.

Exit status: 0 success, 1 some runs failed, 2 bad input (unknown names, invalid config, unwritable results).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.registry import AdaptBenchError, UnknownNameError

EXIT_FAILED_RUNS = 1
EXIT_USAGE = 2


def _default_cache() -> str:
    from tasks.references import default_cache_dir

    return str(default_cache_dir())


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---------------------------------------------------------------------------------------------- list
def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "tasks":
        from bench.config import check_preset
        from tasks import list_tasks
        from tasks.references import get_references

        check_preset(args.preset)  # before any reference is measured
        rows = []
        for spec in list_tasks():
            splits = f"{len(spec.train_tasks)}/{len(spec.test_tasks)}" if spec.train_tasks else "-"
            row = [spec.id, spec.family, spec.observation, spec.actions, splits]
            if not args.no_references:
                print(f"references for {spec.id} ...", file=sys.stderr, flush=True)
                refs = get_references(spec, args.preset, Path(args.cache_dir))
                row += [f"{refs.random:.4g}", refs.random_source.removeprefix("measured: uniform random actions, "),
                        f"{refs.reference:.4g}", refs.reference_source]
            rows.append(row)
        header = ["id", "family", "observation", "actions", "train/test"]
        if not args.no_references:
            header += ["R_random", "random: uniform actions,", "R_reference", "source"]
            print(f"normalisation references for the held-out tasks of preset `{args.preset}`")
        print(_table(rows, header))
    elif args.what == "methods":
        from bench.methods import get_method, method_registry
        from tasks import list_tasks

        reg = method_registry()
        specs = list_tasks()
        rows = []
        for name in reg.names():
            method = get_method(name)
            from bench.method import support_reason

            n = sum(support_reason(method, s) is None for s in specs)
            doc = " ".join((type(method).__doc__ or "").strip().split("\n\n")[0].split())  # its first paragraph
            rows.append([name, reg.provider(name), f"{n}/{len(specs)}", doc])
        print(_table(rows, ["method", "provider", "tasks", "description"]))
    elif args.what == "presets":
        from bench.config import PRESETS

        print(_table([[k, v] for k, v in PRESETS.items()], ["preset", "meaning"]))
    else:
        from bench.runner import suites

        rows = [[s.name, s.preset, ",".join(s.methods), ",".join(s.tasks), str(s.seeds), s.description]
                for s in suites().values()]
        print(_table(rows, ["suite", "preset", "methods", "tasks", "seeds", "description"]))
    return 0


# ---------------------------------------------------------------------------------------------- run
def _split(values: list[str] | None) -> list[str]:
    return [x.strip() for v in values or [] for x in v.split(",") if x.strip()]


def cmd_run(args: argparse.Namespace) -> int:
    from bench.config import check_preset, parse_set_args
    from bench.executor import LocalExecutor, run_sweep
    from bench.runner import check_device, expand_methods, expand_tasks, get_suite, make_plan, suite_plan
    from bench.store import ResultsStore

    suite = get_suite(args.suite) if args.suite else None
    if suite is None and not (args.methods and args.tasks):
        raise AdaptBenchError("give --suite, or both --methods and --tasks (see `bench list suites`)")
    preset = check_preset(args.preset or (suite.preset if suite else "smoke"))
    methods = expand_methods(_split(args.methods)) if args.methods else None
    tasks = expand_tasks(_split(args.tasks)) if args.tasks else None
    n_seeds = args.seeds if args.seeds is not None else (suite.seeds if suite else 1)
    if n_seeds < 1:
        raise AdaptBenchError(f"--seeds must be >= 1, got {n_seeds}")
    if args.first_seed < 0:
        raise AdaptBenchError(f"--first-seed must be >= 0, got {args.first_seed}")
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    # the executor checks its own arguments (workers, threads, device string), before planning or a dry run
    if args.executor == "ray":
        from bench.ray_executor import RayExecutor

        executor = RayExecutor(address=args.address, device=args.device, torch_threads=args.torch_threads,
                               worker_cache_dir=args.worker_cache_dir)
    else:
        executor = LocalExecutor(args.workers, args.torch_threads, args.device)
        if not args.dry_run:  # planning needs no device; running here does
            check_device(args.device)
    overrides = parse_set_args(args.set or [])
    if suite is not None:
        plan = suite_plan(suite, seeds, preset, overrides, methods, tasks)
    else:
        plan = make_plan(methods, tasks, seeds, preset, overrides)  # type: ignore[arg-type]
    if not plan.cells:  # every pair unsupported: say why instead of a silent "0 to run"
        reasons = "".join(f"\n  {m}/{t}: {why}" for m, t, why in plan.skipped)
        raise AdaptBenchError("nothing to run: no method in this plan supports any of its tasks" + reasons
                              + ("\n(with one block, --methods / --tasks replace the suite's own)" if suite else ""))
    methods = sorted({c.method for c in plan.cells} | {m for m, _, _ in plan.skipped})
    tasks = sorted({c.task for c in plan.cells} | {t for _, t, _ in plan.skipped})

    store = ResultsStore(args.results_dir)
    if args.dry_run:
        from bench.executor import pending_cells

        todo, _, _ = pending_cells(plan, store, args.retry_failed)
        todo_ids = {c.run_id for c in todo}
        print(f"plan: preset {preset}, {len(methods)} method(s) x {len(tasks)} task(s) x {len(seeds)} seed(s)")
        for c in plan.cells:
            stored = store.status(c.run_id)
            state = "run" if c.run_id in todo_ids else stored
            note = "  [the stored record is corrupt: it runs again]" if stored == "corrupt" else ""
            print(f"  {state:7s} {c.label}  ({c.run_id}){note}")
        for m, t, why in plan.skipped:
            print(f"  skip    {m}/{t}: {why}")
        print(f"{len(todo)} to run, {len(plan.cells) - len(todo)} stored, {len(plan.skipped)} pair(s) skipped")
        return 0
    for m, t, why in plan.skipped:
        print(f"skip {m}/{t}: {why}", file=sys.stderr)
    store.ensure_writable()  # before any run starts
    summary = run_sweep(plan, store, args.cache_dir, executor, args.retry_failed)
    failed = [c for c in plan.cells if store.status(c.run_id) in ("failed", "corrupt")]
    ok = len(plan.cells) - len(failed)
    elsewhere = sum(r.elsewhere for r in summary.results)
    print(f"done: {ok}/{len(plan.cells)} runs stored ok ({len(summary.results) - elsewhere} run now, "
          f"{summary.skipped_done + elsewhere} found stored), {len(failed)} failed", file=sys.stderr)
    if failed:
        for c in failed:
            try:
                reason = store.read_meta(c.run_id).get("reason")
            except AdaptBenchError as e:
                reason = str(e)
            print(f"  FAILED {c.label}: {reason}  ({store.runs / c.run_id})", file=sys.stderr)
        print("re-run with --retry-failed to run failed cells again", file=sys.stderr)
        return EXIT_FAILED_RUNS
    return 0


# ---------------------------------------------------------------------------------------------- leaderboard
def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench.leaderboard import build_leaderboard

    runs = Path(args.results_dir) / "runs"
    if not runs.is_dir():
        what = "is not a directory" if Path(args.results_dir).exists() and not Path(args.results_dir).is_dir() \
            else f"has no run records (no `{runs}`)"
        raise AdaptBenchError(f"--results-dir `{args.results_dir}` {what}: run `bench run` into it first")
    report = build_leaderboard(args.results_dir, out_dir=args.out_dir, plots=not args.no_plots,
                               seed=args.bootstrap_seed, reps=args.reps)
    for line in report.messages:
        print(line, file=sys.stderr)
    print(report.markdown_path)
    return 0


def cmd_histories(args: argparse.Namespace) -> int:
    from baselines.histories import save_history_plot
    from bench.config import check_preset
    from bench.runner import expand_tasks
    from tasks import get_task

    preset = check_preset(args.preset)
    for task_id in expand_tasks(_split(args.tasks)):
        spec = get_task(task_id)
        if spec.family != "in-context" or spec.batched_core is None:
            raise AdaptBenchError(f"`{task_id}` has no learning histories (an in-context task with a batched core)")
        print(save_history_plot(task_id, preset, args.cache_dir, Path(args.results_dir) / "plots"))
    return 0


def cmd_per_task(args: argparse.Namespace) -> int:
    from bench.config import check_preset
    from bench.methods import get_method
    from bench.pertask import per_task_report

    methods = _split(args.methods) or None
    for name in methods or ():
        get_method(name)  # an unknown name fails here, with close matches
    report = per_task_report(args.results_dir, args.task, methods, check_preset(args.preset))
    for line in report.messages:
        print(line, file=sys.stderr)
    text = report.markdown()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(args.out)
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="list tasks, methods, presets or suites")
    ls.add_argument("what", choices=["tasks", "methods", "presets", "suites"])
    ls.add_argument("--no-references", action="store_true", help="do not compute normalisation references")
    ls.add_argument("--preset", default="quick", help="the preset whose held-out tasks the references cover")
    ls.add_argument("--cache-dir", default=_default_cache(), help="cache for references and artifacts")
    ls.set_defaults(func=cmd_list)

    run = sub.add_parser("run", help="run a suite (methods x tasks x seeds); finished runs are skipped")
    run.add_argument("--suite", help="a suite from `bench list suites`")
    run.add_argument("--preset", help="smoke | quick | paper (default: the suite's)")
    run.add_argument("--methods", action="append", help="comma-separated method names (default: the suite's)")
    run.add_argument("--tasks", action="append", help="comma-separated task ids or family:<name>")
    run.add_argument("--seeds", type=int, help="number of seeds (default: the suite's)")
    run.add_argument("--first-seed", type=int, default=0)
    run.add_argument("--set", action="append", metavar="[METHOD.]FIELD=VALUE", help="typed config override")
    run.add_argument("--workers", type=int, default=1, help="parallel worker processes (local executor)")
    run.add_argument("--torch-threads", type=int, help="torch threads per worker (default: cores / workers)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps | xpu[:N]")
    run.add_argument("--executor", choices=["local", "ray"], default="local")
    run.add_argument("--address", help="Ray cluster address (with --executor ray)")
    run.add_argument("--worker-cache-dir", help="cache directory on the Ray workers (default: --cache-dir); "
                     "shared artifacts are shipped there when it differs")
    run.add_argument("--results-dir", default="results", help="results root (runs under RESULTS_DIR/runs)")
    run.add_argument("--cache-dir", default=_default_cache(), help="artifact and checkpoint cache")
    run.add_argument("--retry-failed", action="store_true", help="run stored failed runs again")
    run.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    run.set_defaults(func=cmd_run)

    lb = sub.add_parser("leaderboard", help="regenerate leaderboard tables and plots from stored runs")
    lb.add_argument("--results-dir", default="results")
    lb.add_argument("--out-dir", help="where to write leaderboard.md/.csv and plots/ (default: RESULTS_DIR)")
    lb.add_argument("--no-plots", action="store_true")
    lb.add_argument("--bootstrap-seed", type=int, default=0)
    lb.add_argument("--reps", type=int, default=2000, help="bootstrap replicates")
    lb.set_defaults(func=cmd_leaderboard)

    hp = sub.add_parser("histories", help="plot a sample of the source's learning histories (built if not cached)")
    hp.add_argument("--tasks", action="append", required=True, help="comma-separated in-context task ids")
    hp.add_argument("--preset", default="quick")
    hp.add_argument("--cache-dir", default=_default_cache(), help="artifact cache holding the histories")
    hp.add_argument("--results-dir", default="results", help="plots go to RESULTS_DIR/plots")
    hp.set_defaults(func=cmd_histories)

    pt = sub.add_parser("per-task", help="in-context return per held-out task (first, peak, final, found) of "
                        "stored runs")
    pt.add_argument("--task", required=True, help="an in-context task id")
    pt.add_argument("--methods", action="append", help="comma-separated method names (default: every method "
                    "with per-task rows)")
    pt.add_argument("--preset", default="quick")
    pt.add_argument("--results-dir", default="results")
    pt.add_argument("--out", help="write the markdown table here instead of printing it")
    pt.set_defaults(func=cmd_per_task)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UnknownNameError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AdaptBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: finished runs are stored; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
