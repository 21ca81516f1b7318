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
        "adamw": "adaptive", "rmsprop": "adaptive"}


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
