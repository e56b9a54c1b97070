"""Encoder, decoder and discriminator, each with its own optimiser and loss (pythae's VAEGAN).

The forward may return ``update_encoder``, ``update_decoder`` and ``update_discriminator``
(VAEGAN's equilibrium rule): an update that is off does not back-propagate, does not step, and
its optimiser state does not advance. Each active loss reaches its own group only; pythae's
CoupledOptimizerAdversarialTrainer lets the discriminator loss leak into the decoder's gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.context import StepContext
from strategies.groups import GroupChoice
from strategies.joint import (
    ClipChoice,
    JointUpdates,
    eval_single_forward,
    joint_from_fields,
    train_single_forward,
)

ROLES = ("encoder", "decoder", "discriminator")


@attrs.define(eq=False)
class CoupledAdversarial:
    """``CoupledAdversarial(encoder=..., decoder=..., discriminator=...)`` (OptimizerSpecs).

    Groups default to ``model.encoder``, ``model.decoder`` and ``model.discriminator``.
    ``grad_clip_norm`` is one norm for each group or ``{role: norm}``.
    """

    encoder: OptimizerSpec
    decoder: OptimizerSpec
    discriminator: OptimizerSpec
    encoder_scheduler: SchedulerSpec | None = None
    decoder_scheduler: SchedulerSpec | None = None
    discriminator_scheduler: SchedulerSpec | None = None
    encoder_loss_key: str = "encoder_loss"
    decoder_loss_key: str = "decoder_loss"
    discriminator_loss_key: str = "discriminator_loss"
    grad_clip_norm: ClipChoice = None
    groups: GroupChoice = None
    metrics: tuple[str, ...] = ()
    _joint: JointUpdates = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._joint = joint_from_fields(self, ROLES)

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return self._joint.loss_keys

    @property
    def joint(self) -> JointUpdates:
        """The updates (optimisers, schedulers, groups) by role, once set up."""
        return self._joint

    def setup(self, model: torch.nn.Module, ctx: StepContext) -> None:
        self._joint.setup(model, ctx)

    def train_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        return train_single_forward(self._joint, model, batch, ctx)

    def eval_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        return eval_single_forward(self._joint, model, batch, ctx)

    def predict_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, Any]:
        """The model's outputs for one batch (``Engine.predict`` keeps the per-sample ones)."""
        return ctx.forward(model, batch)

    def end_epoch(self, metrics: Mapping[str, float], ctx: StepContext) -> None:
        self._joint.end_epoch(metrics)

    def learning_rates(self) -> dict[str, float]:
        return self._joint.learning_rates()

    def state_dict(self) -> dict[str, Any]:
        return self._joint.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._joint.load_state_dict(state)
