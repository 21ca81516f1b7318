"""One function from whatever data a user passes to the `Input` that `fit`, `find_lr` and `sweep` use.

Three kinds, one module each, one interface (`lrjax.feeds.Input`):
- arrays (an object with x_train, y_train, x_valid, y_valid; `lrjax.data.Dataset`): `lrjax.resident`;
- a `lrjax.sources.Splits` (TFDS ArrayRecord or uint8 arrays/memmaps streamed through Grain): `lrjax.stream`;
- any other iterable of batches (a Grain `DataLoader`, a generator, a list), with `valid=`: `lrjax.feeds`.
An `Input` passed in is used as it is (a researcher's own kind).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from lrjax import feeds, sources
from lrjax.errors import ConfigError


def make_input(who: str, data, *, batch_size: int, mesh, valid=None, steps_per_epoch: int | None = None,
               chunk_steps: int = 64, workers: int | None = None, keyword: str = "steps_per_epoch") -> feeds.Input:
    """The `Input` of `data` for entry point `who` ('fit', 'find_lr', 'sweep'). `batch_size` is for
    arrays and splits (an iterable's first batch sets its own); `steps_per_epoch` (named `keyword` in
    errors) for an iterable without a length; `chunk_steps` steps per call for fed batches; `workers`
    Grain worker processes for a streamed split."""
    if isinstance(data, feeds.Input):
        return data
    if isinstance(data, sources.Splits):
        if who == "sweep":
            raise ConfigError("sweep: a lrjax.sources.Splits is not supported; give arrays or an iterable of batches")
        from lrjax import stream  # Grain: imported where the streamed path is used

        return stream.StreamInput(data, batch_size, mesh, chunk_steps, workers)
    if hasattr(data, "x_train"):
        from lrjax import resident

        return resident.ResidentInput(data, batch_size, mesh)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict, tuple, np.ndarray)):
        return feeds.IterableInput(who, data, valid, steps_per_epoch, chunk_steps, mesh, keyword)
    raise ConfigError(f"the training data must be an object with x_train and y_train arrays (e.g. "
                      f"lrjax.load_dataset), a lrjax.sources.Splits, or an iterable of batches (e.g. a Grain "
                      f"DataLoader); got {type(data).__name__}")
