"""Text corpora, the next-token task and the Transformer (`lrjax.text`, `lrjax.tasks.next_token`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrjax import mesh as mesh_lib
from lrjax import models, tasks, text
from lrjax.config import Config
from lrjax.errors import DataError


def write_corpus(root, n_files=3, size=3000, seed=0):
    rng = np.random.default_rng(seed)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "x", "y", "(", ")", ":", "\n"]
    (root / "sub").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        p = root / ("sub" if i % 2 else ".") / f"f{i}.py"
        p.write_text(" ".join(rng.choice(words, size // 4))[:size])
        paths.append(p)
    (root / "blob.bin").write_bytes(b"\x00\x01\x02\xff\xfe")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return sorted(paths)


def test_tokens_are_the_text_files_bytes_in_sorted_order_and_binary_files_are_skipped(tmp_path):
    paths = write_corpus(tmp_path / "c")
    corpus = text.load_corpus(tmp_path / "c", 16, tmp_path / "cache")
    assert bytes(np.asarray(corpus.tokens)) == b"".join(p.read_bytes() for p in paths)
    assert (corpus.files, corpus.skipped) == (3, 2)
    # the second load reads the cache: the same tokens, the same counts
    again = text.load_corpus(tmp_path / "c", 16, tmp_path / "cache")
    assert isinstance(again.tokens, np.memmap)
    np.testing.assert_array_equal(again.tokens, corpus.tokens)
    assert (again.files, again.skipped) == (3, 2)


def test_splits_are_disjoint_and_cover_the_stream_test_last(tmp_path):
    write_corpus(tmp_path / "c")
    corpus = text.load_corpus(tmp_path / "c", 16, tmp_path / "cache")
    n = len(corpus.tokens)
    (a, b), (c, d), (e, f) = (corpus.bounds[s] for s in ("train", "valid", "test"))
    assert a == 0 and b == c and d == e and f == n
    assert d - c == f - e == int(n * text.SPLIT_FRACTION) > 16
    valid = corpus.windows("valid")["tokens"]
    assert valid.dtype == np.int32 and valid.shape[1] == 17
    np.testing.assert_array_equal(valid.reshape(-1), corpus.tokens[c:c + valid.size])


def test_a_damaged_cache_is_reported_and_rebuilt(tmp_path, capsys):
    write_corpus(tmp_path / "c")
    first = np.array(text.load_corpus(tmp_path / "c", 16, tmp_path / "cache").tokens)
    [cached] = (tmp_path / "cache" / "text").iterdir()
    for damage in (lambda raw: raw[:5000], lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), lambda raw: b"junk"):
        cached.write_bytes(damage(cached.read_bytes()))
        capsys.readouterr()
        np.testing.assert_array_equal(text.load_corpus(tmp_path / "c", 16, tmp_path / "cache").tokens, first)
        err = capsys.readouterr().err
        assert "damaged" in err and "rebuilding" in err and len(err.strip().splitlines()) == 1
        text.read_cache(cached)  # intact again


@pytest.mark.parametrize("errno_", ["EROFS", "ENOSPC"])
def test_a_read_only_or_full_cache_folder_means_running_without_the_cache(tmp_path, capsys, monkeypatch, errno_):
    import errno
    import os

    paths = write_corpus(tmp_path / "c")

    def refuse(src, dst):  # as the filesystem refuses (a chmod would not stop root)
        raise OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_)))

    monkeypatch.setattr(text.os, "replace", refuse)
    corpus = text.load_corpus(tmp_path / "c", 16, tmp_path / "cache")
    assert bytes(np.asarray(corpus.tokens)) == b"".join(p.read_bytes() for p in paths)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "running without the cache" in lines[0] and os.strerror(getattr(errno, errno_)) in lines[0]
    assert list((tmp_path / "cache" / "text").iterdir()) == []  # nor a partial file


def test_a_changed_file_gives_a_new_cache_entry(tmp_path):
    paths = write_corpus(tmp_path / "c")
    text.load_corpus(tmp_path / "c", 16, tmp_path / "cache")
    paths[0].write_text(paths[0].read_text() + "\nmore text")
    corpus = text.load_corpus(tmp_path / "c", 16, tmp_path / "cache")
    assert bytes(np.asarray(corpus.tokens)).count(b"more text") == 1
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 2


def test_too_little_text_and_a_missing_folder_are_one_line_errors(tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.txt").write_text("hello world")
    with pytest.raises(DataError, match="fewer than one window"):
        text.load_corpus(tmp_path / "small", 16, tmp_path / "cache")
    with pytest.raises(DataError, match="does not exist"):
        text.load_corpus(tmp_path / "nope", 16, tmp_path / "cache")


def test_windows_follow_from_seed_and_epoch():
    a = text.epoch_starts(1, 2, 1000, 17, 100, 32)
    b = text.epoch_starts(1, 2, 1000, 17, 100, 32)
    c = text.epoch_starts(1, 3, 1000, 17, 100, 32)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    starts, w = a
    assert starts.shape == w.shape == (4, 32) and w.sum() == 100
    assert starts.min() >= 0 and starts.max() <= 1000 - 17


def test_window_fetch_cuts_the_windows_on_the_device():
    tokens = jnp.arange(50, dtype=jnp.uint8)
    batch, w = jax.jit(text.window_fetch(5))(tokens, jnp.array([0, 7, 45]), jnp.ones(3))
    np.testing.assert_array_equal(batch["tokens"], [[0, 1, 2, 3, 4], [7, 8, 9, 10, 11], [45, 46, 47, 48, 49]])
    assert batch["tokens"].dtype == jnp.int32
    assert text.window_fetch(5) is text.window_fetch(5)  # one fetch per length: compiled programs shared


class FixedLogits:
    def __init__(self, logits):
        self.logits = logits

    def __call__(self, x):
        return jnp.broadcast_to(self.logits, (*x.shape, self.logits.shape[-1]))


def test_next_token_loss_is_the_hand_computed_cross_entropy():
    # vocabulary 3, logits (1, 2, 0) at every position; batch [[0, 1, 2]]: targets 1 then 2
    loss, m = jax.jit(lambda b: tasks.next_token(FixedLogits(jnp.array([1.0, 2.0, 0.0])), b))(
        {"tokens": jnp.array([[0, 1, 2]])})
    log_z = math.log(math.e + math.e ** 2 + 1)
    want = ((log_z - 2.0) + (log_z - 0.0)) / 2
    np.testing.assert_allclose(loss, [want], rtol=1e-6)
    np.testing.assert_allclose(m["bits_per_byte"], [want / math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(m["token_accuracy"], [0.5])  # argmax 1: right once


def tiny(context=8, **kw):
    return models.transformer(256, context, d_model=16, layers=2, heads=2, **kw)


def test_the_transformer_is_causal():
    model = tiny()
    model.eval()
    x = np.random.default_rng(0).integers(0, 256, (2, 8)).astype(np.int32)
    y = x.copy()
    y[:, 5] = (y[:, 5] + 1) % 256
    from flax import nnx

    run = nnx.jit(lambda m, t: m(t))
    a, b = run(model, jnp.asarray(x)), run(model, jnp.asarray(y))
    assert a.shape == (2, 8, 256)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_cpu_attention_matches_dot_product_attention():
    q, k, v = (jnp.asarray(np.random.default_rng(i).normal(size=(2, 6, 2, 4)), jnp.float32) for i in range(3))
    np.testing.assert_allclose(jax.jit(models.causal_attention)(q, k, v),
                               jax.jit(jax.nn.dot_product_attention, static_argnames="is_causal")(
                                   q, k, v, is_causal=True), atol=1e-5)


def test_parameters_carry_logical_axis_names():
    from flax import nnx

    model = tiny()
    names = {tuple(v.get_metadata()["out_sharding"]) for v in jax.tree.leaves(
        nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))}
    assert ("vocab", "embed") in names and ("embed", "heads") in names and ("mlp", "embed") in names


def test_the_transformer_defaults_to_adamw_with_weight_decay():
    cfg = Config(model="transformer", dataset="text")
    assert (cfg.optimizer, cfg.weight_decay) == ("adamw", 0.1)
    assert Config(model="transformer", weight_decay=0.0).weight_decay == 0.0
    assert (Config().optimizer, Config().weight_decay) == ("sgd", 0.0)


@pytest.mark.slow
def test_fit_on_text_learns_and_resumes_bit_identically(tmp_path):
    from lrjax.train import fit

    write_corpus(tmp_path / "c", n_files=4, size=8000)
    corpus = text.load_corpus(tmp_path / "c", 8, tmp_path / "cache", max_windows=256)
    mesh = mesh_lib.make_mesh("auto")
    kw = dict(lr=3e-3, epochs=3, batch_size=32, loss_fn=tasks.next_token, mesh=mesh, progress=None)
    whole = fit(tiny(), optax.adamw, corpus, workdir=tmp_path / "a", **kw)
    assert whole.history[-1]["val_loss"] < whole.history[0]["val_loss"]
    assert "val_bits_per_byte" in whole.history[0]
    fit(tiny(), optax.adamw, corpus, workdir=tmp_path / "b", stop_after=1, **kw)
    resumed = fit(tiny(), optax.adamw, corpus, workdir=tmp_path / "b", **kw)
    for a, b in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("member_loop", ["vmap", "map"])
def test_a_sweep_on_text_equals_fit_at_each_rate(tmp_path, member_loop):
    from lrjax.sweeps import sweep
    from lrjax.train import fit

    write_corpus(tmp_path / "c", n_files=3, size=4000)
    corpus = text.load_corpus(tmp_path / "c", 8, tmp_path / "cache", max_windows=96)
    lrs, kw = [1e-3, 1e-2], dict(epochs=2, batch_size=32, loss_fn=tasks.next_token)
    r = sweep(lambda s: tiny(seed=s), optax.adamw, corpus, lrs, seeds=[5], member_loop=member_loop, **kw)
    assert r.rank_by == "val_loss" and r.train_loss.shape == (2, 1, 2) and not r.diverged.any()
    for j, lr in enumerate(lrs):
        f = fit(tiny(seed=5), optax.adamw, corpus, lr=lr, seed=5, progress=None, **kw)
        for name in ("loss", "val_loss", "val_bits_per_byte", "val_token_accuracy"):
            np.testing.assert_allclose(r.metrics[name][:, 0, j], [h[name] for h in f.history], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lrjax_sweep_on_text_ranks_by_validation_loss(tmp_path, capsys, monkeypatch):
    import json

    from lrjax import cli

    monkeypatch.setenv("LRJAX_CACHE_DIR", str(tmp_path / "cache"))
    write_corpus(tmp_path / "c", n_files=3, size=3000)
    assert cli.main(["sweep", "--dataset", "text", "--model", "transformer", "--data-dir", str(tmp_path / "c"),
                     "--context", "8", "--d-model", "16", "--layers", "1", "--heads", "2", "--lrs", "1e-4,1e-2",
                     "--num-lrs", "2", "--epochs", "1", "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "best val_loss" in out
    j = json.loads((tmp_path / "w" / "sweep.json").read_text())
    assert j["rank_by"] == "val_loss" and j["best_lr"] == pytest.approx(1e-2)  # 1e-4 barely moves in one epoch
    assert "val_bits_per_byte" in j["members"][0]


def streamed(corpus):
    import copy

    out = copy.copy(corpus)
    out.input = "stream"
    return out


@pytest.mark.slow
def test_a_streamed_corpus_trains_as_the_resident_one_and_resumes(tmp_path):
    from lrjax.train import fit

    write_corpus(tmp_path / "c", n_files=3, size=4000)
    corpus = text.load_corpus(tmp_path / "c", 8, tmp_path / "cache", max_windows=80)  # 3 steps, the last padded
    kw = dict(lr=3e-3, epochs=3, batch_size=32, loss_fn=tasks.next_token, progress=None, stream_chunk_steps=2)
    resident = fit(tiny(), optax.adamw, corpus, **kw)
    stream = fit(tiny(), optax.adamw, streamed(corpus), workdir=tmp_path / "a", **kw)
    for name in ("loss", "token_accuracy", "val_loss", "val_bits_per_byte"):
        np.testing.assert_allclose([h[name] for h in stream.history], [h[name] for h in resident.history],
                                   rtol=1e-5, err_msg=name)
    fit(tiny(), optax.adamw, streamed(corpus), workdir=tmp_path / "b", stop_after=1, **kw)
    resumed = fit(tiny(), optax.adamw, streamed(corpus), workdir=tmp_path / "b", **kw)
    assert resumed.resumed_from is not None and resumed.epochs_run == 3
    for a, b in zip(jax.tree.leaves(stream.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_streamed_range_test_equals_the_resident_one(tmp_path):
    from lrjax.range_test import find_lr

    write_corpus(tmp_path / "c", n_files=3, size=4000)
    corpus = text.load_corpus(tmp_path / "c", 8, tmp_path / "cache")
    kw = dict(batch_size=16, start_lr=1e-4, end_lr=1.0, num_steps=40, chunk_steps=16, loss_fn=tasks.next_token)
    a = find_lr(tiny(), optax.adamw, corpus, **kw)
    b = find_lr(tiny(), optax.adamw, streamed(corpus), **kw)
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-5)
    assert b.suggestion == pytest.approx(a.suggestion, rel=1e-6)


@pytest.mark.slow
def test_a_streamed_sweep_equals_the_resident_one(tmp_path):
    from lrjax.sweeps import sweep

    write_corpus(tmp_path / "c", n_files=3, size=4000)
    corpus = text.load_corpus(tmp_path / "c", 8, tmp_path / "cache", max_windows=80)  # 3 steps, the last padded
    kw = dict(epochs=2, batch_size=32, loss_fn=tasks.next_token, seeds=[5], chunk_steps=2)
    a = sweep(lambda s: tiny(seed=s), optax.adamw, corpus, [1e-3, 1e-2], **kw)
    b = sweep(lambda s: tiny(seed=s), optax.adamw, streamed(corpus), [1e-3, 1e-2], **kw)
    for name in ("loss", "val_loss", "val_bits_per_byte"):
        np.testing.assert_allclose(b.metrics[name], a.metrics[name], rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_text_range_test_seeds_together_equal_separate_runs(tmp_path):
    from lrjax.range_test import find_lr

    write_corpus(tmp_path / "c", n_files=3, size=4000)
    corpus = text.load_corpus(tmp_path / "c", 8, tmp_path / "cache")
    kw = dict(batch_size=16, start_lr=1e-4, end_lr=0.1, num_steps=30, chunk_steps=16, loss_fn=tasks.next_token,
              method="valley")
    together = find_lr(tiny(), optax.adamw, corpus, num_seeds=2, seed=3, init_fn=lambda s: tiny(seed=s), **kw)
    for s in range(2):
        alone = find_lr(tiny(seed=3 + s), optax.adamw, corpus, seed=3 + s, **kw)
        np.testing.assert_allclose(together.per_seed_losses[s], alone.losses, rtol=2e-4, atol=2e-5)
    assert not np.allclose(together.per_seed_losses[0], together.per_seed_losses[1], rtol=1e-3)  # own windows


def test_input_auto_keeps_a_small_corpus_resident_and_stream_streams_it(tmp_path, capsys):
    from lrjax import workflow

    write_corpus(tmp_path / "c", n_files=3, size=4000)
    cfg = dict(dataset="text", model="transformer", data_dir=str(tmp_path / "c"), context=8,
               cache_dir=str(tmp_path / "cache"))
    assert workflow.load(Config(**cfg)).input == "resident"
    assert "input: resident" in capsys.readouterr().out
    assert workflow.load(Config(**cfg, input="auto", device_memory_budget="1KB")).input == "stream"
    corpus = workflow.load(Config(**cfg, input="stream"))
    assert corpus.input == "stream" and "--input stream" in capsys.readouterr().out
    inp = corpus.input_for("fit", batch_size=4, mesh=mesh_lib.make_mesh("auto"))
    assert isinstance(inp, text.TextStreamInput) and inp.kind == "stream"
    with pytest.raises(Exception, match="--input resident"):  # a streamed sweep: every rate on one seed's windows
        corpus.input_for("sweep", batch_size=4, mesh=mesh_lib.make_mesh("auto")).sweep_feed([1, 2], 4)
