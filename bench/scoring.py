"""Scoring: normalised scores, aggregate metrics and stratified-bootstrap intervals, as pure numpy functions.

The definitions follow rliable (Agarwal et al., NeurIPS 2021, arXiv 2108.13264; ``rliable/metrics.py`` and
``rliable/library.py``). We do not depend on rliable itself: version 1.2 fails to import next to pandas 3, and
its bootstrap draws from numpy's *global* RNG (``np.random.choice``) so its ``random_state`` argument has no
effect and intervals are not reproducible. The few functions we need are small enough to own, and owning them
lets the bootstrap run vectorised over replicates (2000 replicates of a 10 x 8 matrix take milliseconds).

Conventions
    * A score matrix has shape ``(num_runs, num_tasks)``: ``scores[n, m]`` is run (seed) ``n`` on task ``m``.
      Every aggregate also accepts a batch ``(..., num_runs, num_tasks)`` and reduces the last two axes; that
      is how the bootstrap evaluates all replicates in one call.
    * Scores are normalised to a 0-100 scale (:func:`normalize`), so ``gamma=100`` is "as good as the reference".
    * No pandas, plotting or I/O here; callers (leaderboard, plots) turn results into tables and figures.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from bench.registry import AdaptBenchError

Aggregate = Callable[[np.ndarray], "np.ndarray | float"]

# Elements of resampled data materialised at once. The chunking depends on the data's shape only, so the
# random stream, and therefore every interval, is the same on every machine for the same seed.
_CHUNK_ELEMENTS = 1 << 22


class ScoringError(AdaptBenchError, ValueError):
    """Scores or parameters that the scoring functions cannot work with (bad shape, bad fraction, ...)."""


class DegenerateReferenceError(ScoringError):
    """``R_reference == R_random``: the normalisation would divide by zero."""


class NonFiniteScoreError(ScoringError):
    """A NaN or infinite score reached an aggregate or the bootstrap (usually a missing or failed run)."""


# --------------------------------------------------------------------------------------------- validation
def _as_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    """Float array of shape ``(..., num_runs, num_tasks)`` with at least one run and task, all finite."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim < 2 or arr.shape[-1] == 0 or arr.shape[-2] == 0:
        raise ScoringError(
            f"{name} must have shape (num_runs, num_tasks) with num_runs, num_tasks >= 1, got shape {arr.shape}"
        )
    _check_finite(arr, name)
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise NonFiniteScoreError(
            f"{name} holds {int(bad.sum())} non-finite value(s), first {float(arr[where])!r} at index {where}"
            + ("; drop or re-run the failed runs before scoring" if "scores" in name else "")
        )


def _as_curve(values: np.ndarray, name: str = "values") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[-1] == 0:
        raise ScoringError(f"{name} must have shape (..., n) with n >= 1, got shape {arr.shape}")
    _check_finite(arr, name)
    return arr


# ------------------------------------------------------------------------------------------ normalisation
def normalize(
    returns: np.ndarray | float, random: np.ndarray | float, reference: np.ndarray | float
) -> np.ndarray | float:
    """Normalised score ``100 * (R - R_random) / (R_reference - R_random)``, with numpy broadcasting.

    0 is the uniform-random policy, 100 the task's reference. ``returns`` of shape ``(num_runs, num_tasks)``
    and ``random``/``reference`` of shape ``(num_tasks,)`` broadcast per task. A reference below the random
    return is allowed (the sign still makes "better than random" positive); an equal one is not.
    NaN returns stay NaN here (the aggregates reject them); the references must be finite.

    Raises:
        DegenerateReferenceError: ``reference == random`` anywhere.
        NonFiniteScoreError: a NaN or infinite reference.
    """
    r = np.asarray(returns, dtype=np.float64)
    lo = np.asarray(random, dtype=np.float64)
    hi = np.asarray(reference, dtype=np.float64)
    _check_finite(lo, "random")
    _check_finite(hi, "reference")
    span = hi - lo
    if (span == 0).any():
        where = tuple(int(i) for i in np.argwhere(np.atleast_1d(span == 0))[0])
        pair = np.broadcast_arrays(np.atleast_1d(lo), np.atleast_1d(hi))
        raise DegenerateReferenceError(
            f"reference == random == {float(pair[0][where])!r} at index {where}; the normalised score is undefined"
        )
    out = 100.0 * (r - lo) / span
    return out[()] if out.ndim == 0 else out  # a plain scalar in, a numpy scalar out


