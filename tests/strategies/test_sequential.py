"""Sequential phases: the discriminator steps before the generator's phase runs, each phase over
the whole accumulation window; equal to a hand-written alternating loop, bitwise."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config.specs import OptimizerSpec
from strategies import Adversarial, Phase, Sequential, r1
from tests.strategies.gan_toy import TinyGAN, gan_batches
from tests.strategies.toy import make_ctx


def _specs(optimizer: str) -> tuple[OptimizerSpec, OptimizerSpec]:
    """The generator's and the critic's optimisers."""
    return OptimizerSpec(optimizer, lr=0.05), OptimizerSpec(optimizer, lr=0.02)


def _adversarial(optimizer: str, n_critic: int, **options: Any) -> Adversarial:
    generator, critic = _specs(optimizer)
    return Adversarial(
        generator=generator,
        discriminator=critic,
        two_phase=True,
        n_critic=n_critic,
        generator_loss_key="generator_loss",
        **options,
    )


def _hand_written(model: TinyGAN, batches: list[Any], optimizer: str, n_critic: int) -> None:
    """PyTorch's DCGAN example, WGAN-GP's Algorithm 1: step the critic, then the generator
    against the critic just updated."""
    critic = list(model.discriminator.parameters())
    generator = list(model.generator.parameters())
    generator_spec, critic_spec = _specs(optimizer)  # the same torch optimisers (fused or not)
    cpu = torch.device("cpu")
    critic_opt, generator_opt = critic_spec.build(critic, cpu), generator_spec.build(generator, cpu)
    for window, batch in enumerate(batches):
        critic_opt.zero_grad()
        model(batch, phase="discriminator")["discriminator_loss"].backward(inputs=critic)
        critic_opt.step()
        if window % n_critic == n_critic - 1:
            generator_opt.zero_grad()
            model(batch, phase="generator")["generator_loss"].backward(inputs=generator)
            generator_opt.step()


@settings(max_examples=25, deadline=None)
@given(
    optimizer=st.sampled_from(["SGD", "Adam"]),
    n_critic=st.integers(1, 3),
    windows=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_sequential_equals_a_hand_written_alternating_loop_bitwise(
    optimizer: str, n_critic: int, windows: int, seed: int
) -> None:
    torch.manual_seed(seed)
    ours, reference = TinyGAN(), TinyGAN()
    reference.load_state_dict(ours.state_dict())
    batches = gan_batches(windows, 4, seed)
    strategy = _adversarial(optimizer, n_critic)
    strategy.setup(ours, make_ctx())
    for batch in batches:
        strategy.train_step(ours, batch, make_ctx())
    _hand_written(reference, batches, optimizer, n_critic)
    for (name, got), want in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(got, want), name


def test_the_simultaneous_schedule_differs_so_the_bitwise_test_can_fail() -> None:
    torch.manual_seed(0)
    ours, reference = TinyGAN(), TinyGAN()
    reference.load_state_dict(ours.state_dict())
    batches = gan_batches(1, 4, 0)
    strategy = _adversarial("SGD", 1, schedule="simultaneous")
    strategy.setup(ours, make_ctx())
    for batch in batches:
        strategy.train_step(ours, batch, make_ctx())
    _hand_written(reference, batches, "SGD", 1)
    generator = zip(ours.generator.parameters(), reference.generator.parameters())
    assert not all(torch.equal(a, b) for a, b in generator)
    critic = zip(ours.discriminator.parameters(), reference.discriminator.parameters())
    assert all(torch.equal(a, b) for a, b in critic)  # its first step is the same either way


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 4),
    micro=st.integers(1, 3),
    n_critic=st.integers(1, 2),
    every=st.integers(1, 3),
    optimizer=st.sampled_from(["SGD", "Adam"]),
    seed=st.integers(0, 2**16),
)
def test_k_micro_batches_equal_one_batch_k_times_larger_per_phase(
    k: int, micro: int, n_critic: int, every: int, optimizer: str, seed: int
) -> None:
    torch.manual_seed(seed)
    small = TinyGAN().double()
    large = copy.deepcopy(small)
    options = {"regularisers": (r1(1.0),), "regularise_every": every}
    accumulated = _adversarial(optimizer, n_critic, **options)
    whole = _adversarial(optimizer, n_critic, **options)
    accumulated.setup(small, make_ctx())
    whole.setup(large, make_ctx())
    windows = gan_batches(3, k * micro, seed, dtype=torch.float64)
    for window in windows:
        for index in range(k):
            part = {
                key: value[index * micro : (index + 1) * micro] for key, value in window.items()
            }
            accumulated.train_step(small, part, make_ctx(micro_index=index, micro_count=k))
        whole.train_step(large, window, make_ctx())
    for got, want in zip(small.parameters(), large.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(
    lrs=st.tuples(st.floats(1e-3, 0.5), st.floats(1e-3, 0.5)),
    generator_on=st.booleans(),
    critic_on=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_phase_moves_its_own_group_by_minus_lr_times_its_own_gradient(
    lrs: tuple[float, float], generator_on: bool, critic_on: bool, seed: int
) -> None:
    """Isolation, sequentially: the critic moves by its loss's gradient at the start; the
    generator by its loss's gradient against the critic after its step."""
    torch.manual_seed(seed)
    model = TinyGAN().double()
    batch = gan_batches(1, 5, seed, dtype=torch.float64)[0]
    generator_lr, critic_lr = lrs
    strategy = Adversarial(
        generator=OptimizerSpec("SGD", lr=generator_lr),
        discriminator=OptimizerSpec("SGD", lr=critic_lr),
        two_phase=True,
        generator_loss_key="generator_loss",
    )
    strategy.setup(model, make_ctx())
    twin = copy.deepcopy(model)
    critic, generator = list(twin.discriminator.parameters()), list(twin.generator.parameters())
    if critic_on:
        loss = twin(batch, phase="discriminator")["discriminator_loss"]
        grads = torch.autograd.grad(loss, critic)
        with torch.no_grad():
            for param, grad in zip(critic, grads):
                param -= critic_lr * grad
    if generator_on:
        grads = torch.autograd.grad(twin(batch, phase="generator")["generator_loss"], generator)
        with torch.no_grad():
            for param, grad in zip(generator, grads):
                param -= generator_lr * grad
    flags = {"update_discriminator": critic_on, "update_generator": generator_on}

    def forward(module: torch.nn.Module, data: Any, **kwargs: Any) -> Any:
        return {**module(data, **kwargs), **flags}

    ctx = make_ctx()
    ctx.forward_fn = forward
    strategy.train_step(model, batch, ctx)
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    n_critic=st.integers(1, 4),
    every=st.integers(1, 5),
    disc_start=st.integers(0, 6),
    windows=st.integers(0, 14),
    accumulate=st.integers(1, 2),
)
def test_each_phase_runs_and_steps_exactly_as_its_interval_and_start_say(
    n_critic: int, every: int, disc_start: int, windows: int, accumulate: int
) -> None:
    model = TinyGAN()
    options = {"regularisers": (r1(1.0),), "regularise_every": every, "disc_start": disc_start}
    strategy = _adversarial("Adam", n_critic, **options)
    strategy.setup(model, make_ctx())
    for index, batch in enumerate(gan_batches(windows * accumulate, 2, 0)):
        ctx = make_ctx(micro_index=index % accumulate, micro_count=accumulate)
        strategy.train_step(model, batch, ctx)
    critic = sum(disc_start <= w for w in range(windows))
    lazy = sum(disc_start <= w and w % every == every - 1 for w in range(windows)) * (every > 1)
    generator = windows // n_critic
    assert strategy.runner is not None
    expected = {"discriminator": critic, "generator": generator}
    if every > 1:
        expected["discriminator_reg"] = lazy
    assert strategy.runner.runs(windows) == expected
    steps = {  # a penalty does not reach the critic's last bias: the most steps is the count
        role: max((int(s["step"]) for s in update.optimizer.state.values()), default=0)
        for role, update in strategy.joint.by_role.items()
    }
    assert steps == {"discriminator": critic + lazy, "generator": generator}
    factors = [factor for phase, factor in model.calls if phase == "generator"]
    expected_factors = [
        float(w >= disc_start) for w in range(windows) if w % n_critic == n_critic - 1
    ]
    if disc_start == 0:
        assert factors == [None] * len(expected_factors) * accumulate
    else:
        assert factors == [f for f in expected_factors for _ in range(accumulate)]


