"""Training and the range test from a Grain stream (`fit` / `find_lr` given `lrjax.sources.Splits`)
against the resident path on tiny data; streamed evaluation equals resident evaluation; exact resume
of a streamed run stopped mid-epoch; the `--input auto` decision."""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
import optax
import pytest

from lrjax import memory, models, sources, stream
from lrjax.callbacks import Callback
from lrjax.data import from_arrays
from lrjax.range_test import find_lr
from lrjax.train import fit

N, NT, VALID = 1100, 300, 200


def _images(rng, n):
    x = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    return x, (x[:, :4].mean((1, 2)) > 127.5).astype(np.int64)  # the top rows' brightness: easy to learn


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    (x, y), (xt, yt) = _images(rng, N), _images(rng, NT)
    return sources.array_splits(x, y, xt, yt, valid_size=VALID), from_arrays("t", x, y, xt, yt, valid_size=VALID)


def _model():
    return models.build_model("mlp", (8, 8, 1), 2, 0, hidden_sizes=(32,))



@pytest.mark.slow
def test_streamed_fit_covers_each_example_once_per_epoch_and_learns_like_resident(tiny):
    splits, data = tiny
    s = stream.Stream(splits.train, 32, chunk_steps=5, seed=3, steps=2 * 29, epoch_aligned=False)
    seen = np.concatenate([c["x"][c["active"]].reshape(-1, 64)[c["w"][c["active"]].reshape(-1) > 0]
                           for c in s])
    s.close()
    train_x = np.asarray(splits.train.read(np.arange(len(splits.train)))[0]).reshape(-1, 64)
    for epoch in (seen[:len(train_x)], seen[len(train_x):]):  # each epoch: every example exactly once
        assert sorted(map(bytes, epoch)) == sorted(map(bytes, train_x))
    kw = dict(lr=0.01, epochs=8, batch_size=32, progress=None, seed=1)
    streamed = fit(_model(), optax.adam, splits, **kw, stream_chunk_steps=7)
    resident = fit(_model(), optax.adam, data, **kw)
    assert [h["step"] for h in streamed.history] == [h["step"] for h in resident.history]
    a, b = streamed.history[-1]["val_accuracy"], resident.history[-1]["val_accuracy"]
    assert b > 0.7 and abs(a - b) < 0.06, (a, b)


class _SigtermAt(Callback):
    every_n_steps = 1

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, step, logs=None):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_streamed_run_stopped_mid_epoch_resumes_bit_identically(tiny, tmp_path):
    splits, _ = tiny
    kw = dict(lr=0.2, epochs=3, batch_size=32, progress=None, seed=5, checkpoint_every_steps=10,
              stream_chunk_steps=4, tensorboard=False)
    ref = fit(_model(), optax.sgd, splits, workdir=tmp_path / "ref", **kw)
    first = fit(_model(), optax.sgd, splits, workdir=tmp_path / "k", callbacks=[_SigtermAt(43)], **kw)
    assert first.interrupted == "SIGTERM" and first.history[-1]["step"] < 96
    resumed = fit(_model(), optax.sgd, splits, workdir=tmp_path / "k", **kw)
    assert resumed.resumed_from == 50  # mid-epoch 2, inside a stream chunk (50 % 4 == 2)
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(ref.history)
    assert all(np.array_equal(p, q) for p, q in zip(jax.tree.leaves(ref.state.params),
                                                      jax.tree.leaves(resumed.state.params)))


@pytest.mark.slow
def test_streamed_range_test_suggests_like_resident(tiny):
    splits, data = tiny
    kw = dict(batch_size=16, start_lr=1e-3, end_lr=10.0, num_steps=120, chunk_steps=32, seed=2)
    s = find_lr(_model(), optax.sgd, splits, **kw)
    r = find_lr(_model(), optax.sgd, data, **kw)
    per_epoch = -(-(N - VALID) // 16)
    assert len(s.lrs) > per_epoch and len(r.lrs) > per_epoch
    # The first pass is the same permutation (numpy, seeded alike) and the stream's uint8 -> float32
    # on the device equals the resident x / 255: the curves agree bit for bit over the first epoch;
    # later passes draw their order differently (the stream from (seed, epoch)).
    assert np.array_equal(s.losses[:per_epoch], r.losses[:per_epoch])
    assert not np.array_equal(s.losses[per_epoch:per_epoch + 20], r.losses[per_epoch:per_epoch + 20])
    assert s.suggestion is not None and abs(np.log10(s.suggestion / r.suggestion)) < 1


@pytest.mark.parametrize("mode,budget,expect", [("auto", 10**9, "resident"), ("auto", 10**5, "stream"),
                                                 ("stream", 10**9, "stream"), ("resident", 1, "resident")])
def test_the_input_decision_and_its_message(tiny, mode, budget, expect):
    splits, _ = tiny
    chosen, reason = memory.choose_input(mode, memory.resident_nbytes(splits), budget)
    assert chosen == expect and (("stream" in reason) == (expect == "stream"))


@pytest.fixture
def idx_folder(tmp_path):
    from lrjax.idx import FILES, write_idx_gz

    rng = np.random.default_rng(1)
    for split, n in (("train", 5100), ("test", 40)):  # validation takes the first 5000
        write_idx_gz(tmp_path / FILES[f"{split}_images"], rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx_gz(tmp_path / FILES[f"{split}_labels"], rng.integers(0, 10, n, dtype=np.uint8))
    return tmp_path


@pytest.mark.parametrize("budget,streams", [("1KB", True), ("1GB", False)])
def test_auto_input_streams_over_the_budget_and_says_so(idx_folder, tmp_path, capsys, budget, streams):
    from lrjax import workflow
    from lrjax.config import Config
    from lrjax.data import Dataset

    cfg = Config(dataset="mnist", data_dir=str(idx_folder), cache_dir=str(tmp_path / "cache"), input="auto",
                 device_memory_budget=budget, progress=False)
    data = workflow.load(cfg)
    said = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("input:"))
    assert isinstance(data, sources.Splits if streams else Dataset)
    assert ("stream" in said) == streams and "budget" in said


def test_input_flags_are_checked():
    from lrjax.config import Config
    from lrjax.errors import ConfigError

    with pytest.raises(ConfigError, match="--input"):
        Config(input="disk")
    with pytest.raises(ConfigError, match="size"):
        Config(device_memory_budget="lots")


def test_streamed_evaluation_equals_resident_evaluation(tiny):
    from lrjax import mesh as mesh_lib
    from lrjax import steps

    splits, data = tiny
    state = steps.init_state(_model(), optax.sgd, 0.1)
    mesh = mesh_lib.make_mesh("auto")
    evaluator = stream.StreamEvaluator(splits.valid, 64, stream.chunk_sharding(mesh), chunk_steps=2)
    try:
        with jax.set_mesh(mesh):
            evaluator.compile(state)
            streamed = jax.device_get(evaluator(state))
            again = jax.device_get(evaluator(state))  # a second pass, same workers
            resident = jax.device_get(steps.evaluate(state, (data.x_valid, data.y_valid), batch_size=64))
    finally:
        evaluator.close()
    assert streamed == again
    for k in resident:
        np.testing.assert_allclose(streamed[k], resident[k], rtol=1e-6)
