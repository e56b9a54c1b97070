"""What happens around the loop: progress, console metrics, history, and more."""

from callbacks.checkpointing import Checkpointing
from callbacks.console_metrics import ConsoleMetrics
from callbacks.early_stopping import EarlyStopping
from callbacks.lr_monitor import LearningRateMonitor
from callbacks.metrics_history import MetricsHistory
from callbacks.mlflow import MLflow
from callbacks.plots import Plots
from callbacks.progress_bar import ProgressBar
from callbacks.tensorboard import TensorBoard
from callbacks.wandb import WandB

__all__ = [
    "Checkpointing",
    "ConsoleMetrics",
    "EarlyStopping",
    "LearningRateMonitor",
    "MLflow",
    "MetricsHistory",
    "Plots",
    "ProgressBar",
    "TensorBoard",
    "WandB",
]

# The GAN toolkit (issue 13): weight averages, sample grids, FID/KID.
from callbacks.ema import EMA
from callbacks.quality import QualityMetrics
from callbacks.sample_grid import SampleGrid

__all__ += ["EMA", "QualityMetrics", "SampleGrid"]
