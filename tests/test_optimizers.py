"""Optimizer families and the range-test defaults that follow them, in the API and the CLI's Config."""

from __future__ import annotations

import functools

import numpy as np
import optax
import pytest

from lrjax import optimizers
from lrjax.config import Config
from lrjax.errors import ConfigError
from lrjax.models import mlp
from lrjax.optimizers import FAMILY_RANGES, family, range_defaults, resolve_range
from lrjax.range_test import find_lr

from conftest import synthetic


@pytest.mark.parametrize("optimizer, expected", [
    (optax.sgd, "sgd"),
    (functools.partial(optax.sgd, momentum=None), "sgd"),
    (functools.partial(optax.sgd, momentum=0.9), "momentum"),
    (functools.partial(functools.partial(optax.sgd, nesterov=True), momentum=0.9), "momentum"),
    (optimizers.momentum, "momentum"),
    (optimizers.nesterov, "momentum"),
    (optax.adam, "adaptive"),
    (optax.adamw, "adaptive"),
    (optax.nadam, "adaptive"),  # optax's nadam is a partial of adam
    (functools.partial(optax.adamw, weight_decay=1e-4), "adaptive"),
    (optax.rmsprop, "adaptive"),
    (optax.lion, "adaptive"),
    (lambda learning_rate: optax.sgd(learning_rate), "unknown"),
])
def test_family_by_identity_name_and_partial(optimizer, expected):
    assert family(optimizer) == expected
    assert range_defaults(optimizer) == FAMILY_RANGES[expected]


def test_every_cli_optimizer_has_a_known_family():
    assert {name: family(fn) for name, fn in optimizers.OPTIMIZERS.items()} == {
        "sgd": "sgd", "momentum": "momentum", "nesterov": "momentum", "adam": "adaptive",
        "adamw": "adaptive", "rmsprop": "adaptive", "prodigy": "adaptive", "mechanize_adam": "adaptive",
        "schedule_free_adamw": "adaptive"}


def test_each_family_range_is_one_growth_rule_and_adaptive_starts_lowest():
    for d in FAMILY_RANGES.values():
        assert (d.factor is None) != (d.end_lr is None)
    assert FAMILY_RANGES["sgd"] == optimizers.RangeDefaults(1e-3, factor=1.005)  # the seed article's test
    assert FAMILY_RANGES["adaptive"].start_lr < FAMILY_RANGES["momentum"].start_lr < FAMILY_RANGES["sgd"].start_lr


def test_what_is_given_wins_and_the_rest_follows_the_family():
    R = optimizers.RangeDefaults
    assert resolve_range(optax.sgd) == R(1e-3, factor=1.005)
    assert resolve_range(optax.adam) == R(1e-6, end_lr=1.0)
    assert resolve_range(optax.adam, start_lr=1e-4) == R(1e-4, end_lr=1.0)
    assert resolve_range(optax.adam, factor=1.1) == R(1e-6, factor=1.1)
    assert resolve_range(optax.sgd, end_lr=10.0) == R(1e-3, end_lr=10.0)
    assert resolve_range(optax.sgd, factor=1.1, end_lr=10.0) == R(1e-3, end_lr=10.0)  # end_lr wins, as before


@pytest.mark.slow
def test_find_lr_runs_the_adaptive_range_by_default():
    # the shapes of test_range_test's Adam test: one compiled program for both in a test session
    data = synthetic(n_train=512, valid=128, n_test=64, size=6, classes=4, noise=150)
    r = find_lr(mlp(36, (16,), 4, seed=0), optax.adam, data, batch_size=16, num_steps=200, seed=0)
    assert r.lrs[0] == pytest.approx(1e-6)
    np.testing.assert_allclose(r.lrs[1:] / r.lrs[:-1], 1e6 ** (1 / 199), rtol=1e-4)  # 1e-6 -> 1 in 200 steps
    with pytest.raises(ValueError, match="start_lr 2.0 is not below 1.0.*adaptive"):
        find_lr(mlp(36, (16,), 4, seed=0), optax.adam, data, start_lr=2.0)


def test_config_leaves_the_range_to_the_optimizer():
    cfg = Config()
    assert (cfg.start_lr, cfg.factor, cfg.end_lr) == (None, None, None)
    Config(optimizer="adam", start_lr=0.5)
    Config(optimizer="adam", start_lr=2.0, factor=1.01)  # a factor has no end to exceed
    with pytest.raises(ConfigError, match=r"--end-lr 1 \(--optimizer adam's default\) must exceed --start-lr 2"):
        Config(optimizer="adam", start_lr=2.0)
    with pytest.raises(ConfigError, match=r"--end-lr 0.0001 must exceed --start-lr 0.001 \(--optimizer sgd's"):
        Config(end_lr=1e-4)
    with pytest.raises(ConfigError, match="--factor must be > 1"):
        Config(factor=1.0)


