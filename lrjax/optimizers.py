"""Optimizer factories by name, for the CLI, and the range-test defaults of each optimizer family.

Each factory takes `learning_rate` (what `optax.inject_hyperparams` needs) and is a module-level object,
so compiled programs keyed on it are reused across calls. `family` sorts any factory (these, optax's,
a `functools.partial` of either) into plain SGD, momentum SGD or adaptive; `range_defaults` gives the
range test that suits the family (the table is in docs/guide.md)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import optax

from lrjax.errors import ConfigError


def momentum(learning_rate):
    """SGD with momentum 0.9: Keras' `SGD(momentum=0.9)` at a constant rate (optax scales the whole
    momentum trace by the current rate, Keras only each new gradient, so they differ while it changes)."""
    return optax.sgd(learning_rate, momentum=0.9)


def nesterov(learning_rate):
    """SGD with Nesterov momentum 0.9."""
    return optax.sgd(learning_rate, momentum=0.9, nesterov=True)


def prodigy(learning_rate):
    """Prodigy (`optax.contrib.prodigy`): Adam whose step size it estimates itself from the distance
    travelled from the initial weights; `learning_rate` only scales that estimate (train at 1.0)."""
    return optax.contrib.prodigy(learning_rate)


def mechanize_adam(learning_rate):
    """Adam under Mechanic (`optax.contrib.mechanize`), which learns one global scale of Adam's updates
    online; `learning_rate` is Adam's own (train at 1.0: Mechanic's scale starts at 1e-6 and grows)."""
    return optax.contrib.mechanize(optax.adam(learning_rate))


def schedule_free_adamw(learning_rate):
    """Schedule-free AdamW (`optax.contrib.schedule_free_adamw`): no schedule, but a rate (its default
    0.0025). The weights it trains are not the ones to evaluate: `eval_params` gives those."""
    return optax.contrib.schedule_free_adamw(learning_rate)


OPTIMIZERS = {"sgd": optax.sgd, "momentum": momentum, "nesterov": nesterov, "adam": optax.adam,
              "adamw": optax.adamw, "rmsprop": optax.rmsprop, "prodigy": prodigy,
              "mechanize_adam": mechanize_adam, "schedule_free_adamw": schedule_free_adamw}

# Optimizers that set their own step size: they train at rate 1.0 and need no range test.
LR_FREE = {"prodigy": 1.0, "mechanize_adam": 1.0}


def free_rate(optimizer) -> float | None:
    """The rate an optimizer that sets its own step size trains at (`LR_FREE`, by name, also inside a
    `Recipe` or `functools.partial`); None for the others, which need a rate from a range test."""
    return LR_FREE.get(_base_name(optimizer))


def _base_name(optimizer) -> str:
    fn = optimizer
    while isinstance(fn, (functools.partial, Recipe)):
        fn = fn.base if isinstance(fn, Recipe) else fn.func
    return getattr(fn, "__name__", "")


def eval_params(opt_state, params):
    """The weights to evaluate, checkpoint as best and export: for a schedule-free optimizer
    (`optax.contrib.schedule_free*`) `schedule_free_eval_params` (its averaged point x, not the
    gradient's point y that training holds); for every other optimizer `params` itself.
    The schedule-free state is found anywhere inside `opt_state` (under `inject_hyperparams`, a chain,
    `MultiSteps`); traceable."""
    state = _schedule_free_state(opt_state)
    return params if state is None else optax.contrib.schedule_free_eval_params(state, params)


def at_eval_point(opt_state, params):
    """`opt_state` changed so that `eval_params(result, params)` is `params` itself (a schedule-free
    state's z set to `params`; any other state is returned as it is): for a state whose params are
    already the evaluation weights, such as the best ones restored after training."""
    if _schedule_free_state(opt_state) is None:
        return opt_state
    sf = optax.contrib.ScheduleFreeState
    return jax.tree.map(lambda s: s._replace(z=params) if isinstance(s, sf) else s, opt_state,
                        is_leaf=lambda s: isinstance(s, sf))


def _schedule_free_state(opt_state):
    sf = optax.contrib.ScheduleFreeState
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, sf)) if isinstance(s, sf)]
    return found[0] if found else None


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


@dataclasses.dataclass(frozen=True)
class RangeDefaults:
    """A range test's rates: from `start_lr`, growing by `factor` per step or reaching `end_lr` at the
    last step (exactly one of the two is set)."""

    start_lr: float
    factor: float | None = None
    end_lr: float | None = None

    def describe(self) -> str:
        return (f"{self.start_lr:g} x{self.factor:g} per step" if self.factor is not None
                else f"{self.start_lr:g} -> {self.end_lr:g}")


# Plain SGD keeps the seed article's test. Momentum 0.9 takes steps ~10x the rate (1 / (1 - 0.9)), so
# its range starts 10x lower; it ends at 1 whatever the epoch's length, since momentum on Fashion-MNIST's
# MLP diverges at 0.25-0.5. Adaptive optimizers normalise the gradient: their rates sit orders of
# magnitude lower (Adam's MLP curve turns near 1e-3 and diverges at 0.1-0.8), so the test spans 1e-6 -> 1
# (the range the literature uses for Adam); an unrecognised factory gets the widest, 1e-6 -> 10.
FAMILY_RANGES = {
    "sgd": RangeDefaults(1e-3, factor=1.005),
    "momentum": RangeDefaults(1e-4, end_lr=1.0),
    "adaptive": RangeDefaults(1e-6, end_lr=1.0),
    "unknown": RangeDefaults(1e-6, end_lr=10.0),
}

# optax's factories that scale each step by running gradient statistics (or their sign), by name.
_ADAPTIVE = {"adam", "adamw", "nadam", "nadamw", "adamax", "adamaxw", "amsgrad", "adabelief", "radam", "rmsprop", "yogi", "lamb",
             "lion", "novograd", "adagrad", "adadelta", "adafactor", "adan", "sm3", "optimistic_adam",
             "sign_sgd", "rprop", "adopt", "ademamix", "simplified_ademamix", "madgrad",
             "schedule_free_adamw", "prodigy", "mechanize_adam"}


def family(optimizer) -> str:
    """'sgd', 'momentum', 'adaptive' or 'unknown' for an optimizer factory: recognised by identity
    (this module's factories), else by name (also through `functools.partial`, whose momentum keyword
    turns optax.sgd into momentum SGD)."""
    keywords: dict = {}
    fn = optimizer
    while isinstance(fn, (functools.partial, Recipe)):
        if isinstance(fn, Recipe):
            fn = fn.base
            continue
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
    if fn is momentum or fn is nesterov:
        return "momentum"
    name = getattr(fn, "__name__", "")
    if name == "sgd":
        return "momentum" if keywords.get("momentum") else "sgd"
    if name in ("momentum", "nesterov"):
        return "momentum"
    return "adaptive" if name in _ADAPTIVE else "unknown"


def range_defaults(optimizer) -> RangeDefaults:
    """The range test that suits `optimizer`'s family (`FAMILY_RANGES`)."""
    return FAMILY_RANGES[family(optimizer)]


def resolve_range(optimizer, start_lr: float | None = None, factor: float | None = None,
                  end_lr: float | None = None) -> RangeDefaults:
    """The range a test runs: what is given, the family's default for the rest (`end_lr` wins over
    `factor` when both are given; the family's growth applies only when neither is)."""
    defaults = range_defaults(optimizer)
    start_lr = defaults.start_lr if start_lr is None else start_lr
    if end_lr is not None:
        return RangeDefaults(start_lr, end_lr=end_lr)
    if factor is not None:
        return RangeDefaults(start_lr, factor=factor)
    return RangeDefaults(start_lr, factor=defaults.factor, end_lr=defaults.end_lr)
