"""The jobs behind the CLI subcommands, as functions of one `Config` (research scripts call them too).

`find_lr_job` runs the range test and writes lr_find.{json,csv,png} and its TensorBoard curve;
`train_job` trains with early stopping, checkpoints and TensorBoard, evaluates the best weights on
the test set and writes metrics.json; `run_job` is the seed workflow: range test -> suggested rate ->
re-initialised model (fixed seed) -> training -> test.

`load` picks the input path (`--input`, `lrjax.memory.choose_input`) and prints why: a
`Dataset` (resident) or `lrjax.sources.Splits` (streamed through Grain), which the jobs pass on to
`find_lr` and `fit` alike.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lrjax import mesh as mesh_lib
from lrjax import faults, memory, optimizers, overlap, sharding, sources, steps, tasks, tb, text
from lrjax.config import Config
from lrjax.data import Dataset, default_data_dir, from_arrays, load_dataset, split_examples
from lrjax.errors import ConfigError, DataError, LrjaxError
from lrjax.models import build_model, create_sharded
from lrjax.monitors import EarlyStopping
from lrjax.range_test import RangeTestResult, find_lr
from lrjax.timing import process_age_s, process_clock
from lrjax.train import FitResult, fit

# lrjax and what it needs are loaded: the process's start-up ends here (one value for every job)
_STARTUP_S = process_age_s()
_CLOCK = process_clock(_STARTUP_S)  # perf_counter readings -> seconds since the process started


def _say(cfg: Config, msg: str) -> None:
    """Summaries (always, main process only); `--no-progress` silences bars and epoch lines only."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def load_resident(cfg: Config, t0: float | None = None, data: Dataset | None = None) -> Dataset:
    t0 = time.perf_counter() if t0 is None else t0
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir, cfg.cache_dir, tfds_data_dir=cfg.tfds_data_dir,
                            progress=cfg.progress)
    _say(cfg, f"data: {data.name} from {data.source}: train {len(data.x_train)}, validation "
              f"{len(data.x_valid)}, test {len(data.x_test)} ({time.perf_counter() - t0:.2f}s)")
    return data


def stream_splits(cfg: Config) -> sources.Splits:
    """The splits the streamed path reads: the TFDS ArrayRecord preparation in --tfds-data-dir (made
    there from the IDX files in --data-dir if needed), the IDX files of --data-dir as uint8 arrays,
    or a TFDS data_dir given as --data-dir."""
    if cfg.tfds_data_dir is not None:
        from lrjax import tfds_source

        tfds_source.ensure_prepared(cfg.dataset, cfg.tfds_data_dir, idx_dir=cfg.data_dir, progress=cfg.progress)
        return sources.tfds_splits(cfg.dataset, cfg.tfds_data_dir)
    folder = cfg.data_dir or default_data_dir()
    from lrjax import idx

    if folder is not None:  # as `load_dataset` reads it: the same errors for a missing or empty folder
        path = Path(folder)
        if not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise DataError(f"data folder {path} {what} (--data-dir / LRJAX_DATA_DIR)")
    if folder is not None and cfg.dataset in idx.IDX_DATASETS and (
            idx.has_idx_files(folder) or not _tfds_prepared(cfg.dataset, folder)):
        # the CLI's read ahead where it read these files (lrjax.overlap), else lrjax.idx.read_idx_folder
        raw = overlap.read_idx_folder(folder, cfg.dataset, cache_dir=cfg.resolved_cache_dir)
        return sources.array_splits(raw["train_images"], raw["train_labels"], raw["test_images"], raw["test_labels"],
                                    name=cfg.dataset)
    return sources.tfds_splits(cfg.dataset, folder)


def _tfds_prepared(name: str, folder) -> bool:
    from lrjax import tfds_source

    return tfds_source.is_prepared(name, str(folder))


def _budget(cfg: Config) -> int:
    return (memory.parse_size(cfg.device_memory_budget) if cfg.device_memory_budget is not None
            else memory.default_budget())


