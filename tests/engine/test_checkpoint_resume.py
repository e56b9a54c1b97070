"""Exact resume: train N steps == train k steps, stop, resume, train the rest (bitwise, CPU)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from callbacks import Checkpointing, EarlyStopping, MetricsHistory
from engine import Engine, EngineConfig, RunState
from engine.checkpoint.format import latest_checkpoint, load_checkpoint
from tests.engine.checkpoint_cases import KINDS, data, equal, make_case, without_seconds

INTERRUPTIONS = ("max_steps", "stop_in_batch", "stop_at_epoch_end", "error_after_batch")


class Interrupt:
    """Ends a run after step ``step`` (or at the end of epoch ``epoch``) in the chosen way."""

    def __init__(self, how: str, step: int, epoch: int) -> None:
        self.how, self.step, self.epoch = how, step, epoch

    def on_batch_end(self, run: RunState) -> None:
        if run.progress.step != self.step:
            return
        if self.how == "stop_in_batch":
            run.engine.stop()
        elif self.how == "error_after_batch":
            raise RuntimeError(f"interrupted after step {self.step}")

    def on_epoch_end(self, run: RunState) -> None:
        if self.how == "stop_at_epoch_end" and run.progress.epoch == self.epoch:
            run.engine.stop()


def _config(tmp: Path, epochs: int, batch_size: int, accumulate: int, **extra: Any) -> EngineConfig:
    return EngineConfig(
        epochs=epochs,
        batch_size=batch_size,
        accumulate_steps=accumulate,
        log_every=3,
        device="cpu",
        output_dir=tmp,
        run_name="run",
        **extra,
    )


def _callbacks(every_n_steps: int | None, background: bool = False) -> list[Any]:
    return [
        MetricsHistory(),
        EarlyStopping(patience=1000),
        Checkpointing(every_n_steps=every_n_steps, best_k=1, durable=False, background=background),
    ]


def _fit(engine: Engine, model: torch.nn.Module, train: Any, resume: str | None) -> Any:
    try:
        return engine.fit(model, train, resume=resume)
    except RuntimeError as error:
        if "interrupted after step" not in str(error):
            raise
        return None


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    samples=st.integers(3, 13),
    batch_size=st.integers(1, 5),
    epochs=st.integers(1, 3),
    accumulate=st.integers(1, 3),
    n_critic=st.integers(1, 2),
    every_n_steps=st.sampled_from([None, 1, 2, 3]),
    how=st.sampled_from(INTERRUPTIONS),
    where=st.floats(0.0, 1.0),
    background=st.booleans(),
)
def test_resumed_run_equals_uninterrupted_run(
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    samples: int,
    batch_size: int,
    epochs: int,
    accumulate: int,
    n_critic: int,
    every_n_steps: int | None,
    how: str,
    where: float,
    background: bool,
) -> None:
    tmp = tmp_path_factory.mktemp("resume")
    train = data(samples)
    # Two-phase GANs log the generator's loss only in its windows (maybe none in an epoch):
    # monitor the discriminator's, present in every epoch.
    # GAN strategies monitor nothing by default: name the monitor for every kind.
    two_phase = kind in ("two_phase", "sequential")
    steps_per_epoch = math.ceil(samples / batch_size)
    total = steps_per_epoch * epochs
    k = 1 + int(where * (total - 1))  # interruption after step k (1..total)
    stop_epoch = 1 + int(where * max(epochs - 1, 0))

    # The uninterrupted run.
    model_a, strategy_a = make_case(kind, seed=0, n_critic=n_critic)
    first_loss = "discriminator_loss" if two_phase else strategy_a.loss_keys[0]
    monitor = {"monitor": f"train/{first_loss}"}
    callbacks_a = _callbacks(None)
    config_a = _config(tmp / "a", epochs, batch_size, accumulate, **monitor)
    engine_a = Engine(strategy_a, config_a, callbacks_a)
    result_a = engine_a.fit(model_a, train)

    # Interrupted after k steps (or at an epoch's end) ...
    model_b, strategy_b = make_case(kind, seed=0, n_critic=n_critic)
    extra = {"max_steps": k} if how == "max_steps" else {}
    engine_b = Engine(
        strategy_b,
        _config(tmp / "b", epochs, batch_size, accumulate, **extra, **monitor),
        [*_callbacks(every_n_steps, background), Interrupt(how, k, stop_epoch)],
    )
    _fit(engine_b, model_b, train, None)

    # ... then resumed from the last checkpoint, with a model initialised differently.
    # (No checkpoint yet, e.g. stopped inside the first accumulation window: start over.)
    resume = "last" if latest_checkpoint(tmp / "b" / "run") is not None else None
    model_c, strategy_c = make_case(kind, seed=0 if resume is None else 1, n_critic=n_critic)
    callbacks_c = _callbacks(every_n_steps)
    config_c = _config(tmp / "b", epochs, batch_size, accumulate, **monitor)
    engine_c = Engine(strategy_c, config_c, callbacks_c)
    result_c = engine_c.fit(model_c, train, resume=resume)

    assert equal(model_a.state_dict(), model_c.state_dict())
    assert equal(strategy_a.state_dict(), strategy_c.state_dict())
    assert without_seconds(result_a.history) == without_seconds(result_c.history)
    assert without_seconds(callbacks_a[0].history) == without_seconds(callbacks_c[0].history)
    assert callbacks_a[1].state_dict() == callbacks_c[1].state_dict()
    assert (result_a.steps, result_a.best_value) == (result_c.steps, result_c.best_value)


@settings(max_examples=6, deadline=None)
@given(kind=st.sampled_from(KINDS), k=st.integers(1, 7))
def test_resumed_run_continues_the_random_streams(
    tmp_path_factory: pytest.TempPathFactory, kind: str, k: int
) -> None:
    """After resuming at step k and finishing, every RNG stream is where the uninterrupted
    run left it."""
    tmp = tmp_path_factory.mktemp("rng")
    train = data(8)

    def finish(run_name: str, max_steps: int | None, resume: str | None) -> list[float]:
        model, strategy = make_case(kind, seed=0)
        config = EngineConfig(
            epochs=2,
            batch_size=2,
            max_steps=max_steps,
            device="cpu",
            output_dir=tmp,
            run_name=run_name,
        )
        Engine(strategy, config, [Checkpointing(every_n_epochs=None, durable=False)]).fit(
            model, train, resume=resume
        )
        return [*torch.rand(2).tolist(), random.random(), float(np.random.rand())]

    expected = finish("a", None, None)
    finish("b", k, None)
    assert finish("b", None, "last") == expected


def test_fp16_resume_restores_the_grad_scaler(tmp_path: Path) -> None:
    """fp16 on CPU: the GradScaler's scale and growth tracker continue exactly."""

    def run(name: str, max_steps: int | None, resume: str | None, seed: int) -> Any:
        model, strategy = make_case("standard", seed)
        config = EngineConfig(
            epochs=2,
            batch_size=3,
            precision="fp16",
            device="cpu",
            output_dir=tmp_path,
            run_name=name,
            max_steps=max_steps,
        )
        Engine(strategy, config, [Checkpointing(durable=False)]).fit(model, data(10), resume=resume)
        return model, load_checkpoint(tmp_path / name / "checkpoints" / "last")

    model_a, last_a = run("a", None, None, seed=0)
    run("b", 5, None, seed=0)
    model_c, last_c = run("b", None, "last", seed=1)
    assert last_a.training_state["scaler"] is not None
    assert last_a.training_state["scaler"] == last_c.training_state["scaler"]
    assert equal(model_a.state_dict(), model_c.state_dict())
    assert equal(last_a.training_state["strategy"], last_c.training_state["strategy"])


@pytest.mark.parametrize("cut", [1, 2, 4])
def test_mid_epoch_resume_of_data_gathered_per_batch_replays_no_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    """Data above the shuffled-copy limit (lowered to 0 here) is gathered batch by batch; a run
    cut after ``cut`` steps of an epoch and resumed ends bitwise where the uninterrupted one
    does (a replayed or skipped batch would move it)."""
    monkeypatch.setattr("engine.data.batches._SHUFFLED_COPY_LIMIT", 0)
    train = data(13)

    def run(name: str, max_steps: int | None, resume: str | None, seed: int) -> Any:
        model, strategy = make_case("standard", seed)
        config = EngineConfig(
            epochs=2,
            batch_size=3,
            max_steps=max_steps,
            log_every=2,
            device="cpu",
            output_dir=tmp_path,
            run_name=name,
        )
        result = Engine(strategy, config, [Checkpointing(every_n_steps=1, durable=False)]).fit(
            model, train, resume=resume
        )
        return model, result

    reference, expected = run("a", None, None, seed=0)
    run("b", cut, None, seed=0)
    resumed, result = run("b", None, "last", seed=1)
    assert equal(reference.state_dict(), resumed.state_dict())
    assert without_seconds(expected.history) == without_seconds(result.history)
