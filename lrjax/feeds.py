"""What every kind of input gives the entry points (`Input`, `Feed`), and a user's own iterable of
batches (`IterableInput`, `BatchFeed`).

A `Feed` runs the training steps [g, end) that the entry points ask for: it takes the next K steps'
rows (a chunk; a short call padded with weight-0 steps) and calls the compiled K-step program
`program(state, feed.context, rows, w, count)` once per K steps, so there is no host round trip per
step. `feed.fetch(context, row, w) -> (batch, w)` (static) is how the program turns a step's row
into its batch: a gather from resident examples (`lrjax.resident`), or the row itself where whole
batches are handed over (an iterable here, lrjax's Grain stream in `lrjax.stream`).

`BatchFeed` wraps any iterable of batches (a Grain `DataLoader` or dataset, a generator, a list):
- a batch is what the loss function receives (`(x, y)`, a dict, any pytree of arrays with the batch
  on the leading axis); lrjax converts nothing, so dtypes are the pipeline's business;
- each batch has the first batch's size; a smaller one (an epoch's remainder) is padded with
  weight-0 rows; an iterable that ends is iterated again (a new pass);
- with several processes each yields its own rows of every global batch (Grain's
  `ShardByJaxProcess`), assembled with `jax.make_array_from_process_local_data`;
- position: the iterator's own `get_state()` where it has one (Grain's iterators), saved in the
  checkpoint's meta and given back with `set_state()`, else the count of batches taken, replayed on
  resume (exact where the iterable yields the same batches each time it is iterated from the start).

Nothing here imports Grain.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import mesh as mesh_lib
from lrjax import steps
from lrjax.errors import CheckpointError, ConfigError, DataError


def steps_per_pass(data, given: int | None, keyword: str) -> int:
    """Steps of an epoch (or of the range test) for an iterable: `given`, else its length."""
    if given is not None:
        if given < 1:
            raise ConfigError(f"{keyword} must be >= 1, got {given}")
        return int(given)
    try:
        return int(len(data))
    except TypeError:
        raise ConfigError(f"{type(data).__name__} has no length: give {keyword}= (how many of its batches "
                          "make one epoch)") from None


def chunk_sharding(mesh: jax.sharding.Mesh, axis: str | tuple[str, ...] | None = None) -> jax.sharding.NamedSharding:
    """Chunks [K, B, ...] split along the batch over `axis` of `mesh` (default: its batch axes)."""
    axis = axis if axis is not None else mesh_lib.batch_axes(mesh)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axis))


def examples(valid):
    """Validation (or test) examples given beside an iterable: an object with x_valid (and y_valid),
    an (x, y) pair of arrays, or any pytree of arrays with the examples on the leading axis."""
    if hasattr(valid, "x_valid"):
        from lrjax.data import split_examples

        return split_examples(valid, "valid")
    leaves = jax.tree.leaves(valid)
    if not leaves or len({np.shape(a)[0] if np.ndim(a) else -1 for a in leaves}) != 1 or np.ndim(leaves[0]) == 0:
        raise ConfigError("valid= needs arrays with the examples on the leading axis, e.g. (x_valid, y_valid), "
                          f"got {type(valid).__name__}")
    return valid


def put(batch, w: np.ndarray, sharding: jax.sharding.NamedSharding):
    """A host chunk ([K, b, ...] leaves, weights [K, b]) as global device arrays split along the batch
    (dimension 1) by `sharding`; with several processes each passes its own rows of every batch."""
    if jax.process_count() == 1:
        return jax.device_put((batch, w), sharding)

    def one(a):
        shape = (a.shape[0], a.shape[1] * jax.process_count(), *a.shape[2:])
        check_process_rows(sharding, shape)
        return jax.make_array_from_process_local_data(sharding, a, shape)

    return jax.tree.map(one, (batch, w))


def check_process_rows(sharding, shape) -> None:
    local = shape[1] // jax.process_count()
    starts = {index[1].start or 0 for index in sharding.addressable_devices_indices_map(shape).values()}
    stops = {index[1].stop or shape[1] for index in sharding.addressable_devices_indices_map(shape).values()}
    p = jax.process_index()
    if min(starts) != p * local or max(stops) != (p + 1) * local:
        raise ConfigError(f"the sharding gives process {p} batch rows {min(starts)}:{max(stops)}, but the "
                          f"stream reads rows {p * local}:{(p + 1) * local} (ShardByJaxProcess): split the "
                          "batch over a mesh axis whose devices are ordered by process")


class Input:
    """Training data of any kind as the entry points see it (`lrjax.inputs.make_input` makes one):
    `kind` ('resident', 'stream' or 'iterable': the run's `input`), `batch_size` (global),
    `steps_per_epoch`, `num_examples` (None where unknown), and
    - `train_feed(seed, cadence, total_steps)`: `fit`'s feed (`cadence`: the loop's longest chunk);
    - `range_feed(seeds, chunk, num_steps)`: the range test's (several seeds: resident only);
    - `sweep_feed(seeds, chunk)`: a sweep's (every member of a seed on the same batches);
    - `valid_examples(count)`: the first `count` validation examples on the host;
    - `evaluator(batch_size)`: the validation pass (`compile(state)`, then `evaluator(state)`)."""

    kind: str
    batch_size: int
    steps_per_epoch: int
    num_examples: int | None = None
    seeds = 1  # how many seeds a range test may run at once (None: any)
    check = None  # check(batch, name) of each batch or chunk read after the first (lrjax.validate.later_batches)


class Feed:
    """Steps packed into calls of a compiled K-step program `program(state, context, rows, w, count)`.
    Subclasses give `_take(count)` (host rows and weights of the next `count` steps, padded to K) and
    the position (`state(g)`, `restore`); `fetch` is the programs' static row -> batch."""

    k: int
    sharding: jax.sharding.NamedSharding
    context = None  # what `fetch` reads besides the row (resident examples), or None
    fetch = staticmethod(steps.given)
    masked = True  # whether the program skips the steps from `count` on (False: every call is K steps)
    seed_axis = False  # whether rows lead with a seed axis (each seed its own batches)
    host_bound = True  # whether taking a chunk reads it on the host (its time counts from the dispatch)
    _next = 0  # the global step of the next batch
    check = None  # check(batch, name) of each batch read after the first (lrjax.validate.later_batches)

    def zeros(self):
        """A chunk of K padding steps on the devices, shaped like every other (to compile with)."""
        raise NotImplementedError

    def take(self, count: int):
        """The next `count` (<= K) steps' (rows, w) on the devices, padded to K steps of weight 0."""
        return put(*self._take(count), self.sharding)

    def __call__(self, program, state, g: int, end: int):
        """Steps [g, end) with the compiled `program`: (state, per-step metrics)."""
        if g != self._next:
            raise ValueError(f"the feed is at step {self._next}, asked for step {g}")
        outs = []
        for start in range(g, end, self.k):
            count = min(self.k, end - start)
            state, m = program(state, self.context, *self.take(count), np.int32(count))
            outs.append(m)
        return state, outs[0] if len(outs) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *outs)

    def close(self) -> None:
        pass


