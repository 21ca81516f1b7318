"""Learning-rate suggestions read off a range-test curve, and the smoothing that precedes them.

Only numpy: no JAX, nothing else from lrjax. Everything here is a pure function of arrays.

* `smooth` turns raw per-step losses into a debiased exponential moving average.
* `valley`, `steepest`, `minimum`, `seed`, `zerolag`, `lagsafe` and `turn` each map an already *smoothed* curve
  ``(lrs, losses)`` to one suggested learning rate (a Python float), or None when the curve is
  too short to say anything.  `METHODS` names them; `suggest_all` runs every one.
* `turn` reads the curve the same way whatever the test's length (its smoothing spans a fixed width
  of log-rate, not a fixed number of steps): the anchor of lrjax's default, ``"verified"``, which
  trains a few rates below it for a short while and keeps the best (`lrjax.verify`).

All suggestion functions share one preparation step (`_prepare`):

1. points where the loss is NaN or +-inf, or the learning rate is non-finite or <= 0 (every
   rule works on, or is meaningful on, a log-lr axis) are dropped, keeping ``lrs`` and
   ``losses`` aligned;
2. the first ``skip_start`` and last ``skip_end`` of the *remaining* points are cut off (the
   warm-up noise and the blow-up at the end of a range test);
3. if that leaves fewer than 3 points, the whole finite curve from step 1 is used instead;
   if the finite curve itself has fewer than 3 points, the method returns None.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = [
    "DEFAULT_METHOD",
    "FALLBACK_METHOD",
    "NAMES",
    "TURN_WIDTH",
    "LAG_GROWTH_LIMIT",
    "METHODS",
    "lag_growth",
    "lagsafe",
    "length_beta",
    "minimum",
    "turn",
    "unsmooth",
    "seed",
    "smooth",
    "steepest",
    "suggest_all",
    "valley",
    "zerolag",
]

_MIN_POINTS = 3


def smooth(losses, beta: float = 0.98) -> np.ndarray:
    """Debiased exponential moving average of ``losses`` (float64, same length).

    ``avg_t = beta * avg_{t-1} + (1 - beta) * x_t`` with ``avg_{-1} = 0``, and the returned value
    is ``avg_t / (1 - beta**(t + 1))``.  The division removes the bias towards 0 of the early
    averages, so a constant sequence comes back unchanged.  ``beta = 0`` returns the input.

    A non-finite loss propagates to every later point (the average never forgets it); the
    suggestion functions then drop those points.

    Raises ValueError unless ``0 <= beta < 1`` or if ``losses`` is not one-dimensional.
    """
    beta = float(beta)
    if not (0.0 <= beta < 1.0):  # also rejects NaN
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"losses must be one-dimensional, got shape {x.shape}")
    out = np.empty_like(x)
    avg = 0.0
    for t in range(x.shape[0]):
        avg = beta * avg + (1.0 - beta) * x[t]
        out[t] = avg / (1.0 - beta ** (t + 1))
    return out


def _prepare(lrs, losses, skip_start: int, skip_end: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The shared preparation described in the module docstring; None if < 3 usable points."""
    lrs = np.asarray(lrs, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64)
    if lrs.ndim != 1 or losses.ndim != 1:
        raise ValueError(
            f"lrs and losses must be one-dimensional, got shapes {lrs.shape} and {losses.shape}"
        )
    if lrs.shape != losses.shape:
        raise ValueError(f"lrs and losses differ in length: {lrs.shape[0]} != {losses.shape[0]}")
    skip_start, skip_end = int(skip_start), int(skip_end)
    if skip_start < 0 or skip_end < 0:
        raise ValueError(f"skip_start and skip_end must be >= 0, got {skip_start}, {skip_end}")

    keep = np.isfinite(losses) & np.isfinite(lrs) & (lrs > 0)
    lrs, losses = lrs[keep], losses[keep]
    n = lrs.shape[0]
    if n < _MIN_POINTS:
        return None
    stop = n - skip_end
    if stop - skip_start >= _MIN_POINTS:
        return lrs[skip_start:stop], losses[skip_start:stop]
    return lrs, losses


