"""Orbax checkpoints: latest-N plus best preservation, bitwise restore, plain-Orbax readability, fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lrjax.checkpoint import Checkpointer
from lrjax.errors import CheckpointError

VAL_LOSS = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.4, 5: 0.6}  # best at step 2, latest 4 and 5


def make_tree(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "params": {"kernel": jnp.asarray(rng.normal(size=(5, 3)).astype(np.float32)),
                   "bias": jnp.asarray(rng.normal(size=(3,)).astype(np.float32))},
        "half": jnp.asarray(rng.normal(size=(4,)), dtype=jnp.bfloat16),
        "count": jnp.asarray(rng.integers(0, 1000, (2, 2)), dtype=jnp.int32),
        "step": jnp.asarray(step * 10, dtype=jnp.int32),
        "tiny": jnp.asarray([np.float32(1e-40), np.float32(-0.0)]),  # subnormal and negative zero
    }


def make_meta(step: int) -> dict:
    return {"epoch": step, "history": [{"epoch": e, "val_loss": VAL_LOSS[e]} for e in range(1, step + 1)],
            "early_stopping": {"best": 0.3, "wait": 0, "best_epoch": 2, "stopped_epoch": None},
            "run_name": "run_x", "note": "äö"}


def bits(tree) -> list[tuple]:
    return [(str(a.dtype), a.shape, np.asarray(a).tobytes()) for a in jax.tree.leaves(tree)]


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert bits(a) == bits(b)


@pytest.fixture
def five_steps(tmp_path) -> Path:
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, keep_latest=2)
    for step in range(1, 6):
        ckpt.save(step, make_tree(step), make_meta(step), {"val_loss": VAL_LOSS[step], "loss": 1.0})
    ckpt.close()
    return directory


def step_dirs(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.is_dir()}


def test_keeps_latest_and_best(five_steps):
    assert step_dirs(five_steps) == {"2", "4", "5"}
    ckpt = Checkpointer(five_steps, keep_latest=2)
    try:
        assert ckpt.all_steps() == [2, 4, 5]
        assert ckpt.latest_step() == 5
        assert ckpt.best_step() == 2
    finally:
        ckpt.close()


def test_best_by_max_metric(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_latest=1, best_metric="val_accuracy", mode="max")
    for step, acc in enumerate([0.5, 0.9, 0.7, 0.6], start=1):
        ckpt.save(step, make_tree(step), make_meta(1), {"val_accuracy": acc})
    ckpt.close()
    assert step_dirs(tmp_path) == {"2", "4"}


def test_non_finite_metric_is_never_best(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_latest=1)
    for step, loss in enumerate([0.5, float("nan"), float("inf"), 0.9], start=1):
        ckpt.save(step, make_tree(step), make_meta(1), {"val_loss": loss})
    ckpt.close()
    assert step_dirs(tmp_path) == {"1", "4"}


def test_restore_is_bitwise_identical(five_steps, capsys):
    ckpt = Checkpointer(five_steps, keep_latest=2)
    try:
        step, tree, meta = ckpt.restore(make_tree(0))  # default: the newest
        assert step == 5
        assert_bitwise_equal(tree, make_tree(5))
        assert meta == make_meta(5)
        for s in (2, 4):
            step, tree, meta = ckpt.restore(make_tree(0), step=s)
            assert step == s
            assert_bitwise_equal(tree, make_tree(s))
            assert meta == make_meta(s)
    finally:
        ckpt.close()
    assert "unreadable" not in capsys.readouterr().err


def test_plain_orbax_restores_without_lrjax(five_steps):
    """What the README documents: reading an lrjax checkpoint with Orbax alone."""
    # 1. The manager, with explicit args (no warnings; works for any step)
    with ocp.CheckpointManager(five_steps) as mngr:
        assert mngr.all_steps() == [2, 4, 5]
        step = mngr.latest_step()
        ckpt = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                          meta=ocp.args.JsonRestore()))
    assert step == 5
    assert_bitwise_equal(dict(ckpt["state"]), make_tree(5))
    assert ckpt["meta"] == make_meta(5)

    # 2. The manager without args: Orbax infers the items from the saved metadata (logs warnings);
    #    `metrics` is the per-epoch metrics dict the manager ranks checkpoints by
    restored = ocp.CheckpointManager(five_steps).restore(2)
    assert set(restored.keys()) == {"state", "meta", "metrics"}
    assert_bitwise_equal(dict(restored["state"]), make_tree(2))
    assert restored["meta"]["epoch"] == 2
    assert restored["metrics"] == {"val_loss": VAL_LOSS[2], "loss": 1.0}

    # 3. Just the arrays of one step, and the meta as a plain JSON file
    state = ocp.StandardCheckpointer().restore(five_steps / "4" / "state")
    assert_bitwise_equal(state, make_tree(4))
    assert json.loads((five_steps / "4" / "meta" / "metadata").read_text()) == make_meta(4)


def _delete_array_data(step_dir: Path) -> None:
    state = step_dir / "state"
    shutil.rmtree(state / "d")
    shutil.rmtree(state / "ocdbt.process_0")


def _truncate_all_files(step_dir: Path) -> None:
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


def _delete_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").unlink()


def _delete_array_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()  # Orbax then knows no shapes: damaged, not another model


# Orbax's asyncio helpers may report 'Event loop is closed' from a thread after a failed read: noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_delete_array_data, _truncate_all_files, _delete_meta, _delete_array_metadata])
def test_corrupted_latest_falls_back_to_older(five_steps, capfd, damage):
    damage(five_steps / "5")
    ckpt = Checkpointer(five_steps, keep_latest=2)
    try:
        step, tree, meta = ckpt.restore(make_tree(0))
        assert step == 4
        assert_bitwise_equal(tree, make_tree(4))
        assert meta == make_meta(4)
        assert ckpt.all_steps() == [2, 4]
    finally:
        ckpt.close()
    err = capfd.readouterr().err
    assert f"checkpoint {five_steps / '5'} is unreadable" in err
    assert f"resuming from checkpoint {five_steps / '4'} instead" in err
    # moved aside, not deleted: the files are still there for inspection
    assert step_dirs(five_steps) == {"2", "4", "unreadable-5"}
    assert (five_steps / "unreadable-5" / "state").is_dir()
    # a later save of the same step number does not collide with the moved-aside folder
    ckpt = Checkpointer(five_steps, keep_latest=2)
    try:
        ckpt.save(5, make_tree(5), make_meta(5), {"val_loss": VAL_LOSS[5]})
        ckpt.wait()
        assert ckpt.restore(make_tree(0))[0] == 5
    finally:
        ckpt.close()


def test_explicit_unreadable_step_raises_without_moving(five_steps):
    _delete_meta(five_steps / "5")
    ckpt = Checkpointer(five_steps, keep_latest=2)
    try:
        with pytest.raises(CheckpointError, match=str(five_steps)):
            ckpt.restore(make_tree(0), step=5)
    finally:
        ckpt.close()
    assert (five_steps / "5").is_dir()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_checkpoint_raises_naming_the_directory(five_steps, capfd):
    for s in ("2", "4", "5"):
        _delete_meta(five_steps / s)
    ckpt = Checkpointer(five_steps, keep_latest=2)
    try:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(make_tree(0))
    finally:
        ckpt.close()
    message = str(info.value)
    assert str(five_steps) in message and "[5, 4, 2]" in message
    assert step_dirs(five_steps) == {"unreadable-2", "unreadable-4", "unreadable-5"}
    assert capfd.readouterr().err.count("is unreadable") == 3


def test_restore_with_wrong_structure_fails_clearly(five_steps):
    ckpt = Checkpointer(five_steps, keep_latest=2)
    try:
        with pytest.raises(CheckpointError, match=str(five_steps)):
            ckpt.restore({"params": make_tree(0)["params"]}, step=5)
    finally:
        ckpt.close()


def test_best_survives_a_reopened_manager(five_steps):
    """A resumed run (new manager over the same folder) must still keep the best checkpoint: the
    metrics are persisted with each step, not only held in memory."""
    ckpt = Checkpointer(five_steps, keep_latest=2)
    try:
        assert ckpt.best_step() == 2
        ckpt.save(6, make_tree(6), make_meta(5), {"val_loss": 0.7})
        ckpt.save(7, make_tree(7), make_meta(5), {"val_loss": 0.1})
        ckpt.wait()
        assert ckpt.best_step() == 7
    finally:
        ckpt.close()
    assert step_dirs(five_steps) == {"6", "7"}
    ckpt = Checkpointer(five_steps, keep_latest=3)
    try:
        ckpt.save(8, make_tree(8), make_meta(5), {"val_loss": 0.8})
        ckpt.save(9, make_tree(9), make_meta(5), {"val_loss": 0.9})
        ckpt.save(10, make_tree(10), make_meta(5), {"val_loss": 1.0})
    finally:
        ckpt.close()
    assert step_dirs(five_steps) == {"7", "8", "9", "10"}


def test_a_different_model_is_refused_not_moved_aside(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep_latest=2)
    ckpt.save(1, {"w": jnp.ones((3, 2))}, {"epoch": 1}, {"val_loss": 1.0})
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "ck", keep_latest=2)
    with pytest.raises(CheckpointError, match="different model"):
        ckpt.restore({"w": jnp.ones((3, 2)), "b": jnp.zeros(2)})
    ckpt.close()
    assert (tmp_path / "ck" / "1").is_dir() and not list((tmp_path / "ck").glob("unreadable-*"))
