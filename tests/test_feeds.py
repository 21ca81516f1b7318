"""Your own input pipeline: `fit`, `find_lr` and `sweep` given an iterable of batches (a generator,
a list, Grain's DataLoader and datasets) with the validation arrays beside it. Fed the resident
path's own batches they reproduce it; resume is exact through the iterator's state (Grain) or a
replay (plain iterables); bad input is one clear error."""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import strip_times, synthetic

from lrjax import feeds, models, steps
from lrjax.errors import ConfigError, DataError
from lrjax.range_test import find_lr
from lrjax.sweeps import sweep
from lrjax.train import fit

BS = 32


@pytest.fixture(scope="module")
def data():
    return synthetic(n_train=300, valid=100)


def _model(seed=0):
    return models.build_model("mlp", (8, 8, 1), 4, seed, hidden_sizes=(16,))


def resident_batches(data, seed, epochs, batch_size=BS):
    """The batches resident `fit` trains on, epoch after epoch (its padding rows dropped: the feed
    pads a short batch itself)."""
    n = len(data.x_train)
    for epoch in range(1, epochs + 1):
        idx, w = steps.epoch_batches(seed, epoch, n, batch_size)
        for i, wi in zip(idx, w):
            rows = i[wi > 0]
            yield data.x_train[rows], data.y_train[rows]


def _valid(data):
    return data.x_valid, data.y_valid


@pytest.mark.slow
def test_fit_on_the_resident_batches_equals_resident_fit(data):
    spe = steps.steps_per_epoch(len(data.x_train), BS)
    kw = dict(lr=0.05, epochs=3, batch_size=BS, seed=7, progress=None)
    resident = fit(_model(), optax.adam, data, **kw)
    fed = fit(_model(), optax.adam, resident_batches(data, 7, 3), valid=_valid(data), steps_per_epoch=spe,
              stream_chunk_steps=4, **kw)
    assert len(fed.history) == 3
    for a, b in zip(strip_times(fed.history), strip_times(resident.history)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
    leaves = zip(jax.tree.leaves(fed.state.params), jax.tree.leaves(resident.state.params))
    assert all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in leaves)


@pytest.mark.slow
def test_find_lr_on_the_resident_batches_equals_resident_find_lr(data):
    resident = find_lr(_model(), optax.sgd, data, batch_size=BS, seed=3, start_lr=1e-3, factor=1.2, num_steps=40,
                       method="lagsafe")  # one rule for both: the verified stage runs for arrays only
    order = [(data.x_train[i[w > 0]], data.y_train[i[w > 0]])
             for i, w in zip(*steps.host_batch_order(3, len(data.x_train), BS, 40))]
    fed = find_lr(_model(), optax.sgd, order, start_lr=1e-3, factor=1.2, chunk_steps=16, method="lagsafe")  # num_steps = len
    assert fed.num_steps == 40 and fed.batch_size == BS
    np.testing.assert_allclose(fed.losses, resident.losses, rtol=1e-5)
    assert fed.suggestion == pytest.approx(resident.suggestion)


@pytest.mark.slow
def test_sweep_on_the_resident_batches_equals_resident_sweep(data):
    spe = steps.steps_per_epoch(len(data.x_train), BS)
    kw = dict(lrs=[0.01, 0.1], seeds=[5], epochs=2, batch_size=BS)
    resident = sweep(_model, optax.sgd, data, **kw)
    fed = sweep(_model, optax.sgd, resident_batches(data, 5, 2), valid=data, steps_per_epoch=spe,
                chunk_steps=3, **kw)
    for k in resident.metrics:
        np.testing.assert_allclose(fed.metrics[k], resident.metrics[k], rtol=1e-5, err_msg=k)


