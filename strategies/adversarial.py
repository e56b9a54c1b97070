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
from engine.config.validators import is_bool, positive_int
from engine.context import StepContext
from strategies.groups import DISCRIMINATOR, GENERATOR, GroupChoice
from strategies.joint import JointUpdates, eval_step_of, joint_updates, train_step_of
from strategies.joint_methods import LIFECYCLE, eval_one_forward, train_one_forward
from strategies.roles import LOSS_KEY, OPTIMIZER_SPEC, SCHEDULER_SPEC, ClipChoice, RoleFields


@attrs.define(eq=False)
class Adversarial:
    """``Adversarial(generator=OptimizerSpec(...), discriminator=OptimizerSpec(...),
    n_critic=1, two_phase=False)``.

    The discriminator group defaults to ``model.discriminator`` and the generator group to every
    other trainable parameter. ``grad_clip_norm`` is one norm for each group or
    ``{role: norm}``; ``metrics`` names further scalar outputs to log (e.g. ``recon_loss``).
    """

    joint: JointUpdates = attrs.field(init=False, repr=False)
    generator: OptimizerSpec = attrs.field(validator=OPTIMIZER_SPEC)
    discriminator: OptimizerSpec = attrs.field(validator=OPTIMIZER_SPEC)
    generator_scheduler: SchedulerSpec | None = attrs.field(default=None, validator=SCHEDULER_SPEC)
    discriminator_scheduler: SchedulerSpec | None = attrs.field(
        default=None, validator=SCHEDULER_SPEC
    )
    n_critic: int = attrs.field(default=1, validator=positive_int)
    two_phase: bool = attrs.field(default=False, validator=is_bool)
    generator_loss_key: str = attrs.field(default="autoencoder_loss", validator=LOSS_KEY)
    discriminator_loss_key: str = attrs.field(default="discriminator_loss", validator=LOSS_KEY)
    grad_clip_norm: ClipChoice = None
    groups: GroupChoice = None
    metrics: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        generator = RoleFields(self.generator, self.generator_scheduler, self.generator_loss_key)
        discriminator = RoleFields(
            self.discriminator, self.discriminator_scheduler, self.discriminator_loss_key
        )
        self.joint = joint_updates(
            {GENERATOR: generator, DISCRIMINATOR: discriminator},
            self.grad_clip_norm,
            self.groups,
            self.metrics,
            every={GENERATOR: self.n_critic},
        )

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """The generator's loss first; in two-phase mode the discriminator's, which every
        window reports (an epoch shorter than ``n_critic`` windows has no generator loss)."""
        first, second = self.generator_loss_key, self.discriminator_loss_key
        if self.two_phase:
            first, second = second, first
        return tuple(dict.fromkeys((first, second)))

    @property
    def windows(self) -> int:
        """Optimiser windows completed so far: the position in the alternation schedule."""
        return self.joint.windows

    @property
    def is_generator_window(self) -> bool:
        """Whether the generator updates in the current window."""
        return self.joint.scheduled(GENERATOR)

    setup, end_epoch, learning_rates, state_dict, load_state_dict = LIFECYCLE

    def train_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        if not self.two_phase:
            return train_one_forward(self, model, batch, ctx)
        outputs = {DISCRIMINATOR: ctx.forward(model, batch, phase=DISCRIMINATOR)}
        if self.is_generator_window:  # the generator's forward runs only in its windows
            outputs[GENERATOR] = ctx.forward(model, batch, phase=GENERATOR)
        return train_step_of(self.joint, outputs, ctx)

    def predict_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, Any]:
        """The model's outputs for one batch: its generator phase's forward in two-phase mode
        (a GAN predicts samples or reconstructions with its generator)."""
        if not self.two_phase:
            return ctx.forward(model, batch)
        return ctx.forward(model, batch, phase=GENERATOR)

    def eval_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        if not self.two_phase:
            return eval_one_forward(self, model, batch, ctx)
        outputs = {
            GENERATOR: ctx.forward(model, batch, phase=GENERATOR),
            DISCRIMINATOR: ctx.forward(model, batch, phase=DISCRIMINATOR),
        }
        return eval_step_of(self.joint, outputs, ctx)
