"""Encoder and decoder, each with its own optimiser, on ``encoder_loss`` and ``decoder_loss``.

pythae's RAE_L2 and PIWAE are trained this way. Each loss is back-propagated into its own group
only: pythae's CoupledOptimizerTrainer steps after both backwards on the shared graph, so the
encoder also receives the decoder loss's gradient (RAE_L2's encoder gets exactly twice its own).
Where both keys hold the same tensor, one backward serves both groups.
"""

from __future__ import annotations

import attrs

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.preflight import SUPPORTS_ALL
from strategies.groups import GroupChoice
from strategies.joint import JointUpdates, joint_updates
from strategies.joint_methods import LIFECYCLE, ONE_FORWARD
from strategies.roles import LOSS_KEY, OPTIMIZER_SPEC, SCHEDULER_SPEC, ClipChoice, RoleFields

ENCODER = "encoder"
DECODER = "decoder"


@attrs.define(eq=False)
class Coupled:
    """``Coupled(encoder=OptimizerSpec("Adam", lr=1e-3), decoder=OptimizerSpec(...))``.

    The groups default to ``model.encoder`` and ``model.decoder`` (see ``strategies.groups``);
    a forward may return ``update_encoder``/``update_decoder`` flags to switch an update off.
    ``grad_clip_norm`` is one norm for each group or ``{role: norm}``; either overrides the
    engine's ``grad_clip_norm``, which otherwise clips each group separately.
    """

    joint: JointUpdates = attrs.field(init=False, repr=False)
    loss_keys: tuple[str, ...] = attrs.field(init=False, repr=False)
    encoder: OptimizerSpec = attrs.field(validator=OPTIMIZER_SPEC)
    decoder: OptimizerSpec = attrs.field(validator=OPTIMIZER_SPEC)
    encoder_loss_key: str = attrs.field(default="encoder_loss", validator=LOSS_KEY)
    decoder_loss_key: str = attrs.field(default="decoder_loss", validator=LOSS_KEY)
    encoder_scheduler: SchedulerSpec | None = attrs.field(default=None, validator=SCHEDULER_SPEC)
    decoder_scheduler: SchedulerSpec | None = attrs.field(default=None, validator=SCHEDULER_SPEC)
    grad_clip_norm: ClipChoice = None
    groups: GroupChoice = None
    metrics: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        roles = {
            ENCODER: RoleFields(self.encoder, self.encoder_scheduler, self.encoder_loss_key),
            DECODER: RoleFields(self.decoder, self.decoder_scheduler, self.decoder_loss_key),
        }
        self.joint = joint_updates(roles, self.grad_clip_norm, self.groups, self.metrics)
        self.loss_keys = self.joint.loss_keys

    setup, end_epoch, learning_rates, state_dict, load_state_dict = LIFECYCLE
    supports = SUPPORTS_ALL  # accumulation and clipping, through strategies/update.py
    train_step, eval_step, predict_step = ONE_FORWARD
