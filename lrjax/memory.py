"""Whether a dataset goes onto the devices whole (resident) or streams from the host: `choose_input`
for --input resident|stream|auto, with --device-memory-budget parsed by `parse_size` and defaulting
to `default_budget()`."""

from __future__ import annotations

import os
import re

import jax
import numpy as np

from lrjax.errors import ConfigError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'20MB' -> 20_000_000, '1.5GiB' -> 1610612736, '512' -> 512 bytes (decimal and binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and (match.group(2).lower() or "b")
    if not match or unit not in _UNITS:
        raise ConfigError(f"size {text!r} is not a number with a unit such as 20MB, 4GB or 512MiB "
                          f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def host_memory() -> int:
    """Physical memory, or the container's (cgroup) limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                total = min(total, int(f.read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    return total


def default_budget(share: float = 0.5) -> int:
    """Device memory the resident dataset may take on each device: `share` of an accelerator's
    `bytes_limit`; on CPU, `share` of host memory divided among the local devices and the host's own
    float32 copy (the resident path keeps one), since they all live in the same RAM."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(share * stats["bytes_limit"])
    return int(share * host_memory() / (jax.local_device_count() + 1))


def choose_input(mode: str, nbytes: int, budget: int) -> tuple[str, str]:
    """('resident' | 'stream', a printable reason) for --input resident|stream|auto, where `nbytes`
    is what the resident path puts on each device and `budget` the --device-memory-budget."""
    size, limit = format_size(nbytes), format_size(budget)
    if mode == "resident":
        return "resident", f"input: resident (--input resident; the dataset takes {size} per device)"
    if mode == "stream":
        return "stream", f"input: streamed from the host in uint8 chunks (--input stream; resident it would take {size} per device)"
    if mode != "auto":
        raise ConfigError(f"--input {mode!r}: choose resident, stream or auto")
    if nbytes <= budget:
        return "resident", f"input: resident (the dataset's {size} fit the device-memory budget of {limit})"
    return "stream", (f"input: streamed from the host in uint8 chunks (the dataset's {size} exceed the "
                      f"device-memory budget of {limit})")


def resident_nbytes(splits) -> int:
    """Bytes the resident path holds per device for `lrjax.sources.Splits`: float32 images, int32 labels."""
    n = sum(len(s) for s in (splits.train, splits.valid, splits.test))
    return n * (int(np.prod(splits.train.example_shape)) * 4 + 4)
