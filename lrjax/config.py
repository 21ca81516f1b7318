"""The one typed, frozen configuration of lrjax, shared by the CLI and research scripts.

Every field carries its help text and the subcommands that expose it; `lrjax.cli` generates its
argument parser from these fields, so a new option is one new field here. Validation lives in
`Config.__post_init__`: an invalid value raises `ConfigError` with the flag's name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lrjax.errors import ConfigError
from lrjax.optimizers import OPTIMIZERS, resolve_range
from lrjax.suggest import DEFAULT_METHOD, NAMES

ALL = ("find-lr", "train", "run", "sweep")
RANGE = ("find-lr", "run")
TRAIN = ("train", "run", "sweep")


def _f(default: Any, help: str, commands: tuple[str, ...] = ALL, **kw) -> Any:
    return field(default=default, metadata={"help": help, "commands": commands, **kw})


@dataclass(frozen=True)
class Config:
    # --- where things go and what data ---
    workdir: str = _f("workdir", "output folder: lr_find.* (find-lr, run), metrics.json and checkpoints/ "
                      "(train, run; a rerun resumes), sweep.* (sweep), tensorboard/", ALL + ("sample",))
    dataset: str = _f("fashion_mnist", "dataset name: fashion_mnist, mnist (IDX files or TFDS), any "
                      "prepared TFDS image-classification dataset, or text (the UTF-8 files under --data-dir "
                      "as bytes, for language models: docs/language-models.md)")
    data_dir: str | None = _f(None, "folder of the four IDX .gz files, or a TFDS data_dir "
                              "(default: $LRJAX_DATA_DIR, else TFDS's default)")
    tfds_data_dir: str | None = _f(None, "read the dataset through tensorflow-datasets from this data_dir "
                                   "(prepared there from the IDX files in --data-dir if needed)")
    cache_dir: str | None = _f(None, "cache of decoded TFDS arrays (tfds/) and compiled programs (jax/) "
                               "(default: $LRJAX_CACHE_DIR or ~/.cache/lrjax)")
    input: str = _f("auto", "input path: resident (every split as float32 on every device), stream (uint8 chunks "
                    "read through Grain, converted on the device) or auto (resident when the data fit "
                    "--device-memory-budget, else streamed; the choice is printed; sweep: text only, images are resident)", ALL)
    device_memory_budget: str | None = _f(None, "device memory the resident data may take on each device, a size "
                                          "such as 20MB or 4GB (default: half of an accelerator's memory; on "
                                          "CPU half of host memory shared among the devices and the host's copy)",
                                          ALL)
    seed: int = _f(42, "seed for model init, batch order and everything random", ALL + ("sample",))
    batch_size: int = _f(32, "global batch size (divided across devices)")
    model: str = _f("mlp", "model: mlp (the seed's MLP) or cnn (a compact CNN with BatchNorm and Dropout); "
                    "scripts add more with lrjax.models.register_model")
    hidden_sizes: tuple[int, ...] = _f((300, 100), "hidden layer widths of the MLP, e.g. 300,100")
    context: int = _f(256, "text: tokens (bytes) the language model sees; windows of --context + 1 tokens")
    d_model: int = _f(128, "transformer: width of the residual stream")
    layers: int = _f(4, "transformer: number of blocks")
    heads: int = _f(4, "transformer: attention heads (dividing --d-model)")
    dtype: str = _f("float32", "compute dtype: float32, or bfloat16 (mixed precision: parameters and optimizer "
                    "state stay float32, the loss is computed in float32)")
    optimizer: str | None = _f(None, f"optax optimizer: {', '.join(OPTIMIZERS)} (default by model: sgd for mlp, as the "
                               "seed article trains it; adam for cnn, as Keras-style CNNs are trained)")
    # --- range test ---
    start_lr: float | None = _f(None, "first learning rate of the range test (default by optimizer: sgd 1e-3; "
                                "momentum, nesterov 1e-4; adam, adamw, rmsprop 1e-6)", RANGE)
    factor: float | None = _f(None, "lr growth per step (ignored when --end-lr is given; default by optimizer: "
                              "sgd x1.005, the others grow to their --end-lr)", RANGE)
    end_lr: float | None = _f(None, "last learning rate, reached at the last step (default by optimizer, "
                              "unless --factor is given: momentum, nesterov, adam, adamw, rmsprop 1)", RANGE)
    num_steps: int | None = _f(None, "range-test steps (default: one epoch of the training set)", RANGE)
    diverge_factor: float = _f(4.0, "stop once the smoothed loss exceeds this x its lowest value", RANGE)
    beta: float = _f(0.98, "smoothing of the debiased exponential moving average", RANGE)
    num_seeds: int = _f(1, "independent range tests run as one compiled program (sweep: seeds per rate)",
                        RANGE + ("sweep",))
    eval_every: int = _f(0, "validation loss (of the first 1000 validation images) every this many "
                         "range-test steps (0: off)", RANGE)
    suggestion: str = _f("default", f"suggestion method: {', '.join(NAMES)}, or default "
                         f"(= {DEFAULT_METHOD}: a short stage training rates below the curve's turn, "
                         "docs/suggestion.md)", RANGE)
    skip_start: int = _f(10, "points skipped at the start of the curve by the suggestions", RANGE)
    skip_end: int = _f(5, "points skipped at the end of the curve by the suggestions", RANGE)
    chunk_steps: int = _f(256, "range-test steps per compiled chunk (progress granularity)", RANGE)
    # --- training ---
    lr: float | None = _f(None, "learning rate for training (required; `lrjax run` uses the range test's "
                          "suggestion)", ("train",))
    epochs: int = _f(100, "maximum number of epochs", TRAIN)
    patience: int = _f(20, "early stopping: epochs without improvement of the monitor (sweep: of "
                       "val_loss; a patience >= --epochs switches it off)", TRAIN)
    min_delta: float = _f(0.0, "early stopping: smallest change that counts as improvement", TRAIN)
    monitor: str = _f("val_loss", "early stopping monitor and best checkpoint: val_loss, val_accuracy or any "
                      "val_<metric> of the task (mode: max for accuracy-like names, else min)", ("train", "run"))
    restore_best: bool = _f(True, "end with the best epoch's weights (Keras restore_best_weights)",
                            ("train", "run"))
    keep_latest: int = _f(2, "latest checkpoints kept (the best one is always kept too)", ("train", "run"))
    schedule: str = _f("constant", "learning-rate schedule (optax): constant, onecycle, cosine, warmup_cosine "
                       "or plateau (reduce on plateau of the training loss); its peak is --lr, or in `lrjax run` "
                       "the range test's rate by the rule in docs/guide.md", ("train", "run"))
    eval_every_steps: int | None = _f(None, "evaluate every this many steps instead of every epoch: each "
                                      "evaluation is one history row and one unit of early-stopping patience",
                                      ("train", "run"))
    checkpoint_every_steps: int | None = _f(None, "also checkpoint every this many steps (Orbax step numbers "
                                            "are then global steps); a signal stops after the current chunk "
                                            "of steps", ("train", "run"))
    log_every_steps: int | None = _f(None, "write per-step batch_loss and batch_learning_rate to "
                                     "TensorBoard's train run every this many steps", ("train", "run"))
    weight_decay: float | None = _f(None, "weight decay (adamw's own; else L2 added to the gradient; default "
                                    "by model: 0.1 for transformer, else 0)", TRAIN)
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step (optax.MultiSteps); the range test "
                               "raises the rate once per optimizer step", ALL)
    eval_batch_size: int = _f(1000, "batch size of the compiled evaluation", TRAIN)
    # --- sweep ---
    lrs: tuple[float, ...] = _f((1e-3, 1.0), "sweep: lo,hi range of a log grid, or an explicit list "
                                "of rates when more than two are given", ("sweep",))
    num_lrs: int = _f(16, "sweep: points of the log grid", ("sweep",))
    lr_find_json: str | None = _f(None, "sweep: an lr_find.json whose suggestions to mark (default: "
                                  "WORKDIR/lr_find.json where it exists)", ("sweep",))
    # --- devices and clusters ---
    mesh_shape: str = _f("auto", "devices: 'auto' (all on data; on a CPU, seeds and sweep rates over the cores) "
                         "or e.g. '4', 'members=2,data=4', 'fsdp=8' or 'data=2,fsdp=2,tensor=2' (fsdp and tensor "
                         "shard the parameters and optimizer state: docs/sharding.md)")
    sharding_rules: str | None = _f(None, "logical-axis rules replacing lrjax's (NAME=AXIS,...), e.g. "
                                    "'embed=fsdp,mlp=tensor,heads=none' (docs/sharding.md)")
    coordinator_address: str | None = _f(None, "jax.distributed coordinator host:port (multi-host)")
    num_processes: int | None = _f(None, "jax.distributed process count (multi-host)")
    process_id: int | None = _f(None, "jax.distributed process id (multi-host)")
    progress: bool = _f(True, "progress bars and per-epoch lines (summaries print regardless)")
    compilation_cache: bool = _f(True, "keep compiled programs across runs (JAX's persistent compilation "
                                 "cache, under the cache folder)")
    debug: bool = _f(False, "on an error, show its traceback and the libraries' own error logs, not only "
                     "lrjax's one line (also $LRJAX_DEBUG=1)", ALL + ("sample",))

    def __post_init__(self):
        positive = ("batch_size", "epochs", "num_seeds", "chunk_steps", "eval_batch_size", "num_lrs",
                    "keep_latest", "context", "d_model", "layers", "heads")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.input not in ("resident", "stream", "auto"):
            raise ConfigError(f"--input must be resident, stream or auto, got {self.input!r}")
        if self.device_memory_budget is not None:
            from lrjax.memory import parse_size

            parse_size(self.device_memory_budget)
        if self.grad_accum_steps < 1:
            raise ConfigError(f"--grad-accum-steps must be >= 1, got {self.grad_accum_steps}")
        from lrjax.schedules import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        from lrjax.models import MODELS, default_optimizer, default_weight_decay

        if self.weight_decay is None:  # by model (frozen: set once, here)
            object.__setattr__(self, "weight_decay", default_weight_decay(self.model))
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("patience", "eval_every", "skip_start", "skip_end", "min_delta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        for name in ("start_lr", "end_lr", "lr", "factor", "min_delta"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{_flag(name)} must be a finite number, got {value}")
        for name in ("start_lr", "end_lr", "lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{_flag(name)} must be a positive number, got {value}")
        if self.end_lr is None and self.factor is not None and not self.factor > 1:
            raise ConfigError(f"--factor must be > 1 (the rate grows), got {self.factor}")
        if self.num_steps is not None and self.num_steps < 2:
            raise ConfigError(f"--num-steps must be >= 2, got {self.num_steps}")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"--beta must be in [0, 1), got {self.beta}")
        if not self.diverge_factor > 1:
            raise ConfigError(f"--diverge-factor must be > 1, got {self.diverge_factor}")
        if self.optimizer is None:  # by model (frozen: set once, here)
            object.__setattr__(self, "optimizer", default_optimizer(self.model))
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        # the range as find_lr will resolve it: what is not given follows the optimizer's family
        resolved = resolve_range(OPTIMIZERS[self.optimizer], self.start_lr, self.factor, self.end_lr)
        start, end = resolved.start_lr, resolved.end_lr
        if end is not None and not end > start:
            def shown(name, value):
                return f"{value:g}" + ("" if getattr(self, name) is not None else
                                       f" (--optimizer {self.optimizer}'s default)")

            raise ConfigError(f"--end-lr {shown('end_lr', end)} must exceed --start-lr {shown('start_lr', start)}")
        if self.suggestion != "default" and self.suggestion not in NAMES:
            raise ConfigError(f"--suggestion must be {', '.join(NAMES)} or default, got {self.suggestion!r}")
        if not self.monitor.startswith("val_"):
            raise ConfigError(f"--monitor must name a validation metric (val_loss, val_accuracy, ...), got "
                              f"{self.monitor!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            raise ConfigError(f"--hidden-sizes must be positive widths, got {self.hidden_sizes}")
        if not self.dataset or not all(c.isalnum() or c in "_-/.:" for c in self.dataset):
            raise ConfigError(f"--dataset {self.dataset!r} is not a dataset name")
        if len(self.lrs) < 2 or any(not (x > 0 and math.isfinite(x)) for x in self.lrs):
            raise ConfigError(f"--lrs needs two or more positive rates, got {self.lrs}")
        if self.mesh_shape.strip() != "auto":
            from lrjax.mesh import parse_mesh_shape

            parse_mesh_shape(self.mesh_shape, 1)  # its syntax now; the device count when the job starts
        if self.sharding_rules is not None:
            from lrjax.sharding import parse_rules

            parse_rules(self.sharding_rules)

    # Convenience -------------------------------------------------------------------------------
    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        names = {f.name: f for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kw)

    @property
    def resolved_cache_dir(self) -> str:
        from lrjax.data import default_cache_dir

        return self.cache_dir or str(default_cache_dir())


def _flag(name: str) -> str:
    return name.replace("_", "-")
