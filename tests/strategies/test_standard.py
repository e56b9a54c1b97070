"""The Standard strategy: accumulation, clipping, schedulers, precision, state."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import ConfigError, Engine, EngineConfig, OptimizerSpec, SchedulerSpec
from strategies import Standard
from tests.helpers import TinyRegressor, snapshot


def _fit(model: torch.nn.Module, data: Any, strategy: Standard | None = None, **config: Any) -> Any:
    config.setdefault("output_dir", None)
    engine = Engine(strategy or Standard(OptimizerSpec("SGD", lr=0.1)), EngineConfig(**config))
    return engine, engine.fit(model, data)


@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(1, 5),
    micro=st.integers(1, 6),
    steps=st.integers(1, 3),
    optimizer=st.sampled_from(["SGD", "Adam"]),
    seed=st.integers(0, 100),
)
def test_k_micro_batches_equal_one_batch_k_times_larger(
    k: int, micro: int, steps: int, optimizer: str, seed: int
) -> None:
    torch.manual_seed(seed)
    data = torch.randn(k * micro * steps, 4)
    small, large = TinyRegressor(), TinyRegressor()
    large.load_state_dict(small.state_dict())
    spec = OptimizerSpec(optimizer, lr=0.05)
    _fit(small, data, Standard(spec), batch_size=micro, accumulate_steps=k, shuffle=False)
    _fit(large, data, Standard(spec), batch_size=micro * k, shuffle=False)
    for name, value in snapshot(small).items():
        torch.testing.assert_close(value, snapshot(large)[name], rtol=1e-4, atol=1e-5)


def test_a_short_last_window_is_the_mean_of_its_own_micro_batches() -> None:
    """7 batches with accumulate_steps=3: windows of 3, 3 and 1 batches; each one step."""
    data = torch.randn(7, 4)
    small, large = TinyRegressor(), TinyRegressor()
    large.load_state_dict(small.state_dict())
    _fit(small, data, batch_size=1, accumulate_steps=3, shuffle=False)
    for lo, hi in [(0, 3), (3, 6), (6, 7)]:
        _fit(large, data[lo:hi], batch_size=hi - lo, shuffle=False)
    for name, value in snapshot(small).items():
        torch.testing.assert_close(value, snapshot(large)[name])


@settings(max_examples=15, deadline=None)
@given(clip=st.floats(0.01, 5.0), seed=st.integers(0, 100))
def test_clipping_matches_a_clipped_sgd_step(clip: float, seed: int) -> None:
    torch.manual_seed(seed)
    data = torch.randn(8, 4) * 5
    model = TinyRegressor()
    reference = copy.deepcopy(model)
    _fit(model, data, batch_size=8, grad_clip_norm=clip, shuffle=False)
    loss = reference(data)["loss"]
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = min(1.0, clip / (float(norm) + 1e-6))
    with torch.no_grad():
        for param, grad in zip(reference.parameters(), grads):
            param -= 0.1 * scale * grad
    for (name, value), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(value.cpu(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_step_scheduler_steps_once_per_optimizer_step() -> None:
    strategy = Standard(
        OptimizerSpec("SGD", lr=1.0),
        scheduler=SchedulerSpec("StepLR", interval="step", step_size=1, gamma=0.5),
    )
    _fit(TinyRegressor(), torch.randn(12, 4), strategy, batch_size=2, accumulate_steps=2)
    # 6 batches, windows of 2: 3 optimiser steps, so 3 halvings
    assert strategy.learning_rates() == {"lr/model": 0.125}


def test_epoch_scheduler_and_logged_learning_rate() -> None:
    strategy = Standard(
        OptimizerSpec("SGD", lr=1.0), scheduler=SchedulerSpec("StepLR", step_size=1, gamma=0.1)
    )
    _, result = _fit(TinyRegressor(), torch.randn(4, 4), strategy, epochs=3, batch_size=2)
    assert [round(row["lr/model"], 6) for row in result.history] == [1.0, 0.1, 0.01]


@pytest.mark.parametrize(
    ("mode", "expected"), [("min", [0.1, 0.1, 0.1, 0.1]), ("max", [0.1, 0.1, 0.05, 0.025])]
)
def test_plateau_scheduler_reads_its_monitored_metric(mode: str, expected: list[float]) -> None:
    """Full-batch SGD makes the training loss fall every epoch: watched in "min" mode it always
    improves (the lr stays); in "max" mode it never does after the first epoch, so the lr halves
    at every later epoch's end (the lr logged with epoch e is the one that epoch trained with)."""
    torch.manual_seed(0)
    strategy = Standard(
        OptimizerSpec("SGD", lr=0.1),
        scheduler=SchedulerSpec(
            "ReduceLROnPlateau", monitor="train/loss", mode=mode, patience=0, factor=0.5
        ),
    )
    _, result = _fit(TinyRegressor(), torch.randn(4, 4), strategy, epochs=4, batch_size=4)
    losses = [row["train/loss"] for row in result.history]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert [round(row["lr/model"], 6) for row in result.history] == expected
    strategy = Standard(
        OptimizerSpec("SGD", lr=1e-3),
        scheduler=SchedulerSpec("ReduceLROnPlateau", monitor="train/los"),
    )
    with pytest.raises(ConfigError, match="'train/los'"):
        _fit(TinyRegressor(), torch.randn(4, 4), strategy, batch_size=4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu_and_learns(precision: str) -> None:
    torch.manual_seed(0)
    _, result = _fit(
        TinyRegressor(8),
        torch.randn(64, 8),
        Standard(OptimizerSpec("Adam", lr=1e-2)),
        epochs=5,
        batch_size=16,
        precision=precision,
        grad_clip_norm=1.0,
    )
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]


