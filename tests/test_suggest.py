"""Tests for lrjax.suggest: every expected value below is worked out by hand in comments."""

from __future__ import annotations

import ast
import math
import time

import numpy as np
import pytest

from lrjax import suggest
from lrjax.suggest import (
    DEFAULT_METHOD,
    METHODS,
    minimum,
    seed,
    smooth,
    steepest,
    suggest_all,
    lag_growth,
    lagsafe,
    valley,
    zerolag,
)

NO_SKIP = dict(skip_start=0, skip_end=0)


# --------------------------------------------------------------------------------------------
# Fixture: an asymmetric V on a geometric grid, lr_k = 1e-4 * 10**(k/4), k = 0..9.
#   losses: 2.0, then drops 0.1, 0.2, 0.3, 0.9, 0.4, 0.1 down to 0.0 at k=6, then 0.3, 1.0, 2.5.
# Hand-worked answers:
#   steepest: uniform log spacing h, central slope at k = -(d[k-1] + d[k]) / (2h), largest drop
#             pair is 0.9 + 0.4 at k=4 -> lr_4 = 1e-3.
#   minimum:  min at k=6 -> lr_6 / 10 = 10**-2.5 / 10.
#   seed:     lr_6 * 2/3.
#   valley:   k=0..6 strictly decreasing (7 points); later points build shorter chains
#             (k=7: 6, k=8: 5, k=9: 1). end=6, start=6-7=-1, sections=7/3,
#             idx = -1 + int(2.33) + int(1.17) = -1 + 2 + 1 = 2 -> lr_2.
# --------------------------------------------------------------------------------------------
V_LRS = 1e-4 * 10.0 ** (np.arange(10) / 4)
V_LOSSES = np.array([2.0, 1.9, 1.7, 1.4, 0.5, 0.1, 0.0, 0.3, 1.0, 2.5])
V_EXPECTED = {
    "valley": 1e-4 * 10.0 ** (2 / 4),
    "steepest": 1e-3,
    "minimum": 1e-4 * 10.0 ** (6 / 4) / 10,
    "seed": 1e-4 * 10.0 ** (6 / 4) * 2 / 3,
}


@pytest.mark.parametrize("name", sorted(V_EXPECTED))
def test_v_curve_geometric_grid(name):
    got = METHODS[name](V_LRS, V_LOSSES, **NO_SKIP)
    assert type(got) is float
    assert got == pytest.approx(V_EXPECTED[name], rel=1e-12)


def test_suggest_all_and_registry():
    assert set(METHODS) == {"valley", "steepest", "minimum", "seed", "zerolag", "lagsafe", "turn"}
    # the default is a procedure (a verification stage after the test, lrjax.verify), not a curve rule
    assert DEFAULT_METHOD == "verified" and DEFAULT_METHOD not in METHODS and DEFAULT_METHOD in suggest.NAMES
    assert suggest.FALLBACK_METHOD in METHODS
    got = suggest_all(V_LRS, V_LOSSES, **NO_SKIP)
    assert set(got) == set(METHODS)
    # V_LRS grow x10**0.25 per step: far more than x4 over 49 steps, so lagsafe is valley
    expected = {**V_EXPECTED, "zerolag": zerolag(V_LRS, V_LOSSES, **NO_SKIP), "lagsafe": V_EXPECTED["valley"],
                "turn": suggest.turn(V_LRS, V_LOSSES, **NO_SKIP)}
    for name, value in got.items():
        assert value == pytest.approx(expected[name], rel=1e-12)
    # the curve's own smoothing reaches the rules that smooth again or measure the lag
    with_beta = suggest_all(V_LRS, V_LOSSES, beta=0.5, **NO_SKIP)
    assert with_beta["zerolag"] == zerolag(V_LRS, V_LOSSES, beta=0.5, **NO_SKIP)
    assert with_beta["lagsafe"] == lagsafe(V_LRS, V_LOSSES, beta=0.5, **NO_SKIP)
    assert suggest_all(V_LRS[:2], V_LOSSES[:2]) == {name: None for name in METHODS}