def stack_steps(taken: list, k: int):
    """`taken` [(batch, w)] host steps stacked to K steps, the missing ones zeros (weight 0)."""
    pad = [jax.tree.map(np.zeros_like, taken[0])] * (k - len(taken))
    return jax.tree.map(lambda *a: np.stack(a), *(taken + pad))


class BatchFeed(Feed):
    """A user's iterable of batches as a `Feed` (see the module docstring)."""

    def __init__(self, source, k: int, sharding: jax.sharding.NamedSharding, name: str = "training data"):
        self.source, self.k, self.sharding, self.name = source, int(k), sharding, name
        self._it, self._pass, self._in_pass = None, 0, 0
        self._first = None  # (treedef, leaf shapes and dtypes, batch size) of the first batch
        self._peeked = None
        self._states = {0: self._position()}

    # -- reading -------------------------------------------------------------------------------
    def _iterator(self):
        if self._it is None:
            self._it = iter(self.source)
        return self._it

    def _read(self):
        if self._peeked is not None:
            item, self._peeked = self._peeked, None
            return item
        try:
            batch = next(self._iterator())
        except StopIteration:
            if self._in_pass == 0:
                raise DataError(f"the {self.name} yielded no batches" + (
                    f" when iterated again after pass {self._pass} (an iterator that runs once: give an "
                    "iterable, e.g. a list or a Grain DataLoader, or fewer steps)" if self._pass else "")) from None
            self._it, self._pass, self._in_pass = None, self._pass + 1, 0
            return self._read()
        self._in_pass += 1
        return self._check(batch)

    def _check(self, batch):
        leaves, treedef = jax.tree.flatten(batch)
        leaves = [np.asarray(a) for a in leaves]
        if not leaves or any(a.ndim == 0 for a in leaves):
            raise DataError(f"the {self.name} must yield batches: arrays (or pytrees of arrays) with the "
                            f"batch on the leading axis; got {type(batch).__name__}")
        sizes = {len(a) for a in leaves}
        if len(sizes) > 1:
            raise DataError(f"a batch of the {self.name} has arrays of {sorted(sizes)} rows: every array of "
                            "a batch needs the same leading (batch) size")
        n = sizes.pop()
        if self._first is None:
            self._first = (treedef, [(a.shape[1:], a.dtype) for a in leaves], n)
        want, specs, size = self._first
        got = [(a.shape[1:], a.dtype) for a in leaves]
        if treedef != want or got != specs:
            raise DataError(f"batch {self._in_pass} (pass {self._pass + 1}) of the {self.name} differs from "
                            f"the first: {treedef} {got} vs {want} {specs}")
        if n > size:
            raise DataError(f"batch {self._in_pass} of the {self.name} has {n} rows, more than the first "
                            f"batch's {size}: the first batch sets the batch size")
        if self.check is not None:
            self.check(jax.tree.unflatten(treedef, leaves), f"data (its batch {self._in_pass}, pass {self._pass + 1})")
        w = np.zeros(size, np.float32)
        w[:n] = 1.0
        if n < size:  # an epoch's remainder: padded with weight-0 rows
            leaves = [np.concatenate([a, np.zeros((size - n, *a.shape[1:]), a.dtype)]) for a in leaves]
        return jax.tree.unflatten(treedef, leaves), w

    @property
    def batch_size(self) -> int:
        """Rows of each batch this process reads (the global batch is this times the processes)."""
        if self._first is None:
            self._peeked = self._read()
        return self._first[2]

    def peek(self):
        """The next batch as the loss function receives it, read now and still trained on next."""
        if self._peeked is None:
            self._peeked = self._read()
        return self._peeked[0]

    def zeros(self):
        if self._peeked is None and self._first is None:
            self._peeked = self._read()  # the first batch shows the shapes; it is trained on later
        treedef, specs, size = self._first
        batch = jax.tree.unflatten(treedef, [np.zeros((self.k, size, *shape), dtype) for shape, dtype in specs])
        return put(batch, np.zeros((self.k, size), np.float32), self.sharding)

    def _take(self, count: int):
        taken = [self._read() for _ in range(count)]
        self._next += count
        return stack_steps(taken, self.k)

    def __call__(self, program, state, g: int, end: int):
        self._states = {g: self._position()}  # the loop asks for the position of a chunk's start
        return super().__call__(program, state, g, end)

    # -- position ------------------------------------------------------------------------------
    def _position(self) -> dict:
        pos = {"pass": self._pass, "in_pass": self._in_pass - (self._peeked is not None)}
        get_state = getattr(self._it, "get_state", None)
        if self._it is not None and callable(get_state) and self._peeked is None:
            pos["iterator"] = _encode(get_state(), self.name)
        return pos

    def state(self, g: int) -> dict:
        """JSON-serialisable position before step g (a chunk's start, or the current position)."""
        pos = self._states.get(g) if g != self._next else self._position()
        if pos is None:
            raise ValueError(f"the feed has no position for step {g} (it is at step {self._next})")
        return {"step": g, **pos}

    def restore(self, state: dict) -> None:
        """Back to the position `state(g)` gave: the iterator's state set where it was saved, else the
        pass iterated again and its first batches skipped."""
        if not isinstance(state, dict) or "pass" not in state:
            raise CheckpointError("the checkpoint's input position is not one that lrjax's BatchFeed writes")
        self.close()
        self._pass, self._in_pass, self._next, self._peeked = int(state["pass"]), 0, int(state["step"]), None
        saved = state.get("iterator")
        it = self._iterator()
        if saved is not None and callable(getattr(it, "set_state", None)):
            try:
                it.set_state(_decode(saved))
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"the {self.name}'s iterator refuses the checkpoint's position: "
                                      f"{(str(e).splitlines() or [type(e).__name__])[0]}") from e
            self._in_pass = int(state["in_pass"])
        else:
            if saved is not None:
                raise CheckpointError(f"the checkpoint holds the {self.name}'s iterator state, but its "
                                      f"iterator ({type(it).__name__}) has no set_state")
            for _ in range(int(state["in_pass"])):
                self._read()
        self._states = {self._next: self._position()}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if callable(close):
            close()
        self._it = None


