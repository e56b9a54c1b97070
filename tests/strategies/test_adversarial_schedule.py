"""Adversarial's alternation: exact update counts over n windows, phases, resume of the cycle."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Engine, EngineConfig
from engine.config.specs import OptimizerSpec
from strategies import Adversarial
from tests.strategies.toy import CoupledToy, make_ctx


def _adam_steps(strategy: Adversarial, role: str) -> int:
    update = next(u for u in strategy.joint.updates if u.role == role)
    states = [update.optimizer.state[p] for p in update.params]
    counts = {int(s["step"]) for s in states if "step" in s}
    assert len(counts) <= 1, counts
    return counts.pop() if counts else 0


def _run_windows(
    strategy: Adversarial, model: CoupledToy, windows: int, accumulate: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(windows):
        for micro in range(accumulate):
            ctx = make_ctx(micro_index=micro, micro_count=accumulate)
            data = {"data": torch.randn(4, 3, generator=generator)}
            strategy.train_step(model, data, ctx)


@settings(max_examples=30, deadline=None)
@given(
    n_critic=st.integers(1, 4),
    accumulate=st.integers(1, 3),
    windows=st.integers(1, 9),
    split=st.integers(0, 9),
    two_phase=st.booleans(),
)
def test_alternation_counts_match_the_schedule_exactly_across_a_resume(
    n_critic: int, accumulate: int, windows: int, split: int, two_phase: bool
) -> None:
    torch.manual_seed(0)
    model = CoupledToy()
    adam = OptimizerSpec("Adam", lr=1e-3)
    options = {"n_critic": n_critic, "two_phase": two_phase}
    first = Adversarial(generator=adam, discriminator=adam, **options)
    first.setup(model, make_ctx())
    split = min(split, windows)
    _run_windows(first, model, split, accumulate, seed=1)
    # resume: a fresh strategy restored from the first one's state continues the cycle
    second = Adversarial(generator=adam, discriminator=adam, **options)
    second.setup(model, make_ctx())
    second.load_state_dict(first.state_dict())
    _run_windows(second, model, windows - split, accumulate, seed=2)

    assert second.windows == windows
    assert _adam_steps(second, "discriminator") == windows
    assert _adam_steps(second, "generator") == windows // n_critic
    if two_phase:
        generator_windows = windows // n_critic
        assert model.phases.count("discriminator") == windows * accumulate
        assert model.phases.count("generator") == generator_windows * accumulate
        assert None not in model.phases
    else:
        assert model.phases == [None] * windows * accumulate


def test_two_phase_evaluation_runs_both_phases_and_reports_both_losses() -> None:
    model = CoupledToy()
    adam = OptimizerSpec("Adam", lr=1e-3)
    strategy = Adversarial(generator=adam, discriminator=adam, two_phase=True, n_critic=3)
    engine = Engine(strategy, EngineConfig(epochs=2, batch_size=4, output_dir=None, seed=0))
    data = {"data": torch.randn(12, 3)}
    result = engine.fit(model, data, eval=data)
    last = result.history[-1]
    for key in ("train/autoencoder_loss", "train/discriminator_loss"):
        assert key in last
    for key in ("eval/autoencoder_loss", "eval/discriminator_loss", "lr/generator"):
        assert key in last
    assert strategy.windows == 6
    assert _adam_steps(strategy, "generator") == 2


def test_two_phase_monitors_nothing_by_default_and_the_discriminator_loss_when_named() -> None:
    """A GAN's losses are no quality measure: no default monitor (issue 11); a monitor the user
    names on the discriminator's loss is found in every epoch (the generator's is not)."""
    adam = OptimizerSpec("Adam", lr=1e-3)
    strategy = Adversarial(generator=adam, discriminator=adam, two_phase=True, n_critic=5)
    assert strategy.loss_keys == ("discriminator_loss", "autoencoder_loss")
    assert Adversarial(generator=adam, discriminator=adam).loss_keys[0] == "autoencoder_loss"
    engine = Engine(strategy, EngineConfig(epochs=3, batch_size=4, output_dir=None, seed=0))
    assert engine.fit(CoupledToy(), {"data": torch.randn(12, 3)}).monitor is None
    config = EngineConfig(
        epochs=3, batch_size=4, output_dir=None, seed=0, monitor="train/discriminator_loss"
    )
    strategy = Adversarial(generator=adam, discriminator=adam, two_phase=True, n_critic=5)
    result = Engine(strategy, config).fit(CoupledToy(), {"data": torch.randn(12, 3)})
    assert result.monitor == "train/discriminator_loss"
    assert "train/autoencoder_loss" not in result.history[0]  # windows 0-2: critic only
    assert "train/autoencoder_loss" in result.history[1]  # window 4: the generator's