# ------------------------------------------------------------------------------------------- aggregates
def iqm(scores: np.ndarray) -> np.ndarray | float:
    """Interquartile mean of all runs x tasks pooled: the 25% trimmed mean of the flattened matrix.

    Same definition as ``scipy.stats.trim_mean(scores, 0.25, axis=None)`` (rliable's ``aggregate_iqm``):
    ``k = int(0.25 * n)`` values are cut from *each* end of the ``n = num_runs * num_tasks`` sorted scores
    (rounded down, so n = 1..3 keeps everything and n = 8 keeps the middle 4), and the rest are averaged.

    Args:
        scores: ``(num_runs, num_tasks)``, or a batch ``(..., num_runs, num_tasks)``.
    Returns:
        A float, or an array of the batch shape ``(...)``.
    """
    arr = _as_scores(scores)
    flat = np.sort(arr.reshape(*arr.shape[:-2], -1), axis=-1)
    n = flat.shape[-1]
    k = int(0.25 * n)  # exact for every n below 2**50; scipy's `int(proportiontocut * nobs)`
    return flat[..., k : n - k].mean(axis=-1)


def mean(scores: np.ndarray) -> np.ndarray | float:
    """Mean over tasks of the per-task mean score (rliable's ``aggregate_mean``; equal to the pooled mean).

    Args:
        scores: ``(num_runs, num_tasks)``, or a batch ``(..., num_runs, num_tasks)``.
    """
    arr = _as_scores(scores)
    return arr.mean(axis=-2).mean(axis=-1)


def median(scores: np.ndarray) -> np.ndarray | float:
    """Median over tasks of the per-task mean score (rliable's ``aggregate_median``).

    Note this is *not* the median of the pooled runs: runs are averaged within a task first, so with
    8 tasks the median is the mean of the 4th and 5th task means.

    Args:
        scores: ``(num_runs, num_tasks)``, or a batch ``(..., num_runs, num_tasks)``.
    """
    arr = _as_scores(scores)
    return np.median(arr.mean(axis=-2), axis=-1)


def optimality_gap(scores: np.ndarray, gamma: float = 100.0) -> np.ndarray | float:
    """Mean shortfall from ``gamma``: ``mean(gamma - min(score, gamma))`` over all runs x tasks.

    rliable's ``aggregate_optimality_gap`` (written there as ``gamma - mean(min(scores, gamma))``): scores
    above ``gamma`` count as ``gamma``, so beating the reference on one task cannot hide a shortfall on
    another. Lower is better. ``gamma = 100`` is the reference on our normalised 0-100 scale
    (rliable's default ``gamma = 1`` is for scores normalised to 0-1).

    Args:
        scores: ``(num_runs, num_tasks)``, or a batch ``(..., num_runs, num_tasks)``.
    """
    arr = _as_scores(scores)
    if not math.isfinite(gamma):
        raise ScoringError(f"gamma must be finite, got {gamma!r}")
    return (gamma - np.minimum(arr, gamma)).mean(axis=(-2, -1))


def probability_of_improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> np.ndarray | float:
    """``P(X > Y)``: per task, the chance that a random run of X beats a random run of Y; averaged over tasks.

    For task ``m``: ``mean over all pairs (i, j) of [x_im > y_jm] + 0.5 [x_im == y_jm]``, which is the
    Mann-Whitney U statistic of X divided by ``n_x * n_y`` (rliable's ``probability_of_improvement``).
    ``P(X > Y) + P(Y > X) == 1`` always; 0.5 means no difference.

    Args:
        scores_x: ``(n_x, num_tasks)``, or a batch ``(..., n_x, num_tasks)``.
        scores_y: ``(n_y, num_tasks)``, or a batch ``(..., n_y, num_tasks)``; the same tasks in the same order.
    """
    x = _as_scores(scores_x, "scores_x")
    y = _as_scores(scores_y, "scores_y")
    if x.shape[-1] != y.shape[-1]:
        raise ScoringError(f"scores_x has {x.shape[-1]} tasks but scores_y has {y.shape[-1]}; they must match")
    xi = x[..., :, None, :]  # (..., n_x, 1, T)
    yj = y[..., None, :, :]  # (..., 1, n_y, T)
    wins = (xi > yj).mean(axis=(-3, -2)) + 0.5 * (xi == yj).mean(axis=(-3, -2))  # (..., T)
    return wins.mean(axis=-1)


