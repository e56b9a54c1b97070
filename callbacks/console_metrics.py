"""One log line per epoch with every metric: train, eval, learning rates, seconds."""

from __future__ import annotations

import attrs

from engine.state import RunState


def format_metrics(metrics: dict[str, float]) -> str:
    """``key=value`` pairs, four significant digits, in a stable order."""
    return " ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))


@attrs.define(eq=False)
class ConsoleMetrics:
    """Logs (through the run's loguru logger, so also into ``train.log``) at every EPOCH_END."""

    priority: int = 0

    def on_epoch_end(self, run: RunState) -> None:
        if not run.is_main_process:
            return
        metrics = dict(run.epoch_metrics)
        epoch = int(metrics.pop("epoch", run.progress.epoch - 1))
        run.log.info(f"epoch {epoch + 1}/{run.config.epochs} {format_metrics(metrics)}")