def _encode(state, name: str):
    if isinstance(state, bytes):
        return {"bytes": base64.b64encode(state).decode()}
    try:
        json.dumps(state)
    except TypeError:
        raise CheckpointError(f"the {name}'s iterator state ({type(state).__name__}) is neither bytes nor "
                              "JSON-serialisable, so a checkpoint cannot hold it") from None
    return {"json": state}


def _decode(saved: dict):
    return base64.b64decode(saved["bytes"]) if "bytes" in saved else saved["json"]


class Evaluator:
    """Evaluation over examples resident on the devices: one compiled program (`steps.evaluate`)."""

    def __init__(self, examples, batch_size: int):
        self.examples, self.batch_size = examples, batch_size

    def compile(self, state) -> set[str]:
        """Compiles the evaluation for `state`'s shapes; returns the names of what it reports."""
        lowered = steps.evaluate.lower(state, self.examples, batch_size=self.batch_size)
        self._program = lowered.compile()
        return set(lowered.out_info)

    def __call__(self, state) -> dict[str, jax.Array]:
        return self._program(state, self.examples)

    def close(self) -> None:
        pass


class IterableInput(Input):
    """A user's iterable of batches, with the validation examples given beside it (`valid`)."""

    kind = "iterable"

    def __init__(self, who: str, data, valid, steps_per_epoch: int | None, chunk_steps: int, mesh,
                 keyword: str = "steps_per_epoch"):
        self.who, self.valid, self.mesh, self.chunk_steps = who, valid, mesh, chunk_steps
        self.steps_per_epoch = steps_per_pass(data, steps_per_epoch, keyword)
        self.feed = BatchFeed(data, min(chunk_steps, self.steps_per_epoch), chunk_sharding(mesh))
        self.batch_size = self.feed.batch_size * jax.process_count()

    def train_feed(self, seed: int, cadence: int, total_steps: int) -> BatchFeed:
        return self.feed

    def range_feed(self, seeds: list[int], chunk: int, num_steps: int) -> BatchFeed:
        self.feed.k = chunk
        return self.feed

    def sweep_feed(self, seeds: list[int], chunk: int) -> BatchFeed:
        return self.feed

    def valid_examples(self, count: int | None = None):
        if self.valid is None:
            raise ConfigError(f"{self.who}: training from an iterable of batches needs the validation examples "
                              "as valid=")
        valid = examples(self.valid)
        return valid if count is None else jax.tree.map(lambda a: np.asarray(a[:count]), valid)

    def evaluator(self, batch_size: int):
        return Evaluator(mesh_lib.replicate(self.valid_examples(), self.mesh), batch_size)
