"""Stop a run when a monitored metric has not improved for ``patience`` epochs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from engine.config.validators import (
    finite_non_negative_number,
    min_or_max,
    monitor_name,
    positive_int,
)
from engine.errors import ConfigError
from engine.events import EARLY_STOPPING_PRIORITY
from engine.state import RunState


@attrs.define(eq=False)
class EarlyStopping:
    """At each EPOCH_END, compare ``monitor`` (default: the run's monitored metric) with the
    best value so far; an improvement is a change beyond ``min_delta`` in the direction of
    ``mode``. After ``patience`` epochs in a row without one, ``run.engine.stop()``.

    A NaN value never counts as an improvement. Epochs without the metric (``eval/...`` in an
    epoch with no evaluation) are not counted. It runs at ``EARLY_STOPPING_PRIORITY``, after
    every other handler of the epoch, and its counters are part of a checkpoint. The pre-flight
    stage checks ``monitor`` against the run's metrics; without one, the run must have a
    monitored metric (``monitor_required``).
    """

    monitor_required: ClassVar[bool] = True

    monitor: str | None = attrs.field(default=None, validator=monitor_name)
    mode: str = attrs.field(default="min", validator=min_or_max)
    patience: int = attrs.field(default=3, validator=positive_int)
    min_delta: float = attrs.field(default=0.0, validator=finite_non_negative_number)
    priority: int = EARLY_STOPPING_PRIORITY
    best: float | None = attrs.field(default=None, init=False)
    bad_epochs: int = attrs.field(default=0, init=False)
    stopped_epoch: int | None = attrs.field(default=None, init=False)

    def on_epoch_end(self, run: RunState) -> None:
        monitor = self.monitor or run.monitor
        if monitor is None:
            raise ConfigError("EarlyStopping has no metric to monitor: pass monitor='eval/loss'")
        metrics = run.epoch_metrics
        if monitor not in metrics:
            if monitor.startswith("eval/") and not any(k.startswith("eval/") for k in metrics):
                return  # no evaluation this epoch
            raise ConfigError(
                f"EarlyStopping monitors {monitor!r}, which is not among this epoch's metrics "
                f"{sorted(metrics)}"
            )
        if self.observe(float(metrics[monitor])):
            self.stopped_epoch = run.progress.epoch - 1
            run.log.info(
                f"early stopping: {monitor} did not improve on {self.best!r} for "
                f"{self.bad_epochs} epoch(s)"
            )
            run.engine.stop()

    def observe(self, value: float) -> bool:
        """Count one epoch's value; true when the run should stop."""
        if self._improves(value):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best = state["best"]
        self.best = None if best is None else float(best)
        self.bad_epochs = int(state["bad_epochs"])
        stopped = state.get("stopped_epoch")
        self.stopped_epoch = None if stopped is None else int(stopped)
