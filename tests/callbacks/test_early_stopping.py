"""callbacks/early_stopping.py: stops at the right epoch for any metric sequence, resumes its
counters from a state dict, and refuses bad settings."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks import EarlyStopping
from engine import EARLY_STOPPING_PRIORITY, ConfigError, Engine, EngineConfig, OptimizerSpec
from engine.state import RunState
from strategies import Standard
from tests.helpers import TinyRegressor


def expected_stop(values: list[float], mode: str, patience: int, min_delta: float) -> int | None:
    """The 0-based epoch after which a run stops, by the definition in words: stop once
    ``patience`` epochs in a row brought no value beyond the best by more than ``min_delta``."""
    best: float | None = None
    streak = 0
    for epoch, value in enumerate(values):
        better = not math.isnan(value) and (
            best is None
            or (value < best - min_delta if mode == "min" else value > best + min_delta)
        )
        if better:
            best, streak = value, 0
        else:
            streak += 1
        if streak >= patience:
            return epoch
    return None


class FeedMetric:
    """Puts the next synthetic value into the epoch metrics, before early stopping reads them."""

    priority = 0

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_epoch_end(self, run: RunState) -> None:
        run.epoch_metrics["synthetic"] = self.values[run.progress.epoch - 1]

    def metric_names(self) -> tuple[str, ...]:
        """The name it adds, declared so that the pre-flight stage resolves the monitor."""
        return ("synthetic",)


_values = st.lists(
    st.one_of(st.floats(-10, 10, allow_nan=False), st.just(math.nan), st.sampled_from([0.0, 1.0])),
    min_size=1,
    max_size=12,
)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(
    values=_values,
    mode=st.sampled_from(["min", "max"]),
    patience=st.integers(1, 4),
    min_delta=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_stops_after_the_epoch_the_definition_says(
    values: list[float], mode: str, patience: int, min_delta: float
) -> None:
    stopper = EarlyStopping(monitor="synthetic", mode=mode, patience=patience, min_delta=min_delta)
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.01)),
        EngineConfig(epochs=len(values), batch_size=8, output_dir=None),
        callbacks=[stopper, FeedMetric(values)],
    )
    result = engine.fit(TinyRegressor(), torch.randn(8, 4))
    stop = expected_stop(values, mode, patience, min_delta)
    assert len(result.history) == (len(values) if stop is None else stop + 1)
    assert result.stopped_early == (stop is not None)
    assert stopper.stopped_epoch == stop


@settings(max_examples=60, deadline=None)
@given(values=_values, cut=st.integers(0, 12), patience=st.integers(1, 4))
def test_state_dict_resumes_the_count(values: list[float], cut: int, patience: int) -> None:
    whole = EarlyStopping(patience=patience)
    stops_whole = [whole.observe(v) for v in values]
    first = EarlyStopping(patience=patience)
    head = [first.observe(v) for v in values[:cut]]
    second = EarlyStopping(patience=patience)
    second.load_state_dict(first.state_dict())
    tail = [second.observe(v) for v in values[cut:]]
    assert head + tail == stops_whole
    assert second.state_dict() == whole.state_dict()


def test_runs_last_and_defaults_to_the_run_monitor() -> None:
    stopper = EarlyStopping(patience=1)
    assert stopper.priority == EARLY_STOPPING_PRIORITY
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.0)),  # lr 0: the loss never improves
        EngineConfig(epochs=5, batch_size=8, output_dir=None, shuffle=False),
        callbacks=[stopper],
    )
    result = engine.fit(TinyRegressor(), torch.randn(8, 4))
    assert len(result.history) == 2 and result.stopped_early
    assert stopper.best == result.history[0]["train/loss"]


def test_unknown_metric_is_an_error_listing_the_metrics() -> None:
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.01)),
        EngineConfig(epochs=2, batch_size=8, output_dir=None),
        callbacks=[EarlyStopping(monitor="train/los")],
    )
    with pytest.raises(ConfigError, match=r"'train/los'.*'train/loss'"):
        engine.fit(TinyRegressor(), torch.randn(8, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patience": 0}, "patience must be a positive integer, got 0"),
        ({"patience": True}, "patience must be a positive integer, got True"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0, got -0.1"),
        ({"min_delta": math.inf}, "min_delta must be a finite number >= 0, got inf"),
        ({"mode": "best"}, r"mode must be one of \['min', 'max'\], got 'best'"),
        ({"monitor": ""}, "monitor must be a metric name"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EarlyStopping(**kwargs)
