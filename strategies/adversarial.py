"""A generator (autoencoder) and a discriminator, each with its own optimiser and loss.

Two modes:

* single forward (``two_phase=False``; pythae's Adversarial_AE and FactorVAE): one
  ``model(batch)`` returns both ``autoencoder_loss`` and ``discriminator_loss``;
* two-phase (``two_phase=True``; GANs such as WGAN-GP): the discriminator phase runs
  ``model(batch, phase="discriminator")`` and the generator phase runs
  ``model(batch, phase="generator")``, each returning its own loss.

Schedule, counted in optimiser windows (one window = ``accumulate_steps`` batches; ``w`` is the
number of windows completed before this one, kept in ``state_dict()["windows"]`` so a resumed
run continues the cycle): the discriminator updates in every window; the generator updates in
the windows where ``w % n_critic == n_critic - 1``. Over ``W`` windows that is exactly ``W``
discriminator updates and ``W // n_critic`` generator updates (``n_critic=1``: both every
window, as pythae's AdversarialTrainer). In two-phase mode the generator's forward runs only in
its windows. Within a window both phases take their gradients at the same parameters and both
groups step together at the window's end, so accumulating ``k`` batches equals one batch ``k``
times larger. A forward may also return ``update_generator``/``update_discriminator`` to switch
an update off; a window counts whether or not its updates ran.

Each loss reaches its own group only: pythae's trainer steps after both backwards, so the
adversarial term of ``autoencoder_loss`` leaks into the discriminator's gradient (and FactorVAE's
discriminator loss into the encoder's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.context import StepContext
from engine.errors import ConfigError
from strategies.groups import DISCRIMINATOR, GENERATOR, GroupChoice
from strategies.joint import (
    ClipChoice,
    JointUpdates,
    eval_single_forward,
    joint_from_fields,
    train_single_forward,
)

ROLES = (GENERATOR, DISCRIMINATOR)


def _positive_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _is_bool(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be True or False, got {value!r}")


@attrs.define(eq=False)
class Adversarial:
    """``Adversarial(generator=OptimizerSpec(...), discriminator=OptimizerSpec(...),
    n_critic=1, two_phase=False)``.

    The discriminator group defaults to ``model.discriminator`` and the generator group to every
    other trainable parameter. ``grad_clip_norm`` is one norm for each group or
    ``{role: norm}``; ``metrics`` names further scalar outputs to log (e.g. ``recon_loss``).
    """

    generator: OptimizerSpec
    discriminator: OptimizerSpec
    generator_scheduler: SchedulerSpec | None = None
    discriminator_scheduler: SchedulerSpec | None = None
    n_critic: int = attrs.field(default=1, validator=_positive_int)
    two_phase: bool = attrs.field(default=False, validator=_is_bool)
    generator_loss_key: str = "autoencoder_loss"
    discriminator_loss_key: str = "discriminator_loss"
    grad_clip_norm: ClipChoice = None
    groups: GroupChoice = None
    metrics: tuple[str, ...] = ()
    _joint: JointUpdates = attrs.field(init=False)
    _windows: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._joint = joint_from_fields(self, ROLES)

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """The generator's loss first; in two-phase mode the discriminator's, which every
        window reports (an epoch shorter than ``n_critic`` windows has no generator loss)."""
        keys = self._joint.loss_keys
        return tuple(reversed(keys)) if self.two_phase else keys

    @property
    def joint(self) -> JointUpdates:
        """The updates (optimisers, schedulers, groups) by role, once set up."""
        return self._joint

    @property
    def windows(self) -> int:
        """Optimiser windows completed so far: the position in the alternation schedule."""
        return self._windows

    @property
    def is_generator_window(self) -> bool:
        """Whether the generator updates in the current window."""
        return self._windows % self.n_critic == self.n_critic - 1

    def setup(self, model: torch.nn.Module, ctx: StepContext) -> None:
        self._joint.setup(model, ctx)

    def train_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        generator_on = self.is_generator_window
        if self.two_phase:
            metrics = self._train_two_phase(model, batch, ctx, generator_on)
        else:
            metrics = train_single_forward(
                self._joint, model, batch, ctx, scheduled=(generator_on, True)
            )
        if ctx.is_update_step:
            self._windows += 1
        return metrics

    def _train_two_phase(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext, generator_on: bool
    ) -> dict[str, torch.Tensor]:
        critic = ctx.forward(model, batch, phase=DISCRIMINATOR)
        generator = ctx.forward(model, batch, phase=GENERATOR) if generator_on else None
        outputs = [generator, critic]
        losses = self._joint.read_losses(outputs, ctx)
        if not self._joint.train(losses, self._joint.read_flags(outputs, ctx), ctx):
            return {}
        return self._joint.step_metrics(losses, outputs, ctx)

    def eval_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        if not self.two_phase:
            return eval_single_forward(self._joint, model, batch, ctx)
        outputs = [
            ctx.forward(model, batch, phase=GENERATOR),
            ctx.forward(model, batch, phase=DISCRIMINATOR),
        ]
        return self._joint.step_metrics(self._joint.read_losses(outputs, ctx), outputs, ctx)

    def predict_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, Any]:
        """The model's outputs for one batch: its generator phase's forward in two-phase mode
        (a GAN predicts samples or reconstructions with its generator)."""
        if not self.two_phase:
            return ctx.forward(model, batch)
        return ctx.forward(model, batch, phase=GENERATOR)

    def end_epoch(self, metrics: Mapping[str, float], ctx: StepContext) -> None:
        self._joint.end_epoch(metrics)

    def learning_rates(self) -> dict[str, float]:
        return self._joint.learning_rates()

    def state_dict(self) -> dict[str, Any]:
        return {**self._joint.state_dict(), "windows": self._windows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._joint.load_state_dict(state)
        self._windows = int(state.get("windows", 0))