class DictSource:
    """Records as TFDS gives them: {"image", "label"} dicts (a Grain random-access source)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __repr__(self):  # Grain checks a restored state against repr(source)
        return f"DictSource({len(self.x)})"

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def dict_loss(model, batch):
    logits = model(batch["image"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses, {"accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)}


def _loader(data, seed=0):
    source = DictSource(data.x_train, data.y_train.astype(np.int32))
    sampler = grain.samplers.IndexSampler(len(source), shuffle=True, seed=seed, num_epochs=None)
    return grain.DataLoader(data_source=source, sampler=sampler, worker_count=0,
                            operations=[grain.transforms.Batch(BS, drop_remainder=True)])


def _map_dataset(data):  # a Grain dataset with a length: an epoch is len(ds) batches
    source = DictSource(data.x_train, data.y_train.astype(np.int32))
    return grain.MapDataset.source(source).shuffle(seed=1).batch(BS, drop_remainder=True)


@pytest.mark.parametrize("make, iterator_state", [(_loader, "bytes"), (_map_dataset, "json"),
                                                  (lambda d: list(_map_dataset(d)), None)])
@pytest.mark.slow
def test_grain_loaders_train_and_resume_exactly(tmp_path, data, make, iterator_state):
    """A Grain DataLoader (bytes state), a Grain dataset (dict state) and a plain list (replayed):
    dict batches with their own loss, stopped after an epoch and resumed, end as an uninterrupted run."""
    valid = {"image": data.x_valid, "label": data.y_valid.astype(np.int32)}
    kw = dict(lr=0.05, epochs=3, seed=0, progress=None, loss_fn=dict_loss, valid=valid, steps_per_epoch=4,
              stream_chunk_steps=3, tensorboard=False)
    whole = fit(_model(), optax.adam, make(data), workdir=tmp_path / "a", **kw)
    first = fit(_model(), optax.adam, make(data), workdir=tmp_path / "b", stop_after=1, **kw)
    assert first.interrupted == "stop-after" and len(first.history) == 1
    saved = json.loads((tmp_path / "b" / "checkpoints" / "1" / "meta" / "metadata").read_text())["input"]
    assert saved["step"] == 4 and (next(iter(saved["iterator"])) if "iterator" in saved else None) == iterator_state
    rest = fit(_model(), optax.adam, make(data), workdir=tmp_path / "b", **kw)
    assert rest.resumed_from == 1
    assert strip_times(rest.history) == strip_times(whole.history)
    assert whole.history[-1]["val_accuracy"] > 0.5
    for a, b in zip(jax.tree.leaves(rest.state.params), jax.tree.leaves(whole.state.params)):
        np.testing.assert_array_equal(a, b)


def test_an_iterable_that_ends_is_iterated_again(data):
    batches = list(_map_dataset(data))[:3]  # 3 batches; 2 epochs of 5 steps need 10
    fed = feeds.BatchFeed(batches, 4, feeds.chunk_sharding(jax.sharding.Mesh(jax.devices()[:1], ("data",))))
    seen = [fed._take(4)[0]["image"] for _ in range(3)]
    order = np.concatenate(seen)[:10]
    expect = np.stack([batches[i % 3]["image"] for i in range(10)])
    np.testing.assert_array_equal(order, expect)


def test_a_short_batch_is_padded_with_weight_zero_rows(data):
    x, y = data.x_train, data.y_train
    fed = feeds.BatchFeed([(x[:BS], y[:BS]), (x[:5], y[:5])], 2,
                          feeds.chunk_sharding(jax.sharding.Mesh(jax.devices()[:1], ("data",))))
    (bx, by), w = fed._take(2)
    assert bx.shape == (2, BS, *x.shape[1:]) and w.shape == (2, BS)
    assert w[0].sum() == BS and w[1].sum() == 5 and not bx[1, 5:].any()


@pytest.mark.slow
def test_bad_iterables_fail_with_one_clear_error(data):
    x, y = data.x_train, data.y_train
    kw = dict(lr=0.1, epochs=1, progress=None)
    gen = ((x[i:i + BS], y[i:i + BS]) for i in range(0, 96, BS))
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        fit(_model(), optax.sgd, gen, valid=_valid(data), **kw)
    with pytest.raises(ConfigError, match="valid="):
        fit(_model(), optax.sgd, [(x[:BS], y[:BS])], **kw)
    with pytest.raises(DataError, match="yielded no batches"):
        fit(_model(), optax.sgd, [], valid=_valid(data), steps_per_epoch=2, **kw)
    with pytest.raises(DataError, match="differs from the first"):
        fit(_model(), optax.sgd, [(x[:BS], y[:BS]), (x[:BS, :4], y[:BS])], valid=_valid(data), **kw)
    with pytest.raises(DataError, match="more than the first"):
        fit(_model(), optax.sgd, [(x[:BS], y[:BS]), (x[:2 * BS], y[:2 * BS])], valid=_valid(data), **kw)
    with pytest.raises(DataError, match="same leading"):
        fit(_model(), optax.sgd, [(x[:BS], y[:BS - 1])], valid=_valid(data), **kw)
    once = iter([(x[:BS], y[:BS])])  # an iterator runs once: the second pass has nothing
    with pytest.raises(DataError, match="iterated again"):
        fit(_model(), optax.sgd, once, valid=_valid(data), steps_per_epoch=1, epochs=2, lr=0.1, progress=None)
    with pytest.raises(ConfigError, match="x_train"):
        fit(_model(), optax.sgd, 3, valid=_valid(data), **kw)
    with pytest.raises(ValueError, match="one seed"):
        find_lr(_model(), optax.sgd, [(x[:BS], y[:BS])] * 4, num_seeds=2)
