"""Byte-level text corpora for language models: files -> a cached uint8 token stream -> windows.

`load_corpus(data_dir, context, cache_dir)` reads every UTF-8 text file under `data_dir`
(recursively, sorted paths; binary or non-UTF-8 files are skipped and counted), concatenates their
bytes (tokens, vocabulary 256: no tokenizer) and caches the stream as one uint8 file in the cache
folder, keyed by the files' paths, sizes and mtimes. The cache file carries a header (length,
file counts, SHA-256 of the tokens), is verified when read, written to a temporary name and renamed;
a damaged one is reported in one line and rebuilt.

Splits by position in the stream (files in sorted order): the last 5% is test, the 5% before it
validation, the rest training; they never overlap.

`TextInput` is the `lrjax.feeds.Input` of a corpus: the training tokens live on the devices once;
a step's row is B window start positions drawn on the host from (seed, epoch) alone, and the
compiled program cuts the windows `tokens[s : s + context + 1]` itself (`window_fetch`), so the
loss (`lrjax.tasks.next_token`) receives `{"tokens": int32 [B, context + 1]}`. An epoch is
`windows_per_epoch` random windows: len(train) // (context + 1) (one pass's worth of tokens),
capped at `MAX_WINDOWS_PER_EPOCH` so an epoch of a few-MB corpus stays short on a CPU. Validation
and test are the non-overlapping windows of their splits, evaluated as resident examples.

`TextStreamInput` (`--input stream`, or `auto` when the corpus exceeds the device-memory budget) holds
nothing on the devices: lrjax's Grain stream (`lrjax.stream.Stream`, `StepFeed`) reads each chunk's
windows from the memmap on the host (`Windows`), at the same starts per (seed, epoch) as `TextInput`
(`epoch_starts`), so a streamed fit or range test computes what the resident one does; validation
streams its non-overlapping windows too. A sweep needs the resident input.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lrjax import feeds, resident, steps
from lrjax import mesh as mesh_lib
from lrjax.errors import ConfigError, DataError

VOCAB = 256
SPLIT_FRACTION = 0.05  # of the token stream: test (the end), validation (just before it)
# 6,400 windows: 200 steps of batch 32. The default Transformer at context 128 took 0.66 s a step on
# the shared 2-core EPYC (161 range-test steps in 107 s), so a capped epoch is ~2 minutes there under
# load and well under one on idle cores; the acceptance corpus (stdlib email+xml+json, 0.74 MB) has
# 5,144 windows, under the cap.
MAX_WINDOWS_PER_EPOCH = 6_400
PROBE_WINDOWS = 256  # the training windows the input checks read (`Corpus.x_train`)
MAGIC = b"LRJXTOK1"
HEADER = struct.Struct("<8sQII32s")  # magic, token count, files read, files skipped, sha256 of the tokens


class Corpus:
    """A token stream split by position, and the windows of `context` + 1 tokens cut from it."""

    y_train = y_valid = y_test = None  # the examples are dicts {"tokens": ...} (`lrjax.data.split_examples`)

    def __init__(self, tokens: np.ndarray, context: int, name: str = "text", source: str = "tokens",
                 files: int = 0, skipped: int = 0, max_windows: int | None = MAX_WINDOWS_PER_EPOCH,
                 input: str = "resident"):
        if context < 1:
            raise ConfigError(f"--context must be >= 1, got {context}")
        self.tokens, self.context, self.name, self.source = tokens, int(context), name, source
        self.files, self.skipped = files, skipped
        self.input = input  # 'resident' (TextInput) or 'stream' (TextStreamInput): what input_for gives
        n = len(tokens)
        cut = int(n * SPLIT_FRACTION)
        self.bounds = {"train": (0, n - 2 * cut), "valid": (n - 2 * cut, n - cut), "test": (n - cut, n)}
        for split, (lo, hi) in self.bounds.items():
            if hi - lo < self.context + 1:
                raise DataError(f"{source}: {n} tokens leave the {split} split {hi - lo} tokens, fewer than one "
                                f"window of --context {context} + 1; give more text or a shorter --context")
        windows = (self.bounds["train"][1]) // (self.context + 1)
        self.windows_per_epoch = windows if max_windows is None else min(windows, max_windows)

    def split(self, name: str) -> np.ndarray:
        lo, hi = self.bounds[name]
        return self.tokens[lo:hi]

    def windows(self, name: str, count: int | None = None) -> dict[str, np.ndarray]:
        """The (first `count`) non-overlapping windows of a split, as int32 examples {"tokens": [n, context + 1]}."""
        t, w = self.split(name), self.context + 1
        n = len(t) // w if count is None else min(count, len(t) // w)
        return {"tokens": np.asarray(t[: n * w], np.int32).reshape(-1, w)}

    @property
    def resident_nbytes(self) -> int:
        """What `TextInput` puts on each device: the uint8 training tokens, the int32 validation windows."""
        return len(self.split("train")) + 4 * len(self.split("valid"))

    @property
    def x_train(self):
        """The training split's first windows, what the input checks read (a model's input shape; every
        byte is a valid token, so the whole split needs no check and no int32 copy of it is made);
        training draws random windows from the tokens instead."""
        return self.windows("train", PROBE_WINDOWS)

    @property
    def x_valid(self):
        return self.windows("valid")

    @property
    def x_test(self):
        return self.windows("test")

    def input_for(self, who: str, *, batch_size: int, mesh, chunk_steps: int = 64, **_) -> feeds.Input:
        """The `Input` the entry points use (`lrjax.inputs.make_input` calls this), by `self.input`."""
        if self.input == "resident":
            return TextInput(self, batch_size, mesh)
        return TextStreamInput(self, batch_size, mesh, chunk_steps)

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {hi - lo}" for k, (lo, hi) in self.bounds.items())
        return (f"data: {self.name} from {self.source}: {self.files} text files ({self.skipped} binary or "
                f"non-UTF-8 skipped), {len(self.tokens)} byte tokens: {sizes}; {self.windows_per_epoch} windows "
                f"of {self.context}+1 tokens per epoch")


# ---------------------------------------------------------------------------------------------
# Reading files, and the token cache
# ---------------------------------------------------------------------------------------------

def text_files(data_dir) -> list[Path]:
    root = Path(data_dir)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"text folder {root} {what} (--data-dir)")
    return sorted(p for p in root.rglob("*") if p.is_file())


def corpus_key(root: Path, files: list[Path]) -> str:
    """A hash of the folder, and each file's relative path, size and mtime."""
    h = hashlib.sha256(str(root.resolve()).encode())
    for p in files:
        st = p.stat()
        h.update(f"\0{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def read_tokens(files: list[Path]) -> tuple[np.ndarray, int, int]:
    """The bytes of every UTF-8 file in order as uint8 tokens; (tokens, files read, files skipped)."""
    parts, skipped = [], 0
    for p in files:
        raw = p.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if b"\0" in raw:  # valid UTF-8 but binary all the same
            skipped += 1
            continue
        parts.append(raw)
    return np.frombuffer(b"".join(parts), np.uint8), len(parts), skipped


def write_cache(path: Path, tokens: np.ndarray, files: int, skipped: int) -> None:
    """The token file at `path`, written under a temporary name of this process's and renamed; a
    read-only or full cache folder is said in one line and the run goes on without the cache."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, len(tokens), files, skipped, hashlib.sha256(tokens.tobytes()).digest()))
            f.write(tokens.tobytes())
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a part
    except OSError as e:
        print(f"lrjax: cannot write the token cache in {path.parent} ({e.strerror or e}); running without the cache",
              file=sys.stderr, flush=True)
        try:
            tmp.unlink(missing_ok=True)  # a partial file would keep the space
        except OSError:
            pass


def read_cache(path: Path) -> tuple[np.ndarray, int, int]:
    """The cached tokens (a read-only memmap), checked against the header; ValueError if damaged."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ValueError("shorter than its header")
    magic, n, files, skipped, digest = HEADER.unpack(head)
    if magic != MAGIC:
        raise ValueError("not a lrjax token file")
    if path.stat().st_size != HEADER.size + n:
        raise ValueError(f"{path.stat().st_size - HEADER.size} token bytes, the header says {n}")
    tokens = np.memmap(path, np.uint8, mode="r", offset=HEADER.size, shape=(n,)) if n else np.zeros(0, np.uint8)
    if hashlib.sha256(tokens).digest() != digest:
        raise ValueError("checksum mismatch")
    return tokens, files, skipped


def load_corpus(data_dir, context: int, cache_dir, max_windows: int | None = MAX_WINDOWS_PER_EPOCH) -> Corpus:
    """The corpus of the text files under `data_dir`, through the token cache in `cache_dir`/text."""
    if data_dir is None:
        raise ConfigError("--dataset text needs --data-dir: a folder of text files")
    root = Path(data_dir)
    files = text_files(root)
    path = Path(cache_dir) / "text" / f"{corpus_key(root, files)}.tokens"
    loaded = None
    if path.exists():
        try:
            loaded = read_cache(path)
        except (OSError, ValueError) as e:
            print(f"lrjax: token cache {path} is damaged ({e}); removed, rebuilding it", file=sys.stderr, flush=True)
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only cache: read from the files, the write says so
    if loaded is None:
        loaded = read_tokens(files)
        if len(loaded[0]) == 0:
            raise DataError(f"text folder {root} holds no UTF-8 text files ({loaded[2]} skipped)")
        write_cache(path, *loaded)
    tokens, n_files, skipped = loaded
    return Corpus(tokens, context, source=str(root), files=n_files, skipped=skipped, max_windows=max_windows)


# ---------------------------------------------------------------------------------------------
# The Input: random windows cut on the device
# ---------------------------------------------------------------------------------------------

@functools.lru_cache
def window_fetch(length: int):
    """The programs' static fetch for windows of `length` tokens (one function per length, so the
    compiled programs are shared): rows are window starts [B] into the device-resident tokens."""

    def fetch(tokens, starts, w):
        starts = mesh_lib.shard_batch(starts)
        cut = jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (length,)))(starts)
        return {"tokens": mesh_lib.shard_batch(cut.astype(jnp.int32))}, mesh_lib.shard_batch(w)

    fetch.__name__ = fetch.__qualname__ = f"window_fetch_{length}"
    return fetch


