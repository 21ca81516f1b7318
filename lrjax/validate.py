"""The inputs of a run, checked at the API's edge (`find_lr`, `fit`, `sweep`, `FitResult.evaluate`)
before anything compiles, trains or is written: one `DataError` (or, for a loss function's outputs,
`ConfigError`) that names the argument, says what is wrong with one example (index and value) and
what to do.

What is checked, per split (training, validation; `evaluate`'s x and y):
  - every leaf is a numeric array with the examples on its leading axis, all leaves of one split
    with the same number of examples, and no split empty;
  - floating leaves are finite (numpy on the host, one vectorised reduction per leaf);
  - the model takes the examples and, for the default task (`lrjax.tasks.classification`), its
    output width is the number of classes: labels are integers in [0, classes); for another task,
    the loss function returns per-example losses and metrics. Both are learned by abstract
    evaluation (`jax.eval_shape` on two examples' shapes): a trace, no compile, no device work.

Arrays are checked as they were passed, on the host, before `lrjax.inputs.make_input` copies them
to the devices; streamed splits (`lrjax.sources.Splits`) on the first examples of each split, read
straight from the source; iterables of batches on their first batch (`lrjax.feeds.BatchFeed.peek`,
once the input has read it: `check_first_batch`); the batches and chunks read after the first, as they
are read (`later_batches`: never a second pass).

`range_first_step` (the range test) and `check_first_step` (the training loop) explain a loss
that is already non-finite at the first step (computed before any update, so the rate is not the
cause), naming non-finite parameters where they find them.

Nothing here writes or imports the training modules; files are read only for a streamed split's
first examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from lrjax import tasks
from lrjax.errors import ConfigError, DataError, TrainingDiverged

# Examples of the abstract evaluation: two, so that per-example outputs (shape [2]) differ from a
# scalar or from outputs of another leading size.
_PROBE = 2
# Examples of a streamed split read from its source to check the first batch.
_STREAM_PROBE = 256


def check_input(who: str, model, data, *, loss_fn=tasks.classification, valid=None, need_valid: bool = True) -> None:
    """The data of `who` ('find_lr', 'fit', 'sweep') as it was passed, before `lrjax.inputs.make_input`
    copies anything to a device: arrays (an object with x_train, ...), a streamed `lrjax.sources.Splits`
    (its first examples), or the `valid=` given beside an iterable of batches (whose first batch
    `check_first_batch` checks once the input has read it). Any other kind (an `Input` of a
    researcher's own) is not checked. `model` is an `nnx.Module`, or a function of no arguments that
    builds one (sweep's `model_fn`: built only when there is something to check, concretely, since
    lrjax's models initialise under a top-level jit, which `nnx.eval_shape` cannot nest).
    `need_valid`: a validation split is required (fit, sweep; the range test with eval_every > 0)."""
    from lrjax import feeds, sources

    if isinstance(data, sources.Splits):
        _check_stream(who, _module(model), data, loss_fn)
        return
    if isinstance(data, feeds.Input):
        return
    if not hasattr(data, "x_train"):  # an iterable: its valid= here, its first batch later
        if valid is not None:
            _check_split(who, "validation", _module(model), _from_valid(valid), loss_fn)
        return
    splits = [("training", _pair(data, "train"))]
    if getattr(data, "x_valid", None) is not None:
        v = _pair(data, "valid")
        if need_valid or _rows(v) != 0:
            splits.append(("validation", v))
    elif need_valid:
        raise DataError(f"{who}: data has no x_valid: training monitors the validation loss; give "
                        "x_valid and y_valid (e.g. the first examples of the training set)")
    model = _module(model)
    for what, named in splits:
        _check_split(who, what, model, named, loss_fn)


def check_first_batch(who: str, model, inp, *, loss_fn=tasks.classification) -> None:
    """The first batch of an iterable's `Input` (`lrjax.feeds.IterableInput`), read now and still the
    first trained on; and for the batches and chunks read later (an iterable's, a stream's), a check
    of each as it is read (`inp.check` / `feed.check`: `later_batches`). Nothing for resident arrays,
    which `check_input` has seen whole."""
    feed = getattr(inp, "feed", None) if inp.kind == "iterable" else None
    if feed is not None:
        classes = _check_split(who, "training", _module(model), _from_batch(feed.peek(), "data (its first batch)"),
                               loss_fn)
        feed.check = later_batches(who, classes)
    elif inp.kind == "stream" and hasattr(inp, "splits"):  # images; a text corpus's bytes are all valid tokens
        shape = (_PROBE, *inp.splits.train.example_shape)
        classes = None if loss_fn is not tasks.classification else _num_outputs(
            who, _module(model), jax.ShapeDtypeStruct(shape, np.float32), "data (its train split) images")
        inp.check = later_batches(who, classes)


def later_batches(who: str, classes: int | None):
    """`check(batch, name)` for a batch or chunk read after the first (already checked against the first
    batch's structure, shapes and dtypes): floating leaves finite and, for the default task (`classes`
    outputs), the labels of an (x, y) batch in [0, classes). Host numpy on what was read anyway: a sum
    per floating leaf (none for a stream's uint8 images) and a min and max of the labels."""

    def check(batch, name: str) -> None:
        named = _from_batch(batch, name)
        for leaf_name, a in named.leaves:
            if np.issubdtype(a.dtype, np.floating) or _is_jax_float(a.dtype):
                bad = _first_not_finite(a)
                if bad is not None:
                    raise DataError(f"{who}: {leaf_name} holds {bad[1]} at {leaf_name}[{', '.join(map(str, bad[0]))}] "
                                    f"({bad[2]} of its {a.size} values are not finite): clean or drop those examples")
        if classes is not None and named.labels is not None:
            _check_labels(who, *named.leaves[named.labels], classes)

    return check


def _module(model):
    return model if isinstance(model, nnx.Module) else model()


def check_examples(who: str, model, x, y=None, *, loss_fn=tasks.classification) -> None:
    """`FitResult.evaluate`'s examples: (x, y), or the examples pytree `x` where `y` is None."""
    named = _from_batch(x, "x") if y is None else _xy(x, y, "x", "y")
    _check_split(who, "evaluation", model, named, loss_fn)


def not_finite_at_first_step(lr: float, models=()) -> None:
    """Raises `TrainingDiverged` for a loss that is not finite at the first step: that loss comes before
    any update, so the data or the model is the cause, never the rate. The first non-finite parameter
    of `models` (the starting ones, where the caller has them) is named."""
    msg = (f"the loss is not finite at the first step at rate {lr:.3g}: the data or the model, not the rate "
           "(the first step's loss comes before any update)")
    for model in models:
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
            bad = _first_not_finite(leaf) if _is_jax_float(leaf.dtype) else None
            if bad is not None:
                raise TrainingDiverged(msg + f"; the model's parameter {_dotted(path)} holds "
                                       f"{bad[1]} at {list(bad[0])}: initialise it again")
    raise TrainingDiverged(msg + "; look for a loss function that is not finite on these examples (e.g. log "
                           "of 0), or inputs the checks did not see (an Input of your own)"
                           + ("" if models else ", or non-finite parameters"))


def _dotted(path) -> str:
    """A parameter's path as the model spells it: hidden.0.kernel."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def range_first_step(diverged_step: int | None, lr: float, models) -> None:
    """For the range test: a test that stopped at its first (optimizer) step, before any update."""
    if diverged_step == 0:
        not_finite_at_first_step(lr, models)


def check_first_step(start: int, step_metrics: dict) -> None:
    """For the training loop: a chunk starting at step 0 whose first loss is not finite."""
    if start == 0 and not np.isfinite(float(np.asarray(step_metrics["loss"])[0])):
        not_finite_at_first_step(float(np.asarray(step_metrics["lr"])[0]))


# ---------------------------------------------------------------------------------------------
# A split as named leaves
# ---------------------------------------------------------------------------------------------

class _Named:
    """A split's leaves with their names (`x_train`, `y_train`, `x_train['image']`, ...), the batch
    structure the loss function receives, and where the labels are (`labels`: the index into
    `leaves` of the default task's label array, or None when the batch is not an (x, y) pair)."""

    def __init__(self, leaves: list[tuple[str, Any]], tree, labels: int | None):
        self.leaves, self.tree, self.labels = leaves, tree, labels


def _named(tree, base: str) -> _Named:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return _Named([(base + jax.tree_util.keystr(p), leaf) for p, leaf in flat], tree, None)


def _pair(data, split: str) -> _Named:
    """The examples of `split` of an object with x_<split>/y_<split> (see `lrjax.data.split_examples`)."""
    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}", None)
    return _named(x, f"x_{split}") if y is None else _xy(x, y, f"x_{split}", f"y_{split}")


def _xy(x, y, x_name: str, y_name: str) -> _Named:
    """An (x, y) pair; `y` is the default task's labels where it is one array."""
    xs = _named(x, x_name).leaves
    return _Named(xs + _named(y, y_name).leaves, (x, y), len(xs) if len(jax.tree.leaves(y)) == 1 else None)


def _from_valid(valid) -> _Named:
    if hasattr(valid, "x_valid"):
        return _pair(valid, "valid")
    if isinstance(valid, (tuple, list)) and len(valid) == 2:
        return _xy(*valid, "valid[0]", "valid[1]")
    return _named(valid, "valid")


def _from_batch(batch, base: str) -> _Named:
    named = _named(batch, base)
    pair = isinstance(batch, (tuple, list)) and len(batch) == 2 and len(jax.tree.leaves(batch[1])) == 1
    named.labels = len(jax.tree.leaves(batch[0])) if pair else None
    return named


def _rows(named: _Named) -> int | None:
    return next((int(np.shape(a)[0]) for _, a in named.leaves if np.ndim(a)), None)


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------

def _check_split(who: str, what: str, model, named: _Named, loss_fn) -> int | None:
    """Raises for the first problem of the split; returns the number of classes (default task) or None."""
    if not named.leaves:
        raise DataError(f"{who}: the {what} data holds no arrays; give arrays with the examples on the leading axis")
    arrays = []
    for name, a in named.leaves:
        a = a if hasattr(a, "dtype") and hasattr(a, "shape") else np.asarray(a)
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_ or _is_jax_float(a.dtype)):
            raise DataError(f"{who}: {name} holds {a.dtype} values (e.g. {_first_value(a)!r}), not numbers; "
                            "lrjax trains on numeric arrays: convert it (images to floats, labels to integer "
                            "class indices)")
        if a.ndim == 0:
            raise DataError(f"{who}: {name} is a single value ({a!r:.40}); each array needs the examples on "
                            "its leading axis")
        arrays.append((name, a))
    (first, a0), n = arrays[0], arrays[0][1].shape[0]
    for name, a in arrays[1:]:
        if a.shape[0] != n:
            raise DataError(f"{who}: {name} has {a.shape[0]} examples but {first} has {n}: every array of the "
                            f"{what} split needs one row per example; check how they were sliced or filtered")
    if n == 0:
        raise DataError(f"{who}: {first} is empty (0 examples, shape {tuple(a0.shape)}): the {what} split "
                        "needs at least one example")
    for name, a in arrays:
        if np.issubdtype(a.dtype, np.floating) or _is_jax_float(a.dtype):
            bad = _first_not_finite(a)
            if bad is not None:
                raise DataError(f"{who}: {name} holds {bad[1]} at {name}[{', '.join(map(str, bad[0]))}] "
                                f"({bad[2]} of its {a.size} values are not finite): clean or drop those examples")
    probe = jax.tree.map(lambda a: jax.ShapeDtypeStruct((min(n, _PROBE), *np.shape(a)[1:]),
                                                        jax.dtypes.canonicalize_dtype(a.dtype)), named.tree)
    inputs = " and ".join(name for name, _ in arrays[:2]) + (" ..." if len(arrays) > 2 else "")
    if loss_fn is tasks.classification:
        if named.labels is None:
            raise DataError(f"{who}: the {what} data ({inputs}) is not an (x, y) pair of inputs and integer "
                            "labels, which the default task (softmax cross-entropy) takes; give y_* arrays, or "
                            "a loss_fn for examples of another structure")
        classes = _num_outputs(who, model, probe[0], " and ".join(name for name, _ in arrays[:named.labels]))
        _check_labels(who, *arrays[named.labels], classes)
        return classes
    _check_loss_fn(who, model, probe, inputs, loss_fn)
    return None


def _is_jax_float(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, np.floating)  # bfloat16 and other ml_dtypes floats


def _first_value(a):
    a = np.asarray(a)
    return a.reshape(-1)[0].item() if a.size else None


def _on_host(a) -> bool:
    """numpy reads `a` in place: a numpy array, or a jax array held whole by this process's CPU devices.
    Any other jax array (an accelerator's, another process's rows) is checked where it lives, with
    jax.numpy reductions whose scalars alone come back."""
    if not isinstance(a, jax.Array):
        return True
    return a.is_fully_addressable and all(d.platform == "cpu" for d in a.devices())


def _first_not_finite(a) -> tuple[tuple[int, ...], float, int] | None:
    """(index, value, count) of the first non-finite value of a floating array, or None if all are finite.
    The common case costs one sum (NaN and inf propagate into it); only a non-finite sum (or an
    overflowing one) scans element by element."""
    if not _on_host(a):
        import jax.numpy as jnp

        bad = ~jnp.isfinite(a)
        if not bool(bad.any()):
            return None
        flat = int(jnp.argmax(bad.ravel()))
        return (tuple(int(i) for i in np.unravel_index(flat, a.shape)), float(a.ravel()[flat]),
                int(bad.sum()))
    a = np.asarray(a)  # free for numpy arrays and for jax arrays on the CPU
    with np.errstate(all="ignore"):  # an overflowing sum is checked element by element below
        # float16/bfloat16 sums overflow early: those are summed in float32
        total = np.sum(a, dtype=np.float32 if a.dtype.itemsize < 4 else None)
    if np.isfinite(total):
        return None
    bad = ~np.isfinite(a)
    count = int(np.count_nonzero(bad))
    if count == 0:  # the sum overflowed, every value is finite
        return None
    flat = int(np.argmax(bad.reshape(-1)))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    return index, float(a.reshape(-1)[flat]), count


def _num_outputs(who: str, model, x_probe, inputs: str) -> int:
    """The model's output width on examples shaped like `x_probe`, by abstract evaluation."""
    graphdef, state = nnx.split(model)
    try:
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s, copy=True)(x), state, x_probe)
    except Exception as e:  # noqa: BLE001 - whatever the model raises on these shapes is the user's mismatch
        raise DataError(f"{who}: the model does not take examples of {inputs} (each of shape "
                        f"{tuple(x_probe.shape[1:])}, {x_probe.dtype}): {_first_line(e)}; give inputs of the shape "
                        "the model was built for, or a model for these inputs") from e
    shape = getattr(out, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != x_probe.shape[0]:
        raise DataError(f"{who}: the model's output on {inputs} has shape {shape} for {x_probe.shape[0]} examples; "
                        "the default task takes logits of shape (examples, classes): give a model with such "
                        "outputs or a loss_fn for these")
    return int(shape[1])


def _check_labels(who: str, name: str, y, classes: int) -> None:
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{who}: {name} holds {y.dtype} labels (e.g. {name}[0] = {_first_value(y)!r}); the default "
                        "task takes integer class indices: convert them with .astype(np.int32), or give a "
                        "loss_fn for other targets")
    if y.ndim != 1:
        raise DataError(f"{who}: {name} has shape {tuple(y.shape)}; the default task takes one class index per "
                        "example, shape (examples,)" + (" (one-hot labels: y.argmax(-1))" if y.ndim == 2 else ""))
    if not _on_host(y):
        import jax.numpy as jnp
        xp = jnp
    else:
        y, xp = np.asarray(y), np
    low, high = int(y.min()), int(y.max())
    if low >= 0 and high < classes:
        return
    bad = (y < 0) | (y >= classes)
    i = int(xp.argmax(bad))
    raise DataError(f"{who}: {name} holds label {int(y[i])} at index {i}, outside [0, {classes}) (the model has "
                    f"{classes} outputs; {int(bad.sum())} labels are out of range): fix the labels "
                    "or build the model with one output per class")