AGGREGATES: dict[str, Aggregate] = {
    "IQM": iqm,
    "Mean": mean,
    "Median": median,
    "Optimality gap": optimality_gap,
}
"""The aggregates a leaderboard reports, by display name (rliable's standard four)."""


# -------------------------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class Interval:
    """A point estimate on the original data and its percentile bootstrap interval."""

    point: float
    low: float
    high: float
    confidence: float
    reps: int


def _check_reps(reps: int) -> None:
    if isinstance(reps, bool) or not isinstance(reps, int | np.integer) or reps < 1:
        raise ScoringError(f"reps must be a positive int, got {reps!r}")


def _check_bootstrap_args(reps: int, confidence: float) -> None:
    _check_reps(reps)
    if not 0.0 < confidence < 1.0:
        raise ScoringError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ScoringError(f"seed must be a non-negative int, got {seed!r}")


def stratified_resample_indices(rng: np.random.Generator, num_runs: int, num_tasks: int, reps: int) -> np.ndarray:
    """Row indices for ``reps`` stratified resamples, shape ``(reps, num_runs, num_tasks)``.

    ``idx[b, i, m]`` is the run that fills slot ``i`` of task ``m`` in replicate ``b``: each task column is
    resampled with replacement *on its own* (rliable's ``StratifiedBootstrap``), so every replicate holds
    exactly ``num_runs`` scores of every task and never mixes tasks. Use with
    ``np.take_along_axis(scores[None], idx, axis=1)``.
    """
    return rng.integers(0, num_runs, size=(reps, num_runs, num_tasks))


def _chunks(reps: int, per_rep_elements: int) -> list[int]:
    size = max(1, _CHUNK_ELEMENTS // max(1, per_rep_elements))
    return [min(size, reps - start) for start in range(0, reps, size)]


def _apply(aggregate_fn: Aggregate, batch: np.ndarray, batched: bool) -> np.ndarray:
    """``aggregate_fn`` on every replicate of ``batch`` ``(c, num_runs, num_tasks)`` -> ``(c,)``."""
    if not batched:
        return np.array([float(aggregate_fn(b)) for b in batch], dtype=np.float64)
    out = np.asarray(aggregate_fn(batch), dtype=np.float64)
    if out.shape != batch.shape[:1]:
        raise ScoringError(
            f"aggregate_fn returned shape {out.shape} for a batch of shape {batch.shape}; a batched aggregate "
            "must reduce the last two axes of a (..., num_runs, num_tasks) array. Pass batched=False to call it "
            "once per replicate instead"
        )
    return out


def bootstrap_replicates(
    scores: np.ndarray,
    aggregate_fn: Aggregate,
    *,
    reps: int = 2000,
    rng: np.random.Generator,
    batched: bool = True,
) -> np.ndarray:
    """The aggregate on ``reps`` stratified resamples of ``scores``, shape ``(reps,)``.

    Args:
        scores: ``(num_runs, num_tasks)``, finite.
        aggregate_fn: maps ``(..., num_runs, num_tasks)`` to ``(...)`` (every aggregate in this module does);
            with ``batched=False`` it is called once per replicate on a ``(num_runs, num_tasks)`` matrix.
        rng: the Generator to draw from; it is advanced.
    """
    arr = _as_scores(scores)
    if arr.ndim != 2:
        raise ScoringError(f"scores must have shape (num_runs, num_tasks), got shape {arr.shape}")
    _check_reps(reps)
    num_runs, num_tasks = arr.shape
    parts = []
    for c in _chunks(reps, arr.size):
        idx = stratified_resample_indices(rng, num_runs, num_tasks, c)
        parts.append(_apply(aggregate_fn, np.take_along_axis(arr[None], idx, axis=1), batched))
    return np.concatenate(parts)


def _interval(point: float, replicates: np.ndarray, confidence: float, reps: int) -> Interval:
    # The percentile method, as rliable's default (`method="percentile"` in `get_interval_estimates`).
    low, high = np.quantile(replicates, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return Interval(point=point, low=float(low), high=float(high), confidence=confidence, reps=reps)


def _method_rng(seed: int, name: str) -> np.random.Generator:
    # One stream per (seed, method name), so adding, removing or reordering methods in a table never moves
    # another method's interval. blake2b, not hash(): hash() of a str changes between processes.
    words = np.frombuffer(hashlib.blake2b(str(name).encode(), digest_size=16).digest(), dtype="<u4")
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(int(w) for w in words)]))


