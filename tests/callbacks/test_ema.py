"""callbacks/ema.py: the average equals a hand-computed EMA, resumes bitwise, swaps exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from callbacks import Checkpointing
from callbacks.ema import EMA, beta_for
from engine import ConfigError, Engine, EngineConfig, OptimizerSpec, RunState
from strategies import Standard


class Net(nn.Module):
    """A ``body`` with a BatchNorm (buffers to copy) and a ``head``; ``loss`` is a regression."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, batch: Any, **_: Any) -> dict[str, torch.Tensor]:
        x = batch["data"]
        return {"loss": (self.head(self.body(x)) - x.flip(-1)).pow(2).mean()}


def data(n: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"data": torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))}


def config(tmp_path: Path | None = None, **extra: Any) -> EngineConfig:
    values: dict[str, Any] = {"epochs": 2, "batch_size": 6, "device": "cpu", "log_every": 2}
    values.update(output_dir=tmp_path, run_name="run")
    values.update(extra)
    return EngineConfig(**values)


def fit(
    callbacks: list[Any],
    tmp_path: Path | None = None,
    resume: str | None = None,
    eval_data: Any = None,
    **extra: Any,
) -> tuple[Net, Any]:
    torch.manual_seed(0)
    model = Net()
    engine = Engine(Standard(OptimizerSpec("SGD", lr=0.1)), config(tmp_path, **extra), callbacks)
    return model, engine.fit(model, data(), eval_data, resume=resume)


class ParamRecorder:
    """The tracked module's parameters at FIT_START and after every step (after the EMA)."""

    priority = 0

    def __init__(self, path: str) -> None:
        self.path = path
        self.snapshots: list[list[torch.Tensor]] = []
        self.window_ends: list[bool] = []

    def _params(self, run: RunState) -> list[torch.Tensor]:
        module = run.model.get_submodule(self.path)
        return [p.detach().double().clone() for p in module.parameters()]

    def on_fit_start(self, run: RunState) -> None:
        self.snapshots.append(self._params(run))

    def on_batch_end(self, run: RunState) -> None:
        assert run.context is not None
        self.snapshots.append(self._params(run))
        self.window_ends.append(run.context.is_update_step)


