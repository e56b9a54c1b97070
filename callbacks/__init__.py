"""What happens around the loop: progress, console metrics, history, and more."""

from callbacks.console_metrics import ConsoleMetrics
from callbacks.metrics_history import MetricsHistory
from callbacks.progress_bar import ProgressBar

__all__ = ["ConsoleMetrics", "MetricsHistory", "ProgressBar"]
