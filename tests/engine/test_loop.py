"""Engine.fit / evaluate / predict: results, invariants, and every bad input's error."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine import (
    ConfigError,
    DataError,
    Engine,
    EngineConfig,
    Event,
    ModelOutputError,
    NonFiniteLossError,
    OptimizerSpec,
    StrategyError,
)
from strategies import Standard
from tests.engine.checkpoint_cases import equal
from tests.helpers import PythaeStyleAE, TinyRegressor, same_tensors, snapshot


def _engine(**config: Any) -> Engine:
    config.setdefault("output_dir", None)
    lr = config.pop("lr", 0.05)
    return Engine(Standard(OptimizerSpec("Adam", lr=lr)), EngineConfig(**config))


class Outputs(nn.Module):
    """Returns whatever ``make(x)`` builds: for testing the model contract."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.make = make

    def forward(self, x: torch.Tensor, **_: Any) -> Any:
        return self.make(x * self.weight)


def test_fit_returns_history_best_and_paths(tmp_path: Path) -> None:
    engine = _engine(epochs=3, batch_size=8, output_dir=tmp_path, run_name="r")
    data = torch.randn(40, 4)
    result = engine.fit(TinyRegressor(), data, data[:10])
    assert [row["epoch"] for row in result.history] == [0.0, 1.0, 2.0]
    assert {"train/loss", "eval/loss", "lr/model", "seconds"} <= set(result.history[0])
    assert result.monitor == "eval/loss"
    losses = [row["eval/loss"] for row in result.history]
    assert result.best_value == min(losses)
    assert result.best_epoch == losses.index(min(losses))
    assert result.run_dir == tmp_path / "r"
    assert result.steps == 15
    log = (tmp_path / "r" / "train.log").read_text()
    assert "fit start: TinyRegressor" in log and "fit done: 15 steps" in log


def test_two_runs_never_share_a_folder(tmp_path: Path) -> None:
    first = _engine(output_dir=tmp_path, run_name="same").fit(TinyRegressor(), torch.randn(8, 4))
    marker = first.run_dir / "keep.txt"  # type: ignore[operator]
    marker.write_text("mine")
    second = _engine(output_dir=tmp_path, run_name="same").fit(TinyRegressor(), torch.randn(8, 4))
    assert first.run_dir != second.run_dir
    assert marker.read_text() == "mine"


