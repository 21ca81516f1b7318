"""What importing lrjax loads: the heavy dependencies only where a job uses them.

Each check runs in a fresh interpreter, since this test process has long imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrjax.idx import FILES, write_idx_gz

ROOT = Path(__file__).resolve().parents[1]
# Checkpoints, TFDS, plots, TensorBoard and streamed input: each imported by the job that needs it.
HEAVY = ("orbax", "tensorstore", "tensorflow_datasets", "tensorflow", "matplotlib", "tensorboardX", "grain")


def loaded_after(code: str, env: dict | None = None) -> list[str]:
    """The HEAVY top-level packages in sys.modules after running `code` in a new interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [m for m in json.loads(out.stdout.splitlines()[-1]) if m in HEAVY]


def test_import_lrjax_loads_none_of_the_heavy_dependencies():
    # and the public API is all there
    code = "import lrjax\n" + "".join(f"lrjax.{name}\n" for name in ("fit", "find_lr", "sweep", "load_dataset",
                                                                     "Config", "mlp", "EarlyStopping", "suggest"))
    assert loaded_after(code) == []


@pytest.mark.slow
def test_the_cli_and_its_jobs_import_none_until_they_run():
    assert loaded_after("import lrjax.cli, lrjax.workflow\nlrjax.cli.build_parser()") == []


@pytest.mark.slow
def test_reading_an_idx_folder_does_not_import_tfds(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        write_idx_gz(tmp_path / FILES[f"{split}_images"], rng.integers(0, 256, (n, 6, 6), dtype=np.uint8))
        write_idx_gz(tmp_path / FILES[f"{split}_labels"], (np.arange(n) % 10).astype(np.uint8))
    code = (f"import lrjax\nd = lrjax.load_dataset('mnist', {str(tmp_path)!r}, cache_dir={str(tmp_path / 'c')!r}, "
            "valid_size=10)\nassert len(d.x_train) == 20")
    assert loaded_after(code) == []


@pytest.mark.slow  # TFDS alone takes seconds to import
def test_the_modules_at_the_edge_import_what_they_wrap():
    # the other side of the pins above: the probe sees these imports, one import away
    code = "import lrjax.checkpoint, lrjax.tfds_source, lrjax.plots, lrjax.tb\nlrjax.tb.write_curve"
    assert set(loaded_after(code)) >= {"orbax", "tensorstore", "tensorflow_datasets", "matplotlib"}
