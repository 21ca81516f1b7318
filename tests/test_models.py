"""A user's own NNX model and task: BatchNorm and Dropout state through the steps, eval mode in every
evaluation, best-epoch state with the best weights, bit-identical resume, custom losses and metrics,
dict batches, mixed precision, the CNN and the model registry."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lrjax
from lrjax import models, steps
from lrjax.errors import ConfigError
from lrjax.monitors import EarlyStopping

from conftest import strip_times, synthetic


@pytest.fixture(scope="module")
def data():
    return synthetic(n_train=192, valid=64, n_test=64, size=8, classes=4, noise=60)


class BNNet(nnx.Module):
    """Dense -> BatchNorm -> ReLU -> Dropout -> logits: both kinds of non-parameter state."""

    def __init__(self, rngs, rate=0.0):
        self.dense = nnx.Linear(64, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        h = self.drop(jax.nn.relu(self.bn(self.dense(x.reshape(x.shape[0], -1)))))
        return self.out(h)


def bn_net(rate=0.0, seed=0):
    return BNNet(nnx.Rngs(seed), rate)


def bits(tree) -> list[bytes]:
    return [np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a).tobytes()
            for a in jax.tree.leaves(tree)]


def eval_mode_loss(model, x, y) -> float:
    model.eval()
    logits = model(jnp.asarray(x))
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean())


def batch_of(data, n=32):
    return (jnp.asarray(data.x_train[:n]), jnp.asarray(data.y_train[:n])), jnp.ones(n)


# ---------------------------------------------------------------------------------------------
# BatchNorm and Dropout in the steps
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_batchnorm_statistics_update_in_training_and_not_in_evaluation(data):
    state = steps.init_state(bn_net(), optax.sgd, 0.1)
    batch, w = batch_of(data)
    before = np.asarray(state.rest["bn"]["mean"][...])
    new, _ = jax.jit(steps.train_step)(state, batch, w)
    after = np.asarray(new.rest["bn"]["mean"][...])
    assert not np.allclose(before, after), "a training step left the running mean unchanged"
    # the running mean moved towards the batch's mean of the BatchNorm input (momentum 0.5)
    h = np.asarray(state.model().dense(batch[0].reshape(32, -1)))
    np.testing.assert_allclose(after, 0.5 * before + 0.5 * h.mean(0), rtol=1e-5, atol=1e-6)
    sums = jax.jit(steps.eval_step)(new, batch, w)
    assert bits(jax.jit(steps.eval_step)(new, batch, w)) == bits(sums)  # deterministic
    # evaluation reads the running averages: it equals the merged model in eval mode ...
    np.testing.assert_allclose(float(sums["loss"] / sums["count"]),
                               eval_mode_loss(new.model(), data.x_train[:32], data.y_train[:32]), rtol=1e-5)
    # ... and differs from train mode, which normalises with the batch's own statistics
    train_mode = new.model()
    train_mode.train()
    logits = train_mode(batch[0])
    train_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean())
    assert abs(train_loss - float(sums["loss"] / sums["count"])) > 1e-4


@pytest.mark.slow
def test_padding_rows_are_real_examples_in_batch_statistics(data):
    """The documented choice: a partial batch is filled with the pass's first examples (weight 0 in the
    loss), so BatchNorm's batch statistics are of real images, never of zeros. 10 examples, batch 8:
    the second batch holds 2 new examples and 6 repeated ones."""
    examples = (jnp.asarray(data.x_train[:10]), jnp.asarray(data.y_train[:10]))
    idx, w = steps.epoch_batches(0, 1, 10, 8)
    (x, _), wb = steps.gather_batch(examples, idx[1], w[1])
    assert float(wb.sum()) == 2 and np.all(np.isin(np.asarray(idx[1]), np.arange(10)))
    state = steps.init_state(bn_net(), optax.sgd, 0.1)
    new, _ = jax.jit(steps.train_step)(state, (x, examples[1][idx[1]]), wb)
    h = np.asarray(state.model().dense(x.reshape(8, -1)))  # every row a real training image
    np.testing.assert_allclose(np.asarray(new.rest["bn"]["mean"][...]), 0.5 * h.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dropout_is_fresh_every_training_step_and_off_in_evaluation(data):
    state = steps.init_state(bn_net(rate=0.5), optax.sgd, 0.0)  # lr 0: the weights never change
    batch, w = batch_of(data)
    step = jax.jit(steps.train_step)
    s1, m1 = step(state, batch, w)
    s2, m2 = step(s1, batch, w)
    assert float(m1["loss"]) != float(m2["loss"]), "two training steps drew the same dropout mask"
    assert bits(s1.params) == bits(s2.params)
    # the same state gives the same step: the randomness lives in the state (RNG stream count), not the host
    assert float(step(state, batch, w)[1]["loss"]) == float(m1["loss"])
    # evaluation draws no dropout mask: another state of the RNG stream evaluates the same
    other_stream = s1.replace(rest=jax.tree.map(lambda a: a, s2.rest))
    other_stream.rest["bn"] = s1.rest["bn"]
    e1, e2 = (jax.jit(steps.eval_step)(s, batch, w) for s in (s1, other_stream))
    assert int(other_stream.rest["drop"]["rngs"]["count"][...]) != int(s1.rest["drop"]["rngs"]["count"][...])
    assert float(e1["loss"]) == float(e2["loss"]), "evaluation used dropout"
    np.testing.assert_allclose(float(e1["loss"] / e1["count"]),
                               eval_mode_loss(s1.model(), data.x_train[:32], data.y_train[:32]), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# fit, find_lr and sweep with a BatchNorm/Dropout model
# ---------------------------------------------------------------------------------------------

def fit_bn(data, **kw):
    kw.setdefault("early_stopping", EarlyStopping(patience=2))
    return lrjax.fit(bn_net(rate=0.3), optax.sgd, data, lr=0.5, batch_size=16, progress=None, **kw)


@pytest.mark.slow
def test_fit_keeps_the_best_epochs_statistics_with_its_weights(data):
    f = fit_bn(data, epochs=30)
    assert f.stopped_early and f.best_epoch < f.epochs_run, "no epoch after the best: nothing to check"
    ev = f.evaluate(data.x_valid, data.y_valid)
    best = next(h for h in f.history if h["epoch"] == f.best_epoch)
    # the kept state reproduces the best epoch's validation loss: weights and statistics belong together
    np.testing.assert_allclose(ev["loss"], best["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(ev["loss"], eval_mode_loss(f.model(), data.x_valid, data.y_valid), rtol=1e-5)
    # while the last epoch's statistics with the best weights give another loss
    last = fit_bn(data, epochs=f.epochs_run, early_stopping=EarlyStopping(patience=100,
                                                                            restore_best_weights=False))
    mixed = f.state.replace(rest=last.state.rest)
    loss = lrjax.FitResult(state=mixed, history=[], best_epoch=None, best_val_loss=None, epochs_run=0,
                           stopped_early=False).evaluate(data.x_valid, data.y_valid)["loss"]
    assert abs(loss - best["val_loss"]) > 1e-6


@pytest.mark.slow
def test_batchnorm_dropout_resume_is_bit_identical(tmp_path, data):
    a = fit_bn(data, epochs=6, workdir=tmp_path / "a")
    fit_bn(data, epochs=6, workdir=tmp_path / "b", stop_after=3)
    b = fit_bn(data, epochs=6, workdir=tmp_path / "b")
    assert b.resumed_from == 3
    assert strip_times(a.history) == strip_times(b.history)
    assert bits((a.state.params, a.state.rest, a.state.opt_state)) == \
           bits((b.state.params, b.state.rest, b.state.opt_state))
    # the RNG stream's key and count came back from the checkpoint as a typed key and a counter
    rng = b.state.rest["drop"]["rngs"]
    assert jax.dtypes.issubdtype(rng["key"][...].dtype, jax.dtypes.prng_key) and int(rng["count"][...]) > 0


@pytest.mark.slow
def test_find_lr_and_sweep_take_a_batchnorm_dropout_model(data):
    model = bn_net(rate=0.3)
    before = bits(nnx.state(model))
    r = lrjax.find_lr(model, optax.sgd, data, batch_size=16, start_lr=1e-3, end_lr=10.0, num_steps=60,
                      eval_every=10)
    assert bits(nnx.state(model)) == before, "the range test changed the user's model"
    assert r.suggestion is not None and len(r.val_losses) > 0 and np.isfinite(r.val_losses).all()
    s = lrjax.sweep(lambda seed: bn_net(rate=0.3, seed=seed), optax.sgd, data, [0.05, 0.5], seeds=[0],
                    epochs=2, batch_size=16, patience=1)
    assert s.best_lr in (0.05, 0.5) and np.isfinite(s.val_accuracy).all()
    # the sweep's scoring is eval mode too: a member's kept state reproduces its best validation loss
    member = s.states.replace(**{k: jax.tree.map(lambda a: a[0, 0], getattr(s.states, k))
                                 for k in ("params", "rest", "opt_state", "step")})
    ev = steps.evaluate(member, (jnp.asarray(data.x_valid), jnp.asarray(data.y_valid)), batch_size=1000)
    np.testing.assert_allclose(float(ev["loss"]), s.best_val_loss[0, 0], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Custom losses, metrics and batches
# ---------------------------------------------------------------------------------------------

def regression(n_train=600, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 1)).astype(np.float32)

    def split(n):
        x = rng.normal(size=(n, 6)).astype(np.float32)
        return x, (x @ w + 0.05 * rng.normal(size=(n, 1))).astype(np.float32)

    (xt, yt), (xv, yv), (xs, ys) = split(n_train), split(200), split(200)
    return types.SimpleNamespace(x_train=xt, y_train=yt, x_valid=xv, y_valid=yv, x_test=xs, y_test=ys)


def mse(model, batch):
    x, y = batch
    err = model(x) - y
    return jnp.mean(err ** 2, axis=-1), {"mae": jnp.mean(jnp.abs(err), axis=-1)}


def test_custom_regression_loss_through_find_lr_and_fit():
    reg = regression()
    linear = lambda: nnx.Linear(6, 1, rngs=nnx.Rngs(0))  # noqa: E731
    r = lrjax.find_lr(linear(), optax.sgd, reg, loss_fn=mse, batch_size=16, start_lr=1e-4, end_lr=10.0,
                      num_steps=120)
    assert r.suggestion is not None and r.diverged_step is not None
    es = EarlyStopping(monitor="val_mae", mode="min", patience=3)
    f = lrjax.fit(linear(), optax.sgd, reg, loss_fn=mse, lr=r.suggestion, epochs=40, batch_size=16,
                  early_stopping=es, progress=None)
    assert {"loss", "mae", "val_loss", "val_mae"} <= set(f.history[-1]) and "accuracy" not in f.history[-1]
    best = min(h["val_mae"] for h in f.history)
    assert es.best == pytest.approx(best) and f.best_epoch == next(h["epoch"] for h in f.history
                                                                     if h["val_mae"] == best)
    assert best < 0.1  # the noise's mean absolute value is 0.04
    ev = f.evaluate(reg.x_test, reg.y_test)
    assert set(ev) == {"loss", "mae"} and ev["mae"] < 0.1


def test_an_unknown_monitor_is_refused_before_training():
    with pytest.raises(ConfigError, match="val_accuracy.*val_loss, val_mae"):
        lrjax.fit(nnx.Linear(6, 1, rngs=nnx.Rngs(0)), optax.sgd, regression(), loss_fn=mse, lr=0.01, epochs=2,
                  early_stopping=EarlyStopping(monitor="val_accuracy"), progress=None)


def test_loss_fn_must_return_per_example_arrays(data):
    def mean_loss(model, batch):
        losses, metrics = lrjax.tasks.classification(model, batch)
        return losses.mean(), metrics

    with pytest.raises(lrjax.errors.ConfigError, match="one value per example"):
        lrjax.fit(lrjax.mlp(64, (8,), 4), optax.sgd, data, loss_fn=mean_loss, lr=0.1, epochs=1, progress=None)


@pytest.mark.slow
def test_a_dict_batch_dataset(data):
    """Examples as one pytree (TFDS's {"image", "label"} dicts): y_* None, the loss reads the dict."""
    as_dicts = types.SimpleNamespace(**{f"x_{s}": {"image": getattr(data, f"x_{s}"), "label": getattr(data, f"y_{s}")}
                                        for s in ("train", "valid", "test")},
                                     **{f"y_{s}": None for s in ("train", "valid", "test")})

    def dict_loss(model, batch):
        return lrjax.tasks.classification(model, (batch["image"], batch["label"]))

    kw = dict(lr=0.1, epochs=3, batch_size=16, progress=None)
    a = lrjax.fit(lrjax.mlp(64, (8,), 4), optax.sgd, as_dicts, loss_fn=dict_loss, **kw)
    b = lrjax.fit(lrjax.mlp(64, (8,), 4), optax.sgd, data, **kw)
    assert strip_times(a.history) == strip_times(b.history)
    assert a.evaluate(as_dicts.x_test) == b.evaluate(data.x_test, data.y_test)
    r = lrjax.find_lr(lrjax.mlp(64, (8,), 4), optax.sgd, as_dicts, loss_fn=dict_loss, batch_size=16, num_steps=30)
    np.testing.assert_array_equal(r.losses, lrjax.find_lr(lrjax.mlp(64, (8,), 4), optax.sgd, data, batch_size=16,
                                                          num_steps=30).losses)


def test_divergence_rule_for_negative_losses():
    """A loss that goes below zero (a log-likelihood) still diverges on a real rise, not at once."""
    reg = regression()

    def shifted(model, batch):  # the MSE minus a constant: the same curve, negative from early on
        losses, metrics = mse(model, batch)
        return losses - 2.0, metrics

    kw = dict(batch_size=16, start_lr=1e-4, end_lr=30.0, num_steps=150)
    plain = lrjax.find_lr(nnx.Linear(6, 1, rngs=nnx.Rngs(0)), optax.sgd, reg, loss_fn=mse, **kw)
    neg = lrjax.find_lr(nnx.Linear(6, 1, rngs=nnx.Rngs(0)), optax.sgd, reg, loss_fn=shifted, **kw)
    assert neg.smoothed.min() < 0 and neg.diverged_step is not None
    assert neg.diverged_step > 50, f"diverged at step {neg.diverged_step}, long before the rate grew too high"
    assert neg.suggestion is not None and 0.25 < neg.suggestion / plain.suggestion < 4


# ---------------------------------------------------------------------------------------------
# Mixed precision, optimizer factories, the CNN and the registry
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bfloat16_policy(data):
    state = steps.init_state(bn_net(), optax.adam, 1e-3, dtype=jnp.bfloat16)
    batch, w = batch_of(data)
    jaxpr = str(jax.make_jaxpr(steps.train_step)(state, batch, w))
    assert "bf16[32,16]" in jaxpr, "the forward pass did not compute in bfloat16"
    new, m = jax.jit(steps.train_step)(state, batch, w)
    # parameters, optimizer state and batch statistics stay float32; the loss is float32
    for tree in (new.params, new.opt_state, new.rest["bn"]):
        assert {str(a.dtype) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)} == {"float32"}
    assert m["loss"].dtype == jnp.float32
    ref, m32 = jax.jit(steps.train_step)(steps.init_state(bn_net(), optax.adam, 1e-3), batch, w)
    np.testing.assert_allclose(float(m["loss"]), float(m32["loss"]), rtol=2e-2)
    f = lrjax.fit(bn_net(), optax.adam, data, lr=1e-2, epochs=3, batch_size=16, dtype="bfloat16", progress=None)
    assert f.history[-1]["val_accuracy"] > 0.5
    assert {str(a.dtype) for a in jax.tree.leaves(f.state.params)} == {"float32"}