def valley(lrs, losses, skip_start: int = 10, skip_end: int = 5) -> float | None:
    """fastai's default suggestion, "valley" (``fastai.callback.schedule.valley``; devised by
    ESRI on the fast.ai forums): a point inside the longest descent of the loss.  fastai
    describes it as "roughly 2/3 through the longest valley"; the formula below actually lands
    about half-way along the span (``sections + sections / 2`` is half of ``end - start``).

    On the prepared curve (see the module docstring), with ``n`` points:

    * ``lds[i]`` is the length of the longest strictly decreasing subsequence of ``losses``
      ending at ``i`` (not necessarily contiguous, so isolated upward blips are stepped over):
      ``lds[i] = 1 + max(lds[j] for j < i if losses[j] > losses[i])``, or 1 if there is no such
      ``j``.  The dynamic programme is O(n^2), with the inner loop vectorised in numpy.
    * ``end`` is the first index with the largest ``lds``, and ``start = end - lds[end]``
      (fastai's convention: one index before the first point of the subsequence when the
      subsequence is contiguous).  If no two points decrease (every ``lds`` is 1),
      ``start = end = 0``.
    * ``sections = (end - start) / 3`` and ``idx = start + int(sections) + int(sections / 2)``,
      i.e. roughly half-way between the first and second thirds of the span.

    Returns ``lrs[idx]``.  The one departure from fastai: when the longest descent is two points
    starting at the first point, fastai's ``idx`` is -1 and it wraps around to the *last* lr;
    here ``idx`` is clamped to 0.
    """
    prepared = _prepare(lrs, losses, skip_start, skip_end)
    if prepared is None:
        return None
    lrs, losses = prepared
    n = losses.shape[0]
    lds = np.ones(n, dtype=np.int64)
    for i in range(1, n):
        longer = losses[:i] > losses[i]
        if longer.any():
            lds[i] = np.max(lds[:i], where=longer, initial=0) + 1
    end = int(np.argmax(lds))  # first occurrence, as fastai's strict '<' update keeps ties early
    start = end - int(lds[end]) if lds[end] > 1 else 0
    sections = (end - start) / 3
    idx = start + int(sections) + int(sections / 2)
    idx = min(max(idx, 0), n - 1)
    return float(lrs[idx])


def steepest(lrs, losses, skip_start: int = 10, skip_end: int = 5) -> float | None:
    """The learning rate where the loss falls fastest against log(lr).

    The idea is fastai's "steep" suggestion and Lightning's ``LRFinder.suggestion`` (the point
    of steepest descent).  Here the slope is taken against the log learning rate, not against
    the step index: ``g = np.gradient(losses, np.log(lrs))`` (second-order central differences
    inside, one-sided at the ends, exact for non-uniform spacing), and the suggestion is
    ``lrs[argmin(g)]`` (first occurrence; non-finite slopes, e.g. from repeated lrs, are
    ignored).  For a geometric lr grid this picks the same point as the index derivative; when
    the growth factor varies along the run it does not, and the log-lr slope is the one that
    matches the usual log-x plot.  Only the descent counts (points up to the minimum loss): past
    the minimum the curve is diverging, and a drop after a spike there is noise, not a rate to
    train with (on Fashion-MNIST it picked rates that diverged).  Returns None if no slope is finite.
    """
    prepared = _prepare(lrs, losses, skip_start, skip_end)
    if prepared is None:
        return None
    lrs, losses = prepared
    with np.errstate(divide="ignore", invalid="ignore"):
        grads = np.gradient(losses, np.log(lrs))
    grads = grads[: int(np.argmin(losses)) + 1]
    finite = np.isfinite(grads)
    if not finite.any():
        return None
    idx = int(np.argmin(np.where(finite, grads, np.inf)))
    return float(lrs[idx])


def minimum(lrs, losses, skip_start: int = 10, skip_end: int = 5) -> float | None:
    """fastai's "minimum" suggestion (``fastai.callback.schedule.minimum``): one tenth of the
    learning rate at which the loss is lowest, ``lrs[argmin(losses)] / 10`` (first occurrence
    on ties), on the prepared curve.
    """
    prepared = _prepare(lrs, losses, skip_start, skip_end)
    if prepared is None:
        return None
    lrs, losses = prepared
    return float(lrs[int(np.argmin(losses))] / 10.0)


def seed(lrs, losses, skip_start: int = 10, skip_end: int = 5) -> float | None:
    """The rule of the project's seed article, Geron's *Hands-On Machine Learning*: take a rate
    a little below the point where the loss turns back up (its example: the loss turns at
    3e-1, so use 2e-1).

    Made precise here: the turning point is the lr at the minimum of the (smoothed, prepared)
    loss, ``lrs[argmin(losses)]`` (first occurrence on ties), and the suggestion is two thirds
    of it, ``turning_lr * 2 / 3`` -- which maps the book's 3e-1 to exactly 2e-1.
    """
    prepared = _prepare(lrs, losses, skip_start, skip_end)
    if prepared is None:
        return None
    lrs, losses = prepared
    return float(lrs[int(np.argmin(losses))] * 2.0 / 3.0)


