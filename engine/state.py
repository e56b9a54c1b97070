"""What the loop counts (``Progress``), what handlers see (``RunState``), what ``fit`` returns.

Progress is the only loop state a checkpoint needs besides the model, the strategy, RNG states
and callbacks: the shuffle of every epoch is derived from the seed and the epoch number, so the
position inside an epoch is enough to resume exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

if TYPE_CHECKING:
    from engine.config.engine_config import EngineConfig
    from engine.context import StepContext
    from engine.loop import Engine
    from engine.metrics import MetricBuffer
    from engine.protocols import StepStrategy


@attrs.define
class Progress:
    """Counters of a run. ``step`` counts batches (train_step calls) over the whole run."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return attrs.asdict(self)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for field in attrs.fields(Progress):
            setattr(self, field.name, int(state[field.name]))


@attrs.define(eq=False)
class RunState:
    """Everything a handler may read during a run, and ``engine.stop()`` to end it.

    ``step_metrics`` holds the last batch's metrics as device tensors (reading one forces a
    host-device sync: do it at an interval). ``logged_metrics`` holds floats averaged over the
    last ``log_every`` steps, refreshed at that interval; ``epoch_metrics`` holds the epoch's
    train means (``train/...``), eval means (``eval/...``) and learning rates (``lr/...``).
    ``log`` is a loguru logger bound to this run: what it logs also goes to ``train.log``.
    ``context`` is the ``StepContext`` lent to the strategy (its GradScaler is checkpointed) and
    ``metric_buffer`` the epoch's unread metrics (checkpointed, so a mid-epoch resume averages
    the same values).
    """

    engine: Engine
    model: torch.nn.Module
    strategy: StepStrategy
    config: EngineConfig
    progress: Progress
    run_dir: Path | None
    steps_per_epoch: int | None
    step_metrics: Mapping[str, torch.Tensor] = attrs.field(factory=dict)
    logged_metrics: dict[str, float] = attrs.field(factory=dict)
    eval_metrics: dict[str, float] = attrs.field(factory=dict)
    epoch_metrics: dict[str, float] = attrs.field(factory=dict)
    history: list[dict[str, float]] = attrs.field(factory=list)
    best_value: float | None = None
    best_epoch: int | None = None
    paths: dict[str, Path] = attrs.field(factory=dict)
    exception: BaseException | None = None
    is_main_process: bool = True
    monitor: str | None = None
    log: Any = None
    extra: dict[str, Any] = attrs.field(factory=dict)
    context: StepContext | None = None
    metric_buffer: MetricBuffer | None = None


@attrs.frozen
class FitResult:
    """What ``Engine.fit`` returns: the per-epoch history, the best monitored value, the files."""

    history: list[dict[str, float]]
    monitor: str | None
    best_value: float | None
    best_epoch: int | None
    run_dir: Path | None
    paths: dict[str, Path]
    steps: int
    skipped_steps: int
    stopped_early: bool


def fit_result(run: RunState, stopped_early: bool) -> FitResult:
    """What ``fit`` returns about ``run``."""
    return FitResult(
        history=run.history,
        monitor=run.monitor,
        best_value=run.best_value,
        best_epoch=run.best_epoch,
        run_dir=run.run_dir,
        paths=dict(run.paths),
        steps=run.progress.step,
        skipped_steps=run.progress.skipped_steps,
        stopped_early=stopped_early,
    )
