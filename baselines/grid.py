"""The grid tasks' observation embedding, shared by AD / ED (:mod:`baselines.ad`) and RL² (:mod:`baselines.rl2`).

Dark Room and Dark Key-to-Door observe one cell index ``y * size + x``; the AD paper's agent observes its ``(x, y)``
position (Sec. 5). :class:`GridEmbedding` embeds the index as that pair. A per-cell table (one learned vector per
cell, what ``nn.Embedding(size * size, d)`` is) lets a model tell every cell apart without any geometry, and both
models then learnt the 64 train goals' cells instead of a search: measured on Dark Room's 17 held-out goals (quick
preset, seed 0, normalised), AD with a per-cell table found goals such as (7, 0), (7, 3), (7, 7) in its first 20
in-context episodes and scored ~0 on them over its last 10 (62.9 in all; without it 84.3), and RL² went from
3.9 to 5.4 over its 100 episodes (without it 14.2 to 39.9). ``cell_embedding`` (a config field of both methods)
puts the per-cell table back on top of the (x, y) one.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from tasks.spec import TaskSpec

GRID_ONLY_FIELDS = ("cell_embedding",)
"""Config fields only a grid task's model reads; the methods leave them out of other tasks' run ids."""


class GridEmbedding(nn.Module):
    """Cell index ``y * size + x`` -> one table entry for the column ``x`` plus one for the row ``y`` (a linear
    embedding of one-hot ``x`` and ``y``), and with ``cell_table`` one more per cell.

    The row and column tables give the model the room's geometry: reading "the goal is up and to the right" from a
    rewarded cell in context then generalises to goals never seen in training. A per-cell table undoes that (module
    docstring: the measurements).
    """

    def __init__(self, size: int, out_dim: int, cell_table: bool = False) -> None:
        super().__init__()
        self.size = size
        self.x, self.y = nn.Embedding(size, out_dim), nn.Embedding(size, out_dim)
        self.cell = nn.Embedding(size * size, out_dim) if cell_table else None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.x(obs % self.size) + self.y(obs // self.size)
        return out if self.cell is None else out + self.cell(obs)


def env_grid_size(env) -> int | None:
    """The side of ``env``'s grid when it observes a cell index ``y * size + x`` (a ``Discrete(size**2)`` space
    and a ``size`` attribute), else ``None``."""
    size, space = getattr(env.unwrapped, "size", None), env.observation_space
    n = int(space.n) if hasattr(space, "n") else None
    return size if isinstance(size, int) and n == size * size else None


@cache
def _task_grid_size(task_id: str) -> int | None:
    from tasks import get_task

    spec = get_task(task_id)
    env = spec.make(spec.test_tasks[0])
    try:
        return env_grid_size(env)
    finally:
        env.close()


def grid_size(spec: TaskSpec) -> int | None:
    """:func:`env_grid_size` of ``spec``'s tasks (``None`` without making an env for non-discrete observations)."""
    return None if spec.observation != "discrete" else _task_grid_size(spec.id)


def grid_fields_ignored(spec: TaskSpec) -> tuple[str, ...]:
    """A method's ``run_id_ignores``: :data:`GRID_ONLY_FIELDS` on tasks without a grid, so their run ids (and
    the stored runs they name) stay as they were before the fields existed."""
    return () if grid_size(spec) is not None else GRID_ONLY_FIELDS
