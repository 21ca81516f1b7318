"""Early stopping with Keras `EarlyStopping` semantics, as a small plain object with saveable state.

The monitor only decides; the training loop keeps the best weights when `update` says the epoch
improved, and stops when `should_stop` is True. Its state (best, wait, best epoch) is a plain dict so
it travels in checkpoints and a resumed run stops at exactly the same epoch.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class EarlyStopping:
    monitor: str = "val_loss"
    mode: str = "auto"  # "min", "max", or "auto": max for accuracy-like monitors, else min
    patience: int = 20
    min_delta: float = 0.0
    restore_best_weights: bool = True
    # state
    best: float | None = None
    wait: int = 0
    best_epoch: int | None = None
    stopped_epoch: int | None = None

    def __post_init__(self):
        if self.mode == "auto":
            self.mode = "max" if "acc" in self.monitor else "min"
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be min, max or auto, got {self.mode!r}")
        if self.patience < 0 or self.min_delta < 0:
            raise ValueError("patience and min_delta must be >= 0")

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Records one epoch's metrics; returns True when this epoch is the new best."""
        if self.monitor not in metrics:
            raise KeyError(f"early stopping monitors {self.monitor!r}, which the metrics lack "
                           f"(have {sorted(metrics)})")
        value = float(metrics[self.monitor])
        if self.is_improvement(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True
        self.wait += 1
        if self.wait >= self.patience and self.stopped_epoch is None:
            self.stopped_epoch = epoch
        return False

    @property
    def should_stop(self) -> bool:
        """Keras: stop once `patience` epochs in a row brought no improvement (wait >= patience)."""
        return self.stopped_epoch is not None

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "best_epoch": self.best_epoch,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], int(state["wait"])
        self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
