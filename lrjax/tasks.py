"""Loss functions: what a model is trained to do. Nothing else of lrjax is imported here.

A loss function has the signature `loss_fn(model, batch) -> (losses, metrics)`:
  - `model` is the NNX module in the right mode (train mode in training steps, eval mode, with
    BatchNorm's running averages and no dropout, in every evaluation);
  - `batch` is what the data yields: an `(x, y)` pair for array data (`x_train`, `y_train`), or
    the example pytree itself (e.g. TFDS's `{"image", "label"}` dict) where `y_train` is None;
  - `losses` and every value of the `metrics` dict are per-example arrays of shape [batch].
lrjax applies the weights of padded rows and averages exactly, so a metric is any per-example
quantity whose mean over examples is meaningful (accuracy, absolute error, ...). Metrics are
reported as `<name>` (training) and `val_<name>` (validation).

Under mixed precision (`dtype=bfloat16`) the model's outputs reach the loss in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Any], tuple[jax.Array, dict[str, jax.Array]]]


def classification(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax cross-entropy on integer labels, with accuracy: lrjax's default task."""
    x, y = batch
    logits = model(x).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses, {"accuracy": (jnp.argmax(logits, -1) == y).astype(jnp.float32)}


def regression(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared error on float targets of the model's output shape, per example the mean over
    its output values, with `mean_absolute_error`."""
    x, y = batch
    err = model(x).astype(jnp.float32) - y.astype(jnp.float32)
    axes = tuple(range(1, err.ndim))
    return jnp.mean(err ** 2, axes), {"mean_absolute_error": jnp.mean(jnp.abs(err), axes)}


def next_token(model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Language modelling on `{"tokens": int [B, N + 1]}`: the model sees tokens [:, :N] and predicts
    tokens [:, 1:]; per example the mean token cross-entropy (nats, float32 logits), with
    `token_accuracy` (greedy prediction right) and `bits_per_byte` (the loss / ln 2: one token is
    one byte in `lrjax.text`)."""
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1)
    accuracy = (jnp.argmax(logits, -1) == targets).astype(jnp.float32).mean(-1)
    return losses, {"token_accuracy": accuracy, "bits_per_byte": losses / jnp.log(2.0)}