def test_fp16_uses_one_scaler_unscaled_before_clipping() -> None:
    calls: list[str] = []

    class ScalerSpy:
        def __init__(self, scaler: torch.amp.GradScaler) -> None:
            self.scaler = scaler

        def __getattr__(self, name: str) -> Any:
            method = getattr(self.scaler, name)
            if name not in ("unscale_", "step", "update"):
                return method

            def record(*args: Any, **kwargs: Any) -> Any:
                calls.append(name)
                return method(*args, **kwargs)

            return record

    class SpyingStrategy:
        """Standard, with the run's scaler wrapped so that its calls are recorded."""

        def __init__(self) -> None:
            self.inner = Standard(OptimizerSpec("SGD", lr=0.1))
            self.loss_keys = self.inner.loss_keys
            self.train_step, self.eval_step = self.inner.train_step, self.inner.eval_step
            self.predict_step = self.inner.predict_step
            self.end_epoch, self.learning_rates = self.inner.end_epoch, self.inner.learning_rates
            self.state_dict, self.load_state_dict = (
                self.inner.state_dict,
                self.inner.load_state_dict,
            )

        def setup(self, model: torch.nn.Module, ctx: Any) -> None:
            ctx.scaler = ScalerSpy(ctx.scaler)
            self.inner.setup(model, ctx)

    config = EngineConfig(precision="fp16", batch_size=4, grad_clip_norm=1.0, output_dir=None)
    Engine(SpyingStrategy(), config).fit(TinyRegressor(), torch.randn(8, 4))
    assert calls == ["unscale_", "step", "update"] * 2


def test_state_dict_round_trip_restores_optimizer_state() -> None:
    engine, _ = _fit(
        TinyRegressor(), torch.randn(8, 4), Standard(OptimizerSpec("Adam", lr=0.1)), batch_size=4
    )
    state = copy.deepcopy(engine.strategy.state_dict())
    other = Standard(OptimizerSpec("Adam", lr=0.1))
    _fit(TinyRegressor(), torch.randn(8, 4), other, batch_size=2)
    other.load_state_dict(state)
    restored = other.state_dict()["updates"]["model"]["optimizer"]
    assert (
        restored["state"][0]["step"] == state["updates"]["model"]["optimizer"]["state"][0]["step"]
    )


def test_extra_metrics_are_logged() -> None:
    class WithParts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.regressor = TinyRegressor()

        def forward(self, batch: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            out = self.regressor(batch)
            out["part"] = out["loss"] * 2
            return out

    strategy = Standard(OptimizerSpec("SGD", lr=0.0), metrics=("part",))
    _, result = _fit(WithParts(), torch.randn(4, 4), strategy, batch_size=4)
    row = result.history[0]
    assert row["train/part"] == pytest.approx(2 * row["train/loss"])
