"""Engine.fit / evaluate / predict: results, invariants, and every bad input's error."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

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
    ModelOutputError,
    NonFiniteLossError,
    OptimizerSpec,
    StrategyError,
)
from strategies import Standard
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


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), samples=st.integers(2, 30))
def test_evaluation_changes_no_parameter_optimizer_state_or_rng(seed: int, samples: int) -> None:
    torch.manual_seed(seed)
    model, data = TinyRegressor(), torch.randn(samples, 4)
    engine = _engine(epochs=1, batch_size=4)
    engine.fit(model, data)
    optimizer_state = copy.deepcopy(engine.strategy.state_dict())
    params = snapshot(model)
    rng = torch.get_rng_state()
    engine.evaluate(model, data)
    assert same_tensors(params, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())
    after = engine.strategy.state_dict()["updates"]["model"]["optimizer"]["state"]
    before = optimizer_state["updates"]["model"]["optimizer"]["state"]
    assert all(same_tensors(before[k], after[k]) for k in before)


def test_evaluation_inside_fit_does_not_shift_the_training_rng() -> None:
    class Noisy(nn.Module):  # a stand-in for a VAE that samples in eval too
        def __init__(self) -> None:
            super().__init__()
            self.regressor = TinyRegressor()

        def forward(self, batch: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            out = self.regressor(batch)
            out["loss"] = out["loss"] + 0.01 * torch.randn(()).abs()
            return out

    data = torch.randn(16, 4)
    torch.manual_seed(0)
    with_eval, without_eval = Noisy(), Noisy()
    without_eval.load_state_dict(with_eval.state_dict())
    _engine(epochs=3, batch_size=4).fit(with_eval, data, data)
    _engine(epochs=3, batch_size=4).fit(without_eval, data)
    assert same_tensors(snapshot(with_eval), snapshot(without_eval))


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