def _check_loss_fn(who: str, model, probe, inputs: str, loss_fn) -> None:
    """A loss function's outputs on two examples: (losses [2], {name: [2]})."""
    graphdef, state = nnx.split(model)
    b = jax.tree.leaves(probe)[0].shape[0]
    try:
        out = jax.eval_shape(lambda s, batch: loss_fn(nnx.merge(graphdef, s, copy=True), batch), state, probe)
    except Exception as e:  # noqa: BLE001 - the user's loss function or model on these shapes
        raise DataError(f"{who}: the loss_fn fails on examples of {inputs}: {_first_line(e)}; check that the "
                        "data is what the loss_fn and the model take") from e
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise ConfigError(f"{who}: loss_fn must return (losses, metrics), per-example losses and a dict of "
                          f"per-example metrics; it returned {type(out).__name__}")
    from lrjax.steps import RESERVED

    losses, metrics = out
    reserved = [k for k in metrics if k in RESERVED or str(k).startswith("val_")]
    if reserved:
        raise ConfigError(f"{who}: loss_fn's metrics may not be named {reserved} (lrjax reports loss, lr, count "
                          "and val_<name> itself)")
    for what, v in (("losses", losses), *((f"metric {k!r}", v) for k, v in metrics.items())):
        shape = getattr(v, "shape", None)
        if shape != (b,):
            hint = " (a scalar: return the values before averaging; lrjax weights and averages them)" \
                if shape == () else ""
            raise ConfigError(f"{who}: loss_fn's {what} for a batch of {b} have shape {shape}, need ({b},): "
                              f"one value per example{hint}")


def _check_stream(who: str, model, splits, loss_fn) -> None:
    """A streamed `Splits`: the first examples of the training and validation splits, read from the source
    (`_STREAM_PROBE` of them: milliseconds), as the stream hands them to the model (float32 images);
    where the labels are an array (`sources.array_splits`), all of them (a gather of the split's
    labels, no image is read). A TFDS split's later labels are not seen before training."""
    for split in (splits.train, splits.valid):
        m = min(len(split), _STREAM_PROBE)
        if m == 0:
            raise DataError(f"{who}: data (its {split.name} split) is empty (0 examples)")
        x, y = split.read(np.arange(m))
        x = x.astype(np.float32)
        name = f"data (its {split.name} split)"
        classes = _check_split(who, f"{split.name} (its first {m} examples)", model,
                               _Named([(f"{name} images", x), (f"{name} labels", y)], (x, y), 1), loss_fn)
        labels = getattr(split.examples, "labels", None)  # arrays and memmaps: every label, no image read
        if classes is not None and labels is not None:
            _check_labels(who, f"{name} labels", np.asarray(labels)[split.keys], classes)


def _first_line(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line[:300]}" if line else type(e).__name__
