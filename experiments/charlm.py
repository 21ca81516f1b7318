"""A small character-level Transformer LM and a text corpus, for the suggestion experiments only.

A stand-in for the language-model issue's `--model transformer --dataset text` until that lands: the
Python standard library's `email` and `json` packages as one corpus (what the acceptance uses), bytes
as tokens, non-overlapping windows; a pre-norm causal Transformer (flax NNX). `text_data` returns an
object with x_/y_ train/valid/test arrays as `find_lr`, `fit` and `sweep` take; `lm_loss` is the task
(per-window mean next-token cross-entropy, token accuracy).
"""

from __future__ import annotations

import sysconfig
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def corpus_bytes(packages=("email", "json")) -> np.ndarray:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for name in packages for p in (lib / name).rglob("*.py") if "__pycache__" not in p.parts)
    return np.frombuffer(b"\n".join(p.read_bytes() for p in files), np.uint8)


def text_data(context: int = 64, valid_fraction: float = 0.1, train_windows: int | None = None):
    """Windows of `context` bytes (inputs) and the next bytes (targets); the last `valid_fraction` of
    the corpus is validation (and test)."""
    tokens = corpus_bytes().astype(np.int32)
    n = (len(tokens) - 1) // context
    x = tokens[: n * context].reshape(n, context)
    y = tokens[1: n * context + 1].reshape(n, context)
    cut = int(n * (1 - valid_fraction))
    xt, yt = x[:cut], y[:cut]
    if train_windows is not None:
        xt, yt = xt[:train_windows], yt[:train_windows]
    return types.SimpleNamespace(name="text", x_train=xt, y_train=yt, x_valid=x[cut:], y_valid=y[cut:],
                                 x_test=x[cut:], y_test=y[cut:], num_classes=256)


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, h, mask):
        h = h + self.attn(self.ln1(h), mask=mask)
        return h + self.down(jax.nn.gelu(self.up(self.ln2(h))))


class CharLM(nnx.Module):
    def __init__(self, context: int, d: int = 64, layers: int = 2, heads: int = 4, vocab: int = 256, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (context, d)) * 0.02)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)]) if hasattr(nnx, "List") else [
            Block(d, heads, rngs) for _ in range(layers)]
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        t = tokens.shape[-1]
        h = self.embed(tokens) + self.pos[:t]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.ln(h))


def lm_loss(model, batch):
    x, y = batch
    logits = model(x).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return ce.mean(-1), {"accuracy": (jnp.argmax(logits, -1) == y).astype(jnp.float32).mean(-1)}
