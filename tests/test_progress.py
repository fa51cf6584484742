"""The sweep progress line's ETA: cells weighted by what their (method, task) has cost so far, running cells by
their own pace (on a fake clock)."""

from __future__ import annotations

import io

import pytest

from bench.executor import Progress
from bench.runner import Cell, CellResult


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _cells(method: str, task: str, n: int) -> list[Cell]:
    return [Cell(method, task, seed, "quick", None) for seed in range(n)]


def _progress(total: int, cells: list[Cell]) -> tuple[Progress, Clock]:
    clock = Clock()
    return Progress(total=total, stream=io.StringIO(), cells=cells, clock=clock), clock


def _finish(progress: Progress, cell: Cell, wall: float, status: str = "ok", **kw) -> None:
    progress.started(cell)
    progress.finished(CellResult(cell.run_id, cell.label, status, None, wall, **kw))


def _report(progress: Progress, clock: Clock, cell: Cell, t: float, fraction: float) -> None:
    clock.t = t
    progress.update(cell.run_id, fraction, "")


def test_before_any_cell_finishes_a_running_cell_prices_every_cell_by_its_pace():
    cells = _cells("ad", "DarkRoom-v0", 4)
    progress, clock = _progress(4, cells)
    assert progress.eta(10.0) != progress.eta(10.0)  # NaN: nothing reported yet
    progress.started(cells[0])
    _report(progress, clock, cells[0], 1.0, 0.0)
    _report(progress, clock, cells[0], 10.0, 0.01)  # moved under 2%: a cell, as every other
    assert progress.eta(10.0) == pytest.approx(10.0 / 0.01 * 3.99)
    _report(progress, clock, cells[0], 11.0, 0.5)  # 20 s a cell at its pace: 10 s of it left, 3 cells of 20 s
    assert progress.eta(11.0) == pytest.approx(11.0 / 10.0 * (10.0 + 3 * 20.0))


def test_cheap_cells_do_not_inflate_the_eta():
    """One slow and one fast cell done in 101 s on one worker; one slow and nine fast cells left: 109 s, where
    counting cells alike says 505 s."""
    slow, fast = _cells("ad", "DarkRoom-v0", 2), _cells("random", "DarkRoom-v0", 10)
    progress, clock = _progress(12, slow + fast)
    _finish(progress, slow[0], 100.0)
    _finish(progress, fast[0], 1.0)
    assert progress.eta(101.0) == pytest.approx(100.0 + 9 * 1.0)
    # a running cell at 25% after 25 s of its own: 75 s left, then nine fast cells
    progress.started(slow[1])
    _report(progress, clock, slow[1], 101.0, 0.0)
    _report(progress, clock, slow[1], 126.0, 0.25)
    assert progress.eta(126.0) == pytest.approx(126.0 / 126.0 * (75.0 + 9.0))
    clock.t = 136.0  # 10 s without a report: 10 s less of it left
    assert progress.eta(136.0) == pytest.approx(136.0 / 136.0 * (65.0 + 9.0))


def test_the_last_running_cell_bounds_the_eta_from_below():
    """The sweep's data generation: three builds done by 21 s on parallel workers, the Key-to-Door history at 16%
    20 s after its first report, alone: the pace so far (62 s of work in 21 s) would say 36 s; it needs 105 s."""
    cells = [Cell("ed", "DarkRoom-v0", 0, "quick", None), Cell("ad", "DarkRoom-v0", 0, "quick", None),
             Cell("ed", "DarkKeyToDoor-v0", 0, "quick", None), Cell("ad", "DarkKeyToDoor-v0", 0, "quick", None)]
    progress, clock = _progress(4, cells)
    for cell in cells:
        progress.started(cell)
    _report(progress, clock, cells[3], 1.0, 0.0)
    for cell, wall in zip(cells[:3], (4.0, 18.0, 20.0)):
        progress.finished(CellResult(cell.run_id, cell.label, "ok", None, wall))
    _report(progress, clock, cells[3], 21.0, 0.16)
    assert progress.eta(21.0) == pytest.approx(0.84 * 20.0 / 0.16)


def test_a_queued_cell_is_paced_from_its_first_report_not_from_its_submission():
    """Four 600-s builds on two workers, all marked started at 0: the last two begin at 600 s and are at 10% at
    660 s. Timed from submission their pace would say 5,940 s each; from their first report, 540 s."""
    cells = _cells("ad", "DarkRoom-v0", 4)
    progress, clock = _progress(4, cells)
    for cell in cells:
        progress.started(cell)
    for cell in cells[:2]:
        progress.finished(CellResult(cell.run_id, cell.label, "ok", None, 600.0))
    for cell in cells[2:]:
        _report(progress, clock, cell, 600.0, 0.0)
        _report(progress, clock, cell, 660.0, 0.1)
    assert progress.eta(660.0) == pytest.approx(540.0)


def test_a_resumed_or_restarted_cell_is_paced_by_what_it_does_now():
    cells = _cells("drqv2", "DMC-cartpole-swingup-v0", 2)
    progress, clock = _progress(2, cells)
    _finish(progress, cells[0], 1000.0)
    progress.started(cells[1])
    _report(progress, clock, cells[1], 2.0, 0.6)  # resumed from a checkpoint at 60%: not 2 s of work
    assert progress.eta(2.0) == pytest.approx(2.0 / (1000.0 + 600.0) * 400.0)  # priced by its group until it moves
    _report(progress, clock, cells[1], 102.0, 0.7)  # 10% in 100 s: 300 s left
    assert progress.eta(102.0) == pytest.approx(300.0)
    _report(progress, clock, cells[1], 200.0, 0.1)  # a retried attempt starts over: its group's price again
    assert progress.eta(200.0) == pytest.approx(200.0 / (1000.0 + 100.0) * 900.0)


def test_cells_that_took_no_time_price_nothing():
    """A worker that died is recorded with 0 s: the other AD runs still cost what the finished one did."""
    cells = _cells("ad", "DarkRoom-v0", 4)
    progress, _ = _progress(4, cells)
    _finish(progress, cells[0], 800.0)
    _finish(progress, cells[1], 0.0, status="failed")
    assert progress.eta(800.0) == pytest.approx(2 * 800.0)


def test_cells_stored_by_another_driver_price_nothing_and_unlisted_cells_cost_the_mean():
    cells = _cells("ad", "DarkRoom-v0", 3)
    progress, clock = _progress(5, cells)  # two cells this progress was not told of
    _finish(progress, cells[0], 30.0, elsewhere=True)
    _finish(progress, cells[1], 50.0)
    assert progress.eta(50.0) == pytest.approx(50.0 + 2 * 50.0)
    # the printed line: cell 2 running at 0% and the two unlisted cells left, 50 s of work done in 50 s
    clock.t = 50.0
    progress.started(cells[2])
    assert "[2/5 done, elapsed 50s, ETA 2m30s] ad/DarkRoom-v0/seed2 0%" in progress.line()
