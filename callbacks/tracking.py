"""What the experiment trackers (TensorBoard, WandB, MLflow) share: which rank writes and where,
and what they log at the end of a log interval."""

from __future__ import annotations

from pathlib import Path

from engine.errors import ConfigError
from engine.state import RunState


def tracker_folder(
    run: RunState, given: str | None, *, who: str, option: str, subfolder: str | None = None
) -> Path | None:
    """Where a tracker writes: the folder the user gave as ``option``, else the run folder (or
    its ``subfolder``); ``None`` on every rank but the main one, which alone writes. With
    neither a given folder nor a run folder (``output_dir=None``) it is a ``ConfigError``
    naming the tracker ``who`` and the setting that would fix it."""
    if not run.is_main_process:
        return None
    if given is not None:
        return Path(given)
    if run.run_dir is None:
        raise ConfigError(
            f"{who} needs a folder: give {option}=... or set EngineConfig.output_dir "
            f"(output_dir={run.config.output_dir!r})"
        )
    return run.run_dir / subfolder if subfolder is not None else run.run_dir


def interval_metrics(run: RunState) -> dict[str, float] | None:
    """At the end of a log interval, its means as ``step/<metric>``; ``None`` between."""
    if run.progress.step % run.config.log_every != 0:
        return None
    return {f"step/{key}": value for key, value in run.logged_metrics.items()}
