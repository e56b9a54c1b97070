"""Each multi-optimiser strategy over ``CoupledToy``, with its roles, losses and groups."""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from engine.config.specs import OptimizerSpec
from strategies import Adversarial, Coupled, CoupledAdversarial
from tests.strategies.toy import CoupledToy

# "two_phase" is the simultaneous schedule (both phases' gradients at the same parameters);
# "sequential" (two-phase Adversarial's default) steps the discriminator before the generator's
# phase, so the properties that compare with gradients at the initial parameters leave it out.
KINDS = ("adversarial", "two_phase", "coupled", "coupled_adversarial")
ALL_KINDS = (*KINDS, "sequential")


@attrs.frozen
class Case:
    """A strategy, the model it trains, and per role: loss key, modules, phase of its forward."""

    strategy: Any
    model: CoupledToy
    roles: dict[str, tuple[str, list[nn.Module], str | None]]


def build(kind: str, model: CoupledToy, specs: dict[str, OptimizerSpec], **options: Any) -> Case:
    if kind in ("adversarial", "two_phase", "sequential"):
        two_phase = kind != "adversarial"
        schedule = {"two_phase": "simultaneous", "sequential": "sequential"}.get(kind)
        strategy = Adversarial(
            generator=specs["generator"],
            discriminator=specs["discriminator"],
            two_phase=two_phase,
            schedule=schedule,
            **options,
        )
        roles = {
            "generator": (
                "autoencoder_loss",
                [model.encoder, model.decoder],
                "generator" if two_phase else None,
            ),
            "discriminator": (
                "discriminator_loss",
                [model.discriminator],
                "discriminator" if two_phase else None,
            ),
        }
    elif kind == "coupled":
        model.discriminator.requires_grad_(False)
        strategy = Coupled(encoder=specs["encoder"], decoder=specs["decoder"], **options)
        roles = {
            "encoder": ("encoder_loss", [model.encoder], None),
            "decoder": ("decoder_loss", [model.decoder], None),
        }
    elif kind == "coupled_adversarial":
        strategy = CoupledAdversarial(
            encoder=specs["encoder"],
            decoder=specs["decoder"],
            discriminator=specs["discriminator"],
            **options,
        )
        roles = {
            "encoder": ("encoder_loss", [model.encoder], None),
            "decoder": ("decoder_loss", [model.decoder], None),
            "discriminator": ("discriminator_loss", [model.discriminator], None),
        }
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {ALL_KINDS}")
    return Case(strategy, model, roles)


def role_names(kind: str) -> tuple[str, ...]:
    if kind in ("adversarial", "two_phase", "sequential"):
        return ("generator", "discriminator")
    if kind == "coupled":
        return ("encoder", "decoder")
    return ("encoder", "decoder", "discriminator")
