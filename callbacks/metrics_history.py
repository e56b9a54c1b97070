"""The per-epoch metrics, in memory and appended to ``metrics.jsonl`` in the run folder."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import attrs

from engine.state import RunState


@attrs.define(eq=False)
class MetricsHistory:
    """``history`` holds one dict per epoch; each is also one line of ``metrics.jsonl``.

    Its state (the history) is part of a checkpoint. A new run starts an empty history; a
    resumed run (restored before FIT_START) rewrites ``metrics.jsonl`` from the restored history,
    so the lines written after its checkpoint, by the run that stopped, are not repeated.
    """

    filename: str = "metrics.jsonl"
    priority: int = 0
    history: list[dict[str, float]] = attrs.field(factory=list)

    def on_fit_start(self, run: RunState) -> None:
        if run.progress.step == 0:
            self.history = []
            return
        if run.run_dir is None or not run.is_main_process:
            return
        path = run.run_dir / self.filename
        staging = path.with_name(f".{self.filename}.tmp")
        staging.write_text("".join(json.dumps(record) + "\n" for record in self.history))
        os.replace(staging, path)
        run.paths["metrics"] = path

    def on_epoch_end(self, run: RunState) -> None:
        record = dict(run.epoch_metrics)
        record["step"] = float(run.progress.step)
        self.history.append(record)
        if run.run_dir is None or not run.is_main_process:
            return
        path = run.run_dir / self.filename
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        run.paths["metrics"] = path

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(record) for record in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [dict(record) for record in state["history"]]