def test_a_general_sequential_strategy_runs_its_phases_in_order() -> None:
    model = TinyGAN()
    adam = OptimizerSpec("Adam", lr=1e-3)
    strategy = Sequential(
        optimizers={"discriminator": adam, "generator": adam},
        phases=(
            Phase("generator", "generator", "generator_loss"),
            Phase("discriminator", "discriminator", "discriminator_loss"),
            Phase("discriminator", "discriminator", regularisers=(r1(1.0),), every=2),
        ),
        predict_forward="generator",
    )
    strategy.setup(model, make_ctx())
    metrics = [strategy.train_step(model, b, make_ctx()) for b in gan_batches(4, 2, 0)]
    assert [call[0] for call in model.calls[:3]] == ["generator", "discriminator", "generator"]
    assert [sorted(m) for m in metrics[:2]] == [
        ["discriminator_loss", "generator_loss"],
        ["discriminator_loss", "generator_loss", "r1_penalty"],
    ]
    assert strategy.loss_keys == ("generator_loss", "discriminator_loss")
    assert strategy.state_dict()["windows"] == 4
    assert "generator_loss" in strategy.predict_step(model, gan_batches(1, 2, 0)[0], make_ctx())


@pytest.mark.parametrize("poisoned", ["discriminator_loss", "generator_loss"])
def test_a_non_finite_phase_loss_drops_its_batch_from_that_phase_and_the_later_ones(
    poisoned: str,
) -> None:
    torch.manual_seed(0)
    model = TinyGAN()
    strategy = _adversarial("SGD", 1)
    strategy.setup(model, make_ctx())

    def forward(module: torch.nn.Module, data: Any, **kwargs: Any) -> Any:
        outputs = module(data, **kwargs)
        if poisoned in outputs:
            outputs[poisoned] = outputs[poisoned] * float("nan")
        return outputs

    ctx = make_ctx(nonfinite="skip")
    ctx.forward_fn = forward
    before = copy.deepcopy(model.state_dict())
    metrics = strategy.train_step(model, gan_batches(1, 4, 0)[0], ctx)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    if poisoned == "discriminator_loss":  # the batch is out of both phases: nothing moves
        assert moved == set() and metrics == {}
    else:  # the critic stepped first; the generator's phase dropped the batch
        assert moved == {k for k in before if k.startswith("discriminator")}
        assert set(metrics) == {"discriminator_loss"}
    assert ctx.progress.skipped_steps == 1 and strategy.windows == 1
