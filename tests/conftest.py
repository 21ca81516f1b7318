"""Shared fixtures: the real Fashion-MNIST folder (skipped where absent) and tiny synthetic datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lrjax.data import from_arrays

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("LRJAX_TEST_DATA", ROOT.parent / "shared" / "data" / "fashion_mnist"))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (REAL_DATA / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST files not found at {REAL_DATA} (../shared beside the project)")
    return REAL_DATA


def synthetic(n_train: int = 300, n_test: int = 100, size: int = 8, classes: int = 4, seed: int = 0,
              valid: int = 100, noise: float = 40.0):
    """A learnable toy problem: each class is a noisy fixed prototype image (uint8)."""
    xtr, ytr, xte, yte = synthetic_arrays(n_train, n_test, size, classes, seed, valid, noise)
    return from_arrays("synthetic", xtr, ytr, xte, yte, valid_size=valid)


def synthetic_arrays(n_train: int = 300, n_test: int = 100, size: int = 8, classes: int = 4, seed: int = 0,
                     valid: int = 100, noise: float = 40.0):
    """`synthetic`'s uint8 images and labels before the split: train (validation first), test."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (classes, size, size))

    def make(n):
        labels = rng.integers(0, classes, n)
        jitter = rng.normal(0, noise, (n, size, size))
        return np.clip(protos[labels] + jitter, 0, 255).astype(np.uint8), labels.astype(np.uint8)

    (xtr, ytr), (xte, yte) = make(n_train + valid), make(n_test)
    return xtr, ytr, xte, yte


@pytest.fixture
def tiny_data():
    return synthetic()


def strip_times(history):
    """Per-epoch records without their wall times, which differ between otherwise identical runs."""
    return [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in history]


class CompileCounter:
    """Counts XLA compilations of jitted functions by name, from JAX's own `jax_log_compiles` log."""

    def __init__(self):
        import logging

        self.messages: list[str] = []
        counter = self

        class Handler(logging.Handler):
            def emit(self, record):
                counter.messages.append(record.getMessage())

        self._handler, self._logger = Handler(), logging.getLogger("jax")

    def count(self, name: str) -> int:
        return sum(f"Finished XLA compilation of jit({name})" in m for m in self.messages)

    def __enter__(self):
        import jax

        self._old = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)
        self._logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        import jax

        self._logger.removeHandler(self._handler)
        jax.config.update("jax_log_compiles", self._old)


@pytest.fixture
def compiles():
    with CompileCounter() as counter:
        yield counter


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache():
    """`lrjax.cli.main` turns JAX's persistent compilation cache on for its process; in the test
    process that would leak into later tests (and across runs), so it is switched back off."""
    import jax

    yield
    jax.config.update("jax_compilation_cache_dir", None)
