"""Matplotlib figures written to PNG files. Plotting only.

Figures are `matplotlib.figure.Figure` objects, not pyplot's: no global figure registry, no GUI
backend, nothing to close, and safe in threads, as matplotlib's docs advise for use outside an
interactive session.

Drawing is most of a plot's cost, so each figure is drawn once: fixed margins instead of
`bbox_inches="tight"` or a layout engine (either draws the figure twice), log-axis tick labels as
plain numbers instead of mathtext (whose parser is slow on first use), and a curve longer than the
axes are wide drawn as the lowest and highest point of each pixel column (spikes stay visible;
the csv and json files keep every point).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from lrjax.numeric import nan_reduce

_MARKERS = {"valley": "o", "steepest": "v", "minimum": "s", "seed": "D"}
_DPI = 100


def _log_x(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))  # 0.001, 0.01, 1e-05
    # minor ticks at 2x and 5x of each decade, not all eight: each tick is an object to build and draw
    ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))


def _columns(fig, ax) -> int:
    """The axes' width in pixels in the saved PNG."""
    return max(1, int(fig.get_figwidth() * _DPI * ax.get_position().width))


def decimate(x: np.ndarray, y: np.ndarray, columns: int) -> np.ndarray:
    """Indices of the points to draw of the curve (x increasing, log-scaled) on an axis `columns`
    pixels wide: every point when there are at most two per column; else the first and last point
    and, in each column, the lowest and the highest, in their order along the curve."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    if n <= 2 * columns or not (np.all(x > 0) and np.all(np.diff(x) >= 0)) or x[-1] == x[0]:
        return np.arange(n)
    lx = np.log(x)
    column = np.minimum(((lx - lx[0]) / (lx[-1] - lx[0]) * columns).astype(np.int64), columns - 1)
    # per column, lowest value first; a NaN (a gap in the line) is never a column's lowest or highest
    lowest_first = np.lexsort((np.where(np.isnan(y), np.inf, y), column))
    highest_last = np.lexsort((np.where(np.isnan(y), -np.inf, y), column))
    starts = np.flatnonzero(np.diff(column[lowest_first], prepend=-1))
    ends = np.r_[starts[1:], n] - 1
    return np.unique(np.r_[0, lowest_first[starts], highest_last[ends], n - 1])


def plot_lr_find(result, path: str | Path) -> None:
    """The seed's plot done well: loss vs lr (log x), y clipped to the first loss, min line, suggestions."""
    lrs, losses, smoothed = result.lrs, result.losses, result.smoothed
    fig = Figure(figsize=(8, 5))
    fig.subplots_adjust(left=0.085, right=0.98, bottom=0.1, top=0.93)
    ax = fig.subplots()
    if len(lrs):
        keep = decimate(lrs, losses, _columns(fig, ax))
        ax.plot(lrs[keep], losses[keep], color="0.75", lw=0.8, label="loss (raw)")
        if result.num_seeds > 1:
            lo, hi = result.band
            ax.fill_between(lrs[keep], lo[keep], hi[keep], color="C0", alpha=0.2,
                            label=f"{result.num_seeds} seeds (min-max)")
        ax.plot(lrs[keep], smoothed[keep], color="C0", lw=2, label="loss (smoothed)")
        ax.axhline(float(np.min(smoothed)), color="k", ls=":", lw=1, label=f"min {np.min(smoothed):.3g}")
        _log_x(ax)
        top = float(np.max(smoothed[:20]))  # the start of the curve: later blow-ups are clipped
        ax.set_ylim(float(np.min(smoothed)) * 0.9, top * 1.05)
        for i, (name, lr) in enumerate(result.suggestions.items()):
            if lr is None:
                continue
            y = float(np.interp(np.log(lr), np.log(lrs), smoothed))
            chosen = name == result.method
            ax.plot([lr], [y], marker=_MARKERS.get(name, "o"), ms=10 if chosen else 7, ls="none",
                    color=f"C{i + 1}", label=f"{name}: {lr:.3g}" + (" (suggested)" if chosen else ""))
        if result.diverged_lr is not None:
            ax.axvline(result.diverged_lr, color="C3", ls="--", lw=1, label=f"diverged at {result.diverged_lr:.3g}")
        if len(result.val_steps):
            ax.plot(lrs[result.val_steps], result.val_losses, "x", color="C5", label="validation loss")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title(f"LR range test: {result.optimizer}, batch {result.batch_size}, {result.num_seeds} seed(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def warm_up() -> None:
    """Draws a small throwaway figure with a log axis, a legend and a title into memory: the first
    figure a process draws pays for loading the font and the PNG encoder (~0.07 s on a 2-core CPU),
    which a process that draws later can pay in advance, while it waits (lrjax.overlap's child)."""
    fig = Figure(figsize=(2, 2))
    ax = fig.subplots()
    ax.plot([1e-3, 1.0], [1.0, 2.0], marker="o", label="warm-up")
    _log_x(ax)
    ax.set_title("warm-up")
    ax.legend(fontsize=8)
    fig.savefig(io.BytesIO(), format="png", dpi=_DPI)


def plot_samples(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | Path,
                 rows: int = 4, cols: int = 10) -> None:
    """The seed's grid of the first training images titled with their class names.

    One mosaic image on one axes: 40 axes took ~0.6 s to draw, this ~0.1 s (the run's slowest output).
    """
    images = np.asarray(images, np.float32)[: rows * cols]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    images = images / max(1.0, float(images.max(initial=0.0)))  # uint8 or [0, 1] -> [0, 1]
    gray = images.ndim == 3
    h, w = images.shape[1:3]
    gap, title = max(2, w // 5), max(6, h // 3)  # pixels between images, and above each for its title
    cell_h, cell_w = h + title, w + gap
    # white background: 0 in the "binary" colormap of grayscale images, 1 in RGB
    mosaic = np.zeros((rows * cell_h, cols * cell_w)) if gray else np.ones((rows * cell_h, cols * cell_w, 3))
    fig = Figure(figsize=(cols * 1.2, cols * 1.2 * mosaic.shape[0] / mosaic.shape[1]))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        top, left = r * cell_h + title, c * cell_w + gap // 2
        mosaic[top: top + h, left: left + w] = image if gray else image[..., :3]
        ax.text(left + w / 2, top - 1.5, class_names[int(labels[i])], ha="center", va="bottom", fontsize=8)
    ax.imshow(mosaic, cmap="binary" if gray else None, interpolation="nearest", vmin=0, vmax=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)


def plot_history(history: Sequence[dict], path: str | Path) -> None:
    """Training curves (the seed's pd.DataFrame(history).plot()): loss and accuracy per epoch."""
    fig = Figure(figsize=(8, 5))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.97)
    ax = fig.subplots()
    epochs = [h["epoch"] for h in history]
    for key, style in (("loss", "C0-"), ("val_loss", "C0--"), ("accuracy", "C1-"), ("val_accuracy", "C1--")):
        ax.plot(epochs, [h[key] for h in history], style, label=key)
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, path)


