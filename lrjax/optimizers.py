"""Optimizer factories by name, for the CLI. Each takes `learning_rate` (what `optax.inject_hyperparams`
needs) and is a module-level object, so compiled programs keyed on it are reused across calls."""

from __future__ import annotations

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
