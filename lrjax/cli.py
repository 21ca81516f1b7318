"""The `lrjax` command line: a parser generated from `lrjax.config.Config`, and one call per subcommand.

Every flag is a `Config` field (its help text and the subcommands that show it live there); the
jobs themselves are `lrjax.workflow` functions. This is the one place that turns an exception into a
line and an exit code: user errors (`LrjaxError`) and the filesystem's refusals (disk full,
read-only, no permission, over quota: `lrjax.faults`, also when a library wraps them) print one line
and exit 1, with the traceback only under `--debug` or $LRJAX_DEBUG=1 (2 for a bad flag); SIGTERM/SIGINT
during training exits 143/130 after saving a checkpoint. Any other exception is a bug: its traceback.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import os
import sys
import traceback
import types
import typing

from lrjax import faults, overlap
from lrjax.errors import ConfigError, LrjaxError

SUBCOMMANDS = {
    "find-lr": "learning-rate range test: lr_find.json/.csv/.png and a suggested rate",
    "train": "train with --lr: early stopping, Orbax checkpoints (resumable), TensorBoard, metrics.json",
    "run": "the seed workflow: range test -> suggested rate -> re-initialised model -> training -> test",
    "sweep": "train a log grid of learning rates at once (one compiled program) and compare them",
}
EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130, "stop-after": 0}


def _unwrap_optional(tp):
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _tuple_parser(item_type, name):
    def parse(text: str):
        try:
            return tuple(item_type(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item_type.__name__}s, got {text!r}")
    parse.__name__ = name
    return parse


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = f.metadata["help"]
    tp = _unwrap_optional(tp)
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                            help=f"{help_text} (default: {'on' if f.default else 'off'})")
        return
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        shown = ",".join(str(v) for v in f.default)
        parser.add_argument(flag, type=_tuple_parser(item, f"{item.__name__} list"), default=f.default,
                            metavar=item.__name__.upper() + ",...", help=f"{help_text} (default: {shown})")
        return
    shown = "" if f.default is None else f" (default: {f.default})"
    parser.add_argument(flag, type=tp, default=f.default, metavar=tp.__name__.upper(), help=help_text + shown)


def build_parser() -> argparse.ArgumentParser:
    from lrjax.config import Config  # brings optax, so JAX: imported after main() starts the data read

    parser = argparse.ArgumentParser(
        prog="lrjax", description="Find a good learning rate fast, then train with it (JAX/Flax NNX).",
        epilog="Run `lrjax SUBCOMMAND --help` for a subcommand's flags.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    hints = typing.get_type_hints(Config)
    for name, description in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=description, description=description)
        p.set_defaults(subparser=p)  # flag errors found after parsing print this subcommand's usage
        for f in dataclasses.fields(Config):
            if name in f.metadata["commands"]:
                _add_field(p, f, hints[f.name])
        if name in ("train", "run"):
            p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                           help="end after this epoch with a checkpoint, as a preemption would, and exit 0; "
                                "the same command resumes (time-boxed jobs, tests)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    from lrjax.config import Config

    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in names})


def enable_compilation_cache(path: str | None) -> None:
    """A second run of the same command loads its programs instead of compiling them again
    (`path` None switches the cache off again)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)  # default 1 s: ours are shorter


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process's own command line, which ends when this call returns
        # Python's shutdown runs garbage collections over every object that JAX, Flax and the rest
        # created, 0.3-1 s on 2 cores; frozen, they go with the process's memory. Every output is
        # written and closed before then (atexit runs this last: it is registered first).
        atexit.register(gc.freeze)
    # the data's read starts first, on another core, beside the imports below (lrjax.overlap)
    overlap.read_ahead(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    finally:
        overlap.drop_read_ahead()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.command == "train" and cfg.lr is None:
            raise ConfigError("lrjax train needs --lr (or use `lrjax run` to find one first)")
        if getattr(args, "stop_after", None) is not None and args.stop_after < 1:
            raise ConfigError(f"--stop-after must be an epoch >= 1, got {args.stop_after}")
        if os.path.exists(cfg.workdir) and not os.path.isdir(cfg.workdir):
            raise ConfigError(f"--workdir {cfg.workdir} is a file, not a folder")
    except ConfigError as e:
        args.subparser.error(str(e))  # exits 2 with the subcommand's usage
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if cfg.debug:
        os.environ["LRJAX_DEBUG"] = "1"  # read by lrjax.faults, here and in processes started from here
    try:
        from lrjax import mesh as mesh_lib
        from lrjax import workflow

        if not mesh_lib.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id):
            mesh_lib.use_cpu_cores()  # on a CPU: seeds and sweep members run on every core
        if cfg.compilation_cache:
            enable_compilation_cache(os.path.join(cfg.resolved_cache_dir, "jax"))
        if args.command == "find-lr":
            workflow.find_lr_job(cfg)
        elif args.command == "train":
            workflow.train_job(cfg, stop_after=args.stop_after)
        elif args.command == "run":
            workflow.run_job(cfg, stop_after=args.stop_after)
        elif args.command == "sweep":
            workflow.sweep_job(cfg)
    except workflow.Interrupted as e:
        print(f"lrjax: {e}", file=sys.stderr)
        return EXIT_SIGNAL.get(e.result.interrupted, 1)
    except KeyboardInterrupt:
        print("lrjax: interrupted", file=sys.stderr)
        if argv is None:  # the command's own process: end it now, as asked twice
            _exit_now(130)
        return 130
    except Exception as e:
        return _error(e)
    return 0


def _exit_now(code: int) -> None:
    """Ends the process without the interpreter's teardown, which waits for the epoch the device is
    still running (20 s of a 25 s epoch, measured); lrjax's checkpoint and event files are closed
    by then (fit's `finally`), and a save cut short is cleaned up by the next run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _error(e: Exception) -> int:
    """One line and exit 1 for the user's errors and the filesystem's; any other exception propagates."""
    if isinstance(e, LrjaxError):
        line = str(e)
    else:
        line = faults.describe_os_error(e)
        if line is None and isinstance(e, OSError):  # e.g. a missing folder: the user's to fix, one line
            line = str(e)
        if line is None:
            raise e
    if faults.debug():
        traceback.print_exception(e)
    print(f"lrjax: error: {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
