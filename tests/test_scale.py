"""One code path for 1..N devices and for several processes (simulated on CPU in subprocesses).

Tolerance: the same batches and updates run on every layout, but a batch split over devices is
reduced (loss, gradients) in a different order, so float32 results differ in the last bits and SGD
amplifies that a little each step. After 3 tiny epochs the metrics agree to ~1e-5; we allow rtol
1e-4 on losses and one example's worth on accuracies (1/128 of the validation set).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrjax import mesh as mesh_lib
from lrjax.errors import ConfigError

WORKER = Path(__file__).with_name("scale_worker.py")


def run_worker(args, devices: int = 1, extra_env=None, timeout=240):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", **(extra_env or {})}
    p = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[-1][len("RESULT "):]) if line else None


def assert_same_training(a, b):
    for ha, hb in zip(a["history"], b["history"], strict=True):
        np.testing.assert_allclose([ha["loss"], ha["val_loss"]], [hb["loss"], hb["val_loss"]], rtol=1e-4)
        assert abs(ha["val_accuracy"] - hb["val_accuracy"]) <= 1 / 128 + 1e-9
    np.testing.assert_allclose(a["test"]["loss"], b["test"]["loss"], rtol=1e-4)


@pytest.mark.slow
def test_fit_on_1_2_8_devices_agrees(tmp_path):
    results = {n: run_worker(["fit", tmp_path / f"d{n}"], devices=n) for n in (1, 2, 8)}
    assert [results[n]["devices"] for n in (1, 2, 8)] == [1, 2, 8]
    assert_same_training(results[1], results[2])
    assert_same_training(results[1], results[8])


def run_two_processes(workdir: Path, job: str = "fit", timeout: int = 300, extra_env=None,
                      check: bool = True) -> list[tuple[str, str]]:
    """A worker job as 2 processes (one CPU device each, loopback coordinator): [(stdout, stderr)]
    (`check`: both must exit 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", "XLA_FLAGS": "", **(extra_env or {})}
    procs = [subprocess.Popen([sys.executable, str(WORKER), job, str(workdir), f"127.0.0.1:{port}", "2",
                               str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0 or not check, err[-3000:]
    return outs


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    outs = run_two_processes(tmp_path / "mp")
    lines = [ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")]
    assert lines and not any(ln.startswith("RESULT ") for ln in outs[1][0].splitlines()), "only process 0 reports"
    multi = json.loads(lines[-1][len("RESULT "):])
    assert multi["processes"] == 2 and multi["devices"] == 2
    single = run_worker(["fit", tmp_path / "sp"], devices=2)
    assert_same_training(single, multi)
    assert multi["checkpoints"] == single["checkpoints"]  # written once, collectively
    runs = list((tmp_path / "mp" / "tensorboard").glob("run_*/train/events.out.tfevents*"))
    assert len(runs) == 1, "only process 0 writes TensorBoard events"
    # the same job again resumes from the collectively written checkpoint (process 0 says so)
    again = run_two_processes(tmp_path / "mp")
    assert "resuming" in again[0][1] and "from epoch 3" in again[0][1] and "resuming" not in again[1][1]
    resumed = json.loads([ln for ln in again[0][0].splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert resumed["history"] == multi["history"] and resumed["checkpoints"] == multi["checkpoints"]


@pytest.mark.slow
def test_two_processes_shard_the_state_over_fsdp(tmp_path):
    """fsdp=2 over 2 processes: each process holds half of every sharded parameter (and its optimizer
    state), and the run equals one process with 2 devices on the same mesh."""
    outs = run_two_processes(tmp_path / "mp", job="fit_fsdp")
    for out, _ in outs:
        local = json.loads([ln for ln in out.splitlines() if ln.startswith("LOCAL ")][-1][len("LOCAL "):])
        assert local == {"kernel": [36, 16], "shards": [[18, 16]]}
    multi = json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert multi["processes"] == 2
    single = run_worker(["fit_fsdp", tmp_path / "sp"], devices=2)
    assert_same_training(single, multi)


@pytest.mark.slow
def test_two_processes_stream_like_one_and_like_the_resident_path(tmp_path):
    """Streamed input in a 2-process job: each process reads its rows of every batch (Grain's
    sharding by JAX process) and the run equals a 1-process streamed run and the resident run; so
    does a user's iterable of batches of which each process yields its own rows."""
    multi = json.loads([ln for ln in run_two_processes(tmp_path / "mp", job="fit_stream")[0][0].splitlines()
                        if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert multi["processes"] == 2
    single = run_worker(["fit_stream", tmp_path / "sp"], devices=2)
    assert_same_training(single, multi)
    assert multi["checkpoints"] == single["checkpoints"]
    assert_same_training(run_worker(["fit", tmp_path / "resident"], devices=2), multi)
    # a user's iterable, each process yielding its own rows of the same batches (lrjax.feeds.BatchFeed)
    assert_same_training(multi["iterable"], multi)
    assert_same_training(single["iterable"], multi)


@pytest.mark.slow
def test_model_state_resumes_across_two_processes(tmp_path):
    """BatchNorm statistics and a Dropout stream's key and count checkpoint from 2 processes and resume
    there: interrupted after epoch 2 and resumed, the run equals an uninterrupted one."""
    run_two_processes(tmp_path / "mp", job="fit_state:2")
    outs = run_two_processes(tmp_path / "mp", job="fit_state:0")
    assert "resuming" in outs[0][1] and "from epoch 2" in outs[0][1]
    resumed = json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert resumed["resumed_from"] == 2 and len(resumed["history"]) == 3
    single = run_worker(["fit_state:0", tmp_path / "sp"], devices=2)
    assert_same_training(single, resumed)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_after_the_same_epoch(tmp_path):
    # without agreement the signalled process stops after epoch 2 and the other waits for it forever
    outs = run_two_processes(tmp_path / "sig", job="fit_signal", timeout=120)
    result = json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert result["interrupted"] == "SIGTERM" and result["epochs_run"] == 2


@pytest.mark.slow
def test_seeds_and_sweep_members_spread_over_devices(tmp_path):
    one = run_worker(["find_lr", "auto"], devices=1)
    spread = run_worker(["find_lr", "members=2,data=2"], devices=4)
    # data=2 sums each gradient in another order (float32 rounding, ~1e-7); the test's last steps, at
    # rates close to divergence, amplify that (1.2e-4 measured at one step of 384), hence rtol 1e-3.
    np.testing.assert_allclose(spread["per_seed_losses"], one["per_seed_losses"], rtol=1e-3, atol=1e-5)
    one = run_worker(["sweep", "auto"], devices=1)
    spread = run_worker(["sweep", "members=2,data=1"], devices=2)
    np.testing.assert_allclose(spread["val_loss"], one["val_loss"], rtol=1e-4)


@pytest.mark.slow
def test_members_that_do_not_divide_the_devices_are_padded():
    """3 seeds or 3 rates on a members axis of 2: a filler member completes the second block, never
    trains and never shows in the results."""
    for job, key in (("find_lr:3", "per_seed_losses"), ("sweep:3", "val_loss")):
        one = run_worker([job, "auto"], devices=1)
        spread = run_worker([job, "members=2,data=1"], devices=2)
        assert np.shape(spread[key]) == np.shape(one[key]) and 3 in np.shape(one[key])
        np.testing.assert_allclose(spread[key], one[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_cpu_cores_become_devices_for_members():
    """use_cpu_cores() makes one device per core (4 pretended here); 'auto' then spreads a program's
    members over up to that many cores and keeps a single model on one device."""
    code = ("import json, os; os.sched_getaffinity = lambda pid: {0, 1, 2, 3}\n"
            "from lrjax import mesh as m\n"
            "n = m.use_cpu_cores(); import jax\n"
            "print('RESULT ' + json.dumps({'made': n, 'devices': jax.device_count(), "
            "'shapes': [dict(m.make_mesh('auto', k).shape) for k in (1, 3, 16)], "
            "'explicit': [dict(m.make_mesh(spec).shape) for spec in ('1', 'members=2,data=1')] if n else None, "
            "'loop': m.default_member_loop(m.make_mesh('auto', 16))}))")

    def child(env):
        env = {k: v for k, v in {**os.environ, "JAX_PLATFORMS": "cpu", **env}.items() if v is not None}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.split("RESULT ")[-1])

    r = child({"JAX_NUM_CPU_DEVICES": None, "XLA_FLAGS": None})
    assert r["made"] == 4 and r["devices"] == 4 and r["loop"] == "map"
    assert r["shapes"] == [{"members": 1, "data": 1}, {"members": 3, "data": 1}, {"members": 4, "data": 1}]
    # an explicit mesh may use fewer of these cores (they were made devices by lrjax, not by the user)
    assert r["explicit"] == [{"members": 1, "data": 1}, {"members": 2, "data": 1}]
    r = child({"JAX_NUM_CPU_DEVICES": "3", "XLA_FLAGS": None})  # the user's choice stands
    assert r["made"] == 0 and r["devices"] == 3 and r["shapes"] == [{"data": 3}] * 3


def test_batch_size_must_divide_by_devices():
    class FakeMesh:
        axis_names, axis_sizes = ("data",), (8,)

    with pytest.raises(ConfigError, match="not divisible by the 8 devices"):
        mesh_lib.check_batch_size(12, FakeMesh())
    mesh_lib.check_batch_size(16, FakeMesh())


def test_mesh_shape_parsing():
    assert mesh_lib.parse_mesh_shape("auto", 8) == {"data": 8}
    assert mesh_lib.parse_mesh_shape("members=2,data=4", 8) == {"members": 2, "data": 4}
    with pytest.raises(ConfigError):
        mesh_lib.parse_mesh_shape("model=2", 2)
    with pytest.raises(ConfigError):
        mesh_lib.make_mesh("3")  # this process has 1 device
    with pytest.raises(ConfigError, match="twice"):
        mesh_lib.parse_mesh_shape("data=2,data=4", 8)
    with pytest.raises(ConfigError, match="positive"):
        mesh_lib.parse_mesh_shape("members=-2,data=-4", 8)


@pytest.mark.parametrize("flags, env, match", [
    ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4"}, "set \\$JAX_PROCESS_ID"),
    ({"process_id": 1}, {}, "initialize failed: Number of processes"),  # not a silent single process
    ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "initialize failed: Number of processes"),
    ({"coordinator_address": "nonsense", "num_processes": 1, "process_id": 0}, {}, "needs a port: host:port"),
])
def test_incomplete_distributed_settings_are_errors(monkeypatch, flags, env, match):
    def initialize(coordinator_address=None, num_processes=None, process_id=None):  # as JAX checks it
        if num_processes is None:
            raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(mesh_lib.jax.distributed, "initialize", initialize)
    monkeypatch.setattr(mesh_lib.jax.config, "update", lambda *a: None)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=match):
        mesh_lib.initialize_distributed(**flags)


@pytest.mark.parametrize("flag_id, expected", [(3, 3), (None, 2)])
def test_distributed_process_id_flag_wins_over_the_environment(monkeypatch, flag_id, expected):
    seen = {}
    monkeypatch.setattr(mesh_lib.jax.distributed, "initialize", lambda **kw: seen.update(kw))
    monkeypatch.setattr(mesh_lib.jax.config, "update", lambda *a: None)
    for k, v in {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}.items():
        monkeypatch.setenv(k, v)
    assert mesh_lib.initialize_distributed(process_id=flag_id)
    assert seen == {"coordinator_address": None, "num_processes": 4, "process_id": expected}
