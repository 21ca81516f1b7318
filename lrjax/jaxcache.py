"""JAX's persistent compilation cache as lrjax turns it on (`enable`), with the guarantees of lrjax's
other caches: each entry is written under a temporary name of its own process and renamed (two
processes compiling the same program at once leave one whole entry; a killed one leaves none), carries
its length and CRC-32 (checked on every read: a damaged or partial entry is said in one line, removed
and compiled again, where JAX alone would warn on every run and never replace it), and a folder that
cannot be written (read-only, full) is said once and the run goes on without keeping its programs.

The folder's entries are JAX's (`<key>-cache`, the compressed executable) behind a 20-byte header.
An entry without the header (written by JAX itself, before lrjax kept the folder) is removed and
compiled again, once, without a word. Imports nothing of lrjax; JAX's cache is reached through
`jax._src.compilation_cache.get_file_cache`, the one factory it builds its file cache with (a JAX
without it keeps its own cache).
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import zlib
from pathlib import Path

MAGIC = b"lrjaxC1\0"
HEADER = struct.Struct("<8sQI")  # magic, length of the entry's value, its CRC-32
SUFFIX = "-cache"  # JAX's own name for an entry: <key>-cache


class HealingCache:
    """JAX's cache interface (`get(key)`, `put(key, value)`) over the folder `path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = self._path = Path(path)  # _path: what JAX's reset_cache logs
        self.writable = True
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._cannot_write(e)

    def _file(self, key: str) -> Path:
        if not key:
            raise ValueError("key cannot be empty")
        return self.path / f"{key}{SUFFIX}"

    def get(self, key: str) -> bytes | None:
        file = self._file(key)
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            _say(f"lrjax: cannot read the compilation cache entry {file} ({e.strerror or e}); compiling instead")
            return None
        damage = _damage(raw)
        if damage is None:
            return raw[HEADER.size:]
        if damage:
            _say(f"lrjax: the compilation cache entry {file} is damaged ({damage}); removed, compiling it again")
        try:
            file.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder: compiled again each run, the write says so
        return None

    def put(self, key: str, value: bytes) -> None:
        if not self.writable:
            return
        file = self._file(key)
        tmp = file.with_name(f"{file.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, len(value), zlib.crc32(value)))
                f.write(value)
            os.replace(tmp, file)  # readers see no entry or a whole one
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)  # a partial file would keep the space
            except OSError:
                pass
            self._cannot_write(e)

    def _cannot_write(self, e: OSError) -> None:
        self.writable = False
        _say(f"lrjax: cannot write the compilation cache in {self.path} ({e.strerror or e}); running without "
             "the cache (programs are compiled again next run)")


def _damage(raw: bytes) -> str | None:
    """What is wrong with an entry's bytes: None if whole, '' if it is not lrjax's (no header)."""
    if not (raw.startswith(MAGIC) or MAGIC.startswith(raw)):
        return ""
    if len(raw) < HEADER.size:
        return f"{len(raw)} bytes, shorter than its header"
    _, length, crc = HEADER.unpack_from(raw)
    if len(raw) - HEADER.size != length:
        return f"{len(raw) - HEADER.size} bytes of {length}"
    if zlib.crc32(memoryview(raw)[HEADER.size:]) != crc:
        return "its CRC-32 does not match"
    return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def enable(path: str | os.PathLike | None) -> None:
    """JAX's persistent compilation cache in `path` (None: off again): a second run of the same command
    loads its programs instead of compiling them."""
    import jax

    jax.config.update("jax_compilation_cache_dir", None if path is None else os.fspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)  # default 1 s: ours are shorter
    try:
        from jax._src import compilation_cache
    except ImportError:
        return
    if hasattr(compilation_cache, "get_file_cache") and hasattr(compilation_cache, "reset_cache"):
        compilation_cache.get_file_cache = lambda p: (HealingCache(p), p)
        compilation_cache.reset_cache()  # built again, through the factory above, at the next compile
