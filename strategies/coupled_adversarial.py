"""Encoder, decoder and discriminator, each with its own optimiser and loss (pythae's VAEGAN).

The forward may return ``update_encoder``, ``update_decoder`` and ``update_discriminator``
(VAEGAN's equilibrium rule): an update that is off does not back-propagate, does not step, and
its optimiser state does not advance. Each active loss reaches its own group only; pythae's
CoupledOptimizerAdversarialTrainer lets the discriminator loss leak into the decoder's gradient.
"""

from __future__ import annotations

import attrs

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.preflight import SUPPORTS_ALL
from strategies.coupled import DECODER, ENCODER
from strategies.groups import DISCRIMINATOR, GroupChoice
from strategies.joint import JointUpdates, joint_updates
from strategies.joint_methods import LIFECYCLE, ONE_FORWARD
from strategies.roles import LOSS_KEY, OPTIMIZER_SPEC, SCHEDULER_SPEC, ClipChoice, RoleFields


@attrs.define(eq=False)
class CoupledAdversarial:
    """``CoupledAdversarial(encoder=..., decoder=..., discriminator=...)`` (OptimizerSpecs).

    Groups default to ``model.encoder``, ``model.decoder`` and ``model.discriminator``.
    ``grad_clip_norm`` is one norm for each group or ``{role: norm}``.
    """

    joint: JointUpdates = attrs.field(init=False, repr=False)
    loss_keys: tuple[str, ...] = attrs.field(init=False, repr=False)
    encoder: OptimizerSpec = attrs.field(validator=OPTIMIZER_SPEC)
    decoder: OptimizerSpec = attrs.field(validator=OPTIMIZER_SPEC)
    discriminator: OptimizerSpec = attrs.field(validator=OPTIMIZER_SPEC)
    encoder_loss_key: str = attrs.field(default="encoder_loss", validator=LOSS_KEY)
    decoder_loss_key: str = attrs.field(default="decoder_loss", validator=LOSS_KEY)
    discriminator_loss_key: str = attrs.field(default="discriminator_loss", validator=LOSS_KEY)
    encoder_scheduler: SchedulerSpec | None = attrs.field(default=None, validator=SCHEDULER_SPEC)
    decoder_scheduler: SchedulerSpec | None = attrs.field(default=None, validator=SCHEDULER_SPEC)
    discriminator_scheduler: SchedulerSpec | None = attrs.field(
        default=None, validator=SCHEDULER_SPEC
    )
    grad_clip_norm: ClipChoice = None
    groups: GroupChoice = None
    metrics: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        discriminator = RoleFields(
            self.discriminator, self.discriminator_scheduler, self.discriminator_loss_key
        )
        roles = {
            ENCODER: RoleFields(self.encoder, self.encoder_scheduler, self.encoder_loss_key),
            DECODER: RoleFields(self.decoder, self.decoder_scheduler, self.decoder_loss_key),
            DISCRIMINATOR: discriminator,
        }
        self.joint = joint_updates(roles, self.grad_clip_norm, self.groups, self.metrics)
        self.loss_keys = self.joint.loss_keys

    setup, end_epoch, learning_rates, state_dict, load_state_dict = LIFECYCLE
    # Honours accumulation and clipping (strategies/update.py); its adversarial losses rank no
    # checkpoint (no default monitor: name one, e.g. eval/fid).
    supports, loss_is_quality = SUPPORTS_ALL, False
    train_step, eval_step, predict_step = ONE_FORWARD
