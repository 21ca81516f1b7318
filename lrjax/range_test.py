"""The learning-rate range test as one compiled program, and its result object.

The rates come from an optax exponential schedule (`optax.exponential_decay` with decay_rate > 1,
transition_steps=1), evaluated once into an array that the program consumes step by step: rates are
data, so another start or factor never recompiles the steps (only the tiny schedule program). The
steps run in `lax.scan` over device-resident data (each seed's batch order is drawn once on the
host and sent along); `num_seeds` independent tests are one program (vmapped on accelerators; on a
CPU each core loops over its share of seeds, see `mesh.map_members`). The scan runs in equal chunks
of a few hundred steps so the host can print progress between them (the same compiled chunk is
reused; the host dispatches chunk i+1 before reading chunk i) and can stop early once every seed has
diverged. Divergence is detected on device: later steps of a diverged seed are masked (skipped) and
never reach the curve, the suggestion or the plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from lrjax import mesh as mesh_lib
from lrjax import feeds, inputs, optimizers, sharding, steps, suggest, tasks, validate, verify
from lrjax.errors import ConfigError
from lrjax.steps import OptimizerFactory, TrainState
from lrjax.tasks import LossFn


def exponential_lrs(start_lr: float, num_steps: int, factor: float | None = None,
                    end_lr: float | None = None) -> np.ndarray:
    """Rates of the range test from optax's exponential schedule: start * factor**i, i < num_steps.

    Give `factor` (the seed's x1.005 per step) or `end_lr` (the last rate, reached at the last step).
    """
    if (factor is None) == (end_lr is None):
        raise ValueError("give exactly one of factor and end_lr")
    if end_lr is not None:
        if num_steps < 2:
            raise ValueError(f"reaching end_lr takes num_steps >= 2, got {num_steps}")
        factor = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    return np.asarray(jax.device_get(_schedule_values(np.float32(start_lr), float(factor), num_steps)))


@partial(jax.jit, static_argnums=(1, 2), compiler_options=steps.ONE_SHOT)
def _schedule_values(start_lr, factor: float, num_steps: int) -> jax.Array:
    # One small program rather than a handful of eagerly compiled ops (~0.2 s in a new process).
    schedule = optax.exponential_decay(init_value=start_lr, transition_steps=1, decay_rate=factor)
    return schedule(jnp.arange(num_steps)).astype(jnp.float32)


class _Carry(struct.PyTreeNode):
    state: TrainState
    avg: jax.Array  # exponential moving average of the loss (biased)
    best: jax.Array  # best debiased (smoothed) loss so far
    diverged_step: jax.Array  # -1 until the test diverges
    t: jax.Array


def _init_carry(state: TrainState) -> _Carry:
    return _Carry(state=state, avg=jnp.zeros([]), best=jnp.full([], jnp.inf),
                  diverged_step=jnp.full([], -1, jnp.int32), t=jnp.zeros([], jnp.int32))


def _range_chunk(carry: _Carry, fetch, rows, lrs, active, pos, val, hp):
    """Runs one chunk of range-test steps of one seed; pure, so `_run_chunk` can vmap or map it over seeds.
    `rows` are scanned along their leading axis and `fetch(row)` gives a step's (batch, weights).

    A step runs only while `active` (inside num_steps) and the seed has not diverged; otherwise the
    state is left as it is and the step's loss is NaN and `valid` is False.
    """
    val_examples, val_w = val

    def body(c: _Carry, inputs):
        row, lr, act, p = inputs
        run = act & (c.diverged_step < 0)

        def step(c: _Carry):
            state, m = steps.train_step(c.state.with_lr(lr), *fetch(row))
            loss = m["loss"]
            avg = hp["beta"] * c.avg + (1 - hp["beta"]) * loss
            smoothed = avg / (1 - hp["beta"] ** (c.t + 1).astype(jnp.float32))
            # fastai's rule on the smoothed loss (robust to batch noise), smoothed > diverge_factor x lowest,
            # written as a rise above the lowest by (diverge_factor - 1) x its magnitude so that it also
            # holds for losses that go negative (log-likelihoods); a non-finite loss always stops.
            rise = smoothed - c.best
            bad = ~jnp.isfinite(loss) | (rise > (hp["diverge_factor"] - 1) * jnp.abs(c.best))
            new = c.replace(state=state, avg=avg, best=jnp.minimum(c.best, smoothed),
                            diverged_step=jnp.where(bad, c.t, -1), t=c.t + 1)
            return new, loss, ~bad

        def skip(c: _Carry):
            return c.replace(t=c.t + act.astype(jnp.int32)), jnp.full([], jnp.nan), jnp.zeros([], bool)

        c, loss, valid = jax.lax.cond(run, step, skip, c)
        if val_examples is None:
            val_loss = jnp.full([], jnp.nan)
        else:
            # The predicate depends on the step number only, which is the same for every seed, so
            # under vmap this stays a real branch (a per-seed predicate would evaluate every step).
            val_loss = jax.lax.cond(
                p % hp["eval_every"] == 0,
                lambda s: steps.eval_step(s, val_examples, val_w)["loss"] / jnp.sum(val_w),
                lambda s: jnp.full([], jnp.nan), c.state)
            val_loss = jnp.where(valid, val_loss, jnp.nan)
        return c, {"loss": jnp.where(valid, loss, jnp.nan), "valid": valid, "val_loss": val_loss}

    return jax.lax.scan(body, carry, (rows, lrs, active, pos))


@partial(jax.jit, static_argnames=("chunk", "fetch", "member_loop"), donate_argnums=(0,))
def _run_chunk(carry, start, context, rows, w, lrs, active, val, hp, *, chunk: int, fetch, member_loop: str = "vmap"):
    """Steps [start, start + chunk) of the test over a feed's chunk (`lrjax.feeds.Feed`: step i's batch
    is `fetch(context, rows[i], w[i])`). `start` is traced, so every chunk runs one program; with
    several seeds (a leading seed axis on carry, rows and w) the chunk runs for each seed, all at once
    or one after another per device (`member_loop`, see `mesh.map_members`)."""
    pos = start + jnp.arange(chunk)  # step numbers
    lrs, active = (jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in (lrs, active))
    batch_of = lambda context: lambda r: fetch(context, *r)  # noqa: E731
    if carry.t.ndim == 0:  # one seed, no vmap: lax.cond really skips the steps after divergence
        carry, out = _range_chunk(carry, batch_of(context), (rows, w), lrs, active, pos, val, hp)
    else:
        carry, out = mesh_lib.map_members(
            lambda m, context, *shared: _range_chunk(m[0], batch_of(context), (m[1], m[2]), *shared),
            (carry, rows, w), context, lrs, active, pos, val, hp, loop=member_loop)
    # The carry is donated to the next chunk: the host reads divergence from this output instead.
    return carry, {**out, "diverged_step": carry.diverged_step + 0}


@partial(jax.jit, static_argnames=("real",), compiler_options=steps.ONE_SHOT)
def _init_carries(states, *, real: int) -> _Carry:
    """Initial carries as one small program (stacked along a seed axis for several seeds). Seeds from
    `real` on only fill the devices of the `members` axis: they start as diverged, so they never run
    a step."""
    if len(states) == 1:
        return _init_carry(states[0])
    carry = jax.vmap(_init_carry)(jax.tree.map(lambda *a: jnp.stack(a), *states))
    filler = jnp.arange(len(states)) >= real
    return carry.replace(diverged_step=jnp.where(filler, 0, carry.diverged_step))


def _chunking(num_steps: int, chunk_steps: int) -> tuple[int, int]:
    """Equal chunks of at most `chunk_steps` covering num_steps with the fewest padded steps."""
    num_chunks = -(-num_steps // chunk_steps)
    return num_chunks, -(-num_steps // num_chunks)


@dataclasses.dataclass
class RangeTestResult:
    """What a range test measured; `lrs`, `losses` and `smoothed` cover the steps before divergence."""

    lrs: np.ndarray
    losses: np.ndarray  # raw loss per step, mean over seeds
    smoothed: np.ndarray  # debiased EMA of `losses`
    per_seed_losses: np.ndarray  # (num_seeds, len(lrs))
    suggestions: dict[str, float | None]
    suggestion: float | None
    method: str
    diverged_step: int | None
    diverged_lr: float | None
    num_steps: int
    num_seeds: int
    optimizer: str
    batch_size: int
    seed: int
    wall_time_s: float
    compile_time_s: float
    beta: float = 0.98  # the smoothing used
    val_steps: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, int))
    val_losses: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    verification: Any = None  # `lrjax.verify.Verification` of the default method, else None
    notes: list[str] = dataclasses.field(default_factory=list)  # how the suggestion was reached, when unusual

    @property
    def warnings(self) -> list[str]:
        """What makes the suggestion doubtful: a curve under 40 points; else, read off the smoothed
        curve after its first 10 points (the suggestions' default warm-up, where one batch's loss
        still dominates): lowest in the first 5% and 10% higher at the end, the loss rose without
        falling first (the rates started too high); a test that did not diverge and whose loss never
        rose 10% above its lowest ended before the turn the suggestions look for (the rates stopped
        too low). Besides either: the rate grew more than `suggest.LAG_GROWTH_LIMIT` (4x) over the
        smoothing's lag (``beta / (1 - beta)`` steps, 49 at 0.98), so the smoothed curve trails the raw
        loss by that much and the rules that read its turn suggest too high (not said when the verification
        stage picked the rate: it reads the curve with a smoothing scaled to the test, `suggest.turn`)."""
        sm = np.asarray(self.smoothed, np.float64)
        if not np.all(np.isfinite(sm)) or self.suggestion is None:
            return []
        if len(sm) < 40:
            return [f"the curve has only {len(sm)} points"
                    + (f" (it diverged at lr {self.diverged_lr:.3g})" if self.diverged_lr is not None else "")
                    + ": too few to trust the suggestion; start lower or let the rates grow more slowly "
                    "(--start-lr, --factor, --num-steps)"]
        out = []
        lowest = 10 + int(np.argmin(sm[10:]))
        rise = (sm[-1] - sm[lowest]) / abs(sm[lowest])
        if lowest - 10 < 0.05 * (len(sm) - 10) and rise > 0.1:
            out.append(f"the smoothed loss rose from step {lowest} (lr {self.lrs[lowest]:.3g}) without falling "
                       "first: the rates started too high; lower the start rate (--start-lr)")
        elif self.diverged_step is None and rise <= 0.1:
            out.append(f"the smoothed loss never turned back up (lowest at lr {self.lrs[lowest]:.3g}, last lr "
                       f"{self.lrs[-1]:.3g}): the rates stopped too low for the suggestions; let them grow "
                       "further (--end-lr, --factor or --num-steps)")
        lag, growth = self.beta / (1 - self.beta), suggest.lag_growth(self.lrs, self.beta)
        # the verified default reads the curve with a smoothing scaled to the test (suggest.turn): no lag to warn of
        if growth > suggest.LAG_GROWTH_LIMIT and self.verification is None:
            out.append(f"the rate grows x{growth:.3g} over the smoothing's lag (~{lag:.0f} steps at --beta "
                       f"{self.beta:g}): the smoothed curve trails the raw loss and the rules that read its "
                       "turn (seed, minimum) suggest too high, so lagsafe gives valley's rate; for a sharper "
                       "curve run more steps (--num-steps) or smooth less (--beta)")
        return out

    @property
    def band(self) -> tuple[np.ndarray, np.ndarray]:
        """Spread over seeds (min, max of the per-seed smoothed curves)."""
        sm = np.stack([suggest.smooth(l, self.beta) for l in self.per_seed_losses])
        return sm.min(0), sm.max(0)

    def to_json(self) -> dict[str, Any]:
        d = {
            "lrs": self.lrs.tolist(), "losses": self.losses.tolist(), "smoothed": self.smoothed.tolist(),
            "suggestion": self.suggestion, "suggestions": self.suggestions, "method": self.method,
            "diverged_step": self.diverged_step, "diverged_lr": self.diverged_lr,
            "num_steps": self.num_steps, "num_seeds": self.num_seeds, "optimizer": self.optimizer,
            "batch_size": self.batch_size, "seed": self.seed, "beta": self.beta,
            "wall_time_s": self.wall_time_s, "compile_time_s": self.compile_time_s, "warnings": self.warnings,
        }
        if self.verification is not None:
            d["verification"] = self.verification.to_json()
            d["find_lr_time_s"] = self.wall_time_s + self.verification.seconds  # the test and the stage
        if self.notes:
            d["notes"] = list(self.notes)
        if self.num_seeds > 1:
            d["per_seed_losses"] = self.per_seed_losses.tolist()
        if len(self.val_steps):
            d["val_steps"] = self.val_steps.tolist()
            d["val_losses"] = self.val_losses.tolist()
        return d

    def save(self, workdir: str | Path, plot: bool = True) -> None:
        """Writes lr_find.json, lr_find.csv and (unless not `plot`) lr_find.png into `workdir`."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "lr_find.json").write_text(json.dumps(self.to_json(), indent=1))
        header = ["step", "lr", "loss", "smoothed"] + [f"loss_seed{i}" for i in range(self.num_seeds)
                                                       if self.num_seeds > 1]
        rows = [header]
        for i, (lr, loss, sm) in enumerate(zip(self.lrs, self.losses, self.smoothed)):
            extra = [f"{v:.6g}" for v in self.per_seed_losses[:, i]] if self.num_seeds > 1 else []
            rows.append([str(i), f"{lr:.8g}", f"{loss:.6g}", f"{sm:.6g}", *extra])
        (workdir / "lr_find.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
        if plot:
            self.plot(workdir / "lr_find.png")

    def plot(self, path: str | Path) -> None:
        from lrjax import plots

        plots.plot_lr_find(self, path)


def find_lr(model: nnx.Module, optimizer: OptimizerFactory, data, *, batch_size: int = 32,
            start_lr: float | None = None, factor: float | None = None, end_lr: float | None = None,
            num_steps: int | None = None, diverge_factor: float = 4.0, beta: float = 0.98,
            num_seeds: int = 1, seed: int = 42, eval_every: int = 0, eval_examples: int = 1000,
            method: str = "default", skip_start: int = 10, skip_end: int = 5,
            chunk_steps: int = 256, stop_on_divergence: bool = True,
            progress: Callable[[dict], None] | None = None,
            init_fn: Callable[[int], nnx.Module] | None = None,
            mesh: jax.sharding.Mesh | None = None, member_loop: str | None = None,
            loss_fn: LossFn = tasks.classification, dtype=None, valid=None,
            verify_steps: int | None = None, sharding_rules=None) -> RangeTestResult:
    """Runs the learning-rate range test and returns a `RangeTestResult`.

    `model` gives the architecture (never changed); seed s of `num_seeds` starts from `init_fn(seed + s)`
    when given, else from `model`'s weights. `optimizer` is a factory taking `learning_rate`. `data` is
    arrays, a `lrjax.sources.Splits` or an iterable of batches with `valid=` (as `fit`; not arrays: one
    seed). The rate grows from `start_lr` to `end_lr` over `num_steps` (default one epoch), or by
    `factor` per step; left as None they follow the optimizer's family (`optimizers.range_defaults`).
    `eval_every` > 0 adds a validation curve on `eval_examples` examples. `method` picks the suggestion
    (`lrjax.suggest`). Batches split over `mesh`'s `data` x `fsdp`, seeds over `members` (`member_loop`: 'vmap'
    or 'map'), one seed's state over `fsdp`/`tensor` by `sharding_rules`; `stop_on_divergence=False` runs every
    chunk (benchmarks). See docs/guide.md.
    The default method, "verified", adds a short stage after the test (`lrjax.verify`, docs/suggestion.md):
    rates below the curve's turn trained from the starting weights for `verify_steps` (default an eighth
    of an epoch), the lowest validation loss wins; `result.verification` holds what it measured.
    """
    method = suggest.DEFAULT_METHOD if method == "default" else method
    start_lr, factor, end_lr = _resolve_range(optimizer, start_lr, factor, end_lr)
    _check_args(start_lr=start_lr, factor=factor, end_lr=end_lr, num_steps=num_steps, beta=beta,
                diverge_factor=diverge_factor, num_seeds=num_seeds, chunk_steps=chunk_steps, method=method)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh("auto", members=num_seeds)
    validate.check_input("find_lr", model, data, loss_fn=loss_fn, valid=valid, need_valid=eval_every > 0)
    inp = inputs.make_input("find_lr", data, batch_size=batch_size, mesh=mesh, valid=valid, chunk_steps=chunk_steps,
                            keyword="num_steps")
    if inp.seeds is not None and num_seeds > inp.seeds:
        raise ValueError(f"find_lr: a range test fed batch by batch ({inp.kind} input) runs one seed; got num_seeds "
                         f"{num_seeds}")
    batch_size = inp.batch_size
    mesh_lib.check_batch_size(batch_size, mesh)
    validate.check_first_batch("find_lr", model, inp, loss_fn=loss_fn)
    with jax.set_mesh(mesh):  # everything below: batches split over `data` x `fsdp`, seeds over `members`
        t_start = time.perf_counter()
        # Under gradient accumulation (optimizers.Recipe) the rate rises once per optimizer step of k
        # micro-batches, and the curve records each optimizer step's mean loss over its micro-batches.
        k = getattr(optimizer, "grad_accum_steps", 1)
        num_steps = num_steps if num_steps is not None else _one_epoch(inp, k)
        lrs = np.repeat(exponential_lrs(start_lr, num_steps, factor=None if end_lr is not None else factor,
                                        end_lr=end_lr), k)
        num_steps *= k  # micro-steps from here to the curve
        models = [init_fn(seed + s) for s in range(num_seeds)] if init_fn else [model] * num_seeds
        # Several seeds fill whole blocks of the `members` axis; filler seeds never run (see _init_carries).
        total = mesh_lib.padded_members(num_seeds, mesh) if num_seeds > 1 else 1
        shard = dict(mesh=mesh if num_seeds == 1 and sharding.is_sharded(mesh) else None, rules=sharding_rules)
        states = [steps.init_state(m, optimizer, start_lr, loss_fn=loss_fn, dtype=dtype, **shard)
                  for m in models + models[-1:] * (total - num_seeds)]
        num_chunks, chunk = _chunking(num_steps, chunk_steps)
        carry = _init_carries(states, real=num_seeds)
        carry = mesh_lib.spread_members(carry) if num_seeds > 1 else carry
        feed = inp.range_feed(list(range(seed, seed + total)), chunk, num_steps)
        hp = {"beta": np.float32(beta), "diverge_factor": np.float32(diverge_factor),
              "eval_every": np.int32(max(eval_every, 1))}
        args = (np.concatenate([lrs, np.full(num_chunks * chunk - num_steps, lrs[-1], np.float32)]),
                np.arange(num_chunks * chunk) < num_steps, _validation(inp, eval_every, eval_examples, mesh), hp)
        try:
            outputs, compile_time, program = _chunks(feed, carry, args, num_chunks, chunk, num_steps, progress, lrs,
                                                     num_seeds, stop_on_divergence,
                                                     member_loop or mesh_lib.default_member_loop(mesh))
        finally:
            feed.close()
        result = _result(outputs, total, num_seeds, num_steps, k, lrs, beta, skip_start, skip_end, method,
                         optimizer=_name(optimizer), batch_size=batch_size, seed=seed,
                         wall_time_s=time.perf_counter() - t_start, compile_time_s=compile_time)
        validate.range_first_step(result.diverged_step, float(lrs[0]), models)  # before any update: not the rate
        if method == suggest.DEFAULT_METHOD:
            # one seed's program, the test's own where it ran one seed
            program = program if num_seeds == 1 else partial(_run_chunk, chunk=chunk, fetch=feed.fetch)
            new_state = lambda: steps.init_state(models[0], optimizer, start_lr, loss_fn=loss_fn, dtype=dtype, **shard)  # noqa: E731
            _verify(result, inp, program, new_state, args, chunk, num_chunks * chunk, verify_steps=verify_steps,
                    eval_examples=eval_examples, mesh=mesh)
    return result


def _verify(result: RangeTestResult, inp, program, new_state, args, chunk: int, length: int, *, verify_steps: int | None,
            eval_examples: int, mesh) -> None:
    """The default's verification stage (`lrjax.verify`) after the test: its pick becomes the suggestion,
    or, where it cannot run or finds nothing, `suggest.FALLBACK_METHOD`'s (with a note saying why).
    Each candidate runs the test's compiled chunk `program` from a fresh state (`new_state()`) over the
    test's first batches (at most its `length` padded steps), at its rate and then a cooldown
    (`verify.candidate_schedule`)."""
    anchor = result.suggestions.get("turn")
    reason = None
    if inp.kind == "iterable":  # one pass of the user's batches: the first ones cannot be read again
        reason = "iterable input"
    elif anchor is None:
        reason = "the curve is too short for a turn"
    else:
        try:
            valid = inp.valid_examples(eval_examples)
        except (AttributeError, ConfigError):  # arrays without x_valid
            valid = None
        if valid is None or steps.num_examples(valid) == 0:
            reason = "no validation examples"
    if reason is None:
        n = min(length, verify.default_steps(inp.steps_per_epoch) if verify_steps is None else int(verify_steps))
        if n < 1:
            raise ValueError(f"find_lr: verify_steps must be positive, got {verify_steps}")
        # whole batches only: the candidates are scored with each batch's own normalisation statistics
        # (`steps.batch_statistics`), which padding would change
        b = min(1000, steps.num_examples(valid))
        m = steps.num_examples(valid) // b * b
        evaluator = feeds.Evaluator(mesh_lib.replicate(jax.tree.map(lambda a: a[:m], valid), mesh), b)
        val, hp = args[2:]
        compiled = []  # the evaluation's model structure; it compiles once, for the first candidate

        def train(rates):
            outs = []
            for rate in rates:  # dispatched one after another; read once all have run
                carry, feed = _init_carries([new_state()], real=1), inp.range_feed([result.seed], chunk, n)
                lrs = verify.candidate_schedule(rate, n, length)
                try:
                    for start in range(0, n, chunk):
                        carry, out = program(carry, np.int32(start), feed.context, *feed.take(min(chunk, n - start)),
                                             lrs, np.arange(length) < n, val, hp)
                finally:
                    feed.close()
                if not compiled:
                    compiled.append(steps.batch_statistics(carry.state).eval_graphdef)
                    evaluator.compile(carry.state.replace(eval_graphdef=compiled[0]))
                outs.append((out["diverged_step"], evaluator(carry.state.replace(eval_graphdef=compiled[0]))["loss"]))
            return [None if int(d) >= 0 else float(v) for d, v in jax.device_get(outs)]

        result.verification = verify.verify(anchor, train, steps=n, batch_size=result.batch_size, valid_examples=m)
        if result.verification.picked is None:
            reason = "every candidate diverged"
    picked = result.verification.picked if reason is None else result.suggestions.get(suggest.FALLBACK_METHOD)
    if reason is not None:
        result.notes.append(f"the suggestion is {suggest.FALLBACK_METHOD}'s: the verification stage did not run "
                            f"or found nothing ({reason})")
    result.suggestions[suggest.DEFAULT_METHOD] = picked
    result.suggestion = picked


def _resolve_range(optimizer, start_lr, factor, end_lr):
    """(start_lr, factor, end_lr) with the optimizer family's defaults for what was left None."""
    if factor is None and end_lr is None and start_lr is not None:
        default_end = optimizers.range_defaults(optimizer).end_lr
        if default_end is not None and not default_end > start_lr:
            raise ValueError(f"find_lr: start_lr {start_lr} is not below {default_end}, where the range test of "
                             f"a {optimizers.family(optimizer)} optimizer ends by default; give end_lr or factor")
    return dataclasses.astuple(optimizers.resolve_range(optimizer, start_lr, factor, end_lr))


def _one_epoch(inp, k: int) -> int:
    num_steps = inp.steps_per_epoch // k
    if num_steps < 2:
        raise ValueError(f"one epoch at batch size {inp.batch_size} is a single step; the range test needs "
                         "num_steps >= 2 (--num-steps)")
    return num_steps


def _validation(inp, eval_every: int, eval_examples: int, mesh):
    """The validation curve's examples on the devices and their weights, or (None, None) without one."""
    if eval_every <= 0:
        return None, None
    try:
        valid = inp.valid_examples(eval_examples)
    except ConfigError:
        raise ValueError("find_lr: eval_every > 0 with an iterable of batches needs the validation examples "
                         "as valid=") from None
    m = steps.num_examples(valid)
    if m == 0:
        raise ValueError("eval_every > 0 needs validation examples (data.x_valid is empty or eval_examples is 0)")
    return mesh_lib.replicate(valid, mesh), jnp.ones(m, jnp.float32)


def _chunks(feed, carry, args, num_chunks, chunk, num_steps, progress, lrs, num_seeds, stop_on_divergence,
            member_loop):
    """Runs the chunks (compiling the first), reading each one's output while the next runs; stops
    once every seed has diverged. Returns (outputs, compile seconds, the compiled chunk)."""
    compile_time, outputs = 0.0, []
    for c in range(num_chunks):
        call = (carry, np.int32(c * chunk), feed.context, *feed.take(min(chunk, num_steps - c * chunk)), *args)
        if c == 0:
            t0 = time.perf_counter()
            compiled = _run_chunk.lower(*call, chunk=chunk, fetch=feed.fetch, member_loop=member_loop).compile()
            compile_time = time.perf_counter() - t0
        carry, out = compiled(*call)  # dispatched asynchronously
        outputs.append(out)
        if c > 0 and _report(c - 1, outputs[-2], progress, lrs, num_steps, num_seeds) and stop_on_divergence:
            break
    else:
        _report(num_chunks - 1, outputs[-1], progress, lrs, num_steps, num_seeds)
    return outputs, compile_time, compiled


def _result(outputs, total, num_seeds, num_steps, k, lrs, beta, skip_start, skip_end, method, **fields):
    """The curve (before the first seed stopped being valid, in optimizer steps), its suggestions."""
    # (seeds, steps) on the host, also for a single unbatched seed
    out = [jax.tree.map(lambda a: np.asarray(a).reshape(total, -1)[:num_seeds], o) for o in mesh_lib.to_host(outputs)]
    per_seed, valid, val_losses = (np.concatenate([o[key] for o in out], axis=1)[:, :num_steps]
                                   for key in ("loss", "valid", "val_loss"))
    # The mean curve needs every seed: it ends where the first seed stopped being valid.
    length = int(np.argmin(valid.all(0))) if not valid.all() else valid.shape[1]
    first_div = [int(d) for d in out[-1]["diverged_step"].ravel() if d >= 0]
    diverged_step = min(first_div) if first_div else None
    if k > 1:  # back to optimizer steps: whole groups of k micro-batches, their mean loss
        length, num_steps, lrs = length // k, num_steps // k, lrs[::k]
        diverged_step = None if diverged_step is None else diverged_step // k
        per_seed = per_seed[:, :length * k].reshape(num_seeds, length, k).mean(-1)
        val_losses = val_losses[:, :length * k:k]
    per_seed = per_seed[:, :length]
    losses = per_seed.mean(0)
    smoothed = suggest.smooth(losses, beta)
    kept_lrs = lrs[:length].astype(np.float64)
    suggestions = suggest.suggest_all(kept_lrs, smoothed, skip_start=skip_start, skip_end=skip_end, beta=beta)
    val_mask = np.isfinite(val_losses[:, :length]).all(0)
    return RangeTestResult(
        lrs=kept_lrs, losses=losses, smoothed=smoothed, per_seed_losses=per_seed, suggestions=suggestions,
        suggestion=suggestions.get(method), method=method, diverged_step=diverged_step,
        diverged_lr=float(lrs[diverged_step]) if diverged_step is not None else None, num_steps=num_steps,
        num_seeds=num_seeds, beta=beta, val_steps=np.nonzero(val_mask)[0],
        val_losses=val_losses[:, :length].mean(0)[val_mask], **fields)


def _check_args(*, start_lr, factor, end_lr, num_steps, beta, diverge_factor, num_seeds, chunk_steps,
                method) -> None:
    """The API's arguments, checked before anything compiles (the CLI checks its flags in `Config`)."""
    problems = []
    if not start_lr > 0:
        problems.append(f"start_lr must be positive, got {start_lr}")
    if end_lr is not None and not end_lr > start_lr:
        problems.append(f"end_lr {end_lr} must exceed start_lr {start_lr}")
    if end_lr is None and (factor is None or not factor > 1):
        problems.append(f"factor must be > 1 (the rate grows), got {factor}")
    if num_steps is not None and num_steps < 2:
        problems.append(f"num_steps must be >= 2, got {num_steps}")
    if not 0 <= beta < 1:
        problems.append(f"beta must be in [0, 1), got {beta}")
    if not diverge_factor > 1:
        problems.append(f"diverge_factor must be > 1, got {diverge_factor}")
    if num_seeds < 1 or chunk_steps < 1:
        problems.append(f"num_seeds and chunk_steps must be positive, got {num_seeds} and {chunk_steps}")
    if method not in suggest.NAMES:
        problems.append(f"method must be one of {', '.join(suggest.NAMES)} or 'default', got {method!r}")
    if problems:
        raise ValueError("find_lr: " + "; ".join(problems))


def _report(c: int, out: dict, progress, lrs, num_steps, num_seeds) -> bool:
    """Reads chunk `c`'s output (blocking), reports progress; True when every seed has diverged."""
    loss, diverged = mesh_lib.to_host((out["loss"], out["diverged_step"]))
    loss, diverged = np.atleast_2d(loss), np.atleast_1d(diverged)
    chunk = loss.shape[1]
    done = min((c + 1) * chunk, num_steps)
    loss = loss[:num_seeds]  # without the filler seeds that pad the `members` axis (never run)
    # A step a seed did not run is NaN (never inf): the mean over the seeds that ran, where any did.
    finite = np.nanmean(loss[:, ~np.isnan(loss).all(0)], 0)
    if progress is not None:
        progress({"step": done, "num_steps": num_steps, "lr": float(lrs[done - 1]),
                  "loss": float(finite[-1]) if finite.size else math.nan,
                  "diverged": bool((diverged >= 0).all())})
    return bool((diverged >= 0).all())


def _name(optimizer: Any) -> str:
    return getattr(optimizer, "__name__", None) or getattr(getattr(optimizer, "func", None), "__name__",
                                                           repr(optimizer))
