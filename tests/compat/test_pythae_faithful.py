"""``SharedGraphUpdates`` steps exactly as pythae's own ``_optimizers_step`` of each
multi-optimiser trainer (called here on the same outputs), for every combination of
``update_<role>`` flags, and an accumulation window of two half batches steps as pythae does on
the whole batch."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

pytest.importorskip("pythae")

from pythae.models.base.base_utils import ModelOutput
from pythae.trainers import (
    AdversarialTrainer,
    CoupledOptimizerAdversarialTrainer,
    CoupledOptimizerTrainer,
)

from engine import OptimizerSpec
from strategies.joint import RoleFields
from strategies.pythae import SharedGraphUpdates
from tests.strategies.toy import make_ctx

LR = 0.1


class ThreePlayers(nn.Module):
    """Encoder, decoder, discriminator whose losses reach each other's groups as VAEGAN's do;
    ``flags`` are its ``update_<role>`` outputs (pythae's coupled trainers read them)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.decoder = nn.Linear(3, 4)
        self.discriminator = nn.Linear(4, 1)
        self.flags = {"encoder": True, "decoder": True, "discriminator": True}

    def forward(self, batch: dict[str, torch.Tensor], **_: Any) -> ModelOutput:
        x = batch["data"]
        z = torch.tanh(self.encoder(x))
        recon = self.decoder(z)
        real, fake = self.discriminator(x), self.discriminator(recon)
        recon_loss = (recon - x).pow(2).mean()
        discriminator_loss = F.softplus(-real).mean() + F.softplus(fake).mean()
        encoder_loss = recon_loss + 0.1 * z.pow(2).mean()
        decoder_loss = 0.5 * recon_loss - 0.5 * discriminator_loss
        return ModelOutput(
            encoder_loss=encoder_loss,
            decoder_loss=decoder_loss,
            discriminator_loss=discriminator_loss,
            autoencoder_loss=encoder_loss + F.softplus(-fake).mean(),
            **{f"update_{role}": on for role, on in self.flags.items()},
        )


TRAINERS = {
    "CoupledOptimizerAdversarialTrainer": (
        CoupledOptimizerAdversarialTrainer,
        {"encoder": ("encoder",), "decoder": ("decoder",), "discriminator": ("discriminator",)},
    ),
    "CoupledOptimizerTrainer": (
        CoupledOptimizerTrainer,
        {"encoder": ("encoder",), "decoder": ("decoder", "discriminator")},
    ),
    "AdversarialTrainer": (
        AdversarialTrainer,
        {"generator": ("encoder", "decoder"), "discriminator": ("discriminator",)},
    ),
}
LOSS_KEYS = {"generator": "autoencoder_loss"}
PREFIX = {"generator": "autoencoder"}


def _strategy(groups: dict[str, tuple[str, ...]]) -> SharedGraphUpdates:
    roles = {
        role: RoleFields(OptimizerSpec("SGD", lr=LR), None, LOSS_KEYS.get(role, f"{role}_loss"))
        for role in groups
    }
    return SharedGraphUpdates(roles, groups=groups)


def _pythae_step(
    trainer: type, groups: dict[str, tuple[str, ...]], model: ThreePlayers, x: torch.Tensor
) -> None:
    """One batch through pythae's own ``_optimizers_step`` of ``trainer``."""
    optimizers = {
        f"{PREFIX.get(role, role)}_optimizer": torch.optim.SGD(
            [p for name in names for p in getattr(model, name).parameters()], lr=LR
        )
        for role, names in groups.items()
    }
    trainer._optimizers_step(SimpleNamespace(**optimizers), model({"data": x}))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    trainer_name=st.sampled_from(sorted(TRAINERS)),
    flags=st.fixed_dictionaries(
        {}, optional={role: st.booleans() for role in ("encoder", "decoder", "discriminator")}
    ),
    seed=st.integers(0, 2**16),
)
def test_one_step_is_pythaes_own_optimizer_step(
    trainer_name: str, flags: dict[str, bool], seed: int
) -> None:
    trainer, groups = TRAINERS[trainer_name]
    if trainer is AdversarialTrainer:
        flags = {}  # pythae's AdversarialTrainer reads no flags
    elif trainer is CoupledOptimizerTrainer:
        flags = {role: on for role, on in flags.items() if role != "discriminator"}
        flags = {"encoder": True, "decoder": True, **flags}  # it reads both unconditionally
    else:
        flags = {"encoder": True, "decoder": True, "discriminator": True, **flags}
    torch.manual_seed(seed)
    model = ThreePlayers()
    model.flags = flags
    twin = copy.deepcopy(model)
    x = torch.randn(8, 4)
    _pythae_step(trainer, groups, model, x)
    strategy = _strategy(groups)
    strategy.setup(twin, make_ctx())
    strategy.train_step(twin, {"data": x}, make_ctx())
    for (name, theirs), ours in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("trainer_name", sorted(TRAINERS))
def test_two_accumulated_half_batches_step_as_pythae_on_the_whole_batch(
    trainer_name: str,
) -> None:
    trainer, groups = TRAINERS[trainer_name]
    torch.manual_seed(0)
    model = ThreePlayers()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 4)
    _pythae_step(trainer, groups, model, x)
    strategy = _strategy(groups)
    strategy.setup(twin, make_ctx())
    for index, half in enumerate((x[:4], x[4:])):
        strategy.train_step(twin, {"data": half}, make_ctx(micro_index=index, micro_count=2))
    for (name, theirs), ours in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_pythaes_order_is_not_isolation_here() -> None:
    """The toy's losses leak (the check above would pass for any strategy otherwise)."""
    torch.manual_seed(0)
    model = ThreePlayers()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 4)
    trainer, groups = TRAINERS["CoupledOptimizerAdversarialTrainer"]
    _pythae_step(trainer, groups, model, x)
    from strategies import CoupledAdversarial

    sgd = OptimizerSpec("SGD", lr=LR)
    isolated = CoupledAdversarial(encoder=sgd, decoder=sgd, discriminator=sgd)
    isolated.setup(twin, make_ctx())
    isolated.train_step(twin, {"data": x}, make_ctx())
    assert not torch.allclose(model.decoder.weight, twin.decoder.weight)
    assert not torch.allclose(model.encoder.weight, twin.encoder.weight)