def load(cfg: Config) -> Dataset | sources.Splits:
    """The data by the path --input chooses (resident, or streamed where auto finds them over
    --device-memory-budget), with the choice and its reason printed. `--dataset text`: the corpus
    of --data-dir (`lrjax.text`), its training tokens resident or streamed from the token memmap."""
    if cfg.dataset == "text":
        t0 = time.perf_counter()
        corpus = text.load_corpus(cfg.data_dir, cfg.context, cfg.resolved_cache_dir)
        _say(cfg, f"{corpus.describe()} ({time.perf_counter() - t0:.2f}s)")
        corpus.input, reason = memory.choose_input(cfg.input, corpus.resident_nbytes,
                                                   _budget(cfg) if cfg.input == "auto" else 0)
        _say(cfg, reason)
        return corpus
    if cfg.input == "resident":
        data = load_resident(cfg)
        nbytes = sum(a.nbytes for a in (data.x_train, data.x_valid, data.x_test)) + 4 * (
            len(data.y_train) + len(data.y_valid) + len(data.y_test))
        _say(cfg, memory.choose_input("resident", nbytes, 0)[1])
        return data
    t0 = time.perf_counter()
    splits = stream_splits(cfg)
    mode, reason = memory.choose_input(cfg.input, memory.resident_nbytes(splits), _budget(cfg))
    _say(cfg, reason)
    if mode == "resident":
        train, test = splits.train.examples, splits.test.examples
        if isinstance(train, sources.ArrayExamples):  # the IDX files are decoded already: not read twice
            return load_resident(cfg, t0, overlap.from_arrays(from_arrays, cfg.dataset, train.images, train.labels, test.images,
                                                     test.labels, source=f"IDX files in {cfg.data_dir or default_data_dir()}"))
        return load_resident(cfg, t0)
    if cfg.num_seeds > 1:
        raise ConfigError("a streamed range test runs one seed: use --num-seeds 1, or --input resident")
    _say(cfg, f"data: {cfg.dataset} streamed from {type(splits.train.examples).__name__}: train {len(splits.train)}, "
              f"validation {len(splits.valid)}, test {len(splits.test)} ({time.perf_counter() - t0:.2f}s)")
    return splits


def train_size(data) -> int:
    if isinstance(data, text.Corpus):
        return data.windows_per_epoch
    return len(data.train) if isinstance(data, sources.Splits) else len(data.x_train)


def task_for(data) -> tasks.LossFn:
    """The loss of the data's task: next-token prediction for text, else classification."""
    return tasks.next_token if isinstance(data, text.Corpus) else tasks.classification


# `lrjax run` with a schedule: its peak rate is the range test's suggestion times this factor,
# chosen by experiments/schedule_quality.py (docs/measurements.md, Schedules).
# onecycle and cosine peak at twice the suggestion (test accuracy 0.8988 and 0.8974 vs 0.8956 at the
# suggestion itself, 3 seeds, 20 epochs); warmup_cosine takes cosine's factor (not measured apart).
SCHEDULE_PEAK = {"constant": 1.0, "plateau": 1.0, "onecycle": 2.0, "cosine": 2.0, "warmup_cosine": 2.0}


def optimizer_for(cfg: Config, steps_per_epoch: int | None = None):
    """--optimizer with --weight-decay, --grad-accum-steps and, for training (`steps_per_epoch`
    given), --schedule plateau folded in (a plain optax factory when none of them is asked for, so
    programs compiled for it are shared)."""
    base = optimizers.get(cfg.optimizer)
    plateau = None
    if cfg.schedule == "plateau" and steps_per_epoch:
        # Keras' ReduceLROnPlateau(factor=0.2, patience=3), on the training loss averaged over each epoch
        plateau = (3, 0.2, steps_per_epoch)
    if not cfg.weight_decay and cfg.grad_accum_steps == 1 and plateau is None:
        return base
    return optimizers.Recipe(base, cfg.weight_decay, cfg.grad_accum_steps, plateau)


def model_for(cfg: Config, data: Dataset, seed: int | None = None, mesh=None):
    """`--model` from the registry (`lrjax.models.register_model`), initialised from `seed` (default --seed);
    on a `mesh` with fsdp/tensor axes, created sharded by --sharding-rules (`lrjax.models.create_sharded`)."""
    if mesh is not None and sharding.is_sharded(mesh):
        return create_sharded(lambda: model_for(cfg, data, seed), mesh, sharding.parse_rules(cfg.sharding_rules))
    if isinstance(data, text.Corpus):
        shape, classes = (data.context,), text.VOCAB
    elif isinstance(data, sources.Splits):
        shape, classes = data.train.example_shape, sources.num_classes(data)
    else:
        shape, classes = data.x_train.shape[1:], data.num_classes
    return build_model(cfg.model, shape, classes, cfg.seed if seed is None else seed, hidden_sizes=cfg.hidden_sizes,
                       d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads)


