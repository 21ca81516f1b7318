"""Tests of the streamed input path: lrjax.sources (splits as the resident path's, bad files),
lrjax.stream (the Grain pipeline: epochs, padding, resume, sharding, device staging) and lrjax.memory
(the resident-or-stream decision), on tiny generated data and a tiny TFDS ArrayRecord preparation."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from lrjax import memory, sources, stream
from lrjax.data import from_arrays
from lrjax.errors import CheckpointError, ConfigError, DataError
from lrjax.idx import FILES, read_idx_folder, write_idx_gz
from lrjax.memory import choose_input, parse_size
from lrjax.sources import array_splits, tfds_splits
from lrjax.stream import Stream, eval_stream


def numbered(n: int, size: int = 6) -> np.ndarray:
    """uint8 images whose first two pixels spell their index, so a batch says which examples it holds."""
    images = np.random.default_rng(n).integers(0, 256, (n, size, size), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return images


def ids(x: np.ndarray) -> np.ndarray:
    return x[..., 0, 0, 0].astype(np.int64) + 256 * x[..., 0, 1, 0].astype(np.int64)


def make_splits():
    """110 train examples (10 held out for validation: 100 left) and 30 test ones, numbered."""
    return array_splits(numbered(110), np.arange(110) % 7, numbered(30), np.arange(30) % 7, valid_size=10)


@pytest.fixture
def splits():
    return make_splits()


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """An MNIST-format IDX folder (120 train, 30 test) and its TFDS ArrayRecord preparation."""
    from lrjax.tfds_source import load_tfds_arrays

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    (root / "idx").mkdir()
    for split, n in (("train", 120), ("test", 30)):
        write_idx_gz(root / "idx" / FILES[f"{split}_images"], rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx_gz(root / "idx" / FILES[f"{split}_labels"], rng.integers(0, 10, n, dtype=np.uint8))
    load_tfds_arrays("mnist", str(root / "tfds"), idx_dir=root / "idx", progress=False)
    return root


def read_all(split):
    return split.read(np.arange(len(split)))


def collect(s: Stream) -> dict[str, np.ndarray]:
    chunks = list(s)
    return {k: np.stack([c[k] for c in chunks]) for k in chunks[0]}


# --- splits: the same examples as the resident path -------------------------------------------

def test_tfds_splits_hold_the_resident_paths_examples(tiny_tfds):
    ref = from_arrays("mnist", **{k: v for k, v in zip(
        ("train_images", "train_labels", "test_images", "test_labels"),
        (read_idx_folder(tiny_tfds / "idx", "mnist")[k] for k in FILES))}, valid_size=20)
    sp = tfds_splits("mnist", tiny_tfds / "tfds", valid_size=20)
    for name in ("train", "valid", "test"):
        x, y = read_all(getattr(sp, name))
        assert x.dtype == np.uint8 and x.shape[1:] == (28, 28, 1) and y.dtype == np.int32
        np.testing.assert_array_equal(np.asarray(stream.to_float(x)), getattr(ref, f"x_{name}"))  # bit-identical
        np.testing.assert_array_equal(y, getattr(ref, f"y_{name}"))


def test_array_splits_match_from_arrays(splits):
    ref = from_arrays("a", numbered(110), np.arange(110) % 7, numbered(30), np.arange(30) % 7, valid_size=10)
    for name in ("train", "valid", "test"):
        x, y = read_all(getattr(splits, name))
        np.testing.assert_array_equal(np.asarray(stream.to_float(x)), getattr(ref, f"x_{name}"))
        np.testing.assert_array_equal(y, getattr(ref, f"y_{name}"))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_to_float_runs_on_a_sharded_chunk_in_a_compiled_scan(splits, axis_type):
    mesh = jax.make_mesh((1,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    chunk = next(Stream(splits.train, 16, chunk_steps=3, epochs=1, workers=0))
    staged = stream.to_device(chunk, stream.chunk_sharding(mesh))
    scan = jax.jit(lambda x: jax.lax.scan(lambda c, xi: (c, stream.to_float(xi)), 0, x)[1])
    np.testing.assert_array_equal(np.asarray(scan(staged["x"])), chunk["x"].astype(np.float32) / np.float32(255))


def test_a_memmap_travels_to_workers_as_its_file_name(tmp_path):
    images = numbered(3000, size=28)
    path = tmp_path / "images.npy"
    np.save(path, images)
    mm = np.load(path, mmap_mode="r")
    examples = sources.ArrayExamples(mm, np.arange(3000))
    blob = pickle.dumps(examples)
    assert len(blob) < 30_000 < images.nbytes  # the labels (24 kB), not the 2.4 MB of pixels
    again = pickle.loads(blob)
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again.read(np.array([2999, 5]))[0][..., 0], images[[2999, 5]])
    view = pickle.loads(pickle.dumps(sources.ArrayExamples(mm[1000:2000], np.arange(1000))))  # a slice
    np.testing.assert_array_equal(view.read(np.array([0, 999]))[0][..., 0], images[[1000, 1999]])


# --- epochs, shuffling, padding --------------------------------------------------------------

def test_each_epoch_covers_every_example_once_in_a_fresh_reproducible_order(splits):
    s = Stream(splits.train, 32, chunk_steps=3, seed=4, epochs=3, workers=0)
    out = collect(s)
    assert s.steps_per_epoch == 4  # 100 examples: 3 full batches and one of 4 (+28 padding rows)
    x, w, active = ids(out["x"]), out["w"], out["active"]
    assert out["x"].shape == (6, 3, 32, 6, 6, 1) and out["y"].dtype == np.int32 and w.dtype == np.float32
    assert active.tolist() == [[True] * 3, [True, False, False]] * 3  # chunks stop at the epoch's end
    assert out["steps"][active].tolist() == list(range(12))
    orders = []
    for epoch in range(3):
        steps = x[2 * epoch:2 * epoch + 2][active[2 * epoch:2 * epoch + 2]]  # (4, 32)
        weights = w[2 * epoch:2 * epoch + 2][active[2 * epoch:2 * epoch + 2]]
        flat, fw = steps.reshape(-1), weights.reshape(-1)
        assert sorted(flat[fw == 1]) == list(range(10, 110))  # every training example once, at weight 1
        assert (fw[100:] == 0).all() and (fw[:100] == 1).all()
        np.testing.assert_array_equal(flat[100:], flat[:28])  # padding: the epoch's first examples
        orders.append(flat[:100])
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert (w[~active] == 0).all() and (out["x"][~active] == 0).all()
    again = collect(Stream(splits.train, 32, chunk_steps=3, seed=4, epochs=3, workers=0))
    for key in out:
        np.testing.assert_array_equal(again[key], out[key])
    other = collect(Stream(splits.train, 32, chunk_steps=3, seed=5, epochs=3, workers=0))
    assert not np.array_equal(ids(other["x"]), x)


def test_steps_run_on_across_epochs_when_not_epoch_aligned(splits):
    out = collect(Stream(splits.train, 32, chunk_steps=3, seed=4, steps=10, epoch_aligned=False, workers=0))
    assert out["steps"].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, -1, -1]]
    aligned = collect(Stream(splits.train, 32, chunk_steps=3, seed=4, epochs=3, workers=0))
    # The same batches, only chunked differently.
    np.testing.assert_array_equal(out["x"][out["active"]], aligned["x"][aligned["active"]][:10])


def test_eval_stream_is_one_ordered_pass_with_padding_at_weight_zero(splits):
    out = collect(eval_stream(splits.valid, 4, chunk_steps=2, workers=0))  # 10 examples: 3 batches
    assert out["active"].tolist() == [[True, True], [True, False]]
    x, w = ids(out["x"][out["active"]]).reshape(-1), out["w"][out["active"]].reshape(-1)
    assert x[:10].tolist() == list(range(10)) and w.tolist() == [1] * 10 + [0, 0]


def test_a_random_transform_is_reproducible_and_resumable(splits):
    def flip(example, rng):
        image = example["image"][:, ::-1] if rng.random() < 0.5 else example["image"]
        return {"image": image, "label": example["label"]}

    run = lambda: collect(Stream(splits.train, 32, chunk_steps=2, seed=1, epochs=1, transform=flip, workers=0))  # noqa: E731
    a, b = run(), run()
    np.testing.assert_array_equal(a["x"], b["x"])
    plain = collect(Stream(splits.train, 32, chunk_steps=2, seed=1, epochs=1, workers=0))
    flipped = (a["x"] != plain["x"]).any(axis=(2, 3, 4, 5))[a["active"]]
    assert flipped.all()  # each batch of 32 holds some flipped example


# --- exact resume ----------------------------------------------------------------------------

def test_resume_mid_epoch_from_saved_state_yields_the_same_chunks(splits):
    kw = dict(chunk_steps=2, seed=3, epochs=3, workers=0)
    whole = collect(Stream(splits.train, 16, **kw))  # 7 steps an epoch: 4 chunks an epoch
    first = Stream(splits.train, 16, **kw)
    for _ in range(5):
        next(first)
    saved = json.loads(json.dumps(first.state()))  # JSON-serialisable
    first.close()
    resumed = Stream(splits.train, 16, **kw)
    resumed.restore(saved)
    rest = collect(resumed)
    for key in whole:
        np.testing.assert_array_equal(rest[key], whole[key][5:])
    via_bytes = Stream(splits.train, 16, **kw)
    via_bytes.set_state(first.get_state())
    np.testing.assert_array_equal(next(via_bytes)["x"], whole["x"][5])


def test_restore_refuses_a_state_from_another_configuration(splits):
    s = Stream(splits.train, 16, chunk_steps=2, seed=3, epochs=3, workers=0)
    next(s)
    state = s.state()
    with pytest.raises(CheckpointError, match="batch_size 16 -> 32"):
        Stream(splits.train, 32, chunk_steps=2, seed=3, epochs=3, workers=0).restore(state)
    with pytest.raises(CheckpointError, match="not one this lrjax writes"):
        s.restore({"chunks": 1})


def test_orbax_saves_and_restores_the_stream_through_grains_handler(splits, tmp_path):
    import orbax.checkpoint as ocp

    kw = dict(chunk_steps=2, seed=3, epochs=2, workers=0)
    whole = collect(Stream(splits.train, 16, **kw))
    handlers = {"data": grain.checkpoint.CheckpointHandler()}
    s = Stream(splits.train, 16, **kw)
    for _ in range(3):
        next(s)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(s)))
        manager.wait_until_finished()
    resumed = Stream(splits.train, 16, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers=handlers) as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    np.testing.assert_array_equal(collect(resumed)["x"], whole["x"][3:])
    assert (tmp_path / "ckpt" / "3" / "data" / "process_0-of-1.json").exists()  # one file per process


# --- several processes: each reads its rows of every global batch ----------------------------

def test_two_shards_cover_each_global_batch_exactly_once(splits):
    kw = dict(chunk_steps=3, seed=2, epochs=2, workers=0)
    whole = collect(Stream(splits.train, 32, **kw))
    parts = [collect(Stream(splits.train, 32, shard=grain.sharding.ShardOptions(i, 2), **kw)) for i in range(2)]
    assert parts[0]["x"].shape[2] == 16
    for key in ("x", "y", "w"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=2), whole[key])
    for key in ("active", "steps"):
        np.testing.assert_array_equal(parts[1][key], whole[key])
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        Stream(splits.train, 32, shard=grain.sharding.ShardOptions(0, 3))


@pytest.mark.slow
def test_two_processes_assemble_the_global_batches_of_one(tmp_path):
    # ~10 s: two JAX processes on the loopback interface (as tests/test_scale.py), each streaming its rows.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", "XLA_FLAGS": ""}
    worker = Path(__file__).with_name("stream_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), f"127.0.0.1:{port}", "2", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    result = json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert result["processes"] == 2 and set(result["local_rows"]) == {16}  # each read half of each batch
    single = list(Stream(make_splits().train, 32, chunk_steps=3, seed=2, epochs=1, workers=0))
    assert len(result["chunks"]) == len(single)
    for got, want in zip(result["chunks"], single):
        assert got["ids"] == ids(want["x"]).tolist()
        for key in ("y", "w", "active", "steps"):
            assert got[key] == want[key].tolist()


def test_to_device_and_device_prefetch_give_the_chunks_and_the_consumed_state(splits):
    mesh = jax.make_mesh((1,), ("data",))
    sharding = stream.chunk_sharding(mesh)
    kw = dict(chunk_steps=2, seed=3, epochs=2, workers=0)
    whole = collect(Stream(splits.train, 16, **kw))
    prefetch = stream.DevicePrefetch(Stream(splits.train, 16, **kw), sharding, size=2)
    first = next(prefetch)
    assert isinstance(first["x"], jax.Array) and first["x"].sharding.is_equivalent_to(sharding, 5)
    np.testing.assert_array_equal(np.asarray(first["x"]), whole["x"][0])
    second = next(prefetch)
    state = prefetch.state()
    assert state["chunks"] == 2  # what was consumed, not what the thread staged ahead
    rest = [np.asarray(c["w"]) for c in prefetch]
    np.testing.assert_array_equal(np.asarray(second["y"]), whole["y"][1])
    np.testing.assert_array_equal(np.stack(rest), whole["w"][2:])
    prefetch.restore(state)
    np.testing.assert_array_equal(np.asarray(next(prefetch)["x"]), whole["x"][2])
    prefetch.close()  # the thread had staged chunks 3 and 4 ahead: the stream goes on at 3 regardless
    np.testing.assert_array_equal(next(prefetch.stream)["x"], whole["x"][3])


def test_an_error_in_the_reader_reaches_the_consumer_of_the_prefetch(splits):
    def broken(example, rng):
        return {"image": example["image"][:3], "label": example["label"]}

    mesh = jax.make_mesh((1,), ("data",))
    s = Stream(splits.train, 16, epochs=1, transform=broken, workers=0)
    with pytest.raises(DataError, match="transform must return uint8 images of shape"):
        next(stream.DevicePrefetch(s, stream.chunk_sharding(mesh)))


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, message", [
    ("missing", "shard .*mnist-train.array_record-00000-of-00001 is missing"),
    ("truncated", "is damaged"),
    ("garbage", "is damaged"),
])
def test_a_missing_or_corrupt_shard_is_one_data_error(tiny_tfds, tmp_path, damage, message):
    data_dir = tmp_path / "tfds"
    shutil.copytree(tiny_tfds / "tfds", data_dir)
    shard = next(data_dir.glob("mnist/*/mnist-train.array_record-*"))
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:5000])
    else:
        shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))
    with pytest.raises(DataError, match=message) as e:
        tfds_splits("mnist", data_dir, valid_size=20)
    assert "\n" not in str(e.value)


def test_damage_inside_a_shard_is_a_data_error_when_read(tiny_tfds, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(tiny_tfds / "tfds", data_dir)
    shard = next(data_dir.glob("mnist/*/mnist-train.array_record-*"))
    blob = bytearray(shard.read_bytes())
    blob[20000:20200] = b"\xff" * 200  # a record chunk, not the footer: opening still works
    shard.write_bytes(bytes(blob))
    sp = tfds_splits("mnist", data_dir, valid_size=20)
    with pytest.raises(DataError, match="cannot read train records .*hash mismatch"):
        collect(Stream(sp.train, 20, epochs=1, workers=0))


def test_an_unprepared_or_unknown_dataset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not prepared as array_record"):
        tfds_splits("mnist", tmp_path / "nothing")
    with pytest.raises(DataError, match="unknown TFDS dataset 'no_such_set_xyz'"):
        tfds_splits("no_such_set_xyz", tmp_path / "nothing")


def test_a_source_shorter_than_one_batch_is_a_data_error(splits):
    with pytest.raises(DataError, match="the valid split has 10 examples, fewer than one batch of 32"):
        eval_stream(splits.valid, 32)


def test_examples_of_inconsistent_shape_are_a_data_error(tiny_tfds, monkeypatch):
    with pytest.raises(DataError, match="6 images but 5 labels"):
        array_splits(numbered(6), np.arange(5), numbered(3), np.arange(3), valid_size=1)
    with pytest.raises(DataError, match="must be uint8"):
        array_splits(numbered(6).astype(np.float32), np.arange(6), numbered(3), np.arange(3), valid_size=1)
    with pytest.raises(DataError, match=r"train images are \(6, 6, 1\), test images \(5, 5, 1\)"):
        array_splits(numbered(6), np.arange(6), numbered(3, size=5), np.arange(3), valid_size=1)
    # A record whose PNG holds another size than the dataset's features declare.
    from PIL import Image
    from tensorflow_datasets.proto import tf_example_pb2

    sp = tfds_splits("mnist", tiny_tfds / "tfds", valid_size=20)
    png = io.BytesIO()
    Image.fromarray(np.zeros((27, 28), np.uint8)).save(png, format="PNG")
    odd = tf_example_pb2.Example()
    odd.features.feature["image"].bytes_list.value.append(png.getvalue())
    odd.features.feature["label"].int64_list.value.append(3)
    source = sp.train.examples.source
    real = source.__getitems__
    monkeypatch.setattr(source, "__getitems__", lambda keys: [
        odd.SerializeToString() if k == keys[3] else r for k, r in zip(keys, real(keys))])
    with pytest.raises(DataError, match=r"record \d+: image of shape \(27, 28\) \(uint8\), the others are \(28, 28, 1\)"):
        sp.train.read(np.arange(8))
    monkeypatch.setattr(source, "__getitems__", lambda keys: [b"not an example"] * len(keys))
    with pytest.raises(DataError, match="not an example with an encoded image and a label"):
        sp.train.read(np.arange(8))


# --- resident or streamed -----------------------------------------------------------------------

def test_parse_size():
    assert parse_size("20MB") == 20_000_000
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("100") == parse_size("100B") == 100 and parse_size("2kb") == 2000 and parse_size("3KiB") == 3072
    for bad in ("", "MB", "20 parsecs", "-5MB", "1e3MB", "20M B"):
        with pytest.raises(ConfigError, match="not a number with a unit"):
            parse_size(bad)


def test_choose_input():
    mode, reason = choose_input("auto", 188_000_000, parse_size("20MB"))
    assert mode == "stream" and "stream" in reason and "188.0 MB" in reason and "20.0 MB" in reason
    mode, reason = choose_input("auto", 188_000_000, parse_size("4GB"))
    assert mode == "resident" and "stream" not in reason and "fit" in reason
    assert choose_input("resident", 10**12, 1)[0] == "resident"
    mode, reason = choose_input("stream", 1, 10**12)
    assert mode == "stream" and "stream" in reason
    with pytest.raises(ConfigError, match="choose resident, stream or auto"):
        choose_input("sometimes", 1, 1)


def test_default_budget_and_resident_size(splits):
    budget = memory.default_budget()
    assert 0 < budget <= memory.host_memory() / 2
    # 140 examples of 6x6x1 float32 pixels and an int32 label.
    assert memory.resident_nbytes(splits) == 140 * (36 * 4 + 4)


def test_an_endless_eval_stream_serves_one_pass_per_epoch_call(splits):
    valid = eval_stream(splits.valid, 4, chunk_steps=2, epochs=None, workers=0)
    def one_pass():
        chunks = list(valid.epoch())
        x = np.concatenate([ids(c["x"])[c["active"]].reshape(-1) for c in chunks])
        w = np.concatenate([c["w"][c["active"]].reshape(-1) for c in chunks])
        return x[w == 1].tolist()

    assert one_pass() == one_pass() == one_pass() == list(range(10))
    next(valid)
    with pytest.raises(ValueError, match="at an epoch's start"):
        next(valid.epoch())


def bad_label_transform(example, rng):
    """Module-level (picklable by reference too); fails on the 7th training example it sees."""
    if example["label"] == 6:
        raise DataError("example with label 6 rejected")
    return example


@pytest.mark.slow
def test_worker_processes_give_the_same_chunks_and_resume_across_worker_counts(splits):
    # ~10 s: spawning worker processes (each imports jax and grain) dominates.
    kw = dict(chunk_steps=2, seed=3, epochs=2)
    whole = collect(Stream(splits.train, 16, workers=0, **kw))
    with Stream(splits.train, 16, workers=1, **kw) as s:
        got = [next(s) for _ in range(3)]
        saved = s.state()
    for i, chunk in enumerate(got):
        np.testing.assert_array_equal(chunk["x"], whole["x"][i])
    with Stream(splits.train, 16, workers=0, **kw) as resumed:  # a state saved with a worker, read without
        resumed.restore(json.loads(json.dumps(saved)))
        np.testing.assert_array_equal(collect(resumed)["x"], whole["x"][3:])
    plain = Stream(splits.train, 16, workers=0, **kw)
    for _ in range(5):
        next(plain)
    with Stream(splits.train, 16, workers=1, **kw) as resumed:  # and the other way round
        resumed.restore(plain.state())
        np.testing.assert_array_equal(collect(resumed)["w"], whole["w"][5:])
    with pytest.raises(DataError, match="label 6 rejected"):
        with Stream(splits.train, 16, workers=1, transform=bad_label_transform, **kw) as failing:
            collect(failing)


def test_default_workers(splits, tiny_tfds):
    assert stream.default_workers(splits.train) == 0  # arrays: one numpy gather a batch, no processes
    assert 1 <= stream.default_workers(tfds_splits("mnist", tiny_tfds / "tfds", valid_size=20).train) <= 4


ORPHAN_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from test_stream import make_splits
from lrjax.stream import Stream
if __name__ == "__main__":
    s = Stream(make_splits().train, 16, chunk_steps=2, epochs=None, workers=2)
    next(s)
    print("ready", flush=True)
    time.sleep(600)
"""


def descendants(pid: int) -> set[int]:
    """Living processes below `pid` (read from /proc: ppid is the 4th field of /proc/PID/stat)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_worker_processes_end_when_their_parent_is_killed(tmp_path):
    # ~10 s: a streamed run's Grain workers (multiprocessing spawn) must not outlive a SIGKILLed parent.
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        workers = descendants(proc.pid)
        assert len(workers) >= 2  # the two Grain workers (and multiprocessing's resource tracker)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in workers if alive(p)]
    for p in left:  # a failing test leaves nothing behind either
        os.kill(p, 9)
    assert not left, f"processes {left} outlived their SIGKILLed parent"
