"""The range test's verification stage: a few candidate rates below the curve's turn, trained from the
same weights for a short while as one sweep, and the one with the lowest validation loss.

Why a stage and not a rule: where the best rate sits relative to the range-test curve depends on the
task. On Fashion-MNIST's MLP (sgd, adam) it sits at the turn of the loss (`lrjax.suggest.turn`), on a
char-level Transformer LM (adamw) ~10x below it, and no reading of one curve told the two apart. A short
training run does: on the LM a quarter epoch already ranks the rates as two epochs do. Training ranks
the rates above the turn too well, though (on the MLP with adam a quarter epoch is flat from 1e-3 to
1e-2, where four epochs prefer 4e-4-2e-3), so the candidates stop at the turn: `turn` x 2**-k, k = 0..5.
The turn itself moves little with the test's length (`suggest.turn`), and the candidates are 2x apart,
so the pick stays within ~2x between a one-epoch and a five-epoch test.

`candidate_rates` and `pick` are pure; `verify` runs the stage (`lrjax.sweeps.sweep` on a random subset
of the training set that is `steps` batches long, scored on up to `valid_examples` validation examples).
"""

from __future__ import annotations

import dataclasses
import time
import types
from typing import Any

import jax
import numpy as np

from lrjax import sweeps, tasks
from lrjax.data import split_examples

NUM_CANDIDATES = 6  # turn, turn/2, ..., turn/32: the LM's best sat at turn/8 - turn/16
SPACING = 2.0  # between candidates: a pick within 2x whichever neighbour wins
# The stage's length: an eighth of an epoch, at least MIN_STEPS. On the LM (188 steps an epoch) 47 and 94
# steps ranked the rates as two epochs do; on the MLP (1719) 215 and 430 steps did below the turn. Six
# candidates of an eighth epoch cost ~0.75 of a one-epoch range test (on a CPU, where members cost alike).
MIN_STEPS = 40
EPOCH_FRACTION = 8


@dataclasses.dataclass
class Verification:
    """What the stage measured; `picked` is None when every candidate diverged."""

    candidates: list[float]
    val_losses: list[float | None]  # None where the candidate diverged
    picked: float | None
    anchor: float  # the rate the candidates hang from (`suggest.turn`)
    steps: int  # training steps of every candidate
    train_examples: int
    valid_examples: int
    seconds: float  # the whole stage, compile included
    compile_s: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def candidate_rates(anchor: float, num: int = NUM_CANDIDATES, spacing: float = SPACING) -> np.ndarray:
    """`anchor` and the `num - 1` rates below it, each `spacing` x lower (descending)."""
    if not anchor > 0 or num < 1 or not spacing > 1:
        raise ValueError(f"candidate_rates: anchor must be positive, num >= 1 and spacing > 1, got {anchor}, "
                         f"{num}, {spacing}")
    return float(anchor) * float(spacing) ** -np.arange(num, dtype=np.float64)


def pick(candidates, val_losses) -> float | None:
    """The candidate with the lowest finite validation loss (the higher rate on a tie); None if none is finite."""
    v = np.asarray([np.inf if x is None or not np.isfinite(x) else x for x in val_losses], np.float64)
    if not np.isfinite(v).any():
        return None
    return float(np.asarray(candidates, np.float64)[int(np.argmin(v))])


def default_steps(steps_per_epoch: int) -> int:
    """An eighth of an epoch, at least `MIN_STEPS` (and at most the epoch)."""
    return int(min(steps_per_epoch, max(MIN_STEPS, steps_per_epoch // EPOCH_FRACTION)))


def verify(model, optimizer, data, anchor: float, *, batch_size: int = 32, seed: int = 42, steps: int | None = None,
           num_candidates: int = NUM_CANDIDATES, valid_examples: int = 1000, loss_fn=None, dtype=None,
           mesh=None) -> Verification:
    """Trains `candidate_rates(anchor)` from `model`'s weights (left unchanged) for `steps` batches (default
    `default_steps` of one epoch) of a random subset of `data`'s training examples (drawn from `seed`),
    all at once in one `sweep`, and scores each by its loss on the first `valid_examples` validation
    examples. `data` as for `find_lr` with arrays (x_/y_ train and valid)."""
    t0 = time.perf_counter()
    train = split_examples(data, "train")
    valid = split_examples(data, "valid")
    n = int(jax.tree.leaves(train)[0].shape[0])
    m = min(valid_examples, int(jax.tree.leaves(valid)[0].shape[0]))
    if m == 0:
        raise ValueError("verify: no validation examples to score the candidates on")
    per_epoch = -(-n // batch_size)
    steps = default_steps(per_epoch) if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"verify: steps must be positive, got {steps}")
    rows = np.random.default_rng(seed).permutation(n)[: min(n, steps * batch_size)]
    def subset(split, take):  # the split's rows, in the shape it came in ((x, y) arrays or an examples pytree)
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}", None)
        return jax.tree.map(lambda a: np.asarray(a)[take], x), None if y is None else np.asarray(y)[take]

    (x_train, y_train), (x_valid, y_valid) = subset("train", rows), subset("valid", slice(0, m))
    sub = types.SimpleNamespace(x_train=x_train, y_train=y_train, x_valid=x_valid, y_valid=y_valid)
    rates = candidate_rates(anchor, num_candidates)
    result = sweeps.sweep(lambda s: model, optimizer, sub, rates, seeds=[seed], epochs=1, batch_size=batch_size,
                          loss_fn=loss_fn or tasks.classification, dtype=dtype, mesh=mesh, rank_by="val_loss",
                          eval_batch_size=min(1000, m))
    losses = np.asarray(result.metrics["val_loss"][0, 0], np.float64)
    losses = np.where(result.diverged[0], np.nan, losses)
    val = [float(v) if np.isfinite(v) else None for v in losses]
    return Verification(candidates=rates.tolist(), val_losses=val, picked=pick(rates, val), anchor=float(anchor),
                        steps=int(-(-len(rows) // batch_size)), train_examples=int(len(rows)), valid_examples=m,
                        seconds=time.perf_counter() - t0, compile_s=float(result.compile_time_s))
