"""The plain step (``strategies/update.py``'s ``is_plain_step``): where a window of one batch
asks for nothing but the backwards and the optimiser steps (one process, no scaler, no
clipping, no per-step scheduler, ``nonfinite`` not ``"skip"``, not ``compile="step"``),
``Standard`` calls the backward and the step directly and a multi-role strategy steps its
active updates directly (``JointUpdates.train``). Either trains to the same bits as the full
path, and every setting that needs more takes the full path (``backward_isolated``,
``apply_updates``).
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

from engine import Engine, EngineConfig, OptimizerSpec, SchedulerSpec
from strategies import Standard
from tests.engine.checkpoint_cases import data, equal, make_case
from tests.engine.test_compile_step import StepToy
from tests.helpers import TinyRegressor, same_tensors, snapshot

UPDATE = Path(__file__).resolve().parents[2] / "strategies" / "update.py"
FULL_PATH = ("backward_isolated", "apply_updates")


def _fit(seed: int, strategy: Standard, steps: int = 6, **config: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyRegressor()
    samples = torch.randn(4 * steps, 4, generator=torch.Generator().manual_seed(seed))
    config = {"batch_size": 4, "shuffle": False, "output_dir": None, "device": "cpu", **config}
    Engine(strategy, EngineConfig(**config)).fit(model, samples)
    return snapshot(model)


def _full_path_calls(strategy: Standard, steps: int, **config: Any) -> Counter[str]:
    """How often a fit of ``steps`` batches called the full path's functions."""
    counts: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, _: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name in FULL_PATH and Path(code.co_filename) == UPDATE:
            counts[code.co_name] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        _fit(0, strategy, steps, **config)
    finally:
        sys.setprofile(previous)
    return counts


def _sgd() -> Standard:
    return Standard(OptimizerSpec("SGD", lr=0.1))


def test_a_plain_step_calls_backward_and_step_directly() -> None:
    assert _full_path_calls(_sgd(), steps=6) == Counter()


@pytest.mark.parametrize(
    ("needs", "strategy", "config"),
    [
        ("clipping", _sgd(), {"grad_clip_norm": 1.0}),
        ("a role's clipping", Standard(OptimizerSpec("SGD", lr=0.1), grad_clip_norm=1.0), {}),
        (
            "a per-step scheduler",
            Standard(
                OptimizerSpec("SGD", lr=0.1),
                scheduler=SchedulerSpec("StepLR", interval="step", step_size=2),
            ),
            {},
        ),
        ("the finiteness check", _sgd(), {"nonfinite": "skip"}),
        ("accumulation", _sgd(), {"accumulate_steps": 2}),
    ],
)
def test_a_setting_that_needs_more_takes_the_full_path(
    needs: str, strategy: Standard, config: dict[str, Any]
) -> None:
    calls = _full_path_calls(strategy, steps=6, **config)
    assert calls["backward_isolated"] >= 6 and calls["apply_updates"] >= 6, (needs, calls)


def test_a_per_epoch_scheduler_keeps_the_plain_step() -> None:
    spec = SchedulerSpec("StepLR", interval="epoch", step_size=1)
    assert _full_path_calls(Standard(OptimizerSpec("SGD", lr=0.1), scheduler=spec), 6) == {}


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 1000),
    optimizer=st.sampled_from(["SGD", "Adam", "AdamW", "RMSprop"]),
    lr=st.sampled_from([1e-3, 1e-2, 0.1]),
)
def test_the_plain_step_trains_to_the_full_paths_bits(seed: int, optimizer: str, lr: float) -> None:
    """``nonfinite="skip"`` takes the full path and, on finite losses, only reads them: the
    same arithmetic, so the same parameters to the bit."""
    plain = _fit(seed, Standard(OptimizerSpec(optimizer, lr=lr)))
    full = _fit(seed, Standard(OptimizerSpec(optimizer, lr=lr)), nonfinite="skip")
    assert same_tensors(plain, full)
    torch.manual_seed(seed)
    assert not same_tensors(plain, snapshot(TinyRegressor())), "nothing trained"


def _fit_case(kind: str, seed: int, flags: bool, **config: Any) -> dict[str, Any]:
    toy = (lambda: StepToy(device_flags=True)) if flags else None
    model, strategy = make_case(kind, seed=seed, toy=toy)
    config = {"batch_size": 8, "shuffle": False, "output_dir": None, "device": "cpu", **config}
    Engine(strategy, EngineConfig(**config)).fit(model, data(40))
    return {"model": snapshot(model), "strategy": strategy.state_dict()}


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["adversarial", "two_phase", "coupled", "coupled_adversarial"]),
    seed=st.integers(0, 1000),
    flags=st.booleans(),
)
def test_a_multi_role_plain_step_trains_to_the_full_paths_bits(
    kind: str, seed: int, flags: bool
) -> None:
    """With ``flags``, the forward switches updates off in some steps (``StepToy``): an update
    that is off is stepped by neither path."""
    plain = _fit_case(kind, seed, flags)
    assert equal(plain, _fit_case(kind, seed, flags, nonfinite="skip"))


def test_a_multi_role_step_takes_the_full_path_only_when_asked() -> None:
    model, strategy = make_case("coupled_adversarial", seed=0)
    counts: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, _: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name == "apply_updates" and Path(code.co_filename) == UPDATE:
            counts[code.co_name] += 1

    for clip, expected in ((None, 0), (1.0, 5)):
        counts.clear()
        config = EngineConfig(batch_size=8, output_dir=None, device="cpu", grad_clip_norm=clip)
        engine = Engine(strategy, config)
        sys.setprofile(profile)
        try:
            engine.fit(model, data(40))
        finally:
            sys.setprofile(None)
        assert counts["apply_updates"] == expected, (clip, counts)
