"""A generator (autoencoder) and a discriminator, each with its own optimiser and loss.

Two modes:

* single forward (``two_phase=False``; pythae's Adversarial_AE and FactorVAE): one
  ``model(batch)`` returns both ``autoencoder_loss`` and ``discriminator_loss``;
* two-phase (``two_phase=True``; GANs such as DCGAN, WGAN-GP, StyleGAN, VQGAN): the
  discriminator phase runs ``model(batch, phase="discriminator")`` and the generator phase runs
  ``model(batch, phase="generator")``, each returning its own loss.

Schedule, counted in optimiser windows (one window = ``accumulate_steps`` batches; ``w`` is the
number of windows completed before this one, kept in ``state_dict()["windows"]`` so a resumed
run continues the cycle): the discriminator updates in every window; the generator updates in
the windows where ``w % n_critic == n_critic - 1``. Over ``W`` windows that is exactly ``W``
discriminator updates and ``W // n_critic`` generator updates (``n_critic=1``: both every
window, as pythae's AdversarialTrainer). The generator's forward runs only in its windows. A
forward may also return ``update_generator``/``update_discriminator`` to switch an update off;
a window counts whether or not its updates ran.

In which order (``schedule``):

* ``"sequential"`` (the two-phase default; WGAN-GP's Algorithm 1, PyTorch's DCGAN, StyleGAN2):
  the discriminator's phase runs over the window and steps, then the generator's phase runs
  against the just-updated discriminator and steps (``strategies/phase_runner.py``). Only here:
  ``regularisers`` on the discriminator (``r1``, ``r2``, ``wgan_gp`` of
  ``strategies/regularisers.py``), in its phase or, with ``regularise_every=k > 1``, in a lazy
  phase every ``k`` windows (penalty times ``k``, the discriminator's Adam corrected as
  StyleGAN2 does); and ``disc_start=N``: no discriminator phase before window ``N``, and the
  generator's forward receives ``disc_factor`` (0.0 before ``N``, 1.0 from it) to leave out its
  adversarial term (VQGAN; ``strategies/adaptive_weight.py`` has its adaptive weight).
* ``"simultaneous"`` (the single-forward mode's only schedule): both phases take their
  gradients at the same parameters and both groups step together at the window's end
  (simultaneous gradient descent, which may fail to converge where alternating converges:
  Mescheder et al. 2017).

Either way accumulating ``k`` batches equals one batch ``k`` times larger, per update. Each loss
reaches its own group only: pythae's trainer steps after both backwards, so the adversarial
term of ``autoencoder_loss`` leaks into the discriminator's gradient (and FactorVAE's
discriminator loss into the encoder's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.config.validators import is_bool, non_negative_int, one_of, optional, positive_int
from engine.context import StepContext
from engine.errors import ConfigError
from engine.preflight import SUPPORTS_ALL
from strategies.groups import DISCRIMINATOR, GENERATOR, GroupChoice
from strategies.joint import JointUpdates, eval_step_of, joint_updates, train_step_of
from strategies.joint_methods import LIFECYCLE, eval_one_forward, train_one_forward
from strategies.phase_runner import PhaseRunner
from strategies.phases import Phase, check_phases, lazy_ratios
from strategies.regularisers import GradientPenalty, as_penalties, penalties
from strategies.roles import LOSS_KEY, OPTIMIZER_SPEC, SCHEDULER_SPEC, ClipChoice, RoleFields

ROLES = (GENERATOR, DISCRIMINATOR)
SEQUENTIAL = "sequential"
SIMULTANEOUS = "simultaneous"
SCHEDULES = (SEQUENTIAL, SIMULTANEOUS)


@attrs.define(eq=False)
class Adversarial:
    """``Adversarial(generator=OptimizerSpec(...), discriminator=OptimizerSpec(...),
    n_critic=1, two_phase=False)``.

    The discriminator group defaults to ``model.discriminator`` and the generator group to every
    other trainable parameter. ``grad_clip_norm`` is one norm for each group or
    ``{role: norm}``; ``metrics`` names further scalar outputs to log (e.g. ``recon_loss``).
    """

    joint: JointUpdates = attrs.field(init=False, repr=False)
    runner: PhaseRunner | None = attrs.field(init=False, repr=False)
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
    schedule: str | None = attrs.field(default=None, validator=optional(one_of(*SCHEDULES)))
    regularisers: tuple[GradientPenalty, ...] = attrs.field(
        default=(), converter=as_penalties, validator=penalties
    )
    regularise_every: int = attrs.field(default=1, validator=positive_int)
    disc_start: int = attrs.field(default=0, validator=non_negative_int)

    def __attrs_post_init__(self) -> None:
        generator = RoleFields(self.generator, self.generator_scheduler, self.generator_loss_key)
        discriminator = RoleFields(
            self.discriminator, self.discriminator_scheduler, self.discriminator_loss_key
        )
        phases = self._phases() if self.is_sequential else None
        if phases is None:
            self._refuse_sequential_only()
        self.joint = joint_updates(
            {GENERATOR: generator, DISCRIMINATOR: discriminator},
            self.grad_clip_norm,
            self.groups,
            self.metrics,
            every={GENERATOR: self.n_critic},
            lazy_ratios=lazy_ratios(phases or ()),
        )
        self.runner = None if phases is None else PhaseRunner(phases, self.joint.metrics)

    @property
    def is_sequential(self) -> bool:
        """Whether the phases run one after the other (``schedule``, or two-phase's default)."""
        return self.schedule == SEQUENTIAL or (self.schedule is None and self.two_phase)

    def _refuse_sequential_only(self) -> None:
        """Refuse what only the sequential schedule does, naming it."""
        asked = [
            f"{name}={value!r}"
            for name, value, default in (
                ("regularisers", self.regularisers, ()),
                ("regularise_every", self.regularise_every, 1),
                ("disc_start", self.disc_start, 0),
            )
            if value != default
        ]
        if asked:
            raise ConfigError(
                f"{', '.join(asked)} need the sequential schedule (two_phase=True, schedule "
                f"'sequential' or unset); this Adversarial is {self.schedule or 'single-forward'}"
            )

    def _phases(self) -> tuple[Phase, ...]:
        """Discriminator, its lazy regulariser (if any), generator; checked."""
        if not self.two_phase:
            raise ConfigError(
                "schedule='sequential' needs two_phase=True: a single forward serves both roles"
            )
        lazy = self.regularisers if self.regularise_every > 1 else ()
        critic = Phase(
            DISCRIMINATOR,
            DISCRIMINATOR,
            self.discriminator_loss_key,
            regularisers=() if lazy else self.regularisers,
            start=self.disc_start,
        )
        phases = [critic]
        if lazy:
            phases.append(
                attrs.evolve(
                    critic,
                    loss_key=None,
                    regularisers=lazy,
                    every=self.regularise_every,
                    name=f"{DISCRIMINATOR}_reg",
                )
            )
        elif self.regularise_every > 1:
            raise ConfigError(
                f"regularise_every={self.regularise_every} has no regularisers to run"
            )
        adversarial_start = self.disc_start if self.disc_start > 0 else None
        phases.append(
            Phase(
                GENERATOR,
                GENERATOR,
                self.generator_loss_key,
                every=self.n_critic,
                adversarial_start=adversarial_start,
            )
        )
        return check_phases(phases, ROLES)

    @property
    def loss_keys(self) -> tuple[str, ...]:
        """The generator's loss first; in two-phase mode the discriminator's, which every
        window reports (an epoch shorter than ``n_critic`` windows has no generator loss),
        unless ``disc_start`` holds the discriminator back."""
        first, second = self.generator_loss_key, self.discriminator_loss_key
        if self.two_phase and self.disc_start == 0:
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
    # Honours accumulation and clipping (strategies/update.py); its adversarial losses rank no
    # checkpoint (no default monitor: name one, e.g. eval/fid).
    supports, loss_is_quality = SUPPORTS_ALL, False

    def train_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        if self.runner is not None:
            return self.runner.train_step(self.joint, model, batch, ctx)
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
        return ctx.forward(model, batch, **self._generator_kwargs())

    def eval_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        if not self.two_phase:
            return eval_one_forward(self, model, batch, ctx)
        outputs = {
            GENERATOR: ctx.forward(model, batch, **self._generator_kwargs()),
            DISCRIMINATOR: ctx.forward(model, batch, phase=DISCRIMINATOR),
        }
        return eval_step_of(self.joint, outputs, ctx)

    def _generator_kwargs(self) -> dict[str, Any]:
        """The generator forward's keywords now (``disc_factor`` once ``disc_start`` is set)."""
        if self.runner is None:
            return {"phase": GENERATOR}
        generator = next(phase for phase in self.runner.phases if phase.role == GENERATOR)
        return generator.forward_kwargs(self.joint.windows)