# ---------------------------------------------------------------------------------------------
# Learning-rate-free optimizers
# ---------------------------------------------------------------------------------------------

def test_the_lr_free_optimizers_train_at_one_and_the_others_need_a_rate():
    assert optimizers.free_rate(optimizers.prodigy) == 1.0
    assert optimizers.free_rate(optimizers.Recipe(optimizers.mechanize_adam, weight_decay=1e-4)) == 1.0
    assert optimizers.free_rate(functools.partial(optimizers.prodigy)) == 1.0
    assert optimizers.free_rate(optimizers.schedule_free_adamw) is None  # it has a rate to choose
    assert optimizers.free_rate(optax.adam) is None


@pytest.mark.parametrize("name", ["prodigy", "mechanize_adam", "schedule_free_adamw"])
def test_the_lr_free_optimizers_learn_the_toy_problem(name):
    from lrjax.train import fit

    # prodigy and mechanic grow their step size from 1e-6: they need some steps (here 120)
    data = synthetic(n_train=320, valid=64, n_test=32, size=6, classes=4, noise=40)
    lr = optimizers.free_rate(optimizers.get(name)) or 2.5e-3
    r = fit(mlp(36, (16,), 4, seed=0), optimizers.get(name), data, lr=lr, epochs=3, batch_size=8, seed=0)
    first, last = r.history[0], r.history[-1]
    assert last["val_loss"] < first["val_loss"] and last["val_accuracy"] > 0.8, r.history


def _schedule_free_state(params):
    import jax.numpy as jnp

    tx = optax.inject_hyperparams(optimizers.schedule_free_adamw)(learning_rate=0.1)
    state = tx.init(params)
    for g in (1.0, -0.5, 2.0):  # a few updates move z away from the iterate y
        updates, state = tx.update(jax_tree_like(params, g), state, params)
        params = optax.apply_updates(params, updates)
    return state, params


def jax_tree_like(tree, value):
    import jax

    return jax.tree.map(lambda a: a * 0 + value, tree)


def test_eval_params_is_schedule_free_eval_point_and_identity_elsewhere():
    import jax.numpy as jnp

    params = {"w": jnp.arange(3.0), "b": jnp.ones(2)}
    state, y = _schedule_free_state(params)
    sf = optax.contrib.ScheduleFreeState
    inner = next(s for s in __import__("jax").tree.leaves(state, is_leaf=lambda s: isinstance(s, sf))
                 if isinstance(s, sf))
    expected = optax.contrib.schedule_free_eval_params(inner, y)
    got = optimizers.eval_params(state, y)
    for k in params:
        np.testing.assert_allclose(got[k], expected[k])
        assert not np.allclose(got[k], y[k])  # the evaluation point is not the training iterate
    adam_state = optax.adam(0.1).init(params)
    assert optimizers.eval_params(adam_state, params) is params
    # once the params are the evaluation point, at_eval_point makes eval_params leave them as they are
    moved = optimizers.at_eval_point(state, got)
    again = optimizers.eval_params(moved, got)
    for k in params:
        np.testing.assert_allclose(again[k], got[k], rtol=1e-6)
    assert optimizers.at_eval_point(adam_state, params) is adam_state


def test_fit_evaluates_and_keeps_schedule_free_at_its_eval_point():
    import jax
    from lrjax import steps
    from lrjax.train import fit

    data = synthetic(n_train=256, valid=64, n_test=32, size=6, classes=4, noise=40)
    r = fit(mlp(36, (16,), 4, seed=0), optimizers.schedule_free_adamw, data, lr=2.5e-3, epochs=2, batch_size=32,
            seed=0)
    valid = (jax.numpy.asarray(data.x_valid), jax.numpy.asarray(data.y_valid))
    # the returned (best) state evaluates to the recorded best val_loss: the kept weights are the eval point
    got = r.evaluate(*valid)["loss"]
    assert got == pytest.approx(r.best_val_loss, rel=1e-5)
    # without restoring, the last state's evaluation is the last epoch's record, and differs from the
    # training iterate's (what lrjax evaluated before the hook)
    from lrjax.callbacks import EarlyStopping

    last = fit(mlp(36, (16,), 4, seed=0), optimizers.schedule_free_adamw, data, lr=2.5e-3, epochs=2, batch_size=32,
               seed=0, early_stopping=EarlyStopping(patience=2, restore_best_weights=False))
    assert last.evaluate(*valid)["loss"] == pytest.approx(last.history[-1]["val_loss"], rel=1e-5)
    iterate = last.state.replace(opt_state=optax.adam(1.0).init(last.state.params))
    raw = float(steps.evaluate(iterate, valid, batch_size=1000)["loss"])
    assert abs(raw - last.history[-1]["val_loss"]) > 1e-4
