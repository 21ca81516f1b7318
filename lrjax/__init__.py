"""lrjax: find a good learning rate fast (a compiled range test), then train with it.

Public API (re-exported here; each lives in the module named for what it holds):
`Config`, `load_dataset`, `mlp`/`MLP`, `find_lr`/`RangeTestResult`, `fit`/`FitResult`,
`EarlyStopping`, `sweep`/`SweepResult`, `suggest` (suggestion methods), `use_cpu_cores` (call it
first in a script: on a CPU, range-test seeds and sweep members then run on every core).
"""

from lrjax import suggest
from lrjax.config import Config
from lrjax.data import Dataset, load_dataset
from lrjax.errors import CheckpointError, ConfigError, DataError, LrjaxError, TrainingDiverged
from lrjax.mesh import use_cpu_cores
from lrjax.models import MLP, mlp
from lrjax.monitors import EarlyStopping
from lrjax.range_test import RangeTestResult, find_lr
from lrjax.sweeps import SweepResult, sweep
from lrjax.train import FitResult, fit

__version__ = "0.1.0"

__all__ = ["CheckpointError", "Config", "ConfigError", "DataError", "Dataset", "EarlyStopping",
           "FitResult", "LrjaxError", "MLP", "RangeTestResult", "TrainingDiverged", "find_lr", "fit",
           "load_dataset", "mlp", "suggest", "sweep", "SweepResult", "use_cpu_cores"]
