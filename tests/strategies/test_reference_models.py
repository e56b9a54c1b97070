"""The reference models of ``examples/models.py`` train with their strategies on digits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import Engine, EngineConfig
from examples.data import digits
from examples.demo_multi import workloads
from examples.models import WGANGP

FALLING = {
    "aae": "train/recon_loss",
    "rae": "train/encoder_loss",
    "vaegan": "train/pixel_loss",
    "wgan": "train/discriminator_loss",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FALLING))
def test_each_reference_model_learns_with_its_strategy(name: str) -> None:
    reference, strategy = workloads()[name]
    model = type(reference)(hidden=32)
    data = {"data": digits("train")["data"][:256]}
    config = EngineConfig(epochs=3, batch_size=32, output_dir=None, seed=0, log_every=6)
    history = Engine(strategy, config).fit(model, data).history
    key = FALLING[name]
    assert history[-1][key] < history[0][key]
    for loss_key in strategy.loss_keys:
        assert torch.isfinite(torch.tensor(history[-1][f"train/{loss_key}"]))


def test_the_wgan_names_a_bad_phase_and_leaves_out_the_penalty_without_autograd() -> None:
    model = WGANGP()
    batch: dict[str, Any] = {"data": torch.rand(4, 1, 8, 8)}
    with pytest.raises(
        ValueError, match="phase must be 'discriminator', 'generator' or None, got 'critic'"
    ):
        model(batch, phase="critic")
    with torch.no_grad():
        outputs = model(batch)
    assert {"discriminator_loss", "generator_loss"} <= set(outputs)
