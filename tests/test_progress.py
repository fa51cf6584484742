"""The sweep progress line's ETA: cells weighted by what their (method, task) has cost so far."""

from __future__ import annotations

import io
import time

import pytest

from bench.executor import Progress
from bench.runner import Cell, CellResult


def _cells(method: str, task: str, n: int) -> list[Cell]:
    return [Cell(method, task, seed, "quick", None) for seed in range(n)]


def _finish(progress: Progress, cell: Cell, wall: float, **kw) -> None:
    progress.started(cell)
    progress.finished(CellResult(cell.run_id, cell.label, "ok", None, wall, **kw))


def test_before_any_cell_finishes_running_cells_price_by_their_own_pace():
    cells = _cells("ad", "DarkRoom-v0", 4)
    progress = Progress(total=4, stream=io.StringIO(), cells=cells)
    assert progress.eta(10.0) != progress.eta(10.0)  # NaN: nothing reported yet
    progress.started(cells[0])
    progress._since[cells[0].run_id] = 0.0
    progress.update(cells[0].run_id, 0.01, "")  # under 2%: a cell, as every other
    assert progress.eta(10.0, now=10.0) == pytest.approx(10.0 / 0.01 * 3.99)
    progress.update(cells[0].run_id, 0.5, "")  # 20 s a cell at its pace: 10 s of it left, 3 cells of 20 s
    assert progress.eta(10.0, now=10.0) == pytest.approx(10.0 + 3 * 20.0)


def test_cheap_cells_do_not_inflate_the_eta():
    """One slow and one fast cell done in 101 s on one worker; one slow and nine fast cells left: 109 s, where
    counting cells alike says 505 s."""
    slow, fast = _cells("ad", "DarkRoom-v0", 2), _cells("random", "DarkRoom-v0", 10)
    progress = Progress(total=12, stream=io.StringIO(), cells=slow + fast)
    _finish(progress, slow[0], 100.0)
    _finish(progress, fast[0], 1.0)
    assert progress.eta(101.0) == pytest.approx(100.0 + 9 * 1.0)
    # a running cell at 25% after 25 s of its own: 75 s left, then nine fast cells
    progress.started(slow[1])
    progress._since[slow[1].run_id] = 101.0
    progress.update(slow[1].run_id, 0.25, "")
    assert progress.eta(126.0, now=126.0) == pytest.approx(126.0 / 126.0 * (75.0 + 9.0))


def test_the_last_running_cell_bounds_the_eta_from_below():
    """The sweep's data generation: three builds done by 21 s on parallel workers, the Key-to-Door history at 16%
    after 21 s alone: the pace so far (63 s of work in 21 s) would say 37 s; that cell alone needs 110 s."""
    cells = [Cell("ed", "DarkRoom-v0", 0, "quick", None), Cell("ad", "DarkRoom-v0", 0, "quick", None),
             Cell("ed", "DarkKeyToDoor-v0", 0, "quick", None), Cell("ad", "DarkKeyToDoor-v0", 0, "quick", None)]
    progress = Progress(total=4, stream=io.StringIO(), cells=cells)
    for cell in cells:
        progress.started(cell)
        progress._since[cell.run_id] = 0.0
    for cell, wall in zip(cells[:3], (4.0, 18.0, 20.0)):
        progress.finished(CellResult(cell.run_id, cell.label, "ok", None, wall))
    progress.update(cells[3].run_id, 0.16, "")
    assert progress.eta(21.0, now=21.0) == pytest.approx(21.0 / 0.16 * 0.84)


def test_a_group_not_seen_yet_is_priced_by_its_method_then_by_every_cell():
    room, door = _cells("ad", "DarkRoom-v0", 1), _cells("ad", "DarkKeyToDoor-v0", 1)
    rl2 = _cells("rl2", "DarkKeyToDoor-v0", 1)
    progress = Progress(total=3, stream=io.StringIO(), cells=room + door + rl2)
    _finish(progress, room[0], 60.0)
    # Key-to-Door AD costs what Dark Room AD did; RL², no run of its method yet, the mean of all (60)
    assert progress.eta(60.0) == pytest.approx(60.0 + 60.0)
    _finish(progress, door[0], 140.0)
    assert progress.eta(200.0) == pytest.approx(200.0 / 200.0 * 100.0)  # rl2: the mean of 60 and 140


def test_cells_stored_by_another_driver_price_nothing_and_unlisted_cells_cost_the_mean():
    cells = _cells("ad", "DarkRoom-v0", 3)
    progress = Progress(total=5, stream=io.StringIO(), cells=cells)  # two cells this progress was not told of
    _finish(progress, cells[0], 0.0, elsewhere=True)
    _finish(progress, cells[1], 50.0)
    assert progress.eta(50.0) == pytest.approx(50.0 + 2 * 50.0)
    # the printed line: cell 2 running at 0% and the two unlisted cells left, 50 s of work done in 50 s
    progress.start = time.monotonic() - 50.0
    progress.started(cells[2])
    assert "[2/5 done, elapsed 50s, ETA 2m30s] ad/DarkRoom-v0/seed2 0%" in progress.line()
