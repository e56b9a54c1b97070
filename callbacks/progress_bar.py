"""A tqdm progress bar per epoch, showing the loss averaged over each log interval.

By default the bar is drawn only where ``sys.stderr`` is a terminal: written to a file or a CI
log, its carriage-return updates would interleave with the log records there.
"""

from __future__ import annotations

from typing import Any

import attrs
from tqdm.auto import tqdm

from engine.config.validators import is_bool, optional_bool
from engine.state import RunState


@attrs.define(eq=False)
class ProgressBar:
    """One bar per epoch on the main process. The postfix shows ``run.logged_metrics``, which
    the engine refreshes every ``log_every`` steps, so the bar never reads the device itself.
    ``disable=None`` (default) draws it only on a terminal (tqdm's rule: off where stderr is
    not a TTY); ``False`` always draws it, ``True`` never."""

    leave: bool = attrs.field(default=False, validator=is_bool)
    disable: bool | None = attrs.field(default=None, validator=optional_bool)
    priority: int = 0
    _bar: Any = attrs.field(default=None, init=False)
    _shown_step: int = attrs.field(default=-1, init=False)

    def on_epoch_start(self, run: RunState) -> None:
        if not run.is_main_process or self.disable is True:
            return
        self._bar = tqdm(
            total=run.steps_per_epoch,
            initial=run.progress.batch_in_epoch,
            desc=f"epoch {run.progress.epoch + 1}/{run.config.epochs}",
            leave=self.leave,
            dynamic_ncols=True,
            disable=self.disable,
        )

    def on_batch_end(self, run: RunState) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        if run.logged_metrics and run.progress.step % run.config.log_every == 0:
            self._bar.set_postfix(
                {key: f"{value:.4g}" for key, value in run.logged_metrics.items()}, refresh=False
            )

    def on_epoch_end(self, run: RunState) -> None:
        """Close the epoch's bar; the run's end and an exception close it the same way."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    on_fit_end = on_exception = on_epoch_end