def stratified_bootstrap_ci(
    score_dict: Mapping[str, np.ndarray],
    aggregate_fn: Aggregate,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    *,
    batched: bool = True,
) -> dict[str, Interval]:
    """Point estimate and stratified-bootstrap percentile interval of an aggregate, for every method.

    For each method, runs are resampled with replacement independently within each task (see
    :func:`stratified_resample_indices`), the aggregate is computed on each of ``reps`` replicates, and the
    interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those values. The
    point estimate is the aggregate of the original data.

    Randomness: each method draws from ``np.random.default_rng`` seeded with ``seed`` and the method's name,
    so the output is identical for the same seed, and one method's interval does not depend on which other
    methods are in ``score_dict``.

    With a single run (``num_runs == 1``) every resample is the original matrix, so the interval collapses
    to the point estimate (returned as such, without resampling): one seed says nothing about seed variance.

    Args:
        score_dict: method name -> ``(num_runs, num_tasks)`` finite scores (methods may differ in both sizes).
        aggregate_fn: e.g. :func:`iqm`; see :func:`bootstrap_replicates` for ``batched``.
    Raises:
        NonFiniteScoreError: a NaN or infinite score.
        ScoringError: bad shapes, ``reps`` or ``confidence``.
    """
    _check_bootstrap_args(reps, confidence)
    _check_seed(seed)
    out: dict[str, Interval] = {}
    for name, scores in score_dict.items():
        arr = _as_scores(scores, f"scores of `{name}`")
        if arr.ndim != 2:
            raise ScoringError(f"scores of `{name}` must have shape (num_runs, num_tasks), got shape {arr.shape}")
        point = float(np.asarray(aggregate_fn(arr)))
        if arr.shape[0] == 1:
            out[name] = Interval(point, point, point, confidence, reps)
            continue
        values = bootstrap_replicates(arr, aggregate_fn, reps=reps, rng=_method_rng(seed, name), batched=batched)
        out[name] = _interval(point, values, confidence, reps)
    return out


