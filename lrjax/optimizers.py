"""Optimizer factories by name, for the CLI. Each takes `learning_rate` (what `optax.inject_hyperparams`
needs) and is a module-level object, so compiled programs keyed on it are reused across calls."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import optax

from lrjax.errors import ConfigError


def momentum(learning_rate):
    """SGD with momentum 0.9: Keras' `SGD(momentum=0.9)` at a constant rate (optax scales the whole
    momentum trace by the current rate, Keras only each new gradient, so they differ while it changes)."""
    return optax.sgd(learning_rate, momentum=0.9)


def nesterov(learning_rate):
    """SGD with Nesterov momentum 0.9."""
    return optax.sgd(learning_rate, momentum=0.9, nesterov=True)


OPTIMIZERS = {"sgd": optax.sgd, "momentum": momentum, "nesterov": nesterov, "adam": optax.adam,
              "adamw": optax.adamw, "rmsprop": optax.rmsprop}


def get(name: str):
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optimizer factory with lrjax's training options, itself a factory taking `learning_rate`
    (frozen and hashable: compiled programs keyed on it are reused while its fields are equal).

    - `weight_decay`: passed to factories that take it (`optax.adamw`), else `optax.add_decayed_weights`
      before the optimizer (L2 on the gradient, as PyTorch's SGD `weight_decay`);
    - `grad_accum_steps` k > 1: `optax.MultiSteps`, one optimizer update every k micro-batches (the
      mean of their gradients);
    - `plateau` (patience, factor, accumulation_size): `optax.contrib.reduce_on_plateau` after the
      optimizer, scaling the updates down when the training loss (the mean over accumulation_size
      steps) stops improving; the train step passes each step's loss as `value`.
    """

    base: Callable
    weight_decay: float = 0.0
    grad_accum_steps: int = 1
    plateau: tuple[int, float, int] | None = None

    def __call__(self, learning_rate):
        kwargs = {"learning_rate": learning_rate}
        decay = self.weight_decay and "weight_decay" in _parameters(self.base)
        if decay:
            kwargs["weight_decay"] = self.weight_decay
        tx = self.base(**kwargs)
        if self.weight_decay and not decay:
            tx = optax.chain(optax.add_decayed_weights(self.weight_decay), tx)
        if self.grad_accum_steps > 1:
            tx = optax.MultiSteps(tx, self.grad_accum_steps)
        if self.plateau is not None:
            patience, factor, size = self.plateau
            tx = optax.chain(tx, optax.contrib.reduce_on_plateau(patience=patience, factor=factor,
                                                                 accumulation_size=size))
        return tx

    @property
    def __name__(self) -> str:  # what results and checkpoints call the optimizer
        return getattr(self.base, "__name__", None) or repr(self.base)


def _parameters(factory) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()
