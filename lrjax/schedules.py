"""Learning-rate schedules of training, from optax (nothing here re-implements one).

`make(name, peak_lr, total_steps)` returns a function of the micro-step that gives the rate to use,
or None for a rate that stays where the optimizer state holds it (`constant`, and `plateau`, whose
reduction is `optax.contrib.reduce_on_plateau` inside the optimizer: see `optimizers.Recipe`).
The training step sets the injected `learning_rate` from it before every step, so the rate used is
recorded with the step, checkpointed in the optimizer state and continued exactly on resume.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

SCHEDULES = ("constant", "onecycle", "cosine", "warmup_cosine", "plateau")
WARMUP_FRACTION = 0.05  # warmup_cosine: the first 5% of the optimizer steps


def make(name: str, peak_lr: float, total_steps: int, grad_accum_steps: int = 1) -> Callable | None:
    """The schedule `name` peaking at `peak_lr` over `total_steps` optimizer steps; its argument is the
    micro-step (the train state's step), divided by `grad_accum_steps` to count optimizer steps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if name in ("constant", "plateau"):
        return None
    total_steps = max(int(total_steps), 1)
    if name == "onecycle":  # fastai's fit_one_cycle: warm up over 30% to the peak, cosine down to peak/25e4
        schedule = optax.cosine_onecycle_schedule(total_steps, peak_lr)
    elif name == "cosine":
        schedule = optax.cosine_decay_schedule(peak_lr, total_steps)
    else:
        warmup = max(1, int(WARMUP_FRACTION * total_steps))
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total_steps, warmup + 1))
    if grad_accum_steps == 1:
        return schedule
    return lambda step: schedule(step // grad_accum_steps)
