"""Scoring on tiny hand-computed matrices with exact answers (in the manner of rliable's ``metrics_test.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from bench import scoring
from bench.registry import AdaptBenchError
from bench.scoring import (
    DegenerateReferenceError,
    Interval,
    NonFiniteScoreError,
    ScoringError,
    auc,
    bootstrap_replicates,
    episodes_to_plateau,
    final_window_mean,
    first,
    improvement,
    iqm,
    mean,
    median,
    normalize,
    optimality_gap,
    probability_of_improvement,
    stratified_bootstrap_ci,
    stratified_bootstrap_poi,
    stratified_resample_indices,
)


# ------------------------------------------------------------------------------------------ normalisation
def test_normalize_scalars():
    assert normalize(5.0, 0.0, 10.0) == 50.0
    assert normalize(0.0, 0.0, 10.0) == 0.0
    assert normalize(10.0, 0.0, 10.0) == 100.0
    assert normalize(15.0, 0.0, 10.0) == 150.0  # beating the reference is not clipped
    assert normalize(-5.0, 0.0, 10.0) == -50.0  # worse than random is negative
    assert normalize(3.0, 1.0, 5.0) == 50.0


def test_normalize_reference_below_random_keeps_better_positive():
    # e.g. a cost-like return where the reference policy's return is lower than the random one's
    assert normalize(-5.0, 0.0, -10.0) == 50.0


def test_normalize_broadcasts_per_task():
    returns = np.array([[1.0, 10.0, 0.0], [2.0, 20.0, 4.0]])  # (num_runs=2, num_tasks=3)
    out = normalize(returns, random=np.array([0.0, 10.0, -4.0]), reference=np.array([2.0, 30.0, 4.0]))
    np.testing.assert_array_equal(out, [[50.0, 0.0, 50.0], [100.0, 50.0, 100.0]])


def test_normalize_degenerate_reference_is_typed_and_names_the_value():
    with pytest.raises(DegenerateReferenceError, match="7.0"):
        normalize(1.0, 7.0, 7.0)
    # one degenerate task among several is enough
    with pytest.raises(DegenerateReferenceError, match=r"index \(1,\)"):
        normalize(np.ones((2, 3)), np.zeros(3), np.array([1.0, 0.0, 2.0]))
    assert issubclass(DegenerateReferenceError, ValueError)
    assert issubclass(DegenerateReferenceError, AdaptBenchError)


def test_normalize_rejects_nan_reference_but_passes_nan_returns():
    with pytest.raises(NonFiniteScoreError):
        normalize(1.0, float("nan"), 2.0)
    with pytest.raises(NonFiniteScoreError):
        normalize(1.0, 0.0, float("inf"))
    assert np.isnan(normalize(float("nan"), 0.0, 2.0))  # rejected later, by the aggregates


# ------------------------------------------------------------------------------------------- aggregates
def test_iqm_of_one_to_eight():
    # n = 8: int(0.25 * 8) = 2 cut from each end -> mean(3, 4, 5, 6)
    assert iqm(np.arange(1.0, 9.0).reshape(2, 4)) == 4.5
    assert iqm(np.arange(1.0, 9.0).reshape(8, 1)) == 4.5  # pooled: the layout does not matter


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[7.0]], 7.0),  # n = 1: nothing to cut
        ([[1.0, 2.0, 9.0]], 4.0),  # n = 3: int(0.75) = 0, the plain mean
        ([[1.0, 2.0, 3.0, 4.0, 100.0]], 3.0),  # n = 5: int(1.25) = 1 from each end -> mean(2, 3, 4)
        ([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]], 5.5),  # n = 10: int(2.5) = 2 -> mean(3..8)
        ([[-100.0, 1.0], [1.0, 100.0]], 1.0),  # outliers on both sides are cut
    ],
)
def test_iqm_fractional_trimming(values, expected):
    assert iqm(np.array(values)) == expected


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 5), (7, 3), (10, 8), (5, 57)])
def test_iqm_matches_scipy_trim_mean(shape):
    x = np.random.default_rng(sum(shape)).normal(50.0, 30.0, size=shape)
    assert iqm(x) == pytest.approx(scipy.stats.trim_mean(x, 0.25, axis=None), rel=1e-12, abs=1e-12)


def test_aggregates_are_batched_over_leading_axes():
    a = np.arange(1.0, 9.0).reshape(2, 4)
    batch = np.stack([a, a + 10.0])
    np.testing.assert_array_equal(iqm(batch), [4.5, 14.5])
    np.testing.assert_array_equal(mean(batch), [4.5, 14.5])
    np.testing.assert_array_equal(median(batch), [4.5, 14.5])
    np.testing.assert_array_equal(optimality_gap(batch, gamma=10.0), [5.5, 0.0])


def test_mean_is_mean_of_task_means():
    assert mean(np.array([[1.0, 2.0], [3.0, 6.0]])) == 3.0


def test_median_is_median_of_task_means_not_of_pooled_runs():
    scores = np.array([[0.0, 10.0, 20.0], [2.0, 30.0, 40.0]])  # task means 1, 20, 30
    assert median(scores) == 20.0  # the pooled median would be (10 + 20) / 2 = 15
    assert median(np.array([[1.0, 2.0, 3.0, 10.0]])) == 2.5  # even task count: mean of the middle two


def test_optimality_gap_clips_above_gamma():
    scores = np.array([[50.0, 120.0], [100.0, 80.0]])  # shortfalls 50, 0 (clipped), 0, 20
    assert optimality_gap(scores) == 17.5
    assert optimality_gap(np.full((3, 2), 150.0)) == 0.0
    assert optimality_gap(np.array([[0.5, 2.0]]), gamma=1.0) == 0.25  # rliable's 0-1 scale


def test_probability_of_improvement_with_ties():
    x = np.array([[1.0, 3.0], [2.0, 3.0]])
    y = np.array([[2.0, 1.0], [3.0, 3.0]])
    # task 0: pairs (1,2) 0, (1,3) 0, (2,2) 0.5, (2,3) 0 -> 0.125
    # task 1: pairs (3,1) 1, (3,3) 0.5, (3,1) 1, (3,3) 0.5 -> 0.75
    assert probability_of_improvement(x, y) == 0.4375
    assert probability_of_improvement(y, x) == 0.5625  # P(X > Y) + P(Y > X) = 1
    assert probability_of_improvement(x, x) == 0.5
    assert probability_of_improvement(x + 10.0, x) == 1.0


def test_probability_of_improvement_different_run_counts():
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([[2.0], [2.0]])  # 1 vs 2: 0, 0; 2 vs 2: 0.5, 0.5; 3 vs 2: 1, 1 -> 3 / 6
    assert probability_of_improvement(x, y) == 0.5


def test_probability_of_improvement_is_mann_whitney_u_over_mn():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, size=(6, 4)).astype(float)  # small integers: plenty of ties
    y = rng.integers(0, 5, size=(4, 4)).astype(float)
    u = [scipy.stats.mannwhitneyu(x[:, m], y[:, m], method="asymptotic").statistic for m in range(4)]
    assert probability_of_improvement(x, y) == pytest.approx(np.mean(u) / (6 * 4), abs=1e-12)


def test_probability_of_improvement_task_mismatch():
    with pytest.raises(ScoringError, match="3 tasks"):
        probability_of_improvement(np.zeros((2, 3)), np.zeros((2, 4)))


@pytest.mark.parametrize("fn", [iqm, mean, median, optimality_gap])
def test_aggregates_reject_nan_and_bad_shapes(fn):
    with pytest.raises(NonFiniteScoreError, match=r"index \(1, 0\)"):
        fn(np.array([[1.0, 2.0], [np.nan, 3.0]]))
    with pytest.raises(ScoringError, match="shape"):
        fn(np.array([1.0, 2.0]))
    with pytest.raises(ScoringError, match="shape"):
        fn(np.zeros((0, 3)))


def test_aggregates_registry_lists_rliables_four():
    assert list(scoring.AGGREGATES) == ["IQM", "Mean", "Median", "Optimality gap"]


# -------------------------------------------------------------------------------------------- bootstrap
def _scores(seed: int = 0, shape: tuple[int, int] = (10, 8)) -> np.ndarray:
    return np.random.default_rng(seed).normal(50.0, 15.0, size=shape)


def test_bootstrap_same_seed_same_output_other_seed_differs():
    d = {"a": _scores(0), "b": _scores(1)}
    one = stratified_bootstrap_ci(d, iqm, reps=500, seed=7)
    two = stratified_bootstrap_ci(d, iqm, reps=500, seed=7)
    other = stratified_bootstrap_ci(d, iqm, reps=500, seed=8)
    assert one == two
    assert all(isinstance(v, Interval) for v in one.values())
    assert one["a"].point == other["a"].point  # the point estimate is not random
    assert (one["a"].low, one["a"].high) != (other["a"].low, other["a"].high)


def test_bootstrap_method_interval_does_not_depend_on_other_methods():
    a = _scores(0)
    alone = stratified_bootstrap_ci({"a": a}, mean, reps=300, seed=1)
    together = stratified_bootstrap_ci({"z": _scores(5), "a": a, "b": _scores(1)}, mean, reps=300, seed=1)
    assert alone["a"] == together["a"]


@pytest.mark.parametrize("fn", [iqm, mean, median, optimality_gap])
def test_bootstrap_interval_contains_point(fn):
    ci = stratified_bootstrap_ci({"m": _scores(2)}, fn, reps=1000, seed=0)["m"]
    assert ci.low <= ci.point <= ci.high
    assert ci.low < ci.high
    assert (ci.confidence, ci.reps) == (0.95, 1000)
    assert ci.point == pytest.approx(float(fn(_scores(2))))


def test_bootstrap_wider_confidence_gives_wider_interval():
    narrow = stratified_bootstrap_ci({"m": _scores(2)}, iqm, reps=1000, confidence=0.5)["m"]
    wide = stratified_bootstrap_ci({"m": _scores(2)}, iqm, reps=1000, confidence=0.99)["m"]
    assert wide.low < narrow.low and narrow.high < wide.high


def test_bootstrap_collapses_for_constant_data():
    ci = stratified_bootstrap_ci({"c": np.full((5, 3), 42.0)}, iqm, reps=200)["c"]
    assert ci.point == ci.low == ci.high == 42.0
    # constant within each task but different across tasks: stratification keeps every task's value
    per_task = np.tile([10.0, 20.0, 90.0], (4, 1))
    ci = stratified_bootstrap_ci({"c": per_task}, mean, reps=200)["c"]
    assert ci.point == ci.low == ci.high == 40.0


def test_bootstrap_single_run_collapses_to_point():
    one_run = _scores(0, shape=(1, 8))
    ci = stratified_bootstrap_ci({"s": one_run}, iqm, reps=100)["s"]
    assert ci.low == ci.point == ci.high == iqm(one_run)
    poi = stratified_bootstrap_poi(one_run + 1.0, one_run, reps=100)
    assert poi.low == poi.point == poi.high == 1.0


def test_bootstrap_is_stratified_by_task():
    # task m holds the values 100 m + run, so a value names the task it came from
    num_runs, num_tasks, reps = 4, 3, 400
    scores = 100.0 * np.arange(num_tasks)[None, :] + np.arange(num_runs)[:, None]
    seen = []

    def record(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return mean(batch)

    stratified_bootstrap_ci({"m": scores}, record, reps=reps, seed=0)
    batch = np.concatenate([b for b in seen if b.ndim == 3])  # drop the point-estimate call
    assert batch.shape == (reps, num_runs, num_tasks)
    # every replicate draws exactly num_runs scores from every task column, and only from that column;
    # an unstratified (pooled) resample would put e.g. 205 into column 0 or leave a column short.
    np.testing.assert_array_equal(batch // 100, np.broadcast_to(np.arange(num_tasks), batch.shape))
    # ... with replacement: replicates differ from the original and repeat runs
    assert not all(np.array_equal(b, scores) for b in batch)
    assert any(len(np.unique(b[:, 0])) < num_runs for b in batch)
    # every run of every task is drawn at some point
    for m in range(num_tasks):
        assert set(np.unique(batch[:, :, m])) == set(scores[:, m])


def test_bootstrap_replicates_use_the_documented_indices():
    scores = _scores(4, shape=(5, 3))
    values = bootstrap_replicates(scores, mean, reps=50, rng=np.random.default_rng(9))
    idx = stratified_resample_indices(np.random.default_rng(9), 5, 3, 50)
    expected = [np.take_along_axis(scores, i, axis=0).mean(axis=0).mean() for i in idx]
    np.testing.assert_allclose(values, expected, rtol=1e-13)
    # the interval is the percentile interval of those replicates
    ci = stratified_bootstrap_ci({"m": scores}, mean, reps=50)["m"]
    assert ci.low <= ci.high


def test_bootstrap_unbatched_aggregate():
    d = {"m": _scores(3)}
    batched = stratified_bootstrap_ci(d, iqm, reps=200, seed=4)["m"]
    looped = stratified_bootstrap_ci(d, lambda s: float(iqm(s)), reps=200, seed=4, batched=False)["m"]
    assert looped.low == pytest.approx(batched.low, rel=1e-12)
    assert looped.high == pytest.approx(batched.high, rel=1e-12)
    # a 2-D-only aggregate passed as batched is caught, with the fix in the message
    with pytest.raises(ScoringError, match="batched=False"):
        stratified_bootstrap_ci(d, lambda s: float(np.mean(s)), reps=10)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_bootstrap_rejects_non_finite(bad):
    s = _scores(0)
    s[3, 2] = bad
    with pytest.raises(NonFiniteScoreError, match=r"`broken`.*index \(3, 2\)"):
        stratified_bootstrap_ci({"ok": _scores(1), "broken": s}, iqm, reps=10)
    with pytest.raises(NonFiniteScoreError):
        stratified_bootstrap_poi(s, _scores(1), reps=10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"reps": 0}, "reps"), ({"reps": 2.5}, "reps"), ({"confidence": 1.0}, "confidence"), ({"seed": -1}, "seed")],
)
def test_bootstrap_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ScoringError, match=match):
        stratified_bootstrap_ci({"m": _scores(0)}, iqm, **kwargs)
    with pytest.raises(ScoringError, match=match):
        stratified_bootstrap_poi(_scores(0), _scores(1), **kwargs)


def test_bootstrap_poi():
    x, y = _scores(0) + 5.0, _scores(1)
    one = stratified_bootstrap_poi(x, y, reps=500, seed=3)
    assert one == stratified_bootstrap_poi(x, y, reps=500, seed=3)
    assert one != stratified_bootstrap_poi(x, y, reps=500, seed=4)
    assert one.point == probability_of_improvement(x, y)
    assert 0.0 <= one.low <= one.point <= one.high <= 1.0
    # different run counts are fine: X and Y are resampled independently
    assert stratified_bootstrap_poi(x[:3], y, reps=100).point == probability_of_improvement(x[:3], y)
    # strict dominance holds in every resample
    dominated = stratified_bootstrap_poi(y + 1000.0, y, reps=100)
    assert dominated.low == dominated.point == dominated.high == 1.0


def test_bench_bootstrap_2000_reps(benchmark):  # pytest-benchmark; skipped unless --benchmark-only
    d = {"a": _scores(0), "b": _scores(1)}
    benchmark(stratified_bootstrap_ci, d, iqm, reps=2000)


# ---------------------------------------------------------------------------------------- curve summaries
def test_auc():
    assert auc([0, 1, 2], [0.0, 1.0, 2.0]) == 1.0
    assert auc([0, 10, 20], [40.0, 40.0, 40.0]) == 40.0
    assert auc([0, 1, 3], [0.0, 2.0, 2.0]) == pytest.approx(5.0 / 3.0)  # (1*1 + 2*2) / 3, uneven steps
    assert auc([5], [7.0]) == 7.0  # a single point is that value
    np.testing.assert_allclose(auc([0, 1, 3], [[0.0, 2.0, 2.0], [1.0, 1.0, 1.0]]), [5.0 / 3.0, 1.0])


def test_auc_rejects_bad_steps():
    with pytest.raises(ScoringError, match="strictly increasing"):
        auc([0, 2, 2], [1.0, 2.0, 3.0])
    with pytest.raises(ScoringError, match="shape"):
        auc([0, 1], [1.0, 2.0, 3.0])
    with pytest.raises(NonFiniteScoreError):
        auc([0, 1], [1.0, np.nan])


def test_final_window_mean():
    v = np.arange(30.0)
    assert final_window_mean(v) == 28.0  # ceil(0.1 * 30) = 3, not 4 (0.1 * 30 = 3.0000000000000004)
    assert final_window_mean(np.arange(10.0)) == 9.0
    assert final_window_mean(np.arange(5.0)) == 4.0  # ceil(0.5) = 1
    assert final_window_mean(np.arange(15.0)) == 13.5  # ceil(1.5) = 2
    assert final_window_mean(np.arange(4.0), fraction=1.0) == 1.5
    np.testing.assert_array_equal(final_window_mean(np.arange(20.0).reshape(2, 10)), [9.0, 19.0])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ScoringError, match="fraction"):
            final_window_mean(v, fraction=bad)


def test_first_and_improvement():
    curve = np.array([10.0, 20.0, 30.0, 40.0])
    assert first(curve) == 10.0
    assert improvement(curve, fraction=0.5) == 25.0  # mean(30, 40) - 10
    np.testing.assert_array_equal(improvement(np.array([[0.0, 5.0], [3.0, 1.0]]), fraction=0.5), [5.0, -2.0])


def test_episodes_to_plateau():
    # final (last 10% of 20 = last 2) = 10; 90% = 9; trailing means over 2: ep4 (2+4)/2=3, ... ep 7: (8+10)/2 = 9
    curve = np.array([0, 0, 2, 4, 6, 8, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10], dtype=float)
    assert episodes_to_plateau(curve, window=2) == 7.0
    assert episodes_to_plateau(np.full(30, 50.0)) == 1.0  # at the plateau from the start
    assert episodes_to_plateau(curve, window=1) == 7.0  # 10 >= 9 first at episode 7
    assert np.isnan(episodes_to_plateau(np.zeros(10)))  # nothing to plateau at
    noise = np.r_[np.full(20, -3.0), np.full(10, 1.0)]  # a random policy's normalised curve: final ~0
    assert episodes_to_plateau(noise) == 30.0 and np.isnan(episodes_to_plateau(noise, min_final=5.0))
    slow, fast = np.minimum(np.arange(1000) / 3.0, 100.0), np.minimum(np.arange(100) * 10.0, 100.0)
    assert episodes_to_plateau(fast) < episodes_to_plateau(slow)
    with pytest.raises(ScoringError, match="one curve"):
        episodes_to_plateau(np.zeros((2, 10)))
