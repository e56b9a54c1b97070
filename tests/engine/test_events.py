"""The event bus: priorities, filters resolved at subscription, and the loop's exact events."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import (
    CHECKPOINT_PRIORITY,
    EARLY_STOPPING_PRIORITY,
    ConfigError,
    Engine,
    EngineConfig,
    Event,
    EventBus,
    OptimizerSpec,
    Subscription,
)
from strategies import Standard
from tests.helpers import EventRecorder, TinyRegressor


def test_handlers_run_by_descending_priority_then_subscription_order() -> None:
    bus = EventBus()
    calls: list[str] = []
    bus.subscribe(
        Subscription(Event.EPOCH_END, lambda run: calls.append("early"), EARLY_STOPPING_PRIORITY)
    )
    bus.subscribe(
        Subscription(Event.EPOCH_END, lambda run: calls.append("ckpt"), CHECKPOINT_PRIORITY)
    )
    bus.subscribe(Subscription(Event.EPOCH_END, lambda run: calls.append("user-a")))
    bus.subscribe(Subscription(Event.EPOCH_END, lambda run: calls.append("first"), priority=10))
    bus.subscribe(Subscription(Event.EPOCH_END, lambda run: calls.append("user-b")))
    bus.fire(Event.EPOCH_END, None)  # type: ignore[arg-type]
    assert calls == ["first", "user-a", "user-b", "ckpt", "early"]


@given(st.integers(1, 7), st.integers(0, 40))
def test_every_fires_on_each_nth_occurrence(every: int, occurrences: int) -> None:
    bus, calls = EventBus(), []
    bus.subscribe(Subscription(Event.BATCH_END, lambda run: calls.append(1), every=every))
    for _ in range(occurrences):
        bus.fire(Event.BATCH_END, None)  # type: ignore[arg-type]
    assert len(calls) == occurrences // every


@given(st.integers(1, 7), st.integers(0, 40))
def test_once_fires_exactly_at_the_nth_occurrence(once: int, occurrences: int) -> None:
    bus, calls = EventBus(), []
    bus.subscribe(Subscription(Event.BATCH_END, lambda run: calls.append(1), once=once))
    for _ in range(occurrences):
        bus.fire(Event.BATCH_END, None)  # type: ignore[arg-type]
    assert len(calls) == (1 if occurrences >= once else 0)


def test_dispatch_holds_only_subscribed_handlers() -> None:
    bus = EventBus()
    bus.add(EventRecorder())
    assert all(len(bus.handlers(event)) == 1 for event in Event)
    bus = EventBus()
    bus.subscribe(Subscription(Event.FIT_END, print))
    assert [len(bus.handlers(e)) for e in Event].count(0) == len(Event) - 1


@pytest.mark.parametrize(
    "kwargs", [{"every": 0}, {"once": -1}, {"every": 2, "once": 2}, {"every": 1.5}]
)
def test_bad_filters_are_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        Subscription(Event.BATCH_END, print, **kwargs)


def test_callback_without_handlers_is_refused() -> None:
    with pytest.raises(ConfigError, match="no on_<event> method"):
        EventBus().add(object())


def _expected_events(steps_per_epoch: list[int], evals: list[bool]) -> list[Event]:
    events = [Event.FIT_START]
    for steps, evaluated in zip(steps_per_epoch, evals):
        events.append(Event.EPOCH_START)
        events += [Event.BATCH_START, Event.BATCH_END] * steps
        if evaluated:
            events += [Event.EVAL_START, Event.EVAL_END]
        events.append(Event.EPOCH_END)
    return [*events, Event.FIT_END]


@settings(max_examples=25, deadline=None)
@given(
    epochs=st.integers(1, 4),
    samples=st.integers(1, 40),
    batch_size=st.integers(1, 16),
    eval_every=st.integers(1, 3),
    with_eval=st.booleans(),
    every=st.integers(1, 5),
)
def test_recorder_sees_exact_events_in_order(
    epochs: int, samples: int, batch_size: int, eval_every: int, with_eval: bool, every: int
) -> None:
    recorder = EventRecorder()
    filtered: list[int] = []
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.01)),
        EngineConfig(
            epochs=epochs,
            batch_size=batch_size,
            eval_every=eval_every,
            output_dir=None,
            log_every=3,
        ),
        callbacks=[
            recorder,
            Subscription(Event.BATCH_END, lambda run: filtered.append(1), every=every),
        ],
    )
    data = torch.randn(samples, 4)
    engine.fit(TinyRegressor(), data, data[:5] if with_eval else None)
    steps = -(-samples // batch_size)
    evals = [with_eval and (e + 1) % eval_every == 0 for e in range(epochs)]
    assert recorder.events == _expected_events([steps] * epochs, evals)
    assert len(filtered) == (steps * epochs) // every


@settings(max_examples=15, deadline=None)
@given(samples=st.integers(4, 30), batch_size=st.integers(1, 8), stop_at=st.integers(1, 20))
def test_stop_ends_at_the_next_batch_boundary(samples: int, batch_size: int, stop_at: int) -> None:
    recorder = EventRecorder()
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.01)),
        EngineConfig(epochs=3, batch_size=batch_size, output_dir=None),
        callbacks=[recorder],
    )
    engine.on(Event.BATCH_END, lambda run: run.engine.stop(), once=stop_at)
    result = engine.fit(TinyRegressor(), torch.randn(samples, 4))
    steps = -(-samples // batch_size)
    total = min(stop_at, 3 * steps)
    assert result.steps == total
    assert recorder.count(Event.BATCH_END) == total
    assert recorder.events[-1] == Event.FIT_END
    # a stop on an epoch's last batch still completes that epoch; a partial epoch gets no END
    assert recorder.count(Event.EPOCH_END) == total // steps


def test_exception_fires_exception_not_fit_end() -> None:
    recorder = EventRecorder()
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.01)),
        EngineConfig(epochs=2, batch_size=4, output_dir=None),
        callbacks=[recorder],
    )

    def fail(run: object) -> None:
        raise RuntimeError("boom")

    engine.on(Event.BATCH_END, fail, once=3)
    with pytest.raises(RuntimeError, match="boom"):
        engine.fit(TinyRegressor(), torch.randn(20, 4))
    assert recorder.events[-1] == Event.EXCEPTION
    assert Event.FIT_END not in recorder.events


def test_keyboard_interrupt_fires_exception_and_propagates() -> None:
    recorder = EventRecorder()
    engine = Engine(
        Standard(OptimizerSpec("SGD", lr=0.01)),
        EngineConfig(epochs=1, batch_size=4, output_dir=None),
        callbacks=[recorder],
    )

    def interrupt(run: object) -> None:
        raise KeyboardInterrupt

    engine.on(Event.BATCH_START, interrupt, once=2)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(TinyRegressor(), torch.randn(20, 4))
    assert recorder.events[-1] == Event.EXCEPTION