def zerolag(lrs, losses, skip_start: int = 10, skip_end: int = 5, beta: float = 0.98) -> float | None:
    """The `seed` rule on a curve without the smoothing's lag: two thirds of the rate at the minimum of
    ``losses`` smoothed once more, backwards (`smooth` of the reversed finite curve, reversed again),
    then prepared as usual.

    The forward moving average lags the raw loss by about ``beta / (1 - beta)`` steps (49 at 0.98); a
    second pass in the other direction leads by as much, so the two together are centred (the
    forward-backward filtering of signal processing). The lag matters wherever the rate grows fast
    per step: over the seed's one-epoch test (x1.005 per step) 49 steps raise the rate x1.28, but over
    a 150-step test from 1e-3 to 3 x14, so the forward minimum, and with it `seed`, lands far past the
    point where the loss turns. ``beta`` is the forward smoothing's (``RangeTestResult.beta``).
    """
    prepared = _prepare(lrs, losses, 0, 0)
    if prepared is None:
        return None
    lrs, losses = prepared
    centred = smooth(losses[::-1], beta)[::-1]
    return seed(lrs, centred, skip_start=skip_start, skip_end=skip_end)


# Beyond this growth of the rate over the smoothing's lag the forward-smoothed curve trails the raw
# loss too far to read a turn off it: `lagsafe` switches from `seed` to `valley` there, and the range
# test warns.
LAG_GROWTH_LIMIT = 4.0


def lag_growth(lrs, beta: float = 0.98) -> float:
    """How much the rate grows over the smoothing's lag of ``beta / (1 - beta)`` steps: the mean
    growth per step (geometric, over the finite positive rates) to that power. 1.0 for fewer than
    2 rates or ``beta = 0``. The seed's test (x1.005 per step, beta 0.98) gives x1.28; 150 steps
    from 1e-3 to 3, x14."""
    lrs = np.asarray(lrs, dtype=np.float64)
    lrs = lrs[np.isfinite(lrs) & (lrs > 0)]
    if lrs.shape[0] < 2:
        return 1.0
    per_step = np.log(lrs[-1] / lrs[0]) / (lrs.shape[0] - 1)
    return float(np.exp(per_step * beta / (1.0 - beta)))


def lagsafe(lrs, losses, skip_start: int = 10, skip_end: int = 5, beta: float = 0.98) -> float | None:
    """`seed` on a slow test, `valley` on a fast one: `seed` while the rate grows at most
    `LAG_GROWTH_LIMIT` (x4) over the smoothing's lag (`lag_growth`), `valley` beyond.

    On the seed's one-epoch test the smoothed curve trails the raw loss by x1.28 and `seed` measured
    best. On short, fast tests (a 6000-image subset, 150 steps over 3 decades) the trail is x10 or
    more, and the turn itself comes late (each rate runs too few steps to blow up): `seed` picked
    rates that trained to 75-90% of the best or collapsed, where `valley`, fastai's default, made for
    fastai's own 100-step tests, held (experiments/suggestion_quality.py, docs/measurements.md).
    """
    prepared = _prepare(lrs, losses, 0, 0)
    if prepared is None:
        return None
    rule = valley if lag_growth(prepared[0], beta) > LAG_GROWTH_LIMIT else seed
    return rule(lrs, losses, skip_start=skip_start, skip_end=skip_end)


def unsmooth(smoothed, beta: float = 0.98) -> np.ndarray:
    """The raw losses behind a `smooth`ed curve (its exact inverse): ``avg_t = smoothed_t * (1 - beta**(t+1))``
    and ``x_t = (avg_t - beta * avg_{t-1}) / (1 - beta)``."""
    beta = float(beta)
    sm = np.asarray(smoothed, dtype=np.float64)
    if beta == 0.0:
        return sm.copy()
    avg = sm * (1.0 - beta ** np.arange(1, sm.shape[0] + 1))
    prev = np.concatenate([[0.0], avg[:-1]])
    return (avg - beta * prev) / (1.0 - beta)


