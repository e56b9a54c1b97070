"""Learning rates in the per-step metrics, beside the loss (the engine already puts them in
every epoch's metrics as ``lr/<role>``)."""

from __future__ import annotations

import attrs

from engine.state import RunState


@attrs.define(eq=False)
class LearningRateMonitor:
    """At each log interval (``log_every`` steps), adds ``lr/<role>`` to
    ``run.logged_metrics``, so that the progress bar and the trackers show how per-step
    schedulers move the learning rate. It reads the optimisers' settings only: no device sync.
    Its priority is above the default so every other handler of the step sees the rates."""

    priority: int = 10

    def on_batch_end(self, run: RunState) -> None:
        if run.progress.step % run.config.log_every == 0:
            run.logged_metrics.update(run.strategy.learning_rates())
