"""VQGAN's adaptive weight: taming-transformers' formula, detached, writes no gradient, never
NaN; with ``disc_start`` inside a sequential Adversarial, logged as ``d_weight``."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine import Engine, EngineConfig
from engine.config.specs import OptimizerSpec
from engine.errors import ModelOutputError
from strategies import Adversarial, adaptive_weight


class TinyVQGAN(nn.Module):
    """An autoencoder with a discriminator; the generator's forward weighs its adversarial
    term by ``adaptive_weight`` at the decoder's weight and by ``disc_factor``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 2)
        self.decoder = nn.Linear(2, 4)
        self.discriminator = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
        self.factors: list[float | None] = []

    def forward(self, batch: Any, phase: str, disc_factor: float | None = None) -> dict[str, Any]:
        x = batch["data"]
        reconstruction = self.decoder(torch.tanh(self.encoder(x)))
        if phase == "discriminator":
            real, fake = self.discriminator(x), self.discriminator(reconstruction.detach())
            hinge = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
            return {"discriminator_loss": hinge}
        self.factors.append(disc_factor)
        rec_loss = (reconstruction - x).abs().mean()
        g_loss = -self.discriminator(reconstruction).mean()
        d_weight = adaptive_weight(rec_loss, g_loss, self.decoder.weight)
        factor = 1.0 if disc_factor is None else disc_factor
        loss = rec_loss + d_weight * factor * g_loss
        return {"autoencoder_loss": loss, "d_weight": d_weight, "rec_loss": rec_loss}


def _losses(model: TinyVQGAN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    reconstruction = model.decoder(torch.tanh(model.encoder(x)))
    return (reconstruction - x).abs().mean(), -model.discriminator(reconstruction).mean()


def _taming(rec: torch.Tensor, adv: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """taming-transformers' ``calculate_adaptive_weight``, verbatim but for names."""
    rec_grads = torch.autograd.grad(rec, layer, retain_graph=True)[0]
    adv_grads = torch.autograd.grad(adv, layer, retain_graph=True)[0]
    weight = torch.norm(rec_grads) / (torch.norm(adv_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-6, 1e3))
def test_the_weight_is_tamings_and_writes_no_gradient(seed: int, scale: float) -> None:
    torch.manual_seed(seed)
    model = TinyVQGAN()
    rec, adv = _losses(model, torch.randn(5, 4))
    got = adaptive_weight(rec, adv * scale, model.decoder.weight)
    torch.testing.assert_close(got, _taming(rec, adv * scale, model.decoder.weight))
    assert not got.requires_grad and got.dtype == torch.float32
    assert all(param.grad is None for param in model.parameters())


def test_an_overflowing_or_missing_gradient_gives_zero_and_a_bad_layer_is_named() -> None:
    torch.manual_seed(0)
    model = TinyVQGAN()
    rec, adv = _losses(model, torch.randn(5, 4))
    assert adaptive_weight(rec, adv * math.inf, model.decoder.weight) == 0
    with torch.no_grad():
        rec_eval, adv_eval = _losses(model, torch.randn(5, 4))
    assert adaptive_weight(rec_eval, adv_eval, model.decoder.weight) == 0
    with pytest.raises(ModelOutputError, match=r"adversarial loss does not depend on last_layer"):
        adaptive_weight(rec, adv.detach() * model.encoder.weight.sum(), model.decoder.weight)


def test_under_fp16_autocast_the_weight_is_finite_and_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = TinyVQGAN()
    x = torch.randn(8, 4)
    reference = adaptive_weight(*_losses(model, x), model.decoder.weight)
    with torch.autocast("cpu", dtype=torch.float16):
        rec, adv = _losses(model, x)
    got = adaptive_weight(rec, adv, model.decoder.weight)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, reference, rtol=2e-2, atol=0)


def test_disc_start_holds_the_discriminator_and_the_adversarial_term_and_d_weight_is_logged() -> (
    None
):
    torch.manual_seed(0)
    model = TinyVQGAN()
    adam = OptimizerSpec("Adam", lr=1e-3)
    strategy = Adversarial(
        generator=adam,
        discriminator=adam,
        two_phase=True,
        disc_start=5,
        metrics=("d_weight", "rec_loss"),
    )
    config = EngineConfig(epochs=2, batch_size=4, output_dir=None, seed=0, log_every=1)
    data = {"data": torch.randn(16, 4, generator=torch.Generator().manual_seed(1))}
    history = Engine(strategy, config).fit(model, data).history  # 4 windows per epoch
    assert model.factors[:5] == [0.0] * 5 and model.factors[-3:] == [1.0] * 3
    critic = strategy.joint.by_role["discriminator"].optimizer
    assert {int(state["step"]) for state in critic.state.values()} == {8 - 5}
    assert "train/discriminator_loss" not in history[0]  # windows 0-3: before disc_start
    assert history[1]["train/d_weight"] > 0 and math.isfinite(history[1]["train/d_weight"])
