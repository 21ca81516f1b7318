"""Parameters and optimizer state sharded over the mesh's `fsdp` and `tensor` axes (lrjax.sharding).

The rules are pure functions of names, shapes and axis sizes (tested on abstract meshes, no devices).
The slow tests run subprocesses with simulated CPU devices, as tests/test_scale.py does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from lrjax import models, sharding
from lrjax.errors import ConfigError

WORKER = Path(__file__).with_name("shard_worker.py")


def mesh(**axes):
    return AbstractMesh(tuple(axes.values()), tuple(axes))


def test_rules_table_and_override():
    assert sharding.parse_rules(None) is None and sharding.parse_rules(" ") is None
    rules = dict(sharding.parse_rules("embed=none, mlp=fsdp, experts=tensor"))
    assert rules["embed"] is None and rules["mlp"] == "fsdp" and rules["experts"] == "tensor"
    assert rules["heads"] == "tensor"  # the names not given keep lrjax's rule
    with pytest.raises(ConfigError, match="sharding-rules"):
        sharding.parse_rules("embed=model")


def test_logical_and_default_specs():
    m = mesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_spec(("embed", "mlp"), (256, 1024), m) == P("fsdp", "tensor")
    assert sharding.logical_spec(("embed", "vocab"), (256, 5), m) == P("fsdp", None)  # 2 does not divide 5
    assert sharding.logical_spec(("embed", "vocab"), (255, 10), m) == P(None, "tensor")
    assert sharding.logical_spec(("embed", "mlp"), (256, 1024), m, rules=(("embed", None),)) == P(None, None)
    assert sharding.logical_spec(("embed", "mlp"), (256, 1024), mesh(data=8)) == P(None, None)
    # unannotated: the largest dimension fsdp divides, for parameters of at least LARGE elements
    assert sharding.default_spec((100, 784), mesh(fsdp=8)) == P(None, "fsdp")
    assert sharding.default_spec((784, 100), mesh(fsdp=16)) == P("fsdp", None)
    assert sharding.default_spec((63, 65), mesh(fsdp=8)) == P()
    assert sharding.default_spec((64,), mesh(fsdp=8)) == P()


@pytest.mark.parametrize("build", [lambda: models.mlp(784, (300, 100), 10),
                                   lambda: models.cnn((28, 28, 1), 10),
                                   lambda: models.transformer(256, 64, 64, 2, 4)])
def test_registry_models_are_annotated(build):
    params = nnx.state(build(), nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    for v in leaves:
        names = v.get_metadata().get("out_sharding")
        assert names is not None and len(names) == np.ndim(v.get_value()), v


def run_worker(args, devices: int):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


@pytest.mark.slow
def test_fsdp8_checkpoint_restores_on_4_2_1_devices_and_resumes(tmp_path):
    one = run_worker(["fit", tmp_path / "one", "1", 1], devices=1)
    eight = run_worker(["fit", tmp_path / "run", "fsdp=8", 1], devices=8)
    assert eight["kernel_shape"] == [64, 64] and eight["kernel_spec"] == ["fsdp", None]
    # one epoch on fsdp=8 equals one device within the data-parallel tolerance (tests/test_scale.py)
    np.testing.assert_allclose(eight["history"][0]["val_loss"], one["history"][0]["val_loss"], rtol=1e-4)
    np.testing.assert_allclose(eight["test"]["loss"], one["test"]["loss"], rtol=1e-4)
    assert eight["state_bytes_per_device"] < one["state_bytes_per_device"] / 2
    assert eight["segments"] == [{"mesh_shape": "fsdp=8", "state_bytes_per_device": eight["state_bytes_per_device"],
                                  "first_epoch": 1}]
    for n in (4, 2, 1):  # the same values, sharded for the new mesh (the best copy like the live one)
        back = run_worker(["restore", tmp_path / "run", f"fsdp={n}" if n > 1 else "1"], devices=n)
        assert back["digest"] == eight["digest"], n
        spec = ["fsdp", None] if n > 1 else [None, None]
        assert back["kernel_spec"] == spec and back["best_spec"] == spec, (n, back)
    resumed = run_worker(["fit", tmp_path / "run", "fsdp=4", 2], devices=4)
    assert resumed["resumed_from"] == 1 and len(resumed["history"]) == 2
    assert resumed["history"][0] == eight["history"][0]
    assert [s["mesh_shape"] for s in resumed["segments"]] == ["fsdp=8", "fsdp=4"]
    assert resumed["segments"][1]["first_epoch"] == 2
    assert resumed["segments"][1]["state_bytes_per_device"] > eight["state_bytes_per_device"]


@pytest.mark.slow
def test_range_test_with_sharded_state_equals_one_device(tmp_path):
    one = run_worker(["find_lr", tmp_path, "1"], devices=1)["losses"]
    for shape in ("fsdp=8", "data=2,fsdp=2,tensor=2"):
        got = run_worker(["find_lr", tmp_path, shape], devices=8)["losses"]
        assert len(got) == len(one) >= 30, shape
        np.testing.assert_allclose(got[:30], one[:30], rtol=1e-5, err_msg=shape)  # before the rates get high


@pytest.mark.slow
def test_models_created_sharded_keep_their_weights(tmp_path):
    got = run_worker(["create", tmp_path, "data=2,fsdp=2,tensor=2"], devices=8)
    for name in ("mlp", "cnn", "transformer"):
        assert got[name]["same"], name  # models.create_sharded: the weights of building the model directly
    assert "['fsdp', 'tensor']" in got["transformer"]["specs"] and "['tensor', 'fsdp']" in got["transformer"]["specs"]
    assert "[None, None, 'fsdp', 'tensor']" in got["cnn"]["specs"]  # a 3x3 conv: its channels split
    assert "['fsdp', 'tensor']" in got["mlp"]["specs"]


def test_sharding_rules_flag_is_checked_with_the_config():
    from lrjax.config import Config

    assert Config(sharding_rules="embed=none,mlp=fsdp").sharding_rules == "embed=none,mlp=fsdp"
    with pytest.raises(ConfigError, match="embed=model"):
        Config(sharding_rules="embed=model")
