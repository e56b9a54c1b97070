"""The StepStrategy methods every multi-loss strategy shares, written once.

A strategy holds its ``JointUpdates`` as the attribute ``joint`` and takes these functions as its
own methods in its class body (``setup, end_epoch, learning_rates, state_dict, load_state_dict
= LIFECYCLE``); no base class is involved. Each function reads the strategy's ``joint`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from engine.context import StepContext
from strategies.joint import JointUpdates, eval_step_of, one_forward_for_all, train_step_of
from strategies.update import end_epoch_schedulers, learning_rates


class HasJoint(Protocol):
    """A strategy composed of a ``JointUpdates``."""

    joint: JointUpdates


def setup(strategy: HasJoint, model: torch.nn.Module, ctx: StepContext) -> None:
    """Check the parameter groups and build each role's optimiser and scheduler."""
    strategy.joint.setup(model, ctx)


def end_epoch(strategy: HasJoint, metrics: Mapping[str, float], ctx: StepContext) -> None:
    """Step each role's per-epoch scheduler."""
    end_epoch_schedulers(strategy.joint.updates, metrics)


def role_learning_rates(strategy: HasJoint) -> dict[str, float]:
    """``lr/<role>`` of each role."""
    return learning_rates(strategy.joint.updates)


def state_dict(strategy: HasJoint) -> dict[str, Any]:
    """Each role's optimiser and scheduler, and the windows completed (the schedule's place)."""
    return strategy.joint.state_dict()


def load_state_dict(strategy: HasJoint, state: Mapping[str, Any]) -> None:
    strategy.joint.load_state_dict(state)


LIFECYCLE = (setup, end_epoch, role_learning_rates, state_dict, load_state_dict)


def train_one_forward(
    strategy: HasJoint, model: torch.nn.Module, batch: Any, ctx: StepContext
) -> Mapping[str, torch.Tensor]:
    """One forward serves every role: isolated backwards of the active losses, then steps."""
    joint = strategy.joint
    return train_step_of(joint, one_forward_for_all(joint, model, batch, ctx), ctx)


def eval_one_forward(
    strategy: HasJoint, model: torch.nn.Module, batch: Any, ctx: StepContext
) -> Mapping[str, torch.Tensor]:
    """Every role's loss (and extra metrics) from one forward, changing no state."""
    joint = strategy.joint
    return eval_step_of(joint, one_forward_for_all(joint, model, batch, ctx), ctx)


def predict_one_forward(
    strategy: HasJoint, model: torch.nn.Module, batch: Any, ctx: StepContext
) -> Mapping[str, Any]:
    """The model's outputs for one batch (``Engine.predict`` keeps the per-sample ones)."""
    return ctx.forward(model, batch)


ONE_FORWARD = (train_one_forward, eval_one_forward, predict_one_forward)