def epoch_starts(seed: int, epoch: int, num_train: int, length: int, windows: int, batch_size: int):
    """Window starts [steps, B] and weights of epoch `epoch`, from (seed, epoch) alone (numpy PCG64
    seeded with SeedSequence([seed, epoch]), as the image paths draw their orders)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    steps = -(-windows // batch_size)
    starts = rng.integers(0, num_train - length + 1, size=steps * batch_size).astype(np.int32)
    w = (np.arange(steps * batch_size) < windows).astype(np.float32)
    return starts.reshape(steps, batch_size), w.reshape(steps, batch_size)


class TextInput(feeds.Input):
    """A `Corpus` for `fit`, `find_lr` and `sweep`: training tokens resident on the devices, random windows."""

    kind = "resident"
    seeds = None  # any number: each seed cuts its own windows from the same tokens

    def __init__(self, corpus: Corpus, batch_size: int, mesh):
        self.corpus, self.batch_size, self.mesh = corpus, int(batch_size), mesh
        self.length = corpus.context + 1
        self.train = mesh_lib.replicate(np.asarray(corpus.split("train")), mesh)
        self.num_train = len(corpus.split("train"))
        self.num_examples = corpus.windows_per_epoch
        self.steps_per_epoch = -(-corpus.windows_per_epoch // self.batch_size)

    def _order(self, seed: int):
        return lambda epoch: epoch_starts(seed, epoch, self.num_train, self.length, self.num_examples,
                                          self.batch_size)

    def _feed(self, order, steps: int, k: int, masked: bool = True, seed_axis: bool = False,
              place=None) -> resident.ResidentFeed:
        feed = resident.ResidentFeed(self.train, order, steps, k, place=place or self._replicate, masked=masked,
                                     seed_axis=seed_axis)
        feed.fetch = window_fetch(self.length)
        return feed

    def train_feed(self, seed: int, cadence: int, total_steps: int) -> resident.ResidentFeed:
        return self._feed(self._order(seed), self.steps_per_epoch, cadence, cadence != self.steps_per_epoch)

    def range_feed(self, seeds: list[int], chunk: int, num_steps: int) -> resident.ResidentFeed:
        # the range test's steps as one long "epoch" of as many windows (epoch 0: not a training epoch's),
        # each seed its own windows, seeds split over `members` as `lrjax.resident`'s range feed
        def draw(seed, _=None):
            return epoch_starts(seed, 0, self.num_train, self.length, num_steps * self.batch_size, self.batch_size)

        rows = resident.seeds_order(draw, seeds)(0) if len(seeds) > 1 else draw(int(seeds[0]))
        return self._feed(lambda _: rows, num_steps, chunk, seed_axis=len(seeds) > 1,
                          place=lambda t: mesh_lib.spread_members(self._replicate(t)))

    def sweep_feed(self, seeds: list[int], chunk: int) -> resident.ResidentFeed:
        # each seed's windows of the epoch, as `fit` draws them (every rate of a seed on the same
        # windows), one chunk per epoch, as `lrjax.resident`'s sweep feed
        order = resident.seeds_order(lambda s, epoch: self._order(s)(epoch), seeds)
        return self._feed(order, self.steps_per_epoch, self.steps_per_epoch, seed_axis=True)

    def _replicate(self, tree):
        return mesh_lib.replicate(tree, self.mesh)

    def valid_examples(self, count: int | None = None):
        return self.corpus.windows("valid", count)

    def evaluator(self, batch_size: int) -> feeds.Evaluator:
        return feeds.Evaluator(self._replicate(self.valid_examples()), batch_size)


# ---------------------------------------------------------------------------------------------
# The streamed Input: windows read from the memmap on the host, through lrjax's Grain stream
# ---------------------------------------------------------------------------------------------

class Windows:
    """The windows of `length` tokens in tokens[lo:hi] as a split `lrjax.stream.Stream` reads:
    `read(positions)` gives the windows starting at lo + position * `stride` (uint8 [b, length], and
    int32 zeros where an image split has labels); `len` is the windows a pass reads (`count`)."""

    def __init__(self, tokens: np.ndarray, lo: int, hi: int, length: int, stride: int, count: int, name: str):
        self.tokens, self.lo, self.hi, self.length, self.stride = tokens, lo, hi, length, stride
        self.count, self.name, self.example_shape = count, name, (length,)

    def __len__(self) -> int:
        return self.count

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        view = np.lib.stride_tricks.sliding_window_view(self.tokens[self.lo:self.hi], self.length)
        return view[np.asarray(positions) * self.stride], np.zeros(len(positions), np.int32)


def window_order(seed: int, first_epoch: int, num_train: int, length: int, windows: int, batch_size: int,
                 epoch: int) -> np.ndarray:
    """The window starts of the stream's pass `epoch` (0-based): `epoch_starts` of epoch
    `first_epoch + epoch`, as `TextInput` draws them (training epochs are 1-based, the range test is 0)."""
    return epoch_starts(seed, first_epoch + epoch, num_train, length, windows, batch_size)[0].reshape(-1)


def window_batch(_, batch, w):
    """The streamed windows' fetch: a chunk step's uint8 windows (x; y unused) as the task's int32 tokens."""
    return steps.fed_batch({"tokens": batch[0].astype(jnp.int32)}, w)


