"""Callbacks: a few hooks into training, Keras-sized, configured under ``callbacks`` by name.

    callbacks:
      stop: {_target_: runner.callbacks.StopAtValue, monitor: val_accuracy, value: 0.95}

Any object with some of these methods works; subclassing ``Callback`` gives the others as no-ops:

- ``on_train_start()``: once per launch, before the first step (a resumed run calls it again);
- ``on_epoch_end(epoch, metrics)``: after every epoch, ``epoch`` counted from 0 (as MLflow's steps),
  ``metrics`` the epoch's logged values (``lr``, ``train_loss``, ``val_loss``, ``val_accuracy`` ...);
- ``on_train_end(metrics)``: when training ends, at its last epoch or stopped by a callback (not on a stop
  signal: the run is not over, and the next launch resumes it);
- ``state_dict()`` / ``load_state_dict(state)``: what the callback must remember, checkpointed with the run
  (plain values and tensors), so a killed and resumed run carries on exactly.

A callback asks training to stop by setting ``self.stop_training = True``: the run ends after that epoch,
finished (not failed), with the reason logged. Because ``callbacks`` is a mapping, a sweep can switch one off
(``~callbacks.stop``). An exception in a callback is reported with its own traceback, naming the hook.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from runner.errors import ConfigError, UserCodeError
from runner.metrics import metric

log = logging.getLogger(__name__)

HOOKS = ("on_train_start", "on_epoch_end", "on_train_end", "state_dict", "load_state_dict")


class Callback:
    """A callback's hooks, each doing nothing; override the ones you need."""

    stop_training: bool = False

    def on_train_start(self) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, metrics: dict[str, float]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StopAtValue(Callback):
    """Stop once ``monitor`` reaches ``value`` (at or above it for a metric where higher is better, at or below
    for a loss; the direction from the metrics table, or ``mode`` max|min for a metric of your own): the runner's
    example callback, and a target-driven end to a run."""

    def __init__(self, monitor: str, value: float, mode: str | None = None):
        if mode not in (None, "max", "min"):
            raise ConfigError(f"StopAtValue.mode={mode!r}: use max, min, or leave it out for the table's direction.")
        self.monitor, self.value = monitor, value
        self.higher_is_better = (
            metric(monitor, "StopAtValue.monitor").higher_is_better if mode is None else mode == "max"
        )
        self.reached_at: int | None = None

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ConfigError(
                f"StopAtValue.monitor={self.monitor!r} is not logged; this run logs {', '.join(metrics)}."
            )
        current = metrics[self.monitor]
        if (current >= self.value) if self.higher_is_better else (current <= self.value):
            self.reached_at = self.reached_at if self.reached_at is not None else epoch
            self.stop_training = True
            log.info(f"{self.monitor} {current:.4g} reached {self.value:g} at epoch {epoch + 1}")

    def state_dict(self) -> dict[str, Any]:
        return {"reached_at": self.reached_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reached_at = state["reached_at"]
        self.stop_training = self.reached_at is not None


class EarlyStopping(Callback):
    """``trainer.early_stopping``: stop after ``patience`` epochs in which ``monitor`` did not beat its best by
    more than ``min_delta`` (Keras's and Lightning's rule). Its best and its count are checkpointed, so a killed
    and resumed run stops at the same epoch."""

    def __init__(self, monitor: str, higher_is_better: bool, patience: int, min_delta: float = 0.0):
        if patience < 1 or min_delta < 0:
            raise ConfigError(
                f"trainer.early_stopping: patience {patience} and min_delta {min_delta}; give patience >= 1 "
                f"(0 turns early stopping off) and min_delta >= 0."
            )
        self.monitor, self.higher_is_better = monitor, higher_is_better
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.waited = 0
        self.reason: str | None = None

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        current = metrics[self.monitor]
        margin = current - self.best if self.best is not None else None
        if math.isnan(current):  # never a best, so a NaN does not make every later epoch look like no improvement
            improved = False
        else:
            improved = margin is None or (
                margin > self.min_delta if self.higher_is_better else -margin > self.min_delta
            )
        if improved:
            self.best, self.best_epoch, self.waited = current, epoch, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            self.stop_training = True
            self.reason = (
                f"{self.monitor} did not improve on {self.best:.4g} (epoch {self.best_epoch + 1}) by more than "
                f"{self.min_delta:g} for {self.waited} epochs"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "waited": self.waited, "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.waited = state["best"], state["best_epoch"], state["waited"]
        self.reason = state.get("reason")
        self.stop_training = self.reason is not None


class Callbacks:
    """The configured callbacks by name: each hook called on all of them, errors named, state saved as one part."""

    def __init__(self, callbacks: dict[str, Any]):
        self.callbacks = callbacks

    def _call(self, name: str, hook: str, *args: Any) -> Any:
        method = getattr(self.callbacks[name], hook, None)
        if method is None:
            return None
        try:
            return method(*args)
        except ConfigError:
            raise
        except Exception as err:
            callback = type(self.callbacks[name]).__name__
            raise UserCodeError(f"callbacks.{name} ({callback}).{hook} raised {type(err).__name__}: {err}") from err

    def reason(self, name: str) -> str | None:
        """Why callback ``name`` stopped training, if it says (its ``reason`` attribute)."""
        return getattr(self.callbacks[name], "reason", None)

    def on_train_start(self) -> None:
        for name in self.callbacks:
            self._call(name, "on_train_start")

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> str | None:
        """Call every callback; the name of the first that asks to stop, or None."""
        for name in self.callbacks:
            self._call(name, "on_epoch_end", epoch, dict(metrics))
        return self.stopping()

    def stopping(self) -> str | None:
        """The name of the first callback asking to stop, or None."""
        return next((name for name, cb in self.callbacks.items() if getattr(cb, "stop_training", False)), None)

    def on_train_end(self, metrics: dict[str, float]) -> None:
        for name in self.callbacks:
            self._call(name, "on_train_end", dict(metrics))

    def state_dict(self) -> dict[str, Any]:
        return {name: self._call(name, "state_dict") or {} for name in self.callbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.callbacks:
            if name in state:  # a callback added since (a forced resume) starts afresh
                self._call(name, "load_state_dict", state[name])