def test_seed_matches_the_book_example():
    # The loss turns back up at 3e-1 -> the book uses 2e-1.
    lrs = np.array([1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0])
    losses = np.array([2.3, 2.2, 2.0, 1.5, 1.0, 0.7, 1.5, 5.0])
    assert seed(lrs, losses, **NO_SKIP) == pytest.approx(2e-1, rel=1e-12)
    assert minimum(lrs, losses, **NO_SKIP) == pytest.approx(3e-2, rel=1e-12)


# --------------------------------------------------------------------------------------------
# zerolag: the seed rule after a backward pass of the smoothing.
# losses 4, 2, 1, 3, 5 with beta 0.5; reversed 5, 3, 1, 2, 4, debiased EMA (divide by 1 - 0.5**(t+1)):
#   t0: 2.5 / 0.5 = 5;  t1: (1.25 + 1.5) / 0.75 = 3.6667;  t2: (1.375 + 0.5) / 0.875 = 2.1429;
#   t3: (0.9375 + 1) / 0.9375 = 2.0667;  t4: (0.96875 + 2) / 0.96875 = 3.0645.
# Reversed back: 3.0645, 2.0667, 2.1429, 3.6667, 5 -> minimum at index 1, where seed's is at 2.
# --------------------------------------------------------------------------------------------
def test_zerolag_by_hand():
    lrs = np.array([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    losses = np.array([4.0, 2.0, 1.0, 3.0, 5.0])
    assert zerolag(lrs, losses, beta=0.5, **NO_SKIP) == pytest.approx(1e-2 * 2 / 3, rel=1e-12)
    assert seed(lrs, losses, **NO_SKIP) == pytest.approx(1e-1 * 2 / 3, rel=1e-12)
    # without smoothing there is no lag to undo
    assert zerolag(lrs, losses, beta=0.0, **NO_SKIP) == seed(lrs, losses, **NO_SKIP)


def test_zerolag_stays_on_the_plateau_that_smoothing_carries_past():
    # a short, fast test (150 steps, 1e-3 -> 3, x1.055 per step, as on a small subset): the raw loss
    # falls until step 60, stays flat until 110, then rises. The forward EMA (~49 steps of lag at beta
    # 0.98) is lowest only once the loss is already rising; the centred curve inside the plateau.
    lrs = np.geomspace(1e-3, 3.0, 150)
    k = np.arange(150)
    smoothed = smooth(2.0 - np.minimum(k, 60) / 60 + np.maximum(k - 110, 0) / 40, 0.98)
    centred = smooth(smoothed[::-1], 0.98)[::-1]
    forward_min, centred_min = 10 + np.argmin(smoothed[10:-5]), 10 + np.argmin(centred[10:-5])
    assert forward_min > 110 and 60 < centred_min < 110
    assert seed(lrs, smoothed) == pytest.approx(lrs[forward_min] * 2 / 3, rel=1e-12)
    assert zerolag(lrs, smoothed) == pytest.approx(lrs[centred_min] * 2 / 3, rel=1e-12)
    # on the seed's slow test (x1.005 per step: the lag is worth x1.28 in rate) the two stay close
    lrs = 1e-3 * 1.005 ** np.arange(1500)
    k = np.arange(1500)
    smoothed = smooth(2.0 - np.minimum(k, 1000) / 1000 + np.maximum(k - 1000, 0) / 100, 0.98)
    assert 1 <= seed(lrs, smoothed) / zerolag(lrs, smoothed) < 2


def test_lag_growth():
    # x1.005 per step over 49 steps (beta 0.98): 1.005**49
    assert lag_growth(1e-3 * 1.005 ** np.arange(1500)) == pytest.approx(1.005 ** 49, rel=1e-9)
    # 150 steps from 1e-3 to 3: 3000**(1/149) per step
    assert lag_growth(np.geomspace(1e-3, 3.0, 150)) == pytest.approx(3000 ** (49 / 149), rel=1e-9)
    assert lag_growth(np.geomspace(1e-3, 3.0, 150), beta=0.5) == pytest.approx(3000 ** (1 / 149), rel=1e-9)
    assert lag_growth([1e-3, np.nan, 1e-2, 1e-1]) == pytest.approx(10 ** 49, rel=1e-9)  # the finite rates
    assert lag_growth([1e-3]) == 1.0 and lag_growth(np.geomspace(1e-3, 1, 9), beta=0.0) == 1.0


def test_lagsafe_is_seed_on_slow_tests_and_valley_on_fast_ones():
    k = np.arange(150)
    smoothed = smooth(2.0 - np.minimum(k, 60) / 60 + np.maximum(k - 110, 0) / 40, 0.98)
    fast = np.geomspace(1e-3, 3.0, 150)  # x14 over the lag
    assert lagsafe(fast, smoothed) == valley(fast, smoothed) != seed(fast, smoothed)
    # the same curve over a range whose rate grows just under / over x4 in 49 steps
    for growth, rule in ((3.9, seed), (4.1, valley)):
        lrs = 1e-3 * growth ** (np.arange(150) / 49)
        assert lagsafe(lrs, smoothed) == rule(lrs, smoothed)
    slow = 1e-3 * 1.005 ** np.arange(150)
    assert lagsafe(slow, smoothed) == seed(slow, smoothed) != valley(slow, smoothed)
    assert lagsafe(slow, smoothed, beta=0.5) == seed(slow, smoothed)
    assert lagsafe(slow[:2], smoothed[:2]) is None


def test_zerolag_drops_non_finite_points_first():
    lrs = np.concatenate([V_LRS[:4], [2e-3], V_LRS[4:]])
    losses = np.concatenate([V_LOSSES[:4], [np.nan], V_LOSSES[4:]])
    assert zerolag(lrs, losses, **NO_SKIP) == zerolag(V_LRS, V_LOSSES, **NO_SKIP)
    assert zerolag(lrs[:3], np.array([1.0, np.nan, 2.0])) is None


# --------------------------------------------------------------------------------------------
# steepest must differentiate against log(lr), not against the index.
# Segment A: lr = 1e-6 * 10**k, k = 0..5 (factor 10 per step), loss 10, 9, ..., 5.
# Segment B: factor 10**0.1 per step, lr = 1e-1 * 10**(m/10), m = 1..5 (indices 6..10),
#            loss drops 0.1, 0.2, 0.5, 0.3, 0.1 -> 4.9, 4.7, 4.2, 3.9, 3.8.
# Segment C: same factor, m = 6..8 (indices 11..13), loss rises 3.9, 4.2, 5.0.
# With u = ln 10: slope per log-lr in A is -1/u; in B, central differences over 0.2u:
#   idx 6: (4.7-5.0)/0.2u = -1.5/u, idx 7: -3.5/u, idx 8: (3.9-4.7)/0.2u = -4/u, idx 9: -2/u.
#   idx 5 (spacings u then 0.1u, second-order non-uniform formula) = -0.11u^2/0.11u^3 = -1/u.
# So the log-lr steepest point is index 8 (lr = 1e-1 * 10**0.3), whereas per index the loss
# falls by 1 per step in A and at most 0.4 per step in B, so np.gradient(losses) points into A.
# --------------------------------------------------------------------------------------------
NU_LRS = np.concatenate(
    [1e-6 * 10.0 ** np.arange(6), 1e-1 * 10.0 ** (np.arange(1, 9) / 10)]
)
NU_LOSSES = np.array(
    [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.9, 4.7, 4.2, 3.9, 3.8, 3.9, 4.2, 5.0]
)


def test_steepest_uses_log_lr_not_index():
    expected = 1e-1 * 10.0 ** 0.3
    assert steepest(NU_LRS, NU_LOSSES, **NO_SKIP) == pytest.approx(expected, rel=1e-12)
    # The fixture really discriminates: the index derivative picks a point in segment A.
    assert int(np.argmin(np.gradient(NU_LOSSES))) < 6
    # ... and so would a forward difference per index.
    assert int(np.argmin(np.diff(NU_LOSSES))) < 6


# --------------------------------------------------------------------------------------------
# valley: longest strictly decreasing subsequence (not necessarily contiguous).
# --------------------------------------------------------------------------------------------
def _grid(n):
    return 1e-5 * 10.0 ** (np.arange(n) / 4)


def test_valley_after_an_initial_rise():
    # idx 3..12 is 10, 9, ..., 1 (10 points); 1, 2, 3 before it are smaller, so cannot extend.
    # end=12, start=12-10=2, sections=10/3, idx = 2 + 3 + int(1.67)=1 -> 6.
    losses = np.array([1, 2, 3, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 5, 9], dtype=float)
    lrs = _grid(15)
    assert valley(lrs, losses, **NO_SKIP) == pytest.approx(lrs[6], rel=1e-12)


def test_valley_steps_over_blips():
    # lds = [1, 2, 2, 3, 4, 1, 5, 6, 1, 1]: 10, 9, 8, 7, 6, 5 skips the 9.5 and the 11.
    # end=7, start=7-6=1, sections=2, idx = 1 + 2 + 1 = 4.
    losses = np.array([10, 9, 9.5, 8, 7, 11, 6, 5, 12, 13], dtype=float)
    lrs = _grid(10)
    assert valley(lrs, losses, **NO_SKIP) == pytest.approx(lrs[4], rel=1e-12)


def test_valley_ties_keep_the_first_valley():
    # lds = [1, 1, 2, 3, 1, 2, 3]; first max at end=3, start=0, sections=1, idx = 0 + 1 + 0 = 1.
    # (The second valley would give end=6, start=3, idx=4.)
    losses = np.array([0, 3, 2, 1, 10, 9, 8], dtype=float)
    lrs = _grid(7)
    assert valley(lrs, losses, **NO_SKIP) == pytest.approx(lrs[1], rel=1e-12)


def test_valley_without_any_descent_returns_first_lr():
    # All lds are 1 -> start = end = 0 -> idx 0 (fastai's behaviour).
    lrs = _grid(6)
    assert valley(lrs, np.arange(6.0), **NO_SKIP) == pytest.approx(lrs[0], rel=1e-12)


def test_valley_clamps_fastai_negative_index():
    # lds = [1, 2, 1, 1]: end=1, start=1-2=-1, sections=2/3, idx=-1 (fastai wraps to lrs[-1]).
    lrs = _grid(4)
    assert valley(lrs, np.array([2.0, 1.0, 3.0, 4.0]), **NO_SKIP) == pytest.approx(lrs[0])


def _fastai_style_valley_reference(lrs, losses):
    """Slow, literal statement of the rule (double loop), independent of the vectorised code."""
    n = len(losses)
    lds = [1] * n
    for i in range(n):
        for j in range(i):
            if losses[j] > losses[i]:
                lds[i] = max(lds[i], lds[j] + 1)
    best = max(lds)
    end = lds.index(best)
    start = end - best if best > 1 else 0
    span = (end - start) / 3
    idx = min(max(start + int(span) + int(span / 2), 0), n - 1)
    return float(lrs[idx])


def test_valley_agrees_with_slow_reference_on_random_curves():
    rng = np.random.default_rng(0)
    for n in (3, 5, 17, 60, 120):
        for _ in range(20):
            losses = np.round(rng.normal(size=n).cumsum(), 1)  # rounding creates ties
            lrs = _grid(n)
            assert valley(lrs, losses, **NO_SKIP) == _fastai_style_valley_reference(lrs, losses)


def test_valley_2000_points_is_fast():
    rng = np.random.default_rng(1)
    n = 2000
    lrs = 1e-7 * (1e8) ** (np.arange(n) / (n - 1))
    x = np.linspace(-1, 1, n)
    losses = smooth(2.3 - np.exp(-((x - 0.2) ** 2) * 4) + 0.05 * rng.normal(size=n) + 3 * (x > 0.8))
    valley(lrs, losses)  # warm-up
    t0 = time.perf_counter()
    got = valley(lrs, losses)
    assert time.perf_counter() - t0 < 0.2
    assert got is not None and lrs[0] <= got <= lrs[-1]


# --------------------------------------------------------------------------------------------
# Non-finite points, skipping, fallback, too-short curves.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(V_EXPECTED))
def test_non_finite_points_are_ignored(name):
    # Insert bad points into the V fixture; the expected lrs are unchanged because the
    # surviving points are exactly the original ones, with their own lrs.
    bad_losses = [np.nan, -np.inf, np.inf, 0.7]
    bad_lrs = [1e-4, 2e-3, 3e-2, np.nan]  # last one: finite loss but NaN lr
    lrs = np.concatenate([V_LRS[:3], bad_lrs[:2], V_LRS[3:7], bad_lrs[2:], V_LRS[7:]])
    losses = np.concatenate([V_LOSSES[:3], bad_losses[:2], V_LOSSES[3:7], bad_losses[2:],
                             V_LOSSES[7:]])
    # -inf would be the minimum and the inf/NaN would wreck the gradient if they were kept.
    got = METHODS[name](lrs, losses, **NO_SKIP)
    assert got == pytest.approx(V_EXPECTED[name], rel=1e-12)


def test_non_positive_lr_is_ignored():
    lrs = np.concatenate([[0.0, -1.0], V_LRS])
    losses = np.concatenate([[-5.0, -5.0], V_LOSSES])
    assert minimum(lrs, losses, **NO_SKIP) == pytest.approx(V_EXPECTED["minimum"], rel=1e-12)


# 30 points at level 5.0 with dips: 0.5 at k=2, 1.0 at k=17, 0.1 at k=27.
# Default skips (10, 5) keep k = 10..24, where the only dip is k=17.
SK_LRS = 1e-6 * 10.0 ** (np.arange(30) / 5)
SK_LOSSES = np.full(30, 5.0)
SK_LOSSES[[2, 17, 27]] = [0.5, 1.0, 0.1]


def test_skip_start_and_skip_end_are_honoured():
    L = SK_LRS
    # Window k=10..24.
    assert minimum(L, SK_LOSSES) == pytest.approx(L[17] / 10, rel=1e-12)
    assert seed(L, SK_LOSSES) == pytest.approx(L[17] * 2 / 3, rel=1e-12)
    # Slopes (uniform h): k=16: (1-5)/2h, k=18: +; steepest at 16.
    assert steepest(L, SK_LOSSES) == pytest.approx(L[16], rel=1e-12)
    # Window lds: 1 ... 1, 2 at k=17 (window pos 7), then 1s; end=7, start=5, sections=2/3,
    # idx = 5 -> k = 15.
    assert valley(L, SK_LOSSES) == pytest.approx(L[15], rel=1e-12)

    # Whole curve: global min 0.1 at k=27.
    assert minimum(L, SK_LOSSES, **NO_SKIP) == pytest.approx(L[27] / 10, rel=1e-12)
    # Slopes: k=1: -4.5/2h, k=16: -4/2h, k=26: -4.9/2h -> 26.
    assert steepest(L, SK_LOSSES, **NO_SKIP) == pytest.approx(L[26], rel=1e-12)
    # lds: 2 at k=2, 2 at k=17, 3 at k=27 (5 -> 0.5 -> 0.1); end=27, start=24, idx=25.
    assert valley(L, SK_LOSSES, **NO_SKIP) == pytest.approx(L[25], rel=1e-12)

    # Only skip_end: window k=0..24 -> min 0.5 at k=2.
    assert minimum(L, SK_LOSSES, skip_start=0, skip_end=5) == pytest.approx(L[2] / 10)
    # Only skip_start: window k=10..29 -> min 0.1 at k=27.
    assert minimum(L, SK_LOSSES, skip_start=10, skip_end=0) == pytest.approx(L[27] / 10)


def test_skip_counts_finite_points_after_dropping():
    # NaNs at k=0,1; the smallest loss is at k=3, the second finite point.
    # Drop first, then skip 2 finite points (k=2, 3) -> min over k=4..9 is at k=6.
    lrs = _grid(10)
    losses = np.array([np.nan, np.nan, 3.0, 0.1, 2.0, 1.5, 0.5, 1.0, 2.0, 4.0])
    assert minimum(lrs, losses, skip_start=2, skip_end=0) == pytest.approx(lrs[6] / 10)


def test_too_few_points_after_skipping_falls_back_to_whole_curve():
    # 17 points with default skips leave 2 -> whole curve; min at k=1.
    lrs = _grid(17)
    losses = np.linspace(3.0, 4.0, 17)
    losses[1] = 0.5
    assert minimum(lrs, losses) == pytest.approx(lrs[1] / 10, rel=1e-12)
    # 18 points leave exactly 3 (k=10..12), which is enough: min there is at k=10.
    lrs = _grid(18)
    losses = np.linspace(3.0, 4.0, 18)
    losses[1] = 0.5
    assert minimum(lrs, losses) == pytest.approx(lrs[10] / 10, rel=1e-12)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize(
    "lrs, losses",
    [
        ([], []),
        ([1e-3], [1.0]),
        ([1e-3, 1e-2], [1.0, 0.5]),
        ([1e-3, 1e-2, 1e-1, 1.0], [1.0, np.nan, 0.5, np.inf]),
        ([1e-3, 1e-2, 1e-1], [np.nan, np.nan, np.nan]),
    ],
)
def test_too_short_curve_returns_none(name, lrs, losses):
    assert METHODS[name](np.array(lrs), np.array(losses)) is None
    assert METHODS[name](np.array(lrs), np.array(losses), **NO_SKIP) is None


def test_three_points_is_enough():
    lrs = np.array([1e-3, 1e-2, 1e-1])
    assert minimum(lrs, np.array([2.0, 1.0, 3.0])) == pytest.approx(1e-3, rel=1e-12)


def test_steepest_ignores_non_finite_slopes_from_repeated_lrs():
    # Repeated lr at k=1,2 gives infinite slopes there; the finite ones decide.
    lrs = np.array([1e-3, 1e-2, 1e-2, 1e-1, 1.0])
    losses = np.array([3.0, 2.0, 1.0, 0.5, 2.0])
    got = steepest(lrs, losses, **NO_SKIP)
    assert got is not None and math.isfinite(got)


def test_input_validation():
    with pytest.raises(ValueError):
        minimum(np.ones(5), np.ones(4))
    with pytest.raises(ValueError):
        minimum(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError):
        minimum(V_LRS, V_LOSSES, skip_start=-1)
    with pytest.raises(ValueError):
        minimum(V_LRS, V_LOSSES, skip_end=-1)


# --------------------------------------------------------------------------------------------
# smooth
# --------------------------------------------------------------------------------------------
def test_smooth_matches_hand_computation():
    # beta = 0.5, x = 1, 2, 3:
    #   avg0 = 0.5             -> 0.5 / (1 - 0.5)    = 1
    #   avg1 = 0.25 + 1 = 1.25 -> 1.25 / (1 - 0.25)  = 5/3
    #   avg2 = 0.625 + 1.5     -> 2.125 / (1 - 0.125) = 17/7
    got = smooth([1.0, 2.0, 3.0], beta=0.5)
    np.testing.assert_allclose(got, [1.0, 5 / 3, 17 / 7], rtol=1e-14)
    assert got.dtype == np.float64


def test_smooth_constant_stays_constant():
    np.testing.assert_allclose(smooth(np.full(200, 2.5)), 2.5, rtol=1e-12)
    np.testing.assert_allclose(smooth(np.full(5, 2.5), beta=0.9), 2.5, rtol=1e-12)


def test_smooth_beta_zero_is_identity_and_empty_is_empty():
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    np.testing.assert_array_equal(smooth(x, beta=0.0), x)
    assert smooth(np.array([])).shape == (0,)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan")])
def test_smooth_rejects_bad_beta(beta):
    with pytest.raises(ValueError):
        smooth([1.0, 2.0], beta=beta)


def test_module_is_numpy_only():
    with open(suggest.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "typing", "collections", "numpy"}, imported


def test_steepest_ignores_drops_after_the_minimum():
    # descent with its steepest point at index 20, minimum at 40, then a spike at 50 and a sharp
    # fall after it (slope -30 per log-lr unit, far steeper than the descent): not a rate to use.
    lrs = np.geomspace(1e-4, 1.0, 80)
    losses = np.concatenate([
        np.linspace(2.0, 1.8, 16), [1.7, 1.5, 1.2, 0.9, 0.8, 0.75], np.linspace(0.74, 0.5, 19),
        np.linspace(0.52, 3.0, 10), np.linspace(2.0, 1.0, 10), np.linspace(1.2, 5.0, 19)])
    assert int(np.argmin(losses)) == 40
    got = suggest.steepest(lrs, losses, skip_start=0, skip_end=0)
    g = np.gradient(losses, np.log(lrs))
    assert got == pytest.approx(lrs[int(np.argmin(g[:41]))])
    assert got < lrs[40]


# --------------------------------------------------------------------------------------------
# turn: a reading of the curve that does not move with the test's length
# --------------------------------------------------------------------------------------------

def test_unsmooth_inverts_smooth():
    x = np.random.default_rng(0).normal(2.0, 0.3, 500)
    for beta in (0.0, 0.5, 0.98):
        np.testing.assert_allclose(suggest.unsmooth(smooth(x, beta), beta), x, rtol=0, atol=1e-10)


def test_length_beta_spans_a_fixed_width_of_rate():
    # 1e-6 -> 1 in 1719 steps: 286.3 steps a decade, a lag of 0.17 decades is 48.7 steps (beta ~0.98)
    lrs = np.geomspace(1e-6, 1.0, 1719)
    b = suggest.length_beta(lrs)
    assert b / (1 - b) == pytest.approx(0.17 * 1718 / 6, rel=1e-9)
    b5 = suggest.length_beta(np.geomspace(1e-6, 1.0, 5 * 1719))
    assert b5 / (1 - b5) == pytest.approx(0.17 * (5 * 1719 - 1) / 6, rel=1e-9)  # 5x the steps, 5x the lag
    assert suggest.length_beta(np.geomspace(1e-6, 1.0, 20)) == 0.0  # under a step of lag: no smoothing
    assert suggest.length_beta([1e-3]) == 0.0


def _noisy_bowl(num_steps, seed=0, turn_at=1e-2):
    """A loss flat at 2 up to 1e-4, falling (log-quadratic) to 1 at `turn_at`, rising 12x as steeply past it,
    plus batch noise."""
    lrs = np.geomspace(1e-6, 1.0, num_steps)
    u = np.log10(lrs / turn_at)
    clean = np.where(u < 0, 1.0 + 0.25 * np.minimum(u, 2.0) ** 2 * (u > -2) + 1.0 * (u <= -2), 1.0 + 3.0 * u ** 2)
    return lrs, clean + np.random.default_rng(seed).normal(0, 0.1, num_steps)


def test_turn_finds_the_same_rate_at_any_length_where_the_fixed_smoothing_drifts():
    got, lagging = {}, {}
    for n in (200, 1000, 5000):
        lrs, raw = _noisy_bowl(n)
        sm = smooth(raw, 0.98)
        got[n], lagging[n] = suggest.turn(lrs, sm), seed(lrs, sm) * 1.5  # seed is 2/3 of the lagging minimum
    for n, v in got.items():
        # within 0.5 decades of the true turn (1e-2; the steep rise beyond pulls a centred smoothing's
        # minimum ~0.25 decades low, the same at every length)
        assert 10 ** -2.5 < v < 10 ** -1.9, (n, v)
    assert max(got.values()) / min(got.values()) < 1.6
    # the fixed 49-step smoothing trails by 0.06 decades at 5000 steps, 1.5 at 200: its minimum drifts ~2x
    assert lagging[200] / lagging[5000] > 1.8


def test_turn_needs_three_points_and_returns_a_rate_of_the_curve():
    assert suggest.turn([1e-3, 1e-2], [1.0, 0.5]) is None
    lrs, raw = _noisy_bowl(300)
    v = suggest.turn(lrs, smooth(raw))
    assert v in set(lrs.tolist())