def test_pythae_style_model_trains_and_its_loss_falls() -> None:
    torch.manual_seed(0)
    data = {"data": torch.randn(256, 4) @ torch.randn(4, 16)}
    result = _engine(epochs=15, batch_size=32, lr=3e-3).fit(PythaeStyleAE(), data, data)
    losses = [row["eval/loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]


class Stochastic(nn.Module):
    """Draws from the torch RNG in training and in evaluation (dropout, and a VAE-style sampled
    code whose noise reaches the loss and so the parameters), keeps BatchNorm statistics, and
    remembers each forward's mode with the phase it ran in (``modes``: ``phase`` is set by the
    test, e.g. "train" or "eval")."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(features, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, features)
        )
        self.log_sigma = nn.Parameter(torch.full((features,), -1.0))
        self.modes: list[tuple[str | None, bool]] = []
        self.phase: str | None = None

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        self.modes.append((self.phase, self.training))
        x = batch["data"] if isinstance(batch, dict) else batch
        code = self.body(x)
        sampled = code + torch.randn_like(code) * self.log_sigma.exp()
        return {"loss": (sampled - x.flip(-1)).pow(2).mean()}


def _every_rng() -> tuple[torch.Tensor, Any, Any]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _same_rng(a: tuple[torch.Tensor, Any, Any], b: tuple[torch.Tensor, Any, Any]) -> bool:
    numpy_same = a[2][0] == b[2][0] and np.array_equal(a[2][1], b[2][1]) and a[2][2:] == b[2][2:]
    return torch.equal(a[0], b[0]) and a[1] == b[1] and numpy_same


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 1000),
    samples=st.integers(8, 30),
    eval_batch=st.integers(1, 9),
    mode=st.sampled_from(["train", "eval"]),
)
def test_evaluation_changes_no_state_enters_eval_mode_and_restores_the_mode(
    seed: int, samples: int, eval_batch: int, mode: str
) -> None:
    """After a fit (optimiser state exists), ``evaluate`` on a model with dropout, BatchNorm
    and sampling noise: every forward ran in eval mode; parameters, buffers (BatchNorm running
    statistics), optimiser state and every random stream are as before; the model is back in
    the mode it had (each submodule too)."""
    torch.manual_seed(seed)
    model, data = Stochastic(), torch.randn(samples, 4)
    engine = _engine(epochs=1, batch_size=4, drop_last=True, eval_batch_size=eval_batch)
    engine.fit(model, data)
    model.train(mode == "train")
    modes_before = [module.training for module in model.modules()]
    optimizer_state = copy.deepcopy(engine.strategy.state_dict())
    state = snapshot(model)
    streams = _every_rng()
    model.modes.clear()
    engine.evaluate(model, data)
    assert model.modes and all(not training for _, training in model.modes), model.modes
    assert [module.training for module in model.modules()] == modes_before
    assert same_tensors(state, snapshot(model))  # parameters and BatchNorm buffers
    assert _same_rng(streams, _every_rng())
    assert equal(engine.strategy.state_dict(), optimizer_state)


class Phases:
    """Tells the model which phase its forwards run in: training steps and evaluations."""

    def __init__(self, model: Stochastic) -> None:
        self.model = model

    def on_batch_start(self, run: Any) -> None:
        self.model.phase = "train"

    def on_eval_start(self, run: Any) -> None:
        self.model.phase = "eval"

    def on_batch_end(self, run: Any) -> None:
        self.model.phase = None

    on_eval_end = on_batch_end


def test_evaluation_inside_fit_does_not_shift_the_training_rng_and_keeps_the_modes() -> None:
    """The model samples noise in training (it reaches the parameters through the loss) and in
    evaluation: with evaluation every epoch, training ends bitwise where it ends without any.
    Evaluation's forwards run in eval mode, training's in train mode."""
    data = torch.randn(16, 4)
    torch.manual_seed(0)
    with_eval, without_eval, shifted_model = Stochastic(), Stochastic(), Stochastic()
    without_eval.load_state_dict(with_eval.state_dict())
    shifted_model.load_state_dict(with_eval.state_dict())
    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=0.05)),
        EngineConfig(epochs=3, batch_size=4, output_dir=None),
        [Phases(with_eval)],
    )
    engine.fit(with_eval, data, data)
    _engine(epochs=3, batch_size=4).fit(without_eval, data)
    assert same_tensors(snapshot(with_eval), snapshot(without_eval))
    evaluating = [training for phase, training in with_eval.modes if phase == "eval"]
    training = [training for phase, training in with_eval.modes if phase == "train"]
    assert len(evaluating) == 3 * 4 and not any(evaluating)
    assert len(training) == 3 * 4 and all(training)
    # The check can fail: one extra draw from the training stream moves the parameters.
    shifted = Engine(
        Standard(OptimizerSpec("Adam", lr=0.05)),
        EngineConfig(epochs=3, batch_size=4, output_dir=None),
    )
    shifted.on(Event.EPOCH_END, lambda run: torch.rand(1), once=1)
    shifted.fit(shifted_model, data)
    assert not same_tensors(snapshot(shifted_model), snapshot(without_eval))


@settings(max_examples=10, deadline=None)
@given(samples=st.integers(1, 30), batch_size=st.integers(1, 8))
def test_lr_zero_changes_no_parameter(samples: int, batch_size: int) -> None:
    model = TinyRegressor()
    params = snapshot(model)
    _engine(epochs=2, batch_size=batch_size, lr=0.0).fit(model, torch.randn(samples, 4))
    assert same_tensors(params, snapshot(model))


def test_max_steps_counts_batches_across_epochs() -> None:
    result = _engine(epochs=10, batch_size=4, max_steps=7).fit(TinyRegressor(), torch.randn(12, 4))
    assert result.steps == 7
    assert len(result.history) == 2  # 3 steps per epoch: two whole epochs, then a partial one


def test_predict_concatenates_per_sample_outputs() -> None:
    model, data = PythaeStyleAE(), {"data": torch.randn(10, 16)}
    outputs = _engine(eval_batch_size=3).predict(model, data)
    assert set(outputs) == {"recon_x", "z"}
    assert outputs["recon_x"].shape == (10, 16) and outputs["z"].shape == (10, 4)
    expected = model.cpu()(data)["recon_x"]  # predict ran it on the run's device
    torch.testing.assert_close(outputs["recon_x"], expected)


def test_evaluate_weights_every_sample_equally() -> None:
    model = TinyRegressor()
    data = torch.randn(10, 4)
    value = _engine(eval_batch_size=3).evaluate(model, data)["loss"]
    model.cpu()  # evaluate ran it on the run's device
    with torch.no_grad():
        per_sample = [model(data[i : i + 1])["loss"].item() for i in range(10)]
    assert math.isclose(value, sum(per_sample) / 10, rel_tol=1e-5)


# ----------------------------------------------------------------------------- bad inputs


def test_missing_loss_key_lists_the_keys_present() -> None:
    model = Outputs(lambda x: {"los": x.sum(), "recon": x})
    with pytest.raises(
        ModelOutputError, match=r"no loss 'loss' at step 0; keys present: \['los', 'recon'\]"
    ):
        _engine().fit(model, torch.randn(8, 3))


def test_non_scalar_loss_names_its_shape() -> None:
    model = Outputs(lambda x: {"loss": x.pow(2)})
    with pytest.raises(ModelOutputError, match=r"scalar.*\(4, 3\) at step 0"):
        _engine(batch_size=4).fit(model, torch.randn(8, 3))


def test_output_that_is_not_a_mapping() -> None:
    with pytest.raises(ModelOutputError, match=r"mapping.*got Tensor"):
        _engine().fit(Outputs(lambda x: x.sum()), torch.randn(8, 3))


@given(bad_step=st.integers(0, 9), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
@settings(max_examples=10, deadline=None)
def test_nonfinite_loss_raises_naming_the_step(bad_step: int, bad: float) -> None:
    calls = {"n": 0}

    def make(x: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = x.pow(2).mean()
        if not torch.is_grad_enabled():  # the pre-flight forward (engine/preflight.py): no step
            return {"loss": loss}
        if calls["n"] == bad_step:
            loss = loss * bad
        calls["n"] += 1
        return {"loss": loss}

    with pytest.raises(NonFiniteLossError, match=f"at step {bad_step};"):
        _engine(batch_size=1, log_every=4, lr=0.0).fit(Outputs(make), torch.randn(10, 3))


def test_nonfinite_skip_mode_skips_and_counts_steps() -> None:
    calls = {"n": 0}

    def make(x: torch.Tensor) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        loss = x.pow(2).mean()
        return {"loss": loss * math.nan if calls["n"] in (2, 5) else loss}

    model = Outputs(make)
    result = _engine(batch_size=1, nonfinite="skip", lr=0.01).fit(model, torch.randn(8, 3))
    assert result.skipped_steps == 2
    assert result.history[0]["skipped_steps"] == 2
    assert math.isfinite(result.history[0]["train/loss"])
    assert torch.isfinite(model.weight).all()


def test_empty_dataset_is_refused_before_any_folder_is_made(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        _engine(output_dir=tmp_path).fit(TinyRegressor(), torch.empty(0, 4))
    assert list(tmp_path.iterdir()) == []


def test_model_without_trainable_parameters() -> None:
    model = TinyRegressor().requires_grad_(False)
    with pytest.raises(StrategyError, match="no trainable parameters"):
        _engine().fit(model, torch.randn(4, 4))


def test_unavailable_device_is_named() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ConfigError, match="'cuda:1'"):
        _engine(device="cuda:1").fit(TinyRegressor(), torch.randn(4, 4))


def test_monitor_that_is_never_logged_is_named() -> None:
    with pytest.raises(ConfigError, match="'eval/accuracy'"):
        _engine(monitor="eval/accuracy").fit(TinyRegressor(), torch.randn(4, 4), torch.randn(4, 4))


def test_strategy_must_follow_the_protocol() -> None:
    with pytest.raises(StrategyError, match="StepStrategy"):
        Engine(object(), EngineConfig())  # type: ignore[arg-type]
