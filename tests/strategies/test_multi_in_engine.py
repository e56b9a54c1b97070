"""The multi-optimiser strategies inside the Engine: metrics per loss key, learning rate per
group, schedulers per group, precision, non-finite losses, and exact continuation from state."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Engine, EngineConfig
from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.errors import NonFiniteLossError
from engine.events import Event
from tests.strategies.builders import ALL_KINDS, KINDS, build, role_names
from tests.strategies.toy import CoupledToy, make_ctx

DATA = {"data": torch.randn(24, 3, generator=torch.Generator().manual_seed(0))}


def _fit(case: Any, epochs: int = 2, eval: Any = None, **config: Any) -> Any:
    config = {"epochs": epochs, "batch_size": 8, "output_dir": None, "seed": 0, **config}
    return Engine(case.strategy, EngineConfig(**config)).fit(case.model, DATA, eval)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_metrics_per_loss_key_and_learning_rate_per_group(kind: str) -> None:
    roles = role_names(kind)
    specs = {role: OptimizerSpec("Adam", lr=1e-3 * (i + 1)) for i, role in enumerate(roles)}
    case = build(
        kind,
        CoupledToy(),
        specs,
        metrics=() if kind in ("two_phase", "sequential") else ("recon_loss",),
    )
    last = _fit(case, eval=DATA).history[-1]
    for loss_key, _, _ in case.roles.values():
        assert math.isfinite(last[f"train/{loss_key}"]) and math.isfinite(last[f"eval/{loss_key}"])
    for i, role in enumerate(roles):
        assert last[f"lr/{role}"] == pytest.approx(1e-3 * (i + 1))
    if kind not in ("two_phase", "sequential"):
        assert "train/recon_loss" in last


def test_schedulers_step_per_group_per_step_per_epoch_and_on_plateau() -> None:
    sgd = OptimizerSpec("SGD", lr=1.0)
    case = build(
        "coupled_adversarial",
        CoupledToy(),
        {"encoder": sgd, "decoder": sgd, "discriminator": sgd},
        encoder_scheduler=SchedulerSpec("StepLR", interval="step", step_size=1, gamma=0.5),
        decoder_scheduler=SchedulerSpec("StepLR", step_size=1, gamma=0.1),
        discriminator_scheduler=SchedulerSpec(
            "ReduceLROnPlateau", monitor="train/never_falls", patience=0, factor=0.5
        ),
        metrics=("never_falls",),
    )
    case.model.flags["never_falls"] = torch.tensor(1.0)
    history = _fit(case, epochs=2).history
    # 3 steps per epoch: the encoder halves per step, the decoder divides by 10 per epoch
    assert [h["lr/encoder"] for h in history] == [0.5**3, 0.5**6]
    assert [h["lr/decoder"] for h in history] == pytest.approx([1.0, 0.1])
    # a plateau scheduler sees a metric that never improves: the second epoch's end halves it
    assert [h["lr/discriminator"] for h in history] == [1.0, 1.0]
    assert case.strategy.learning_rates()["lr/discriminator"] == 0.5


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_strategy_trains_under_mixed_precision(kind: str, precision: str) -> None:
    specs = {role: OptimizerSpec("Adam", lr=1e-2) for role in role_names(kind)}
    case = build(kind, CoupledToy(), specs)
    before = copy.deepcopy(case.model.state_dict())
    history = _fit(case, epochs=1, precision=precision, grad_clip_norm=1.0).history
    assert all(math.isfinite(v) for k, v in history[-1].items() if k.startswith("train/"))
    assert any(not torch.equal(before[k], v.cpu()) for k, v in case.model.state_dict().items())


class NaNAt:
    """Poisons one loss at one step (counted over train forwards)."""

    def __init__(self, key: str, step: int) -> None:
        self.key, self.step, self.calls = key, step, 0

    def __call__(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> Any:
        outputs = model(batch, **kwargs)
        if self.key in outputs and torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.step:
                outputs[self.key] = outputs[self.key] * float("nan")
        return outputs


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_finite_loss_skips_the_whole_step_or_raises(kind: str) -> None:
    specs = {role: OptimizerSpec("SGD", lr=0.1) for role in role_names(kind)}
    case = build(kind, CoupledToy(), specs)
    poisoned = list(case.roles.values())[-1][0]
    config = EngineConfig(epochs=1, batch_size=8, output_dir=None, seed=0, nonfinite="skip")
    snapshots: list[list[torch.Tensor]] = []
    engine = Engine(case.strategy, config, forward=NaNAt(poisoned, 2))
    engine.on(
        Event.BATCH_START,
        lambda run: snapshots.append([p.detach().clone() for p in run.model.parameters()]),
    )
    history = engine.fit(case.model, DATA).history
    assert history[-1]["skipped_steps"] == 1
    assert math.isfinite(history[-1][f"train/{poisoned}"])
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # step 2: no move
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))

    raising = build(kind, CoupledToy(), specs)
    with pytest.raises(NonFiniteLossError, match=poisoned):
        Engine(
            raising.strategy,
            EngineConfig(epochs=1, batch_size=8, output_dir=None, log_every=1),
            forward=NaNAt(poisoned, 2),
        ).fit(raising.model, DATA)


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(ALL_KINDS), stop=st.integers(1, 5), n_critic=st.integers(1, 3))
def test_continuing_from_a_state_dict_is_bitwise_identical(
    kind: str, stop: int, n_critic: int
) -> None:
    torch.manual_seed(0)
    batches = [{"data": torch.randn(4, 3)} for _ in range(6)]
    specs = {role: OptimizerSpec("Adam", lr=1e-2) for role in role_names(kind)}
    options = {"n_critic": n_critic} if kind in ("adversarial", "two_phase", "sequential") else {}
    straight = build(kind, CoupledToy(), specs, **options)
    resumed = build(kind, copy.deepcopy(straight.model), specs, **options)
    straight.strategy.setup(straight.model, make_ctx())
    resumed.strategy.setup(resumed.model, make_ctx())
    for batch in batches[:stop]:
        resumed.strategy.train_step(resumed.model, batch, make_ctx())
    saved_model = copy.deepcopy(resumed.model.state_dict())
    saved_strategy = copy.deepcopy(resumed.strategy.state_dict())
    restored = build(kind, CoupledToy(), specs, **options)
    restored.model.load_state_dict(saved_model)
    restored.strategy.setup(restored.model, make_ctx())
    restored.strategy.load_state_dict(saved_strategy)
    for batch in batches[stop:]:
        restored.strategy.train_step(restored.model, batch, make_ctx())
    for batch in batches:
        straight.strategy.train_step(straight.model, batch, make_ctx())
    for a, b in zip(straight.model.parameters(), restored.model.parameters()):
        assert torch.equal(a, b)