class _Progress:
    """A tqdm bar fed by the range test's per-chunk reports (stderr, main process only)."""

    def __init__(self, cfg: Config, total: int):
        self.bar = None
        if cfg.progress and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="lr range test", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def __call__(self, info: dict) -> None:
        if self.bar is not None:
            self.bar.update(info["step"] - self.bar.n)
            self.bar.set_postfix(lr=f"{info['lr']:.3g}", loss=f"{info['loss']:.4f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def find_lr_job(cfg: Config, data: Dataset | None = None) -> RangeTestResult:
    """The range test; writes lr_find.{json,csv,png} and its TensorBoard curve. lr_find.json also
    holds the process's `startup_s` and this job's `phases_s`, as metrics.json does, and
    `timeline_s`: each phase's [start, end] in seconds since the process started (None where the OS
    does not tell; the compile is placed at the start of find_lr's own clock, its set-up before it
    counts in range_test's span). lr_find.png is drawn by a child process started here (it imports
    matplotlib while this one works; lrjax.overlap; LRJAX_SERIAL=1 draws it here)."""
    with overlap.PngChild(enabled=jax.process_index() == 0) as png:
        return _find_lr_job(cfg, data, png)


def _find_lr_job(cfg: Config, data: Dataset | None, png: overlap.PngChild) -> RangeTestResult:
    t0 = time.perf_counter()
    # the CLI's read ahead of the data (lrjax.overlap), where it ran, beside the start-up
    phases, timeline = {}, {"startup": [0.0, _STARTUP_S], **overlap.spans(_CLOCK)}
    if data is None:
        data = load(cfg)
        phases["data_load"] = time.perf_counter() - t0
        timeline["data_load"] = [_CLOCK(t0), _CLOCK(t0 + phases["data_load"])]
    t_set_up = time.perf_counter()
    workdir = Path(cfg.workdir)
    mesh = mesh_lib.make_mesh(cfg.mesh_shape, members=cfg.num_seeds)
    num_steps = cfg.num_steps or steps.steps_per_epoch(train_size(data), cfg.batch_size)
    bar = _Progress(cfg, num_steps)
    try:
        result = find_lr(
            model_for(cfg, data, mesh=mesh if cfg.num_seeds == 1 else None), optimizer_for(cfg), data,
            batch_size=cfg.batch_size,
            start_lr=cfg.start_lr, factor=cfg.factor, end_lr=cfg.end_lr, num_steps=num_steps,
            diverge_factor=cfg.diverge_factor, beta=cfg.beta, num_seeds=cfg.num_seeds, seed=cfg.seed,
            eval_every=cfg.eval_every, method=cfg.suggestion, skip_start=cfg.skip_start,
            skip_end=cfg.skip_end, chunk_steps=cfg.chunk_steps, progress=bar,
            # seed s of several starts from model_for(seed + s); one seed is the model itself
            init_fn=(lambda s: model_for(cfg, data, s)) if cfg.num_seeds > 1 else None, mesh=mesh,
            dtype=cfg.dtype, loss_fn=task_for(data), sharding_rules=sharding.parse_rules(cfg.sharding_rules))
        t_found = time.perf_counter()
    finally:
        bar.close()
    if jax.process_index() == 0:
        t = time.perf_counter()
        with faults.writing(workdir):  # a full or read-only disk: one line naming the file
            result.save(workdir, plot=False)
            png.draw(result, workdir / "lr_find.png")  # in the child, beside the events written here
            write_lr_find_events(result, workdir / "tensorboard" / "lr_find")
            png.wait()
            phases.update(range_test_compile=result.compile_time_s,
                          range_test=result.wall_time_s - result.compile_time_s, outputs=time.perf_counter() - t)
            if result.verification is not None:  # the default's candidate stage (lrjax.verify)
                phases["verification"] = result.verification.seconds
            phases["other"] = time.perf_counter() - t0 - sum(phases.values())  # model init, set-up
            tested = t_found - phases.get("verification", 0.0)  # the stage runs after the test
            started = tested - result.wall_time_s  # find_lr's clock: after the examples' transfer
            timeline.update(set_up=[_CLOCK(t_set_up), _CLOCK(started)],
                            range_test_compile=[_CLOCK(started), _CLOCK(started + result.compile_time_s)],
                            range_test=[_CLOCK(started + result.compile_time_s), _CLOCK(tested)],
                            **({"verification": [_CLOCK(tested), _CLOCK(t_found)]} if "verification" in phases else {}),
                            outputs=[_CLOCK(t), _CLOCK(t + phases["outputs"])])
            (workdir / "lr_find.json").write_text(json.dumps(
                {**result.to_json(), "startup_s": _STARTUP_S, "phases_s": phases, "timeline_s": timeline}, indent=1))
    if result.suggestion is None:
        if result.diverged_step is None:
            raise LrjaxError(f"the range test ran only {len(result.lrs)} steps, too few to suggest a rate; "
                             "raise --num-steps (its default is one epoch)")
        raise LrjaxError(f"the range test diverged at step {result.diverged_step} (lr {result.diverged_lr:.3g}), "
                         "too early to suggest a rate; lower --start-lr, let the rate grow more slowly "
                         "(--factor, --end-lr) or raise --diverge-factor")
    div = (f"diverged at step {result.diverged_step} (lr {result.diverged_lr:.3g})"
           if result.diverged_step is not None else "did not diverge")
    sugg = ", ".join(f"{k} {v:.3g}" for k, v in result.suggestions.items() if v is not None)
    _say(cfg, f"range test: {len(result.lrs)} steps from lr {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}, {div}, {result.wall_time_s:.1f}s "
              f"(compile {result.compile_time_s:.1f}s); suggestions: {sugg}")
    v = result.verification
    if v is not None:
        losses = ", ".join(f"{lr:.3g} {loss:.4f}" if loss is not None else f"{lr:.3g} diverged"
                           for lr, loss in zip(v.candidates, v.val_losses))
        _say(cfg, f"verification: {len(v.candidates)} rates below the curve's turn ({v.anchor:.3g}) trained {v.steps} "
                  f"steps each, validation loss: {losses}; {v.seconds:.1f}s"
                  + (f"; best {v.candidate:.3g}, between its neighbours {v.picked:.3g}"
                     if v.picked is not None and v.picked != v.candidate else ""))
    _say(cfg, f"suggested lr ({result.method}): {result.suggestion:.4g}  -> {workdir / 'lr_find.png'}")
    for note in result.notes:
        _say(cfg, f"note: {note}")
    if jax.process_index() == 0:
        for warning in result.warnings:
            print(f"lrjax: warning: {warning}", file=sys.stderr, flush=True)
    return result


def write_lr_find_events(result: RangeTestResult, logdir: Path) -> None:
    """The range-test curve in TensorBoard: loss, smoothed loss and lr against the step."""
    tb.write_curve(logdir, {"loss": result.losses, "smoothed_loss": result.smoothed, "learning_rate": result.lrs},
                   texts={"suggestions": json.dumps(result.suggestions)})


def train_job(cfg: Config, data: Dataset | None = None, lr: float | None = None,
              extra: dict[str, Any] | None = None, stop_after: int | None = None,
              started: float | None = None, phases: dict[str, float] | None = None,
              config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains with `lr` (default `cfg.lr`), evaluates the kept weights on test, writes metrics.json
    (`wall_time_s` counts from `started`, a `time.perf_counter()` value, when given; `phases` are
    the seconds of the work done since then, to which metrics.json's `phases_s` adds training's).
    `config` adds entries to the run's configuration kept in its checkpoints."""
    t0 = started if started is not None else time.perf_counter()
    phases = dict(phases or {})
    lr = lr if lr is not None else cfg.lr
    if lr is None:
        raise LrjaxError("lrjax train needs --lr (or use `lrjax run` to find one first)")
    if data is None:
        t = time.perf_counter()
        data = load(cfg)
        phases["data_load"] = time.perf_counter() - t
    workdir = Path(cfg.workdir)
    es = EarlyStopping(monitor=cfg.monitor, patience=cfg.patience, min_delta=cfg.min_delta,
                       restore_best_weights=cfg.restore_best)
    mesh = mesh_lib.make_mesh(cfg.mesh_shape)
    result: FitResult = fit(
        model_for(cfg, data, mesh=mesh), optimizer_for(cfg, steps.steps_per_epoch(train_size(data), cfg.batch_size)),
        data,
        lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, early_stopping=es, workdir=workdir,
        keep_latest=cfg.keep_latest, eval_batch_size=cfg.eval_batch_size,
        config={**cfg.to_dict(), **(config or {}), "lr": lr}, mesh=mesh, stop_after=stop_after,
        progress=print if cfg.progress else None, dtype=cfg.dtype, schedule=cfg.schedule,
        eval_every_steps=cfg.eval_every_steps, checkpoint_every_steps=cfg.checkpoint_every_steps,
        log_every_steps=cfg.log_every_steps, loss_fn=task_for(data),
        sharding_rules=sharding.parse_rules(cfg.sharding_rules))
    if result.interrupted:
        raise Interrupted(result)
    t = time.perf_counter()
    with jax.set_mesh(mesh):
        if isinstance(data, sources.Splits):
            from lrjax import stream

            evaluator = stream.StreamEvaluator(data.test, cfg.eval_batch_size, stream.chunk_sharding(mesh))
            try:
                evaluator.compile(result.state)
                test = {k: float(v) for k, v in jax.device_get(evaluator(result.state)).items()}
            finally:
                evaluator.close()
        else:
            test = result.evaluate(mesh_lib.replicate(split_examples(data, "test"), mesh), None, cfg.eval_batch_size)
    timings = result.timings
    phases.update(training_compile=timings["compile_s"], training=timings["train_s"],
                  checkpoint_io=timings["checkpoint_s"], tensorboard=timings["tensorboard_s"],
                  test_evaluation=time.perf_counter() - t)
    wall = time.perf_counter() - t0
    phases["other"] = wall - sum(phases.values())  # model init, training set-up, summaries
    metrics = {
        **{f"test_{k}": v for k, v in test.items()}, "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss, "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early, "lr": float(lr), "seed": cfg.seed,
        "optimizer": cfg.optimizer, "batch_size": cfg.batch_size, "dataset": cfg.dataset, "model": cfg.model,
        "wall_time_s": wall, "phases_s": phases, "startup_s": _STARTUP_S, **(extra or {}),
        "tensorboard": str(result.run_dir) if result.run_dir else None,
        # the mesh the state was created on (the first segment's); each resumed segment's own under `segments`
        "state_bytes_per_device": result.segments[0]["state_bytes_per_device"], "segments": result.segments,
        "history": result.history,
    }
    if jax.process_index() == 0:
        with faults.writing(workdir):
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    stop = f"stopped early, best epoch {result.best_epoch}" if result.stopped_early else "epoch limit reached"
    shown = ", ".join(f"test {k.replace('_', ' ')} {v:.4f}" for k, v in test.items() if k != "loss")
    _say(cfg, f"trained {result.epochs_run} epoch{'s' * (result.epochs_run != 1)} at lr {lr:.4g} ({stop}); "
              f"{shown}, test loss {test['loss']:.4f}; state {_mib(result.segments[-1]['state_bytes_per_device'])} "
              f"per device on {result.segments[-1]['mesh_shape']}; {metrics['wall_time_s']:.1f}s")
    _say(cfg, f"metrics: {workdir / 'metrics.json'}\ntensorboard: tensorboard --logdir {workdir / 'tensorboard'}")
    return metrics


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def checkpointed_run(cfg: Config) -> dict[str, Any] | None:
    """The meta of the run checkpointed in `cfg.workdir` (None when there is none), after checking
    that `cfg` describes the same run (`ConfigError` otherwise), so that `lrjax run` resumes it at
    its own rate, whatever lr_find.json says now, or refuses before writing anything."""
    directory = Path(cfg.workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    from lrjax.checkpoint import Checkpointer
    from lrjax.train import check_same_run

    ckpt = Checkpointer(directory)
    try:
        meta = ckpt.latest_meta()
    finally:
        ckpt.close()
    if meta is None or "lr" not in meta:
        return None  # nothing readable: training decides (it moves unreadable checkpoints aside)
    # the input path is what --input decides once the data are open: not comparable here
    current = {k: v for k, v in cfg.to_dict().items() if k != "input"}
    check_same_run(meta.get("config", {}), {**current, "lr": meta["lr"]}, directory)
    return meta


def read_json(path: Path, what: str) -> Any:
    """A JSON file the user or an earlier run wrote; `LrjaxError` naming it when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise LrjaxError(f"{path} is not valid JSON ({e}); {what}") from None


class Interrupted(LrjaxError):
    """Training stopped by SIGTERM/SIGINT after saving a checkpoint."""

    def __init__(self, result: FitResult):
        self.result = result
        epoch = result.history[-1]["epoch"] if result.history else 0
        how = "as asked (--stop-after)" if result.interrupted == "stop-after" else f"by {result.interrupted}"
        super().__init__(f"stopped {how} after epoch {epoch}; checkpoint saved: run the same command again "
                         "to resume")


def run_job(cfg: Config, stop_after: int | None = None) -> dict[str, Any]:
    """The seed workflow end to end; returns metrics.json's content (`stop_after` as in `train_job`)."""
    t0 = time.perf_counter()
    workdir = Path(cfg.workdir)
    # A workdir with checkpoints resumes that run at its rate, or is refused before anything is loaded or written.
    resumed = checkpointed_run(cfg)
    data = load(cfg)
    phases = {"data_load": time.perf_counter() - t0}
    if jax.process_index() == 0 and isinstance(data, Dataset):  # streamed: no decoded arrays to draw from
        t = time.perf_counter()
        with faults.writing(workdir):
            workdir.mkdir(parents=True, exist_ok=True)
            from lrjax import plots  # matplotlib: only where a picture is drawn

            plots.save_samples(data, workdir / "samples.png")
        phases["samples_png"] = time.perf_counter() - t
    free = optimizers.free_rate(optimizers.get(cfg.optimizer))
    if resumed is not None:
        lr, method = float(resumed["lr"]), resumed.get("config", {}).get("lr_method")
        _say(cfg, f"resuming: the checkpointed run's rate {lr!r} (epoch {resumed['epoch']} done)")
    elif free is not None:  # it sets its own step size: nothing for a range test to find
        lr, method = free, "lr-free"
        _say(cfg, f"{cfg.optimizer} sets its own step size: no range test, training at lr {lr:g}")
    else:
        t = time.perf_counter()
        result = find_lr_job(cfg, data)
        lr, method = result.suggestion * SCHEDULE_PEAK[cfg.schedule], result.method
        verified = result.verification.seconds if result.verification is not None else 0.0
        if verified:
            phases["verification"] = verified
        if cfg.schedule != "constant":
            _say(cfg, f"schedule {cfg.schedule}: peak lr {lr:.4g} ({SCHEDULE_PEAK[cfg.schedule]:g} x the suggestion)")
        phases.update(range_test_compile=result.compile_time_s,
                      range_test=result.wall_time_s - result.compile_time_s,
                      # the model's initialisation, lr_find.{json,csv,png} and the TensorBoard curve
                      range_test_init_and_outputs=time.perf_counter() - t - result.wall_time_s - verified)
    return train_job(cfg, data, lr=lr, extra={"lr_method": method}, stop_after=stop_after, started=t0,
                     phases=phases, config={"lr_method": method})


def sweep_job(cfg: Config, data: Dataset | None = None, suggestions: dict | None = None):
    """Trains the grid of rates x seeds at once; writes sweep.{json,csv,png} and TensorBoard runs."""
    from lrjax.numeric import nan_reduce
    from lrjax.sweeps import lr_grid, sweep, write_sweep_events

    if data is None:  # a sweep trains resident images; a text corpus resident or streamed (`lrjax.text`)
        if cfg.dataset != "text" and cfg.input == "stream":
            raise ConfigError("sweep: images are trained resident (--input resident or auto); --input stream is for "
                              "--dataset text")
        data = load(cfg) if cfg.dataset == "text" else load_resident(cfg)
    workdir = Path(cfg.workdir)
    grid = lr_grid(cfg.lrs, cfg.num_lrs)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    if suggestions is None:
        lr_find_file = Path(cfg.lr_find_json) if cfg.lr_find_json else workdir / "lr_find.json"
        if lr_find_file.exists():
            found = read_json(lr_find_file, "pass another --lr-find-json or remove it")
            suggestions = found.get("suggestions") if isinstance(found, dict) else None
            if not (isinstance(suggestions, dict) and all(
                    v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
                    for v in suggestions.values())):
                raise LrjaxError(f"{lr_find_file} has no 'suggestions' of the range test (names to positive "
                                 "rates or null); pass another --lr-find-json or remove it")
        elif cfg.lr_find_json:
            raise LrjaxError(f"--lr-find-json {lr_find_file} does not exist")
    _say(cfg, f"sweep: {len(grid)} rates {grid[0]:.3g}..{grid[-1]:.3g} x {len(seeds)} seed(s), "
              f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)}, as one program")

    def on_epoch(epoch, m):
        if cfg.progress and jax.process_index() == 0:
            name = "val_accuracy" if "val_accuracy" in m else "val_loss"  # the task's ranking metric
            high = name == "val_accuracy"
            mean = nan_reduce(np.nanmean, m[name], 0, -1.0 if high else np.inf)
            best = int(np.argmax(mean) if high else np.argmin(mean))
            print(f"epoch {epoch:3d}/{cfg.epochs}  best {_short(name)} {mean[best]:.4f} at lr {grid[best]:.3g}  |  "
                  f"live members {int(np.isfinite(m[name]).sum())}/{m[name].size}", flush=True)

    result = sweep(lambda s: model_for(cfg, data, s), optimizer_for(cfg), data, grid, seeds=seeds,
                   dtype=cfg.dtype, loss_fn=task_for(data),
                   epochs=cfg.epochs, batch_size=cfg.batch_size,
                   patience=cfg.patience if cfg.patience < cfg.epochs else None, min_delta=cfg.min_delta,
                   eval_batch_size=cfg.eval_batch_size, mesh=mesh_lib.make_mesh(cfg.mesh_shape, members=len(grid)),
                   on_epoch=on_epoch)
    result.suggestions = dict(suggestions or {})
    if jax.process_index() == 0:
        with faults.writing(workdir):
            result.save(workdir)
            write_sweep_events(result, workdir / "tensorboard" / "sweep",
                               hparams={"optimizer": cfg.optimizer, "batch_size": cfg.batch_size})
    if result.best_lr is None:
        raise LrjaxError(f"every member of the sweep diverged before its first validation, so there is no best "
                         f"rate ({workdir / 'sweep.json'}); lower the rates (--lrs)")
    score = result.best(result.rank_by).mean(0)[result.best_index]
    _say(cfg, f"best lr {result.best_lr:.4g} (mean best {_short(result.rank_by)} {score:.4f}); "
              f"{int(result.diverged.sum())} member(s) diverged; {result.wall_time_s:.1f}s -> {workdir / 'sweep.png'}")
    return result


def _short(metric: str) -> str:
    return metric.replace("val_accuracy", "val_acc")


def sample_job(workdir: str, prompt: str, tokens: int = 200, temperature: float = 0.0, seed: int = 0) -> str:
    """Text generated by the language model trained in `workdir` (its saved configuration, the best
    weights of its newest checkpoint): `tokens` bytes after `prompt`, greedy at temperature 0."""
    from lrjax.checkpoint import Checkpointer

    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise LrjaxError(f"{workdir} has no checkpoints/: train a language model there first (lrjax run)")
    if tokens < 1 or not temperature >= 0:
        raise ConfigError(f"--tokens must be >= 1 and --temperature >= 0, got {tokens} and {temperature}")
    ckpt = Checkpointer(directory)
    try:
        meta = ckpt.latest_meta()
        if meta is None:
            raise LrjaxError(f"no readable checkpoint in {directory}")
        cfg = Config.from_dict({**meta["config"], "workdir": str(workdir)})
        if cfg.dataset != "text":
            raise LrjaxError(f"{workdir} holds a {cfg.model} trained on {cfg.dataset}, not a language model")
        data = text.load_corpus(cfg.data_dir, cfg.context, cfg.resolved_cache_dir)
        state = steps.init_state(model_for(cfg, data), optimizer_for(cfg, steps.steps_per_epoch(
            train_size(data), cfg.batch_size)), float(meta["lr"]), loss_fn=tasks.next_token)
        target = {"params": state.params, "rest": state.rest, "opt_state": state.opt_state, "step": state.step,
                  "best_params": state.params, "best_rest": state.rest}
        _, tree, _ = ckpt.restore(target)
    finally:
        ckpt.close()
    model = state.replace(params=tree["best_params"], rest=tree["best_rest"]).model()
    model.eval()
    out = text.generate(model, prompt.encode(), tokens, cfg.context, temperature, seed)
    return prompt + out.decode("utf-8", errors="replace")
