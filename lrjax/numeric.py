"""Host-side numpy helpers shared by the result objects and the plots (no JAX, no lrjax imports)."""

from __future__ import annotations

import warnings

import numpy as np


def nan_reduce(fn, values: np.ndarray, axis: int, fill: float) -> np.ndarray:
    """`fn` (np.nanmax, np.nanmean, ...) over `axis`, with `fill` where every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: filled below
        out = fn(values, axis=axis)
    return np.where(np.isnan(out), fill, out)
