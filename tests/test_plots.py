"""lrjax.plots: curves decimated to the axes' pixel columns, and the PNGs drawn from them."""

from __future__ import annotations

import numpy as np

from lrjax import plots


def test_a_short_curve_is_drawn_whole():
    x = np.geomspace(1e-3, 1, 50)
    np.testing.assert_array_equal(plots.decimate(x, np.sin(x), columns=100), np.arange(50))


def test_a_long_curve_keeps_each_columns_extremes_in_order():
    rng = np.random.default_rng(0)
    n, columns = 20_000, 300
    x = np.geomspace(1e-4, 10, n)
    y = 2 + rng.normal(0, 0.01, n)
    y[12_345], y[777] = 50.0, -3.0  # a spike and a dip, one point each
    keep = plots.decimate(x, y, columns)
    assert len(keep) <= 2 * columns + 2 and np.all(np.diff(keep) > 0)
    assert {0, n - 1, 12_345, 777} <= set(keep.tolist())
    # every column keeps its lowest and highest point, so the drawn envelope is the curve's
    column = np.minimum((np.log(x / x[0]) / np.log(x[-1] / x[0]) * columns).astype(int), columns - 1)
    for c in (0, 17, columns - 1):
        members = np.flatnonzero(column == c)
        assert members[np.argmin(y[members])] in keep and members[np.argmax(y[members])] in keep


def test_nan_points_do_not_hide_a_columns_extremes():
    x = np.geomspace(1e-3, 1, 1000)
    y = np.ones(1000)
    y[::7] = np.nan
    y[500] = 9.0
    assert 500 in plots.decimate(x, y, columns=50)
