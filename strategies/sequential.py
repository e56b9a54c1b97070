"""A strategy described as an ordered list of phases (StyleGAN2-ADA's Gmain, Greg, Dmain, Dreg).

Each ``Phase`` (``strategies/phases.py``) names a role, the forward it runs, its loss and/or
regularisers and its interval; ``PhaseRunner`` (``strategies/phase_runner.py``) runs the due
phases in order at the end of each accumulation window, each over every batch of the window,
stepping its role before the next phase. The roles' optimisers, schedulers, groups, clipping and
state are the same ``JointUpdates`` part as in every multi-loss strategy.

Two-phase ``Adversarial`` is this with three phases written for you (discriminator, its lazy
regulariser, generator); use ``Sequential`` directly for other layouts, e.g. StyleGAN2's
generator path-length phase, or several discriminators.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.config.validators import is_bool, non_empty_str, optional
from engine.context import StepContext
from engine.errors import ConfigError
from engine.preflight import SUPPORTS_ALL
from strategies.groups import GroupChoice
from strategies.joint import JointUpdates, joint_updates
from strategies.joint_methods import LIFECYCLE
from strategies.phase_runner import PhaseRunner
from strategies.phases import Phase, check_phases, lazy_ratios
from strategies.roles import OPTIMIZER_SPEC, SCHEDULER_SPEC, ClipChoice, RoleFields


def _optimizers(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"optimizers must map each role to an OptimizerSpec, got {value!r}")
    for role, spec in value.items():
        OPTIMIZER_SPEC.require(f"optimizers[{role!r}]", spec)


def _schedulers(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"schedulers must map roles to SchedulerSpecs, got {value!r}")
    for role, spec in value.items():
        SCHEDULER_SPEC.require(f"schedulers[{role!r}]", spec)


@attrs.define(eq=False)
class Sequential:
    """``Sequential(optimizers={"discriminator": OptimizerSpec(...), "generator": ...},
    phases=(Phase("discriminator", "discriminator", "discriminator_loss"),
    Phase("discriminator", "discriminator", regularisers=(r1(10.0),), every=16),
    Phase("generator", "generator", "generator_loss")))``.

    ``schedulers`` maps roles to their ``SchedulerSpec``; ``grad_clip_norm``, ``groups`` and
    ``metrics`` are as for every multi-loss strategy. ``lazy_correction`` applies StyleGAN2's
    optimiser correction to roles with lazy regulariser phases. ``predict_forward`` is the
    ``phase=`` of the forward ``Engine.predict`` runs (None: ``model(batch)``). The loss keys
    are the phases' in order: put a phase that runs every window first, for the monitor.
    """

    joint: JointUpdates = attrs.field(init=False, repr=False)
    runner: PhaseRunner = attrs.field(init=False, repr=False)
    loss_keys: tuple[str, ...] = attrs.field(init=False, repr=False)
    optimizers: Mapping[str, OptimizerSpec] = attrs.field(validator=_optimizers)
    phases: tuple[Phase, ...] = attrs.field(converter=tuple)
    schedulers: Mapping[str, SchedulerSpec] = attrs.field(factory=dict, validator=_schedulers)
    grad_clip_norm: ClipChoice = None
    groups: GroupChoice = None
    metrics: tuple[str, ...] = ()
    lazy_correction: bool = attrs.field(default=True, validator=is_bool)
    predict_forward: str | None = attrs.field(default=None, validator=optional(non_empty_str))

    def __attrs_post_init__(self) -> None:
        phases = check_phases(self.phases, self.optimizers)
        unknown = sorted(set(self.schedulers) - set(self.optimizers))
        if unknown:
            raise ConfigError(
                f"schedulers names role(s) {unknown} without an optimizer; the roles are "
                f"{list(self.optimizers)}"
            )
        roles = {
            role: RoleFields(spec, self.schedulers.get(role), _main_key(role, phases))
            for role, spec in self.optimizers.items()
        }
        ratios = lazy_ratios(phases) if self.lazy_correction else {}
        clip, groups = self.grad_clip_norm, self.groups
        self.joint = joint_updates(roles, clip, groups, self.metrics, lazy_ratios=ratios)
        self.runner = PhaseRunner(phases, self.joint.metrics)
        keys = [phase.loss_key for phase in phases if phase.loss_key is not None]
        self.loss_keys = tuple(dict.fromkeys(keys))

    setup, end_epoch, learning_rates, state_dict, load_state_dict = LIFECYCLE
    # Honours accumulation and clipping (strategies/update.py); its adversarial losses rank no
    # checkpoint (no default monitor: name one, e.g. eval/fid).
    supports, loss_is_quality = SUPPORTS_ALL, False

    def train_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        return self.runner.train_step(self.joint, model, batch, ctx)

    def eval_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        return self.runner.eval_step(self.joint, model, batch, ctx)

    def predict_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, Any]:
        """The outputs of the forward named ``predict_forward``, for one batch."""
        if self.predict_forward is None:
            return ctx.forward(model, batch)
        return ctx.forward(model, batch, phase=self.predict_forward)


def _main_key(role: str, phases: tuple[Phase, ...]) -> str:
    """The loss key naming ``role`` in messages: its first phase's loss, else its first
    penalty's name."""
    own = [phase for phase in phases if phase.role == role]
    keyed = [phase.loss_key for phase in own if phase.loss_key is not None]
    return keyed[0] if keyed else own[0].regularisers[0].name