def test_an_optimizer_instance_is_refused_with_what_to_pass(data):
    with pytest.raises(ConfigError, match="factory taking learning_rate.*optax.adam"):
        lrjax.find_lr(lrjax.mlp(64, (8,), 4), optax.adam(1e-3), data, num_steps=10)
    # a partial of a factory is a factory
    f = lrjax.fit(lrjax.mlp(64, (8,), 4), functools.partial(optax.adamw, weight_decay=1e-4), data, lr=1e-3,
                  epochs=1, progress=None)
    assert np.isfinite(f.history[0]["loss"])


@pytest.mark.slow
def test_cnn_shapes_and_conv_gradient_equal_lax():
    model = models.cnn(seed=0)
    x = jnp.asarray(np.random.default_rng(0).random((4, 28, 28, 1), np.float32))
    assert model(x).shape == (4, 10)
    model.eval()
    loss = lambda m: (m(x) ** 2).sum()  # noqa: E731
    ours = nnx.grad(loss)(model)
    reference = nnx.clone(model)
    for conv in reference.convs:
        conv.conv_general_dilated = jax.lax.conv_general_dilated
    theirs = nnx.grad(loss)(reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    pooled = models.max_pool_2x2(x)
    np.testing.assert_array_equal(pooled, nnx.max_pool(x, (2, 2), strides=(2, 2)))


def test_the_registry_builds_and_extends_the_cli_choices(tmp_path):
    assert {"mlp", "cnn"} <= set(models.MODELS)
    m = models.build_model("mlp", (8, 8, 1), 4, seed=0, hidden_sizes=(5,))
    assert m(jnp.zeros((2, 8, 8, 1))).shape == (2, 4)
    with pytest.raises(ConfigError, match="--model must be one of"):
        lrjax.Config(model="resnet")
    models.register_model("tiny", lambda shape, classes, seed, **_: lrjax.mlp(int(np.prod(shape)), (4,), classes,
                                                                                seed=seed))
    try:
        assert lrjax.Config(model="tiny").model == "tiny"
    finally:
        del models.MODELS["tiny"]