# ----------------------------------------------------------------------------- the average


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    decay=st.floats(0.01, 0.999),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_decay_average_equals_a_hand_computed_ema(decay: float, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    module = nn.Linear(3, 2)
    ema = EMA(decay=decay)
    ema.attach(module)
    expected = [p.detach().double().clone() for p in module.parameters()]
    for _ in range(steps):
        with torch.no_grad():
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        ema.update(4)
        expected = [
            decay * e + (1 - decay) * p.detach().double()
            for e, p in zip(expected, module.parameters())
        ]
    for got, want in zip(ema.averaged.values(), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert ema.updates == steps and ema.samples_seen == 4 * steps


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    half_life=st.floats(1.0, 1e5),
    rampup=st.one_of(st.none(), st.floats(0.01, 1.0)),
    batches=st.lists(st.integers(1, 64), min_size=1, max_size=8),
)
def test_half_life_beta_is_stylegans_formula(
    half_life: float, rampup: float | None, batches: list[int]
) -> None:
    seen = 0
    for batch in batches:
        life = half_life if rampup is None else min(half_life, seen * rampup)
        expected = 0.5 ** (batch / max(life, 1e-8))
        assert beta_for(seen, batch, half_life, None, rampup) == pytest.approx(expected)
        seen += batch
    assert beta_for(0, 8, half_life, None, None) == pytest.approx(0.5 ** (8 / half_life))
    # half the old weight is left after half_life samples, whatever the batch size
    assert beta_for(0, 8, 800.0, None, None) ** 100 == pytest.approx(0.5)


def test_rampup_starts_from_the_current_weights() -> None:
    module = nn.Linear(2, 2)
    ema = EMA(half_life=1000.0, rampup=0.05)
    ema.attach(module)
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(8)  # samples_seen 0: half-life 0, beta 0: the EMA is the weights
    assert torch.equal(ema.averaged["weight"], module.weight)


def test_in_a_run_the_ema_follows_each_optimiser_step_and_copies_buffers() -> None:
    ema = EMA(module="body", half_life=30.0)
    recorder = ParamRecorder("body")
    model, _ = fit([ema, recorder])
    expected = recorder.snapshots[0]
    seen = 0
    for params in recorder.snapshots[1:]:
        beta = 0.5 ** (6 / 30.0)
        expected = [beta * e + (1 - beta) * p for e, p in zip(expected, params)]
        seen += 6
    averaged = list(ema.averaged.values())
    for got, want in zip(averaged, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert ema.updates == 8 and ema.samples_seen == seen == 48
    batch_norm = model.body[1]
    assert torch.equal(ema.averaged["1.running_mean"], batch_norm.running_mean)
    assert torch.equal(ema.averaged["1.num_batches_tracked"], batch_norm.num_batches_tracked)


def test_with_accumulation_only_window_ends_update_counting_the_window() -> None:
    ema = EMA(module="head", decay=0.5)
    recorder = ParamRecorder("head")
    fit([ema, recorder], accumulate_steps=2)
    assert recorder.window_ends == [False, True] * 4
    assert ema.updates == 4 and ema.samples_seen == 4 * 12
    expected = recorder.snapshots[0]
    for params, window_end in zip(recorder.snapshots[1:], recorder.window_ends):
        if window_end:
            expected = [0.5 * e + 0.5 * p for e, p in zip(expected, params)]
    for got, want in zip(ema.averaged.values(), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- swapping


class WeightProbe:
    """The model's weights as seen at EVAL_START and EVAL_END (after the EMA's handlers)."""

    priority = 0

    def __init__(self, ema: EMA) -> None:
        self.ema = ema
        self.at_eval: list[dict[str, torch.Tensor]] = []
        self.ema_at_eval: list[dict[str, torch.Tensor]] = []
        self.after_eval: list[dict[str, torch.Tensor]] = []
        self.before_eval: list[dict[str, torch.Tensor]] = []

    def on_batch_end(self, run: RunState) -> None:
        self.before_eval.append(_state(run.model))

    def on_eval_start(self, run: RunState) -> None:
        self.at_eval.append(_state(run.model))
        self.ema_at_eval.append({k: v.clone() for k, v in self.ema.averaged.items()})

    def on_eval_end(self, run: RunState) -> None:
        self.after_eval.append(_state(run.model))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_use_for_eval_evaluates_the_ema_and_restores_the_raw_weights_bitwise() -> None:
    ema = EMA(decay=0.9, use_for_eval=True)
    probe = WeightProbe(ema)
    _, result = fit([ema, probe], eval_data=data(12, seed=1))
    for at_eval, averaged in zip(probe.at_eval, probe.ema_at_eval):
        for key, value in averaged.items():
            assert torch.equal(at_eval[key], value), key
    for epoch, after in enumerate(probe.after_eval):
        raw = probe.before_eval[(epoch + 1) * 4 - 1]
        for key in raw:
            assert torch.equal(after[key], raw[key]), key
    # the eval losses are those of the EMA model
    averaged_model = Net()
    averaged_model.load_state_dict(probe.at_eval[-1])
    engine = Engine(Standard(OptimizerSpec("SGD", lr=0.1)), config())
    expected = engine.evaluate(averaged_model, data(12, seed=1))["loss"]
    assert result.history[-1]["eval/loss"] == pytest.approx(expected, rel=1e-6)


def test_applied_swaps_in_and_back_even_on_error() -> None:
    module = nn.Linear(2, 2)
    ema = EMA(decay=0.5)
    ema.attach(module)
    raw = _state(module)
    with torch.no_grad():
        ema.averaged["weight"].add_(3.0)
    with pytest.raises(RuntimeError, match="boom"), ema.applied():
        assert torch.equal(module.weight, raw["weight"] + 3.0)
        with ema.applied():  # nested: keeps the outer swap
            pass
        assert torch.equal(module.weight, raw["weight"] + 3.0)
        raise RuntimeError("boom")
    for key, value in _state(module).items():
        assert torch.equal(value, raw[key])


def test_without_use_for_eval_evaluation_sees_the_raw_weights() -> None:
    ema = EMA(decay=0.9)
    probe = WeightProbe(ema)
    fit([ema, probe], eval_data=data(12, seed=1))
    assert torch.equal(probe.at_eval[-1]["head.weight"], probe.before_eval[-1]["head.weight"])


# ----------------------------------------------------------------------------- checkpoints


def test_resume_continues_the_average_bitwise(tmp_path: Path) -> None:
    whole = EMA(module="body", half_life=40.0, rampup=0.5)
    fit([whole, Checkpointing(durable=False)], tmp_path / "a", epochs=4)
    first = EMA(module="body", half_life=40.0, rampup=0.5)
    fit([first, Checkpointing(durable=False)], tmp_path / "b", epochs=2)
    resumed = EMA(module="body", half_life=40.0, rampup=0.5)
    fit([resumed, Checkpointing(durable=False)], tmp_path / "b", resume="last", epochs=4)
    assert resumed.samples_seen == whole.samples_seen == 4 * 4 * 6
    assert resumed.updates == whole.updates
    for key, value in whole.averaged.items():
        assert torch.equal(resumed.averaged[key], value), key


def test_export_writes_the_model_with_the_ema_weights(tmp_path: Path) -> None:
    ema = EMA(module="head", decay=0.8)
    model, result = fit([ema], tmp_path)
    exported = torch.load(result.paths["model_ema"], weights_only=True)
    assert set(exported) == set(model.state_dict())
    assert torch.equal(exported["head.weight"], ema.averaged["weight"])
    assert torch.equal(exported["body.0.weight"], model.body[0].weight.detach())


def test_a_state_for_another_module_is_refused() -> None:
    ema = EMA(module="body", decay=0.5)
    ema.attach(Net())
    other = EMA(module="head", decay=0.5)
    with pytest.raises(ValueError, match="'body'"):
        other.load_state_dict(ema.state_dict())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"half_life": 0}, "half_life must be a positive number.*got 0"),
        ({"half_life": -5.0}, "half_life must be a positive number.*got -5.0"),
        ({"decay": 0.0}, r"decay must be a number in \(0, 1\) or None, got 0.0"),
        ({"decay": 1.0}, r"decay must be a number in \(0, 1\) or None, got 1.0"),
        ({"decay": 1.5}, "got 1.5"),
        ({"decay": 0.9, "half_life": 10.0}, "not both"),
        ({"decay": 0.9, "rampup": 0.05}, "rampup=0.05"),
        ({"rampup": 0}, "rampup must be a positive number"),
        ({"module": ".generator"}, "'.generator'"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EMA(**kwargs)


def test_an_unknown_module_path_is_refused_at_fit_start_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"'body.missing'.*\['0', '1', '2'\]"):
        fit([EMA(module="body.missing")])
    with pytest.raises(ConfigError, match=r"'generator'.*\['body', 'head'\]"):
        fit([EMA(module="generator")])
