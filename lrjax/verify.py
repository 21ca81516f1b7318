"""The range test's verification stage: a few candidate rates below the curve's turn, trained from the
same weights for a short while, and the one with the lowest validation loss.

Why a stage and not a rule: where the best rate sits relative to the range-test curve depends on the
task. On Fashion-MNIST's MLP (sgd, adam) it sits at the turn of the loss (`lrjax.suggest.turn`), on a
char-level Transformer LM (adamw) ~10x below it, and no reading of one curve told the two apart. A short
training run does: on the LM a quarter epoch already ranks the rates as two epochs do. Training ranks
the rates above the turn too well, though (on the MLP with adam a quarter epoch is flat from 1e-3 to
1e-2, where four epochs prefer 4e-4-2e-3), so the candidates stop at the turn: `turn` x 2**-k, k = 0..5.
The turn itself moves little with the test's length (`suggest.turn`), and the candidates are 2x apart,
so the pick stays within ~2x between a one-epoch and a five-epoch test. Where the pick is the lowest
candidate, the best may lie lower still: the stage goes on halving (`MAX_EXTRA` more at most) until a
lower rate scores worse. On lrjax's Transformer (95 steps an epoch) the turn moved 7x between a one-epoch
and a five-epoch test (0.071 and 0.010: adam's loss answers a fast-rising rate late), the one-epoch
candidates ended at 2.2e-3 on a plateau and the five-epoch ones bracketed a best at 6.3e-4.

The suggestion is then moved between the chosen candidate and its neighbours, to the vertex of the
parabola through their losses (`refine`, at most 1.41x): on that Transformer 1.4x below the best rate
cost 2-4% of validation loss after two epochs, which candidates 2x apart could not avoid.

`candidate_rates`, `pick` and `refine` are pure; `verify` runs the stage around a function that trains the
candidates. The range test gives it its own compiled program (`lrjax.range_test`): each candidate runs
the test's first `steps` batches at a constant rate that cools down to zero over the last quarter
(`candidate_schedule`), one after another, and is scored on the first validation examples, normalised
by their own batch statistics (`lrjax.steps.batch_statistics`: after 40 steps BatchNorm's running averages
are still mostly their initial values, docs/suggestion.md "BatchNorm in the stage"). No second
training program is compiled: against a six-member `lrjax.sweep` of the same candidates the stage took
1.3-1.5 s instead of 3.8-4.8 s after a one-epoch test of the MLP (sgd, Fashion-MNIST), and 0.7-1.1 s
instead of 3.5-4.1 s after a 188-step one (adam, 6000 images), in fresh processes on a shared 2-core
AMD EPYC; the whole find_lr went from 3.3-4.1x the plain test to 1.9-2.1x.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

NUM_CANDIDATES = 6  # turn, turn/2, ..., turn/32: the LM's best sat at turn/8 - turn/16
SPACING = 2.0  # between candidates: a pick within 2x whichever neighbour wins
# The stage's length: an eighth of an epoch, at least MIN_STEPS. On the LM (188 steps an epoch) 47 and 94
# steps ranked the rates as two epochs do; on the MLP (1719) 215 and 430 steps did below the turn. Six
# candidates of an eighth epoch cost ~0.75 of a one-epoch range test's steps.
MIN_STEPS = 40
EPOCH_FRACTION = 8
# Candidates within 1% of the lowest loss count as tied, and the lowest rate among them wins. A short
# stage cannot rank rates that close: on the Transformer LM's plateau 40 steps gave 3.04, 3.20, 3.20,
# 3.04, 3.04 for rates 2x apart from 1.1e-2 down, and three epochs at the highest tied rate (1.1e-2)
# reached 3.91 bits per byte where ~1e-3 had reached 2.93-3.15. Below a long run's best rate the loss
# rises more gently than above it, so the lower of two rates a short run cannot tell apart is the safer.
TOLERANCE = 0.01
# Where every finite candidate ends within 2% of the lowest loss, the stage is flat: no candidate has left
# the loss's first plateau, and all count as tied (the lowest wins, and the stage goes lower while it does).
# On lrjax's Transformer at context 128 (96 steps an epoch) the cooled 40-step losses from 0.071 down were
# 3.355, 3.388, 3.387, 3.337, 3.346, 3.373 (1.5% apart): by the 1% rule 4.4e-3 won (two epochs: val loss
# 2.96); as a flat stage the rates below were tried, 5.5e-4 scored 3.317 and 2.8e-4 3.70, and the pick was
# 7.6e-4 (a grid's best after two epochs: 5e-4, 2.64). Every cell of the matrix spreads by 4.7% or more.
FLAT = 0.02
MAX_EXTRA = 4  # rates below the last candidate tried while the pick is the lowest tried
# The pick between the candidates: the vertex of the parabola through the picked candidate's loss and its
# two neighbours' (in log rate), at most half a spacing away (a factor 2**0.5). Candidates 2x apart leave
# the best up to 1.4x from every one of them, and on lrjax's Transformer LM (2 epochs) 1.4x below the best
# rate cost 2-4% of validation loss; the vertex falls between candidates where the losses say so, at no cost
# in training. Without two finite neighbours, or where the three points do not curve upwards (a plateau,
# noise), the candidate stands.
MAX_SHIFT = 0.5  # in spacings (log rate)
# Each candidate's last quarter of steps decays linearly to zero (a cooldown, as warmup-stable-decay
# schedules end). A constant rate leaves the weights as noisy as the rate is high, and a short run scores
# that noise: higher rates look worse after 40 steps than they turn out after two epochs (short-horizon
# bias). The cooldown removes most of it before the candidate is scored, at no extra step. On lrjax's
# Transformer LM (seed 42, 188 steps an epoch) constant-rate candidates picked 1.27e-3 (two epochs: on a
# shelf 3.7% above the best grid rate's loss), cooled ones 2.54e-3 (within the best rates' band).
COOLDOWN = 0.25  # of the stage's steps


@dataclasses.dataclass
class Verification:
    """What the stage measured; `picked` is None when every candidate diverged."""

    candidates: list[float]
    val_losses: list[float | None]  # None where the candidate diverged
    picked: float | None  # the suggestion: `candidate` moved between its neighbours by `refine`
    candidate: float | None  # the candidate `pick` chose
    anchor: float  # the rate the candidates hang from (`suggest.turn`)
    steps: int  # training steps of every candidate
    train_examples: int
    valid_examples: int
    seconds: float  # the whole stage, its evaluation's compile included

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def candidate_rates(anchor: float, num: int = NUM_CANDIDATES, spacing: float = SPACING) -> np.ndarray:
    """`anchor` and the `num - 1` rates below it, each `spacing` x lower (descending)."""
    if not anchor > 0 or num < 1 or not spacing > 1:
        raise ValueError(f"candidate_rates: anchor must be positive, num >= 1 and spacing > 1, got {anchor}, "
                         f"{num}, {spacing}")
    return float(anchor) * float(spacing) ** -np.arange(num, dtype=np.float64)


def pick(candidates, val_losses, tolerance: float = TOLERANCE) -> float | None:
    """The lowest candidate rate whose finite validation loss is within `tolerance` (relative, of its
    magnitude) of the lowest, or the lowest finite one where all are within `FLAT` of it; None if none
    is finite."""
    v = np.asarray([np.inf if x is None or not np.isfinite(x) else x for x in val_losses], np.float64)
    if not np.isfinite(v).any():
        return None
    best, finite = v.min(), np.isfinite(v)
    flat = v[finite].max() - best <= FLAT * abs(best)
    near = np.flatnonzero(finite if flat else v <= best + tolerance * abs(best))
    rates = np.asarray(candidates, np.float64)
    return float(rates[near[np.argmin(rates[near])]])


def refine(candidates, val_losses, picked: float | None, spacing: float = SPACING,
           max_shift: float = MAX_SHIFT) -> float | None:
    """`picked` moved to the vertex of the parabola through its loss and its neighbours' in log rate
    (the candidates `spacing` x apart on either side), by at most `max_shift` spacings; `picked` itself
    where a neighbour is missing or not finite or the points do not curve upwards."""
    if picked is None:
        return None
    rates = np.asarray(candidates, np.float64)
    v = np.asarray([np.nan if x is None else x for x in val_losses], np.float64)
    at = lambda r: np.flatnonzero(np.isclose(rates, r, rtol=1e-9))  # noqa: E731
    here, up, down = at(picked), at(picked * spacing), at(picked / spacing)
    if not (len(here) and len(up) and len(down)):
        return picked
    f0, f_up, f_down = v[here[0]], v[up[0]], v[down[0]]
    curvature = f_up - 2 * f0 + f_down
    if not (np.isfinite([f0, f_up, f_down]).all() and curvature > 0):
        return picked
    shift = float(np.clip((f_down - f_up) / (2 * curvature), -max_shift, max_shift))  # in spacings, up positive
    return float(picked * spacing ** shift)


def candidate_schedule(rate: float, steps: int, length: int, cooldown: float | None = None) -> np.ndarray:
    """A candidate's per-step rates over `length` (padded) steps: `rate`, then over the last `cooldown`
    (default `COOLDOWN`) of its `steps` (at least one step) linearly down to zero; the padding past
    `steps` keeps `rate` (never run)."""
    cooldown = COOLDOWN if cooldown is None else cooldown
    if not 0 < steps <= length or not 0 <= cooldown <= 1:
        raise ValueError(f"candidate_schedule: need 0 < steps <= length and 0 <= cooldown <= 1, got {steps}, "
                         f"{length}, {cooldown}")
    lrs = np.full(length, rate, np.float32)
    if cooldown > 0:
        k = max(1, int(round(cooldown * steps)))
        lrs[steps - k:steps] = rate * np.linspace(1, 0, k + 1, dtype=np.float32)[1:]
    return lrs


def _losses(values) -> list[float | None]:
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def default_steps(steps_per_epoch: int) -> int:
    """An eighth of an epoch, at least `MIN_STEPS` (and at most the epoch)."""
    return int(min(steps_per_epoch, max(MIN_STEPS, steps_per_epoch // EPOCH_FRACTION)))


def verify(anchor: float, train: Callable[[np.ndarray], list[float | None]], *, steps: int, batch_size: int,
           valid_examples: int, num_candidates: int = NUM_CANDIDATES) -> Verification:
    """The stage around `train(rates) -> [validation loss, or None where that rate diverged]`, which
    trains each of `candidate_rates(anchor)` from the same weights for `steps` batches (the range test
    gives it: `lrjax.range_test`); picks by `pick`, trying lower rates while the pick is the lowest tried."""
    t0 = time.perf_counter()
    rates = candidate_rates(anchor, num_candidates).tolist()
    val = _losses(train(np.asarray(rates)))
    picked = pick(rates, val)
    for _ in range(MAX_EXTRA):  # the pick at the lowest rate tried: bracket it from below
        if picked is None or picked > min(rates):
            break
        rates.append(min(rates) / SPACING)
        val += _losses(train(np.asarray(rates[-1:])))
        picked = pick(rates, val)
    candidate, picked = picked, refine(rates, val, picked)
    return Verification(candidates=rates, val_losses=val, picked=picked, candidate=candidate, anchor=float(anchor),
                        steps=int(steps), train_examples=int(steps) * int(batch_size), valid_examples=int(valid_examples),
                        seconds=time.perf_counter() - t0)
