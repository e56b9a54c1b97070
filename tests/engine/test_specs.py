"""Optimiser and scheduler specs: names, classes and factories; errors name what is wrong."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import ConfigError, OptimizerSpec, SchedulerSpec


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(3))]


def test_unknown_optimizer_name_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown optimizer name 'Adamm'.*'Adam'"):
        OptimizerSpec("Adamm", lr=1e-3)


def test_unknown_optimizer_argument_is_named() -> None:
    with pytest.raises(ConfigError, match=r"\['lrr'\]"):
        OptimizerSpec("Adam", lrr=1e-3)


def test_optimizer_target_must_be_name_class_or_factory() -> None:
    with pytest.raises(ConfigError, match="42"):
        OptimizerSpec(42)  # type: ignore[arg-type]


def test_adam_is_fused_on_cpu_by_default() -> None:
    optimizer = OptimizerSpec("Adam", lr=1e-3).build(_params(), torch.device("cpu"))
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("SGD", {}),
        ("SGD", {"momentum": 0.9}),
        ("SGD", {"momentum": 0.9, "nesterov": True}),
        ("Adam", {}),
        ("AdamW", {}),
        ("Adagrad", {}),
    ],
)
def test_a_skipped_first_fp16_step_leaves_the_default_optimizer_as_plain_torch_would(
    name: str, extra: dict[str, Any]
) -> None:
    """The GradScaler skips a first step whose gradients overflowed; the next, finite steps then
    move the parameters exactly as torch's unfused optimiser does (fused SGD with momentum
    would step from uninitialised momentum buffers, so it is not the default)."""

    def train(spec: OptimizerSpec) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 64))
        optimizer = spec.build([weight], torch.device("cpu"))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        for factor in (float("inf"), 1.0, 1.0):  # the first step overflows
            scaler.scale((weight * factor).pow(2).sum()).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        return weight.detach()

    default = train(OptimizerSpec(name, lr=0.1, **extra))
    plain = train(OptimizerSpec(name, lr=0.1, foreach=False, **extra))
    torch.testing.assert_close(default, plain)


def test_user_choice_of_foreach_is_kept() -> None:
    optimizer = OptimizerSpec("Adam", lr=1e-3, foreach=True).build(_params(), torch.device("cpu"))
    assert not optimizer.defaults.get("fused")
    assert optimizer.defaults["foreach"] is True


def test_class_and_factory_targets() -> None:
    assert isinstance(
        OptimizerSpec(torch.optim.SGD, lr=0.1).build(_params(), torch.device("cpu")),
        torch.optim.SGD,
    )
    spec = OptimizerSpec(lambda params: torch.optim.RMSprop(params, lr=0.01))
    assert isinstance(spec.build(_params(), torch.device("cpu")), torch.optim.RMSprop)


def test_unknown_scheduler_name() -> None:
    with pytest.raises(ConfigError, match="unknown scheduler name 'StepLr'"):
        SchedulerSpec("StepLr", step_size=1)


def test_plateau_needs_a_monitor() -> None:
    with pytest.raises(ConfigError, match="monitor"):
        SchedulerSpec("ReduceLROnPlateau")


def test_plateau_steps_per_epoch_only() -> None:
    with pytest.raises(ConfigError, match="interval='step'"):
        SchedulerSpec("ReduceLROnPlateau", monitor="eval/loss", interval="step")


def test_bad_interval() -> None:
    with pytest.raises(ConfigError, match="'batch'"):
        SchedulerSpec("StepLR", step_size=1, interval="batch")  # type: ignore[arg-type]


def test_unknown_scheduler_argument() -> None:
    with pytest.raises(ConfigError, match="step_sise"):
        SchedulerSpec("StepLR", step_sise=1)
