"""Encoder and decoder, each with its own optimiser, on ``encoder_loss`` and ``decoder_loss``.

pythae's RAE_L2 and PIWAE are trained this way. Each loss is back-propagated into its own group
only: pythae's CoupledOptimizerTrainer steps after both backwards on the shared graph, so the
encoder also receives the decoder loss's gradient (RAE_L2's encoder gets exactly twice its own).
Where both keys hold the same tensor, one backward serves both groups.
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

ROLES = ("encoder", "decoder")


@attrs.define(eq=False)
class Coupled:
    """``Coupled(encoder=OptimizerSpec("Adam", lr=1e-3), decoder=OptimizerSpec(...))``.

    The groups default to ``model.encoder`` and ``model.decoder`` (see ``strategies.groups``);
    a forward may return ``update_encoder``/``update_decoder`` flags to switch an update off.
    ``grad_clip_norm`` is one norm for each group or ``{role: norm}``; either overrides the
    engine's ``grad_clip_norm``, which otherwise clips each group separately.
    """

    encoder: OptimizerSpec
    decoder: OptimizerSpec
    encoder_scheduler: SchedulerSpec | None = None
    decoder_scheduler: SchedulerSpec | None = None
    encoder_loss_key: str = "encoder_loss"
    decoder_loss_key: str = "decoder_loss"
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