def stratified_bootstrap_poi(
    scores_x: np.ndarray,
    scores_y: np.ndarray,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """``P(X > Y)`` (:func:`probability_of_improvement`) with a stratified-bootstrap percentile interval.

    X and Y are resampled independently of each other (they are different methods' seeds, not pairs), each
    stratified by task, as rliable's ``StratifiedIndependentBootstrap``; ``n_x`` and ``n_y`` may differ.
    Draws from ``np.random.default_rng(seed)``: X's indices first, then Y's, chunk by chunk.
    If both have a single run the interval collapses to the point.

    Args:
        scores_x: ``(n_x, num_tasks)``; scores_y: ``(n_y, num_tasks)``, finite, the same tasks.
    """
    _check_bootstrap_args(reps, confidence)
    _check_seed(seed)
    x = _as_scores(scores_x, "scores_x")
    y = _as_scores(scores_y, "scores_y")
    if x.ndim != 2 or y.ndim != 2:
        raise ScoringError(f"scores_x and scores_y must be 2-D (num_runs, num_tasks), got {x.shape} and {y.shape}")
    point = float(probability_of_improvement(x, y))
    (nx, num_tasks), ny = x.shape, y.shape[0]
    if nx == 1 and ny == 1:
        return Interval(point, point, point, confidence, reps)
    rng = np.random.default_rng(seed)
    parts = []
    for c in _chunks(reps, nx * ny * num_tasks):  # the pairwise comparison is the largest temporary
        xb = np.take_along_axis(x[None], stratified_resample_indices(rng, nx, num_tasks, c), axis=1)
        yb = np.take_along_axis(y[None], stratified_resample_indices(rng, ny, num_tasks, c), axis=1)
        parts.append(probability_of_improvement(xb, yb))
    return _interval(point, np.concatenate(parts), confidence, reps)


# ---------------------------------------------------------------------------------------- curve summaries
def auc(steps: np.ndarray, values: np.ndarray) -> np.ndarray | float:
    """Normalised area under a learning curve: trapezoid integral over ``steps`` divided by their span.

    The result is on the scale of ``values`` (a curve constant at 40 has AUC 40), so it reads as "the average
    score over training", the sample-efficiency summary. A single point returns that point's value.

    Args:
        steps: ``(n,)`` strictly increasing (e.g. environment frames at each evaluation).
        values: ``(..., n)``; leading axes (e.g. runs) are kept.
    """
    s = np.asarray(steps, dtype=np.float64)
    v = _as_curve(values)
    if s.ndim != 1 or s.shape[0] != v.shape[-1]:
        raise ScoringError(f"steps must have shape ({v.shape[-1]},) to match values {v.shape}, got {s.shape}")
    _check_finite(s, "steps")
    if s.shape[0] == 1:
        return v[..., 0]
    dx = np.diff(s)
    if (dx <= 0).any():
        i = int(np.argmax(dx <= 0))
        raise ScoringError(f"steps must be strictly increasing, but steps[{i + 1}] = {s[i + 1]!r} <= {s[i]!r}")
    # np.trapezoid only exists from numpy 2.0 and we support 1.26, so the rule is written out.
    area = (dx * (v[..., 1:] + v[..., :-1]) / 2.0).sum(axis=-1)
    return area / (s[-1] - s[0])


def final_window(n: int, fraction: float = 0.1) -> int:
    """How many of ``n`` episodes the final score averages: ``ceil(fraction * n)``, at least one."""
    if not 0.0 < fraction <= 1.0:
        raise ScoringError(f"fraction must lie in (0, 1], got {fraction!r}")
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, and ceil would make it 4.
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


def final_window_mean(values: np.ndarray, fraction: float = 0.1) -> np.ndarray | float:
    """Mean of the last ``ceil(fraction * n)`` values (at least one): the "final score".

    For in-context families ``values`` are the scores of the successive in-context evaluation episodes and
    this is the score over the last 10% of them (DESIGN.md, "What a leaderboard row shows").

    Args:
        values: ``(..., n)``, finite; the last axis is time.
    """
    v = _as_curve(values)
    return v[..., -final_window(v.shape[-1], fraction) :].mean(axis=-1)


def first(values: np.ndarray) -> np.ndarray | float:
    """The first value of each curve (the first in-context episode's score). ``values``: ``(..., n)``."""
    return _as_curve(values)[..., 0]


def improvement(values: np.ndarray, fraction: float = 0.1) -> np.ndarray | float:
    """In-context improvement: :func:`final_window_mean` minus :func:`first`. ``values``: ``(..., n)``.

    Positive when the agent gets better across episodes without weight updates (the AD paper's claim).
    """
    return final_window_mean(values, fraction) - first(values)


def episodes_to_plateau(values: np.ndarray, fraction: float = 0.1, level: float = 0.9, window: int = 10,
                        min_final: float = 0.0) -> float:
    """Episodes until the ``window``-episode trailing mean first reaches ``level`` x the final score.

    The final score is :func:`final_window_mean` (last ``fraction`` of the curve). The trailing mean at
    episode ``e`` averages episodes ``max(0, e - window + 1) .. e``; the answer counts episodes (1-based), so
    a curve at its plateau from the start gives 1. The window is fixed in episodes, not a fraction, so curves of
    different lengths (AD's 100 in-context episodes, the source's 1,000 learning episodes) are smoothed alike.
    NaN when the final score is <= ``min_final`` (nothing to plateau at: on a normalised curve a final near 0 is the
    random policy's level, and 90% of it is noise). ``values``: ``(n,)``, finite.
    """
    v = _as_curve(values)
    if v.ndim != 1:
        raise ScoringError(f"episodes_to_plateau takes one curve (n,), got shape {v.shape}")
    if window < 1 or not 0.0 < level <= 1.0:
        raise ScoringError(f"need window >= 1 and level in (0, 1], got window={window!r}, level={level!r}")
    final = float(final_window_mean(v, fraction))
    if final <= min_final:
        return float("nan")
    csum = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, len(v) + 1)
    trailing = (csum[idx] - csum[np.maximum(0, idx - window)]) / np.minimum(idx, window)
    return float(np.argmax(trailing >= level * final - 1e-12) + 1)
