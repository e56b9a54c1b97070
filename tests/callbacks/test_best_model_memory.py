"""Best-model tracking keeps the best weights as a checkpoint file, not as a second copy of the
model in memory (pythae's trainer deep-copies the model on the device at each new best, doubling
parameter memory).

The instrument: at the end of every epoch, after every handler (checkpointing included) has
run, sum the bytes of the distinct tensor storages alive in the process. A run tracking the
best model must hold no more than a run that tracks nothing, give or take much less than one
copy of the parameters; a tracker that does deep-copy is caught by the same measure.
"""

from __future__ import annotations

import copy
import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from callbacks import Checkpointing
from engine import Engine, EngineConfig, Event, OptimizerSpec, RunState, Subscription
from strategies import Standard

FEATURES = 256


class WideRegressor(nn.Module):
    """A model whose parameters (about 0.5 MiB) dwarf every other tensor of the run."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, FEATURES)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.linear(x) - x).pow(2).mean()}


def _live_storage_bytes() -> int:
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class DeepCopyTracker:
    """What pythae does: keep ``copy.deepcopy(model)`` at every new best."""

    priority = -1000

    def __init__(self) -> None:
        self.best: nn.Module | None = None

    def on_epoch_end(self, run: RunState) -> None:
        self.best = copy.deepcopy(run.model)


def _peak_live_bytes(tmp_path: Path, name: str, epochs: int, callbacks: list[Any]) -> int:
    peaks: list[int] = []
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=1e-3)),
        EngineConfig(
            epochs=epochs, batch_size=16, output_dir=tmp_path, run_name=name, device="cpu"
        ),
        callbacks=callbacks,
    )
    engine.bus.subscribe(
        Subscription(Event.EPOCH_END, lambda run: peaks.append(_live_storage_bytes()), -10_000)
    )
    torch.manual_seed(0)
    data = {"data": torch.rand(32, FEATURES)}
    engine.fit(WideRegressor(), data)
    return max(peaks)


PARAM_BYTES = (FEATURES * FEATURES + FEATURES) * 4


@pytest.mark.slow
@settings(max_examples=2, deadline=None)
@given(epochs=st.integers(min_value=1, max_value=2), best_k=st.integers(min_value=1, max_value=2))
def test_best_model_tracking_holds_no_copy_of_the_model(
    tmp_path_factory: Any, epochs: int, best_k: int
) -> None:
    tmp_path = tmp_path_factory.mktemp("best")
    baseline = _peak_live_bytes(tmp_path, "plain", epochs, [])
    tracked = _peak_live_bytes(
        tmp_path, "tracked", epochs, [Checkpointing(best_k=best_k, durable=False)]
    )
    assert tracked - baseline < PARAM_BYTES / 2, (
        f"tracking the best model holds {tracked - baseline} more bytes than no tracking; "
        f"one copy of the parameters is {PARAM_BYTES}"
    )
    assert (tmp_path / "tracked" / "model_best.pt").is_file()


def test_the_instrument_catches_a_deep_copy(tmp_path: Path) -> None:
    baseline = _peak_live_bytes(tmp_path, "plain", 1, [])
    copied = _peak_live_bytes(tmp_path, "copied", 1, [DeepCopyTracker()])
    assert copied - baseline >= PARAM_BYTES, (baseline, copied)
