"""lrjax: find a good learning rate fast (a compiled range test), then train with it.

Public API (re-exported here; each lives in the module named for what it holds):
`Config`, `load_dataset`, `mlp`/`MLP`, `cnn`/`CNN`, `register_model`, `find_lr`/`RangeTestResult`,
`fit`/`FitResult`, `EarlyStopping`, `sweep`/`SweepResult`, `tasks` (loss functions: bring your own
`loss_fn(model, batch) -> (losses, metrics)`), `suggest` (suggestion methods), `use_cpu_cores`
(call it first in a script: on a CPU, range-test seeds and sweep members then run on every core).
"""

import importlib

# Each public name and the module it lives in, imported on first use (PEP 562), so that `import
# lrjax` (and the CLI, which parses its flags first) costs nothing until a name is used: the CLI
# starts reading its data before JAX's import (~1.5 s) has run (lrjax.overlap).
_EXPORTS = {
    "callbacks": None, "suggest": None, "tasks": None,  # submodules
    "Config": "lrjax.config", "Dataset": "lrjax.data", "load_dataset": "lrjax.data",
    "CheckpointError": "lrjax.errors", "ConfigError": "lrjax.errors", "DataError": "lrjax.errors",
    "LrjaxError": "lrjax.errors", "TrainingDiverged": "lrjax.errors", "use_cpu_cores": "lrjax.mesh",
    "CNN": "lrjax.models", "MLP": "lrjax.models", "cnn": "lrjax.models", "mlp": "lrjax.models",
    "register_model": "lrjax.models", "EarlyStopping": "lrjax.monitors", "RangeTestResult": "lrjax.range_test",
    "find_lr": "lrjax.range_test", "SweepResult": "lrjax.sweeps", "sweep": "lrjax.sweeps",
    "FitResult": "lrjax.train", "fit": "lrjax.train",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lrjax' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = importlib.import_module(f"lrjax.{name}") if module is None else getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = ["CNN", "CheckpointError", "Config", "ConfigError", "DataError", "Dataset", "EarlyStopping",
           "FitResult", "LrjaxError", "MLP", "RangeTestResult", "TrainingDiverged", "cnn", "find_lr", "fit",
           "load_dataset", "mlp", "register_model", "suggest", "sweep", "SweepResult", "callbacks", "tasks", "use_cpu_cores"]