def _save(fig, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)


def plot_sweep(result, path: str | Path) -> None:
    """Best validation accuracy and loss vs learning rate (log x), seed spread shaded, suggestions marked."""

    lrs = result.lrs
    fig = Figure(figsize=(12, 4.5))
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12, top=0.9, wspace=0.18)
    axes = fig.subplots(1, 2)
    for ax, values, label in ((axes[0], result.best_val_accuracy, "best validation accuracy"),
                              (axes[1], np.where(np.isfinite(result.best_val_loss), result.best_val_loss, np.nan),
                               "best validation loss")):
        mean = nan_reduce(np.nanmean, values, 0, np.nan)
        ax.plot(lrs, mean, "o-", color="C0", label=f"mean over {len(result.seeds)} seed(s)")
        if len(result.seeds) > 1:
            ax.fill_between(lrs, nan_reduce(np.nanmin, values, 0, np.nan), nan_reduce(np.nanmax, values, 0, np.nan),
                            color="C0", alpha=0.2, label="seed min-max")
        div = result.diverged.any(0)
        if div.any():
            ax.plot(lrs[div], mean[div], "x", color="C3", ms=10, label="diverged")
        if result.best_lr is not None:
            ax.axvline(result.best_lr, color="k", ls=":", label=f"best lr {result.best_lr:.3g}")
        for i, (name, lr) in enumerate((result.suggestions or {}).items()):
            if lr:
                ax.axvline(lr, color=f"C{i + 1}", ls="--", lw=1, label=f"{name} {lr:.3g}")
        _log_x(ax)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"LR sweep: {len(lrs)} rates x {len(result.seeds)} seed(s), {result.epochs} epochs")
    _save(fig, path)


def save_samples(dataset, path: str | Path, rows: int = 4, cols: int = 10) -> None:
    """The seed's 4 x 10 grid of training images (of a `lrjax.data.Dataset`) titled with their class names."""
    plot_samples(dataset.x_train[: rows * cols], dataset.y_train[: rows * cols], dataset.class_names,
                 path, rows=rows, cols=cols)
