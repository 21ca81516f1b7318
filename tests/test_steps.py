"""Tests for lrjax.models and lrjax.steps: init, one step by hand, padding, batch order, epochs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lrjax import steps
from lrjax.models import MLP, mlp

train_step = jax.jit(steps.train_step)
eval_step = jax.jit(steps.eval_step)


def _leaf(params, *path):
    node = params
    for key in path:
        node = node[key]
    return np.asarray(node[...] if isinstance(node, nnx.Variable) else node)


def _flat(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _batch(x, y, w=None):
    """(batch, weights): the (x, y) pair the default loss receives, and per-example weights."""
    w = np.ones(len(y), np.float32) if w is None else np.asarray(w, np.float32)
    return (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)), jnp.asarray(w)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def test_mlp_shapes_and_output():
    model = mlp(784)
    out = model(jnp.zeros((5, 28, 28, 1)))
    assert out.shape == (5, 10)
    params = nnx.state(model, nnx.Param)
    assert _leaf(params, "hidden", 0, "kernel").shape == (784, 300)
    assert _leaf(params, "hidden", 1, "kernel").shape == (300, 100)
    assert _leaf(params, "out", "kernel").shape == (100, 10)
    for path, n in ((("hidden", 0, "bias"), 300), (("hidden", 1, "bias"), 100), (("out", "bias"), 10)):
        bias = _leaf(params, *path)
        assert bias.shape == (n,)
        assert np.all(bias == 0)
    # Zero input, zero biases: zero logits.
    assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("path,fan_in,fan_out,rtol", [
    (("hidden", 0, "kernel"), 784, 300, 0.02),
    (("hidden", 1, "kernel"), 300, 100, 0.03),
    (("out", "kernel"), 100, 10, 0.1),  # only 1000 values: looser
])
def test_glorot_uniform_init(path, fan_in, fan_out, rtol):
    kernel = _leaf(nnx.state(mlp(784), nnx.Param), *path)
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.95 * bound  # uniform on the whole interval, not a narrower one
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=rtol)
    assert abs(kernel.mean()) < 0.05 * bound


def test_init_depends_on_seed_only():
    a, b, c = (nnx.state(mlp(784, seed=s), nnx.Param) for s in (0, 0, 1))
    for x, y in zip(_flat(a), _flat(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(_leaf(a, "hidden", 0, "kernel"), _leaf(c, "hidden", 0, "kernel"))


def test_compiled_init_gives_the_eager_weights():
    """mlp() builds the model in one compiled program; the weights are those of eager NNX construction."""
    compiled = nnx.state(mlp(20, (8, 6), 3, seed=5), nnx.Param)
    eager = nnx.state(MLP(20, (8, 6), 3, rngs=nnx.Rngs(5)), nnx.Param)
    for x, y in zip(_flat(compiled), _flat(eager), strict=True):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------


def test_sgd_step_decreases_loss_and_is_deterministic(tiny_data):
    x, y = tiny_data.x_train[:32], tiny_data.y_train[:32]
    batch = _batch(x, y)
    states = [steps.init_state(mlp(64, (32,), 4, seed=0), optax.sgd, 0.1) for _ in range(2)]
    new_a, metrics_a = train_step(states[0], *batch)
    new_b, metrics_b = train_step(states[1], *batch)
    _, after = train_step(new_a, *batch)  # metrics are of the params before this step
    assert float(after["loss"]) < float(metrics_a["loss"])
    assert int(new_a.step) == 1
    np.testing.assert_allclose(float(metrics_a["lr"]), 0.1, rtol=1e-6)
    # Same seed: bit-identical parameters and metrics.
    for pa, pb in zip(_flat(new_a.params), _flat(new_b.params)):
        np.testing.assert_array_equal(pa, pb)
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    # A different seed starts (and so ends) elsewhere.
    other, _ = train_step(steps.init_state(mlp(64, (32,), 4, seed=1), optax.sgd, 0.1), *batch)
    assert not np.array_equal(_leaf(new_a.params, "out", "kernel"), _leaf(other.params, "out", "kernel"))


# A 2-3-2 MLP with hand-picked weights; no pre-activation is exactly 0 (ReLU's kink).
W1 = np.array([[0.5, -1.0, 0.25], [1.5, 0.5, -0.75]], np.float32)
B1 = np.array([0.1, -0.2, 0.3], np.float32)
W2 = np.array([[1.0, -0.5], [-0.25, 0.75], [0.5, 0.5]], np.float32)
B2 = np.array([0.05, -0.05], np.float32)
X = np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7], [2.0, -1.0]], np.float32)
Y = np.array([0, 1, 1, 0], np.int32)


def _hand_model():
    model = MLP(2, (3,), 2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    params["hidden"][0]["kernel"][...] = jnp.asarray(W1)
    params["hidden"][0]["bias"][...] = jnp.asarray(B1)
    params["out"]["kernel"][...] = jnp.asarray(W2)
    params["out"]["bias"][...] = jnp.asarray(B2)
    nnx.update(model, params)
    return model


def _hand_forward_backward(x, y):
    x, y = x.astype(np.float64), y
    pre = x @ W1 + B1
    assert np.all(pre != 0)
    h = np.maximum(pre, 0)
    logits = h @ W2 + B2
    m = logits.max(axis=1, keepdims=True)
    logsumexp = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    losses = logsumexp - logits[np.arange(len(y)), y]
    n = len(y)
    probs = np.exp(logits - logsumexp[:, None])
    dlogits = (probs - np.eye(2)[y]) / n
    grads = {"W2": h.T @ dlogits, "B2": dlogits.sum(0)}
    dpre = (dlogits @ W2.T) * (pre > 0)
    grads.update(W1=x.T @ dpre, B1=dpre.sum(0))
    accuracy = np.mean(logits.argmax(1) == y)
    return logits, losses, grads, accuracy


def test_loss_and_update_match_hand_computation():
    logits, losses, grads, accuracy = _hand_forward_backward(X, Y)
    model = _hand_model()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(X))), logits, rtol=1e-6, atol=1e-6)
    lr = 0.5
    state = steps.init_state(model, optax.sgd, lr)
    new, metrics = train_step(state, *_batch(X, Y))
    np.testing.assert_allclose(float(metrics["loss"]), losses.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["accuracy"]), accuracy, rtol=1e-6)
    sums = eval_step(state, *_batch(X, Y))
    np.testing.assert_allclose(float(sums["loss"] / sums["count"]), losses.mean(), rtol=1e-6)
    assert float(sums["count"]) == 4 and float(sums["accuracy"]) == accuracy * 4
    # Plain SGD: params - lr * grad, with the gradient worked out by hand.
    p = new.params
    np.testing.assert_allclose(_leaf(p, "hidden", 0, "kernel"), W1 - lr * grads["W1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_leaf(p, "hidden", 0, "bias"), B1 - lr * grads["B1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_leaf(p, "out", "kernel"), W2 - lr * grads["W2"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_leaf(p, "out", "bias"), B2 - lr * grads["B2"], rtol=1e-5, atol=1e-6)


def test_weight_zero_rows_change_nothing():
    state = steps.init_state(_hand_model(), optax.sgd, 0.5)
    plain, m_plain = train_step(state, *_batch(X, Y))
    # Three padding rows with wild values and labels; weight 0.
    xp = np.concatenate([X, [[100.0, -50.0], [7.0, 7.0], [-3.0, 9.0]]]).astype(np.float32)
    yp = np.concatenate([Y, [1, 0, 1]]).astype(np.int32)
    padded, m_padded = train_step(state, *_batch(xp, yp, [1, 1, 1, 1, 0, 0, 0]))
    np.testing.assert_allclose(float(m_padded["loss"]), float(m_plain["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_padded["accuracy"]), float(m_plain["accuracy"]), rtol=1e-6)
    for a, b in zip(_flat(padded.params), _flat(plain.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    s_plain, s_padded = eval_step(state, *_batch(X, Y)), eval_step(state, *_batch(xp, yp, [1] * 4 + [0] * 3))
    for k in ("loss", "accuracy", "count"):
        np.testing.assert_allclose(float(s_padded[k]), float(s_plain[k]), rtol=1e-6)
    # While weight 1 on those rows does change the step (the check above is not vacuous).
    moved, _ = train_step(state, *_batch(xp, yp))
    assert not np.allclose(_leaf(moved.params, "out", "kernel"), _leaf(plain.params, "out", "kernel"))


# --------------------------------------------------------------------------------------------
# Batch order
# --------------------------------------------------------------------------------------------


# Every order is drawn on the host: the range test's (a numpy seed), training's (`epoch_batches`,
# which is its first pass for the same seed: see test_epoch_batches_is_the_first_pass).
ORDERS = {"host": lambda seed, **kw: steps.host_batch_order(seed, **kw)}


def test_epoch_batches_is_the_first_pass():
    for seed in (0, 3, 42):
        for a, b in zip(steps.host_batch_order(seed, 100, 8), steps.epoch_batches(seed, 1, 100, 8)):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(steps.epoch_batches(0, 2, 100, 8)[0], steps.epoch_batches(0, 1, 100, 8)[0])


@pytest.mark.parametrize("where", ORDERS)
def test_batch_order_covers_each_example_once(where):
    idx, w = ORDERS[where](0, n=10, batch_size=4)
    idx, w = np.asarray(idx), np.asarray(w)
    assert idx.shape == (3, 4) and w.shape == (3, 4)
    assert w.dtype == np.float32 and idx.dtype == np.int32
    assert w.sum() == 10 and set(np.unique(w)) == {0.0, 1.0}
    np.testing.assert_array_equal(w[-1], [1, 1, 0, 0])  # the last batch is padded
    assert sorted(idx[w == 1].tolist()) == list(range(10))
    assert np.all((idx >= 0) & (idx < 10))  # padding rows point at real (weight-0) examples
    assert idx[w == 1].tolist() != list(range(10))  # shuffled


@pytest.mark.parametrize("where", ORDERS)
def test_batch_order_with_a_batch_larger_than_the_data(where):
    # 3 examples in a batch of 8: one step per pass, the padding wraps around the pass's order.
    idx, w = ORDERS[where](0, n=3, batch_size=8, num_steps=2)
    idx, w = np.asarray(idx), np.asarray(w)
    assert idx.shape == w.shape == (2, 8)
    np.testing.assert_array_equal(w, [[1, 1, 1, 0, 0, 0, 0, 0]] * 2)
    for row in idx:
        assert sorted(row[:3].tolist()) == [0, 1, 2]
        np.testing.assert_array_equal(row[3:], np.resize(row[:3], 5))


@pytest.mark.parametrize("where", ORDERS)
def test_batch_order_differs_across_seeds_and_passes(where):
    a, _ = ORDERS[where](0, n=10, batch_size=4)
    b, _ = ORDERS[where](1, n=10, batch_size=4)
    a2, _ = ORDERS[where](0, n=10, batch_size=4)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    # num_steps beyond one epoch: each pass a fresh permutation covering everything.
    idx, w = ORDERS[where](0, n=10, batch_size=4, num_steps=6)
    idx, w = np.asarray(idx), np.asarray(w)
    assert idx.shape == (6, 4)
    first, second = idx[:3][w[:3] == 1], idx[3:][w[3:] == 1]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert first.tolist() != second.tolist()


# --------------------------------------------------------------------------------------------
# Epochs and evaluation
# --------------------------------------------------------------------------------------------


def test_a_compiled_epoch_improves_accuracy(tiny_data):
    d = tiny_data
    model = MLP(d.in_features, (32,), d.num_classes, rngs=nnx.Rngs(0))
    state = steps.init_state(model, optax.sgd, 0.1)
    train = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    valid = jnp.asarray(d.x_valid), jnp.asarray(d.y_valid)
    before = steps.evaluate(state, valid, batch_size=64)
    losses = []
    spe = steps.steps_per_epoch(len(d.x_train), 32)
    for epoch in range(1, 6):  # fit's program and order: a whole epoch as one compiled chunk
        idx, w = steps.epoch_batches(0, epoch, len(d.x_train), 32)
        state, m = steps.train_chunk(state, train, idx, w, np.int32(spe), length=spe, masked=False,
                                     fetch=steps.gather_batch)
        losses.append(float(np.sum(m["loss"] * m["count"]) / np.sum(m["count"])))
    after = steps.evaluate(state, valid, batch_size=64)
    assert int(state.step) == 5 * steps.steps_per_epoch(len(d.x_train), 32)
    assert losses[-1] < losses[0]
    assert float(after["loss"]) < float(before["loss"])
    assert float(after["accuracy"]) > float(before["accuracy"]) + 0.2
    assert float(after["accuracy"]) >= 0.9


@pytest.mark.parametrize("batch_size", [7, 32, 100, 1000])
def test_evaluate_matches_direct_computation(tiny_data, batch_size):
    d = tiny_data
    state = steps.init_state(MLP(d.in_features, (16,), d.num_classes, rngs=nnx.Rngs(3)), optax.sgd, 0.1)
    x, y = d.x_valid, d.y_valid  # 100 examples
    logits = np.asarray(state.model()(jnp.asarray(x)), np.float64)
    m = logits.max(1, keepdims=True)
    losses = m[:, 0] + np.log(np.exp(logits - m).sum(1)) - logits[np.arange(len(y)), y]
    got = steps.evaluate(state, (jnp.asarray(x), jnp.asarray(y)), batch_size=batch_size)
    np.testing.assert_allclose(float(got["loss"]), losses.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(got["accuracy"]), np.mean(logits.argmax(1) == y), rtol=1e-6)


def test_regression_task_is_mean_squared_error_and_fit_learns_it():
    """tasks.regression: the per-example MSE and absolute error of numpy, and a fit on a linear target
    (float y, no classes) lowers the validation loss tenfold."""
    import types

    import lrjax
    from lrjax import tasks

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    x = rng.normal(size=(640, 8)).astype(np.float32)
    y = x @ w
    model = mlp(8, (16,), 3, seed=0)
    losses, metrics = tasks.regression(model, (x[:5], y[:5]))
    out = np.asarray(model(x[:5]))
    np.testing.assert_allclose(losses, ((out - y[:5]) ** 2).mean(1), rtol=1e-5)
    np.testing.assert_allclose(metrics["mean_absolute_error"], np.abs(out - y[:5]).mean(1), rtol=1e-5)
    data = types.SimpleNamespace(x_train=x[:512], y_train=y[:512], x_valid=x[512:], y_valid=y[512:],
                                 x_test=x[512:], y_test=y[512:])
    r = lrjax.fit(model, optax.adam, data, lr=1e-2, epochs=8, loss_fn=tasks.regression, batch_size=32,
                  progress=None)
    val = [h["val_loss"] for h in r.history]
    assert val[-1] < 0.1 * val[0], val
    assert "val_mean_absolute_error" in r.history[-1]


class _NormNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden, self.norm = nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
        self.drop, self.out = nnx.Dropout(0.5, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jax.nn.relu(self.norm(self.hidden(x)))))


def test_batch_statistics_normalises_by_the_evaluated_batch_with_dropout_off():
    rng = np.random.default_rng(0)
    x, y = (rng.normal(size=(64, 4)) * 3 + 5).astype(np.float32), rng.integers(0, 3, 64).astype(np.int32)
    state = steps.init_state(_NormNet(nnx.Rngs(1)), optax.sgd, 0.1)
    p = jax.device_get(state.params)
    h = x @ np.asarray(p["hidden"]["kernel"]) + np.asarray(p["hidden"]["bias"])

    def loss_after(norm):
        logits = np.maximum(norm(h), 0) @ np.asarray(p["out"]["kernel"]) + np.asarray(p["out"]["bias"])
        m = logits.max(1, keepdims=True)
        return np.mean(m[:, 0] + np.log(np.exp(logits - m).sum(1)) - logits[np.arange(len(y)), y])

    own = steps.evaluate(steps.batch_statistics(state), (x, y), batch_size=64)["loss"]
    running = steps.evaluate(state, (x, y), batch_size=64)["loss"]  # the initial averages: mean 0, variance 1
    np.testing.assert_allclose(float(own), loss_after(lambda a: (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)), rtol=1e-4)
    np.testing.assert_allclose(float(running), loss_after(lambda a: a / np.sqrt(1 + 1e-5)), rtol=1e-4)
    assert abs(float(own) - float(running)) > 0.05
    plain = steps.init_state(MLP(4, (8,), 3, rngs=nnx.Rngs(0)), optax.sgd, 0.1)
    assert steps.batch_statistics(plain).eval_graphdef == plain.eval_graphdef  # nothing to change
