"""Tests for the `lrjax` command line and `lrjax.config.Config`: help, bad flags, bad data, no tracebacks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrjax import cli
from lrjax.config import Config
from lrjax.idx import FILES, write_idx_gz

SUBCOMMANDS = ("find-lr", "train", "run", "sweep")
COMMON_FLAGS = ("--workdir", "--dataset", "--data-dir", "--seed", "--batch-size")


def _run_cli(*args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env.pop("LRJAX_DATA_DIR", None)
    return subprocess.run([sys.executable, "-m", "lrjax.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LRJAX_DATA_DIR", raising=False)
    monkeypatch.setenv("LRJAX_CACHE_DIR", str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_help_subprocess(tmp_path):
    proc = _run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert name in proc.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lrjax"
    assert script.exists(), f"console script not found beside {sys.executable}"
    assert "lrjax.cli" in script.read_text()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in COMMON_FLAGS:
        assert flag in out, f"{command} --help lacks {flag}"


def test_flags_follow_config_metadata(capsys):
    # --beta is a range-test flag: find-lr has it, train does not.
    with pytest.raises(SystemExit):
        cli.main(["find-lr", "--help"])
    assert "--beta" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--beta", "0.5"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --beta" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad flag values: exit 2, one clear message, no traceback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["find-lr", "--batch-size", "-4"], "--batch-size must be positive, got -4"),
    (["train", "--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["find-lr", "--factor", "0.9"], "--factor must be > 1"),
    (["train", "--optimizer", "foo"], "--optimizer must be one of sgd"),
    (["run", "--beta", "1.5"], "--beta must be in [0, 1), got 1.5"),
    (["find-lr", "--batch-size", "lots"], "invalid int value: 'lots'"),
    (["train", "--hidden-sizes", "300,x"], "expected comma-separated ints"),
    (["train", "--lr", "-1"], "--lr must be a positive number"),
    (["train", "--lr", "inf"], "lrjax train: error: --lr must be a finite number, got inf"),
    (["train"], "lrjax train: error: lrjax train needs --lr"),
    (["train", "--lr", "0.1", "--stop-after", "0"], "--stop-after must be an epoch >= 1, got 0"),
    (["find-lr", "--seed", "-1"], "lrjax find-lr: error: --seed must be in [0, 2**32), got -1"),
    (["run", "--seed", str(2**64)], "--seed must be in [0, 2**32)"),
    (["run", "--mesh-shape", "foo"], "--mesh-shape 'foo' is not 'auto', an integer or 'members=M,data=D'"),
    (["sweep", "--lrs", "0.01,nan"], "--lrs needs two or more positive rates"),
])
def test_bad_flag_values(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--workdir", str(tmp_path / "w")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "w").write_text("")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--workdir", str(tmp_path / "w")])
    assert exit_.value.code == 2
    assert "lrjax run: error: --workdir " in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad data: exit 1, one line naming the problem, no traceback
# --------------------------------------------------------------------------------------------


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("lrjax: error:")]
    assert len(lines) == 1, captured.err
    return lines[0]


def test_unknown_dataset(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli.main(["find-lr", "--workdir", str(tmp_path / "w"), "--dataset", "no_such_dataset",
                   "--data-dir", str(empty)])
    assert rc == 1
    assert "no_such_dataset" in _error_line(capsys)


def test_missing_data_folder(tmp_path, capsys):
    rc = cli.main(["find-lr", "--workdir", str(tmp_path / "w"), "--data-dir", str(tmp_path / "absent")])
    assert rc == 1
    line = _error_line(capsys)
    assert "absent does not exist" in line


def test_empty_data_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli.main(["train", "--workdir", str(tmp_path / "w"), "--data-dir", str(empty), "--lr", "0.1"])
    assert rc == 1
    line = _error_line(capsys)
    assert "lacks train-images-idx3-ubyte.gz" in line and "t10k-labels-idx1-ubyte.gz" in line
    assert os.listdir(empty) == []  # nothing written next to the (absent) data


def _truncated_mnist(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    write_idx_gz(folder / FILES["train_images"], rng.integers(0, 256, (60, 28, 28)))
    write_idx_gz(folder / FILES["train_labels"], np.arange(60) % 10)
    write_idx_gz(folder / FILES["test_images"], rng.integers(0, 256, (20, 28, 28)))
    write_idx_gz(folder / FILES["test_labels"], np.arange(20) % 10)
    path = folder / FILES["train_images"]
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return folder


def test_truncated_file_in_process(tmp_path, capsys):
    folder = _truncated_mnist(tmp_path / "mnist")
    rc = cli.main(["find-lr", "--workdir", str(tmp_path / "w"), "--dataset", "mnist", "--data-dir", str(folder)])
    assert rc == 1
    assert "train-images-idx3-ubyte.gz: truncated or corrupt gzip" in _error_line(capsys)


@pytest.mark.slow
def test_truncated_file_subprocess(tmp_path):
    # The whole program, as a user runs it: exit status 1 and no traceback anywhere.
    folder = _truncated_mnist(tmp_path / "mnist")
    proc = _run_cli("find-lr", "--workdir", str(tmp_path / "w"), "--dataset", "mnist",
                    "--data-dir", str(folder), cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "lrjax: error:" in proc.stderr and "truncated or corrupt gzip" in proc.stderr


def test_bad_flag_subprocess(tmp_path):
    proc = _run_cli("find-lr", "--batch-size", "-4", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "--batch-size must be positive" in proc.stderr


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    changed = cfg.replace(seed=7)
    assert changed.seed == 7 and cfg.seed == 42


def test_config_dict_round_trip():
    cfg = Config(workdir="w", seed=3, batch_size=64, hidden_sizes=(64, 32), lrs=(1e-4, 1e-2, 1.0),
                 end_lr=10.0, num_steps=50, data_dir="/d", progress=False)
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON-safe (tuples as lists)
    assert Config.from_dict(Config().to_dict()) == Config()
    assert Config.from_dict({**cfg.to_dict(), "not_a_field": 1}) == cfg  # unknown keys are ignored


def test_config_from_parsed_args():
    args = cli.build_parser().parse_args(["train", "--workdir", "w", "--lr", "0.05", "--hidden-sizes", "64,32",
                                          "--batch-size", "16", "--no-restore-best"])
    cfg = cli.config_from_args(args)
    assert (cfg.lr, cfg.hidden_sizes, cfg.batch_size, cfg.restore_best) == (0.05, (64, 32), 16, False)
    assert cfg.beta == Config().beta  # not a train flag: the default
