"""Gradient penalties as parts of a phase: their formulas, lazy intervals (gain and Adam's
correction), a GradScaler (scaled, then unscaled in fp32) and clear errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config.specs import OptimizerSpec
from engine.errors import ConfigError, ModelOutputError
from strategies import Adversarial, GradientPenalty, Phase, Sequential, r1, r2, wgan_gp
from tests.strategies.gan_toy import TinyGAN, gan_batches
from tests.strategies.toy import make_ctx

SGD = OptimizerSpec("SGD", lr=0.1)


def _input_gradient(model: TinyGAN, batch: Any, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = model(batch, phase="discriminator")
    scores = {"real": "real_scores", "fake": "fake_scores", "interpolates": "interpolate_scores"}
    (grad,) = torch.autograd.grad(outputs[scores[key]].sum(), outputs[key], retain_graph=True)
    return grad, outputs


@settings(max_examples=25, deadline=None)
@given(gamma=st.floats(0.0, 20.0), seed=st.integers(0, 2**16))
def test_each_penalty_equals_its_formula(gamma: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = TinyGAN().double()
    batch = gan_batches(1, 6, seed, dtype=torch.float64)[0]
    for penalty, key, want in (
        (r1(gamma), "real", lambda g: gamma / 2 * g.square().sum(1).mean()),
        (r2(gamma), "fake", lambda g: gamma / 2 * g.square().sum(1).mean()),
        (wgan_gp(gamma), "interpolates", lambda g: gamma * (g.norm(dim=1) - 1).square().mean()),
    ):
        grad, outputs = _input_gradient(model, batch, key)
        got = penalty.penalty(outputs, make_ctx(), "test")
        torch.testing.assert_close(got, want(grad), rtol=1e-12, atol=1e-12)
        assert got.requires_grad  # differentiable with respect to the discriminator


@settings(max_examples=20, deadline=None)
@given(power=st.integers(0, 24), seed=st.integers(0, 2**16))
def test_under_a_grad_scaler_the_penalty_is_taken_scaled_and_unscaled_exactly(
    power: int, seed: int
) -> None:
    """fp32: scaling by a power of two and back is exact, so the penalty is bitwise the same."""
    torch.manual_seed(seed)
    model = TinyGAN()
    outputs = model(gan_batches(1, 5, seed)[0], phase="discriminator")
    plain = r1(10.0).penalty(outputs, make_ctx(), "test")
    ctx = make_ctx()
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**power)
    assert torch.equal(r1(10.0).penalty(outputs, ctx, "test"), plain)


def test_under_fp16_the_scaled_gradient_survives_where_the_unscaled_one_underflows() -> None:
    torch.manual_seed(0)
    model = TinyGAN()
    with torch.no_grad():  # input gradients of about 1e-8: below fp16's smallest subnormal
        for layer in (model.discriminator[0], model.discriminator[2]):
            layer.weight.mul_(1e-4 / layer.weight.abs().max())
    batch = gan_batches(1, 5, 0)[0]
    reference = r1(2.0).penalty(model(batch, phase="discriminator"), make_ctx(), "fp32")
    with torch.autocast("cpu", dtype=torch.float16):
        outputs = model(batch, phase="discriminator")
    unscaled = r1(2.0).penalty(outputs, make_ctx(), "fp16")
    ctx = make_ctx()
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    scaled = r1(2.0).penalty(outputs, ctx, "fp16")
    assert reference > 0 and unscaled == 0
    torch.testing.assert_close(scaled, reference, rtol=2e-2, atol=0)


@settings(max_examples=15, deadline=None)
@given(every=st.integers(2, 16), seed=st.integers(0, 2**16))
def test_a_lazy_phase_multiplies_its_penalty_by_its_interval_and_corrects_adam(
    every: int, seed: int
) -> None:
    torch.manual_seed(seed)
    model = TinyGAN().double()
    adam = OptimizerSpec("Adam", lr=0.01, betas=(0.5, 0.99))
    lazy = Adversarial(
        generator=adam,
        discriminator=adam,
        two_phase=True,
        generator_loss_key="generator_loss",
        regularisers=(r1(3.0),),
        regularise_every=every,
    )
    lazy.setup(model, make_ctx())
    group = lazy.joint.by_role["discriminator"].optimizer.param_groups[0]
    c = every / (every + 1)
    assert group["lr"] == pytest.approx(0.01 * c)
    assert group["betas"] == pytest.approx((0.5**c, 0.99**c))
    assert lazy.joint.by_role["generator"].optimizer.param_groups[0]["lr"] == 0.01

    # The lazy phase alone, with SGD: the critic moves by -lr * every * grad(penalty).
    sgd = Sequential(
        optimizers={"discriminator": SGD},
        phases=(Phase("discriminator", "discriminator", regularisers=(r1(3.0),), every=every),),
        groups={"discriminator": "discriminator"},
        lazy_correction=False,
    )
    model.generator.requires_grad_(False)
    sgd.setup(model, make_ctx())
    batches = gan_batches(every, 4, seed, dtype=torch.float64)
    for batch in batches[:-1]:
        sgd.train_step(model, batch, make_ctx())  # not due: nothing moves
    twin = copy.deepcopy(model)
    critic = list(twin.discriminator.parameters())
    penalty = r1(3.0).penalty(twin(batches[-1], phase="discriminator"), make_ctx(), "twin")
    grads = torch.autograd.grad(penalty, critic, allow_unused=True)
    sgd.train_step(model, batches[-1], make_ctx())
    for param, before, grad in zip(model.discriminator.parameters(), critic, grads):
        want = before if grad is None else before - 0.1 * every * grad
        torch.testing.assert_close(param, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: Adversarial(generator=SGD, discriminator=SGD, regularisers=(r1(1.0),)),
            "regularisers=(GradientPenalty(name='r1_penalty'",
        ),
        (
            lambda: Adversarial(
                generator=SGD,
                discriminator=SGD,
                two_phase=True,
                schedule="simultaneous",
                disc_start=5,
            ),
            "disc_start=5 need the sequential schedule",
        ),
        (
            lambda: Adversarial(generator=SGD, discriminator=SGD, schedule="sequential"),
            "schedule='sequential' needs two_phase=True",
        ),
        (
            lambda: Adversarial(generator=SGD, discriminator=SGD, schedule="alternating"),
            "schedule must be one of ['sequential', 'simultaneous'] or None, got 'alternating'",
        ),
        (
            lambda: Adversarial(
                generator=SGD, discriminator=SGD, two_phase=True, regularise_every=16
            ),
            "regularise_every=16 has no regularisers to run",
        ),
        (
            lambda: Adversarial(
                generator=SGD, discriminator=SGD, two_phase=True, regularisers=("r1",)
            ),
            "each of regularisers must be a GradientPenalty, got 'r1'",
        ),
        (lambda: r1(-1.0), "gamma must be a finite number >= 0, got -1.0"),
        (
            lambda: Sequential(
                optimizers={"generator": SGD, "discriminator": SGD},
                phases=(
                    Phase("generator", "generator", "generator_loss"),
                    Phase("critic", "discriminator", "discriminator_loss"),
                ),
            ),
            "phase 'critic' names role 'critic', which is not among the strategy's roles "
            "['generator', 'discriminator']",
        ),
        (
            lambda: Sequential(
                optimizers={"generator": SGD, "discriminator": SGD},
                phases=(Phase("generator", "generator", "generator_loss"),),
            ),
            "role(s) ['discriminator'] are trained by no phase",
        ),
        (lambda: Phase("discriminator", "discriminator"), "phase 'discriminator_reg' trains on"),
        (
            lambda: GradientPenalty("r1", "real", "real_scores", weight=float("inf")),
            "weight must be a finite number >= 0, got inf",
        ),
    ],
)
def test_bad_configuration_fails_at_construction_naming_the_value(make: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        make()
    assert message in str(error.value)


@pytest.mark.parametrize("every", [1, 16])
def test_a_regulariser_whose_input_does_not_require_grad_fails_before_any_change(
    every: int,
) -> None:
    """Even a lazy phase due only in window 15 is checked on the critic's first forward."""
    model = TinyGAN(detach_real=True)
    strategy = Adversarial(
        generator=SGD,
        discriminator=SGD,
        two_phase=True,
        generator_loss_key="generator_loss",
        regularisers=(r1(1.0),),
        regularise_every=every,
    )
    strategy.setup(model, make_ctx())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelOutputError) as error:
        strategy.train_step(model, gan_batches(1, 4, 0)[0], make_ctx())
    assert "regulariser 'r1_penalty' needs output 'real'" in str(error.value)
    assert "model(batch, phase='discriminator')" in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_phase_whose_forward_the_model_does_not_have_fails_in_the_pre_flight() -> None:
    from engine import Engine, EngineConfig

    strategy = Sequential(
        optimizers={"generator": SGD, "discriminator": SGD},
        phases=(
            Phase("discriminator", "discriminator", "discriminator_loss"),
            Phase("generator", "critic_of_generator", "generator_loss"),
        ),
    )
    model = TinyGAN()
    before = copy.deepcopy(model.state_dict())
    data = gan_batches(1, 8, 0)[0]
    with pytest.raises((ModelOutputError, ValueError), match="critic_of_generator"):
        Engine(strategy, EngineConfig(epochs=1, batch_size=4, output_dir=None)).fit(model, data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_missing_regulariser_output_is_named_with_the_keys_present() -> None:
    strategy = Sequential(
        optimizers={"generator": SGD, "discriminator": SGD},
        phases=(
            Phase("discriminator", "discriminator", "discriminator_loss"),
            Phase("discriminator", "discriminator", regularisers=(r1(1.0, inputs="reals"),)),
            Phase("generator", "generator", "generator_loss"),
        ),
    )
    model = TinyGAN()
    strategy.setup(model, make_ctx())
    with pytest.raises(ModelOutputError, match=r"reads output 'reals', which phase .* keys"):
        strategy.train_step(model, gan_batches(1, 4, 0)[0], make_ctx())
    assert all(p.grad is None for p in model.parameters())
