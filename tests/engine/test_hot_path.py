"""The loop's per-batch work, counted in Python calls (never timed): in one process with no
batch handler, a batch costs the loop one ``MetricBuffer.add`` of its own and nothing of the
event bus, the window bookkeeping or the stop agreement; metrics are read once per log
interval. And what the cheap paths must still do: a handler subscribed mid-epoch runs from
the next batch, the buffer's means are those of the values it was given, a resumed epoch's
windows are the uninterrupted epoch's.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine import Engine, EngineConfig, Event, OptimizerSpec, World
from engine.data.windows import in_windows
from engine.metrics import MetricBuffer
from strategies import Standard

ENGINE = Path(__file__).resolve().parents[2] / "engine"
# The files whose per-batch calls are the loop's own bookkeeping.
LOOP_FILES = {ENGINE / name for name in ("loop.py", "events.py", "metrics.py")} | {
    ENGINE / "data" / "windows.py"
}


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.linear(x) - x).pow(2).mean()}


def _calls_during_fit(steps: int, log_every: int, engine_setup: Any = None) -> Counter[str]:
    """``file:function`` of every Python call into the loop's files while ``fit`` runs
    ``steps`` batches of one epoch."""
    torch.manual_seed(0)
    config = EngineConfig(
        batch_size=4, device="cpu", output_dir=None, log_every=log_every, shuffle=False
    )
    engine = Engine(Standard(OptimizerSpec("SGD", lr=0.1)), config)
    if engine_setup is not None:
        engine_setup(engine)
    data = {"data": torch.randn(4 * steps, 3, generator=torch.Generator().manual_seed(1))}
    counts: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, _: Any) -> None:
        if event == "call" and Path(frame.f_code.co_filename) in LOOP_FILES:
            counts[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        engine.fit(Regressor(), data)
    finally:
        sys.setprofile(previous)
    return counts


def _per_batch(log_every: int = 1000, engine_setup: Any = None) -> dict[str, float]:
    """Calls per batch: the difference between a 40-batch and a 20-batch epoch, over 20."""
    short = _calls_during_fit(20, log_every, engine_setup)
    long = _calls_during_fit(40, log_every, engine_setup)
    return {key: (long[key] - short[key]) / 20 for key in long if long[key] != short[key]}


def test_a_batch_costs_the_loop_one_buffer_append_and_nothing_else() -> None:
    assert _per_batch() == {"metrics.py:add": 1.0}


def test_metrics_are_read_once_per_log_interval() -> None:
    per_batch = _per_batch(log_every=5)
    assert per_batch.pop("metrics.py:add") == 1.0
    assert per_batch["metrics.py:flush"] == 1 / 5
    # Steps with the same keys take the one-stack path: no per-step grouping (``_pending``).
    flush_parts = ("flush", "_stacked_by_key", "<listcomp>", "<dictcomp>")
    assert set(per_batch) <= {f"metrics.py:{name}" for name in flush_parts}, per_batch


def test_a_batch_handler_is_dispatched_and_only_its_event() -> None:
    def subscribe(engine: Engine) -> None:
        engine.on(Event.BATCH_END, lambda run: None)

    per_batch = _per_batch(engine_setup=subscribe)
    assert per_batch == {"metrics.py:add": 1.0, "events.py:fire": 1.0}


def test_a_handler_subscribed_mid_epoch_runs_from_the_next_batch() -> None:
    seen: list[int] = []

    def late(run: Any) -> None:
        seen.append(run.progress.step)

    def subscribe_late(run: Any) -> None:
        if run.progress.step == 3:
            run.engine.on(Event.BATCH_START, late)

    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.1)),
        EngineConfig(batch_size=4, device="cpu", output_dir=None),
    )
    engine.on(Event.BATCH_END, subscribe_late)
    engine.fit(Regressor(), {"data": torch.randn(24, 3)})  # 6 batches
    assert seen == [3, 4, 5]  # BATCH_START of batches 4, 5, 6 (step counts the batches done)


@st.composite
def _steps(draw: st.DrawFn) -> list[dict[str, float]]:
    """Each step's metrics: a subset of three keys (a skipped step has none), finite values."""
    keys = st.sets(st.sampled_from(["loss", "recon", "kl"]))
    values = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    return draw(
        st.lists(
            keys.flatmap(lambda ks: st.fixed_dictionaries({k: values for k in ks})), max_size=30
        )
    )


@settings(max_examples=60, deadline=None, derandomize=True)
@given(steps=_steps(), split=st.integers(0, 30))
def test_buffered_means_are_the_means_of_the_values_even_across_a_resume(
    steps: list[dict[str, float]], split: int
) -> None:
    """``flush`` gives each key's mean over the steps that had it; a buffer saved before
    ``split`` and loaded into a fresh one ends the epoch with the same means."""
    world = World()
    whole = MetricBuffer()
    resumed = MetricBuffer()
    for step, values in enumerate(steps):
        metrics = {key: torch.tensor(value) for key, value in values.items()}
        whole.add(step, metrics)
        if step == split:
            saved = resumed.state_dict()
            resumed = MetricBuffer()
            resumed.load_state_dict(saved, torch.device("cpu"))
        resumed.add(step, metrics)
    expected = {}
    for key in {key for values in steps for key in values}:
        taken = torch.tensor([values[key] for values in steps if key in values])
        expected[key] = float(taken.sum().double()) / len(taken)
    assert whole.epoch_means(world) == expected
    assert resumed.epoch_means(world) == expected


@st.composite
def _uniform_steps(draw: st.DrawFn) -> list[dict[str, float]]:
    """Every step with the same keys (the one-stack path of ``flush``)."""
    keys = draw(st.lists(st.sampled_from(["loss", "recon", "kl"]), unique=True, min_size=1))
    values = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    row = st.fixed_dictionaries({k: values for k in keys})
    return draw(st.lists(row, min_size=1, max_size=30))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(steps=_uniform_steps(), log_every=st.integers(1, 8))
def test_steps_with_the_same_keys_flush_to_the_means_of_their_values(
    steps: list[dict[str, float]], log_every: int
) -> None:
    """Flushed every ``log_every`` steps, each interval's means and the epoch's are exactly
    those of the values (float32 sums, as the general path makes them)."""
    world = World()
    buffer = MetricBuffer()
    for step, values in enumerate(steps):
        buffer.add(step, {key: torch.tensor(value) for key, value in values.items()})
        if (step + 1) % log_every == 0:
            chunk = steps[step + 1 - log_every : step + 1]
            expected = {
                key: float(torch.tensor([v[key] for v in chunk]).sum().double()) / len(chunk)
                for key in chunk[0]
            }
            assert buffer.flush(world) == expected
    keys = steps[0]
    assert buffer.epoch_means(world) == pytest.approx(
        {key: sum(v[key] for v in steps) / len(steps) for key in keys}, rel=1e-5, abs=1e-3
    )


@settings(max_examples=200, deadline=None, derandomize=True)
@given(n=st.integers(0, 40), k=st.integers(1, 6), start=st.integers(0, 40))
def test_a_resumed_epoch_of_known_length_has_the_places_of_the_whole_epoch(
    n: int, k: int, start: int
) -> None:
    """Resuming at any batch, even inside a window, gives its batches the places they have in
    the uninterrupted epoch (the zipped C iterators of a known length)."""
    start = min(start, n)
    whole = list(in_windows(iter(range(n)), 0, n, None, k, World()))
    rest = list(in_windows(iter(range(start, n)), start, n, None, k, World()))
    assert rest == whole[start:]