class TextStreamInput(feeds.Input):
    """A `Corpus` streamed through Grain in chunks of `chunk_steps` steps: nothing on the devices
    but each chunk's windows (see the module docstring)."""

    kind = "stream"
    seeds = 1

    def __init__(self, corpus: Corpus, batch_size: int, mesh, chunk_steps: int):
        self.corpus, self.batch_size, self.mesh, self.chunk_steps = corpus, int(batch_size), mesh, int(chunk_steps)
        self.length = corpus.context + 1
        self.num_train = len(corpus.split("train"))
        self.num_examples = corpus.windows_per_epoch
        self.steps_per_epoch = -(-corpus.windows_per_epoch // self.batch_size)

    def _feed(self, seed: int, first_epoch: int, windows: int, chunk: int, total_steps: int):
        from lrjax import stream  # Grain: imported where the streamed path is used

        split = Windows(self.corpus.tokens, *self.corpus.bounds["train"], self.length, 1, windows, "train")
        order = functools.partial(window_order, int(seed), first_epoch, self.num_train, self.length, windows,
                                  self.batch_size)
        feed = stream.StepFeed(stream.Stream(split, self.batch_size, chunk_steps=chunk, seed=seed, steps=total_steps,
                                             epoch_aligned=False, workers=0, order=order),
                               feeds.chunk_sharding(self.mesh))
        feed.fetch = window_batch
        return feed

    def train_feed(self, seed: int, cadence: int, total_steps: int):
        return self._feed(seed, 1, self.num_examples, min(self.chunk_steps, self.steps_per_epoch), total_steps)

    def range_feed(self, seeds: list[int], chunk: int, num_steps: int):
        if len(seeds) != 1:
            raise ConfigError("a text range test runs one seed: use --num-seeds 1")
        # as TextInput's: the range test's steps as one long epoch 0 of as many windows
        return self._feed(seeds[0], 0, num_steps * self.batch_size, chunk, num_steps)

    def sweep_feed(self, seeds: list[int], chunk: int):
        if len(seeds) != 1:
            raise ConfigError("a streamed text sweep runs one seed (every rate on its windows): use --num-seeds 1, "
                              "or --input resident")
        # each epoch's windows as `fit` streams them; endless: the sweep reads its epochs and closes it
        return self._feed(seeds[0], 1, self.num_examples, min(chunk, self.steps_per_epoch), None)

    def valid_examples(self, count: int | None = None):
        return self.corpus.windows("valid", count)

    def evaluator(self, batch_size: int):
        from lrjax import stream

        lo, hi = self.corpus.bounds["valid"]
        split = Windows(self.corpus.tokens, lo, hi, self.length, self.length, (hi - lo) // self.length, "valid")
        return stream.StreamEvaluator(split, batch_size, feeds.chunk_sharding(self.mesh), workers=0, fetch=window_batch)


def generate(model, prompt: bytes, tokens: int, context: int, temperature: float = 0.0, seed: int = 0) -> bytes:
    """`tokens` bytes after `prompt` from `model` (eval mode): greedy at temperature 0, else sampled.
    Each step runs the model on the last `context` tokens (one compiled program, padded on the right)."""
    graphdef, state = nnx_split(model)
    seq = list(prompt) or [ord("\n")]
    key = jax.random.key(seed)
    out = []
    for _ in range(tokens):
        window = seq[-context:]
        n = len(window)
        x = np.zeros((1, context), np.int32)
        x[0, :n] = window
        key, sub = jax.random.split(key)
        nxt = int(_next_token(graphdef, state, x, n - 1, sub, float(temperature)))
        seq.append(nxt)
        out.append(nxt)
    return bytes(out)


def nnx_split(model):
    from flax import nnx

    return nnx.split(model)


@functools.partial(jax.jit, static_argnums=(0,))
def _next_token(graphdef, state, x, last, key, temperature):
    from flax import nnx

    logits = nnx.merge(graphdef, state)(x)[0, last].astype(jnp.float32)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits))
