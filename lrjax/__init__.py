"""lrjax: find a good learning rate fast (a compiled range test), then train with it.

Public API (re-exported here; each lives in the module named for what it holds):
`Config`, `load_dataset`, `mlp`/`MLP`, `cnn`/`CNN`, `register_model`, `find_lr`/`RangeTestResult`,
`fit`/`FitResult`, `EarlyStopping`, `sweep`/`SweepResult`, `tasks` (loss functions: bring your own
`loss_fn(model, batch) -> (losses, metrics)`), `suggest` (suggestion methods), `use_cpu_cores`
(call it first in a script: on a CPU, range-test seeds and sweep members then run on every core).
"""

from lrjax import callbacks, suggest, tasks
from lrjax.config import Config
from lrjax.data import Dataset, load_dataset
from lrjax.errors import CheckpointError, ConfigError, DataError, LrjaxError, TrainingDiverged
from lrjax.mesh import use_cpu_cores
from lrjax.models import CNN, MLP, cnn, mlp, register_model
from lrjax.monitors import EarlyStopping
from lrjax.range_test import RangeTestResult, find_lr
from lrjax.sweeps import SweepResult, sweep
from lrjax.train import FitResult, fit

__version__ = "0.1.0"

__all__ = ["CNN", "CheckpointError", "Config", "ConfigError", "DataError", "Dataset", "EarlyStopping",
           "FitResult", "LrjaxError", "MLP", "RangeTestResult", "TrainingDiverged", "cnn", "find_lr", "fit",
           "load_dataset", "mlp", "register_model", "suggest", "sweep", "SweepResult", "callbacks", "tasks", "use_cpu_cores"]