# The log-rate width (decades) that `turn`'s smoothing lags by: that of the default smoothing (beta 0.98,
# 49 steps) on the adaptive optimizers' one-epoch test of Fashion-MNIST (1e-6 -> 1 in 1719 steps, x1.48).
TURN_WIDTH = 0.17


def length_beta(lrs, width: float = TURN_WIDTH) -> float:
    """The smoothing whose lag, ``beta / (1 - beta)`` steps, spans `width` decades of the rate on this
    test (its mean growth per step): the same reading on a test of any length. 0 (no smoothing) where
    the rates grow more than `width` per step."""
    lrs = np.asarray(lrs, dtype=np.float64)
    lrs = lrs[np.isfinite(lrs) & (lrs > 0)]
    if lrs.shape[0] < 2 or not lrs[-1] > lrs[0]:
        return 0.0
    steps_per_decade = (lrs.shape[0] - 1) / np.log10(lrs[-1] / lrs[0])
    lag = width * steps_per_decade
    return float(lag / (1.0 + lag)) if lag > 1.0 else 0.0


def turn(lrs, losses, skip_start: int = 10, skip_end: int = 5, beta: float = 0.98,
         width: float = TURN_WIDTH) -> float | None:
    """The rate at which the loss turns: the minimum of the raw curve smoothed forwards and backwards
    (centred, no lag) with `length_beta`'s smoothing, which spans `width` decades of rate whatever the
    number of steps. ``losses`` is the curve smoothed with ``beta``, as for every method (`unsmooth`
    recovers the raw losses); the first and last 5% / 2% of the points are skipped (at least
    ``skip_start`` / ``skip_end`` when the curve is long enough).

    Why: a one-epoch test and a five-epoch one see the same curve against log(rate), but a smoothing of
    a fixed number of steps (beta 0.98: 49) trails it by 5x more rate on the short one, and `seed`,
    `minimum` and `lagsafe`'s switch move with it (a Transformer LM: 1.2e-3 at one epoch, 0.06-0.09 at
    five). Measured (docs/suggestion.md): `turn` moved at most 1.6x between 1x and 5x on Fashion-MNIST's
    MLP (sgd, adam) and a char-level Transformer LM.
    """
    prepared = _prepare(lrs, losses, 0, 0)
    if prepared is None:
        return None
    lrs, smoothed = prepared
    raw = unsmooth(smoothed, beta)
    b = length_beta(lrs, width)
    centred = smooth(smooth(raw, b)[::-1], b)[::-1]
    n = lrs.shape[0]
    start = min(max(int(skip_start), n // 20), n - _MIN_POINTS)
    stop = max(n - max(int(skip_end), n // 50), start + _MIN_POINTS)
    if start < 0:
        start, stop = 0, n
    return float(lrs[start + int(np.argmin(centred[start:stop]))])


METHODS: dict[str, Callable[..., float | None]] = {
    "valley": valley,
    "steepest": steepest,
    "minimum": minimum,
    "seed": seed,
    "zerolag": zerolag,
    "lagsafe": lagsafe,
    "turn": turn,
}

# The default, chosen from evidence (docs/suggestion.md): "verified", a short candidate stage after the
# range test: rates `turn` x 2**-k (k = 0..5) trained from the same weights for an eighth of an epoch, the one
# with the lowest validation loss (`lrjax.verify`). No rule read off one curve held on both Fashion-MNIST
# and a Transformer LM: the LM's best rate sits ~10x below its curve's turn, the MLP's at it. Where the
# stage cannot run (an iterable of batches, read once; no validation examples) the range test falls back to
# `lagsafe`, the previous default: `seed` on slow tests, `valley` on fast ones.
DEFAULT_METHOD = "verified"
FALLBACK_METHOD = "lagsafe"
# What --suggestion / find_lr(method=) accept: a rule of METHODS or the verified procedure.
NAMES = (*METHODS, DEFAULT_METHOD)


def suggest_all(lrs, losses, skip_start: int = 10, skip_end: int = 5,
                beta: float = 0.98) -> dict[str, float | None]:
    """Every method in `METHODS` on the same curve: ``{name: suggestion or None}``; ``beta`` is the
    smoothing the curve had (`zerolag` smooths it again with the same, `lagsafe` measures its lag, `turn`
    undoes it)."""
    return {
        name: fn(lrs, losses, skip_start=skip_start, skip_end=skip_end,
                 **({"beta": beta} if fn in (zerolag, lagsafe, turn) else {}))
        for name, fn in METHODS.items()
    }
