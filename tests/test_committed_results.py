"""The committed results are the current code's: every stored run under ``results/`` has the id that today's plan
gives its (method, task, seed, preset, overrides), so ``bench run`` with the command in ``results/README.md`` finds
it stored instead of running it again, and its config is the one a user gets.

A change of a preset, a budget or a config field changes run ids; this test then names the records it left stale
(re-run them, or give a new field ``OMIT_DEFAULT_FROM_RUN_ID``). ``results/per-task`` is excluded: its Key-to-Door
``ad`` records were made at ``slide_keep`` 0.5, before the per-task preset, and are kept as that measurement.
"""

from __future__ import annotations

import json

import pytest

from bench.runner import make_plan
from tests.conftest import ROOT

RESULT_DIRS = [ROOT / "results" / "runs", ROOT / "results" / "same-vm-arr" / "runs"]
RECORDS = sorted(p for d in RESULT_DIRS if d.is_dir() for p in d.iterdir() if (p / "meta.json").is_file())


def test_there_are_committed_results() -> None:
    assert len(RECORDS) > 100, "results/runs is missing: the leaderboard has nothing to read"


@pytest.mark.parametrize("record", RECORDS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_a_committed_run_has_the_id_the_current_code_plans(record) -> None:
    meta = json.loads((record / "meta.json").read_text())
    assert meta["run_id"] == record.name
    overrides = {meta["method"]: {k: str(v) for k, v in meta["overrides"].items()}} if meta["overrides"] else None
    (cell,) = make_plan([meta["method"]], [meta["task"]], [meta["seed"]], meta["preset"], overrides).cells
    if cell.config is not None:  # fields added since are left out of the id at their default (id_omit)
        assert {k: v for k, v in cell.config.items() if k in meta["config"]} == meta["config"]
        assert set(cell.config) - set(meta["config"]) <= set(cell.id_omit)
    assert cell.run_id == record.name, "stale: the current plan gives this run another id (budget or config)"
