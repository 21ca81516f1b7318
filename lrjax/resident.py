"""Resident input: every split as arrays on every device, batches gathered by index inside the programs.

The training examples go to the devices once; what travels per chunk of K steps is only its rows of
the batch order (indices [K, B] and weights), drawn on the host from (seed, epoch) alone
(`lrjax.steps.epoch_batches`, or `host_batch_order` for the range test), so a resumed run sees the
same batches and the position needs no saving. The compiled programs fetch a step's batch with
`steps.gather_batch(examples, idx, w)`.
"""

from __future__ import annotations

import jax
import numpy as np

from lrjax import feeds, steps
from lrjax import mesh as mesh_lib
from lrjax.data import split_examples


class ResidentFeed(feeds.Feed):
    """Chunks of an epoch's batch order (`order(epoch) -> (idx, w)`, 1-based epochs of
    `steps_per_epoch` steps, a leading seed axis where several seeds draw their own order) for
    programs that gather from `examples` on the device. A chunk never crosses an epoch's end."""

    fetch = staticmethod(steps.gather_batch)
    host_bound = False  # a chunk's rows are a slice of a drawn order: its time counts once the host is free

    def __init__(self, examples, order, steps_per_epoch: int, k: int, *, place, masked: bool = True,
                 seed_axis: bool = False):
        self.context, self.order, self.steps_per_epoch, self.k = examples, order, steps_per_epoch, int(k)
        self.masked, self.seed_axis = masked, seed_axis
        self.place = place  # host rows -> device arrays (replicated; seeds split over `members`)
        self._epoch, self._rows = None, None

    def _epoch_rows(self, epoch: int):
        if epoch != self._epoch:  # one epoch's order at a time, drawn when its first chunk is taken
            self._epoch, self._rows = epoch, self.order(epoch)
        return self._rows

    def zeros(self):
        idx, w = self._epoch_rows(self._next // self.steps_per_epoch + 1)
        shape = lambda a: (*a.shape[:-2], self.k, a.shape[-1])  # noqa: E731
        return self.place((np.zeros(shape(idx), idx.dtype), np.zeros(shape(w), w.dtype)))

    def _take(self, count: int):
        epoch, pos = divmod(self._next, self.steps_per_epoch)
        if pos + count > self.steps_per_epoch:
            raise ValueError(f"a chunk of {count} steps from step {self._next} crosses the end of an epoch")
        idx, w = self._epoch_rows(epoch + 1)
        pad = [(0, 0)] * (idx.ndim - 2) + [(0, self.k - count), (0, 0)]
        self._next += count
        return tuple(np.pad(a[..., pos:pos + count, :], pad) for a in (idx, w))

    def take(self, count: int):
        return self.place(self._take(count))

    def __call__(self, program, state, g: int, end: int):
        self._next = g  # the order is a function of the step: any step may come next
        return super().__call__(program, state, g, end)

    def state(self, g: int) -> None:
        return None  # the batches of step g follow from (seed, epoch): nothing to save

    def restore(self, state) -> None:
        pass


def seeds_order(order_of, seeds):
    """An epoch's rows of every seed, stacked on a leading seed axis (a sweep's feed: each seed's rates
    on that seed's rows); `order_of(seed, epoch) -> (rows, w)` is one seed's, as `fit` draws it."""
    def order(epoch):
        return tuple(np.stack(a) for a in zip(*(order_of(int(s), epoch) for s in seeds)))

    return order


class ResidentInput(feeds.Input):
    """Arrays (an object with x_train, y_train, x_valid, y_valid; see `lrjax.data.split_examples`)."""

    kind = "resident"
    seeds = None  # any number: each seed gathers its own order from the same examples

    def __init__(self, data, batch_size: int, mesh):
        self.data, self.batch_size, self.mesh = data, batch_size, mesh
        self.train = mesh_lib.replicate(split_examples(data, "train"), mesh)
        self.num_examples = steps.num_examples(self.train)
        self.steps_per_epoch = steps.steps_per_epoch(self.num_examples, batch_size)

    def train_feed(self, seed: int, cadence: int, total_steps: int) -> ResidentFeed:
        order = lambda epoch: steps.epoch_batches(seed, epoch, self.num_examples, self.batch_size)  # noqa: E731
        return ResidentFeed(self.train, order, self.steps_per_epoch, cadence, place=self._replicate,
                            masked=cadence != self.steps_per_epoch)

    def range_feed(self, seeds: list[int], chunk: int, num_steps: int) -> ResidentFeed:
        orders = [steps.host_batch_order(int(s), self.num_examples, self.batch_size, num_steps) for s in seeds]
        rows = tuple(np.stack([o[i] for o in orders]) if len(seeds) > 1 else orders[0][i] for i in (0, 1))
        place = lambda t: mesh_lib.spread_members(mesh_lib.replicate(t, self.mesh))  # noqa: E731 - seeds split
        return ResidentFeed(self.train, lambda _: rows, num_steps, chunk, place=place, seed_axis=len(seeds) > 1)

    def sweep_feed(self, seeds: list[int], chunk: int) -> ResidentFeed:
        # each seed's batches of the epoch, as `fit` draws them, one chunk per epoch
        order = seeds_order(lambda s, epoch: steps.epoch_batches(s, epoch, self.num_examples, self.batch_size), seeds)
        return ResidentFeed(self.train, order, self.steps_per_epoch, self.steps_per_epoch, place=self._replicate,
                            seed_axis=True)

    def _replicate(self, tree):
        return mesh_lib.replicate(tree, self.mesh)

    def valid_examples(self, count: int | None = None):
        valid = split_examples(self.data, "valid")
        return valid if count is None else jax.tree.map(lambda a: np.asarray(a[:count]), valid)

    def evaluator(self, batch_size: int) -> feeds.Evaluator:
        return feeds.Evaluator(mesh_lib.replicate(self.valid_examples(), self.mesh), batch_size)
