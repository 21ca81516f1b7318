"""The process's own clock: how long ago it started, as the OS recorded it.

metrics.json and lr_find.json report `startup_s`, the seconds from the process's start to the
job's (the interpreter, importing lrjax and its dependencies, and under the CLI the parsing of its
flags), beside the job's own `phases_s`, so that a slower import shows up as plainly as a slower
compile; lr_find.json's `timeline_s` places the phases on this clock (`process_clock`).
Python has no portable way to ask when its process started; Linux says it in
/proc/self/stat, elsewhere the answer is None.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def process_age_s() -> float | None:
    """Seconds from this process's start to now; None where the OS does not tell (resolution: a
    clock tick, usually 10 ms)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # field 22, starttime, in clock ticks since boot; fields are counted from after the
        # parenthesised command name, which may itself hold spaces
        start_ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
        now = time.clock_gettime(time.CLOCK_BOOTTIME)  # the clock starttime is measured on
        return now - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def process_clock(age_s: float | None) -> Callable[[float], float | None]:
    """A function from a `time.perf_counter()` reading to seconds since the process's start, given
    the process's age `age_s` (process_age_s()) read just now; None where the age is unknown.

    lr_find.json's `timeline_s` places each phase as [start, end] on this clock, so a phase that
    overlaps another shows as overlapping; `phases_s` keeps the durations alone."""
    if age_s is None:
        return lambda t: None
    start = time.perf_counter() - age_s
    return lambda t: round(t - start, 4)
