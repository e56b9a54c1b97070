"""Weights & Biases: config, metrics per log interval and per epoch (optional extra
``strategy-engine[wandb]``). Offline by default: nothing leaves the machine until the user runs
``wandb sync run_dir/wandb/offline-run-*``; pass ``mode="online"`` to stream instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from callbacks.extras import require_extra
from callbacks.mlflow import run_params
from callbacks.tracking import interval_metrics, tracker_folder
from engine.config.validators import one_of
from engine.state import RunState


@attrs.define(eq=False)
class WandB:
    """One W&B run per fit, on rank 0 only, in ``dir`` (default: the run folder); no set-up
    call is needed. Logs ``step/<metric>`` every ``log_every`` steps and every epoch metric at
    EPOCH_END, all at the global step; the run finishes at FIT_END (exit code 1 on an
    exception)."""

    project: str = "strategy-engine"
    mode: str = attrs.field(default="offline", validator=one_of("offline", "online", "disabled"))
    name: str | None = None
    dir: str | None = None
    entity: str | None = None
    tags: list[str] = attrs.field(factory=list)
    config: dict[str, Any] = attrs.field(factory=dict)
    priority: int = 0
    run_dir: Path | None = attrs.field(default=None, init=False)
    _run: Any = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        require_extra("wandb", "wandb", "The WandB callback")

    def on_fit_start(self, run: RunState) -> None:
        folder = tracker_folder(run, self.dir, who="WandB", option="dir")
        if folder is None:
            return
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        name = self.name or (run.run_dir.name if run.run_dir is not None else None)
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=name,
            dir=str(folder),
            mode=self.mode,  # type: ignore[arg-type]
            tags=list(self.tags),
            config=run_params(run, self.config),
            reinit="create_new",
        )
        self.run_dir = Path(self._run.dir).parent if self.mode != "disabled" else None
        if self.run_dir is not None:
            run.paths["wandb"] = self.run_dir

    def on_batch_end(self, run: RunState) -> None:
        metrics = interval_metrics(run)
        if self._run is not None and metrics is not None:
            self._run.log(metrics, step=run.progress.step)

    def on_epoch_end(self, run: RunState) -> None:
        if self._run is not None:
            self._run.log(dict(run.epoch_metrics), step=run.progress.step)

    def on_fit_end(self, run: RunState) -> None:
        self._finish(0)

    def on_exception(self, run: RunState) -> None:
        self._finish(1)

    def _finish(self, exit_code: int) -> None:
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None
