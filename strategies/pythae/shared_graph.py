"""Updates as pythae's multi-optimiser trainers make them: every backward on one shared graph.

pythae 0.1.2's ``AdversarialTrainer``, ``CoupledOptimizerTrainer`` and
``CoupledOptimizerAdversarialTrainer`` run, for each optimiser in turn, ``zero_grad()`` then
``loss.backward()`` into *every* parameter, and step all optimisers only after the last
backward. A later loss therefore adds its gradient to the groups of the earlier roles: the role
at position ``r`` steps on the sum of the gradients of its own loss and of every later active
loss, taken at the same parameters. RAE_L2's encoder gets twice its loss's gradient (it is the
decoder's loss too); VAEGAN's decoder gets its own loss plus the discriminator's, whose
adversarial terms nearly cancel; Adversarial_AE's and FactorVAE's autoencoders get the
discriminator loss's gradient on top of their own. Isolated updates (the engine's strategies)
give each group its own loss's gradient only.

``SharedGraphUpdates`` reproduces that arithmetic without pythae's ``zero_grad`` calls:
loss ``j`` is back-propagated into the groups of the active roles at positions ``<= j``, which
is exactly what survives pythae's zeroing. So it works with everything else a strategy does:
accumulation windows, a GradScaler, gradient averaging across ranks, clipping, the
``update_<role>`` flags a forward returns (VAEGAN's equilibrium rule: an inactive role neither
back-propagates nor steps, as in pythae) and ``nonfinite="skip"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from engine.config.validators import Check
from engine.context import StepContext
from engine.errors import ModelOutputError
from strategies.groups import GroupChoice
from strategies.joint import (
    ClipChoice,
    JointUpdates,
    RoleFields,
    joint_updates,
    one_forward_for_all,
)
from strategies.joint_methods import LIFECYCLE, ONE_FORWARD
from strategies.update import Update, apply_updates, losses_are_finite, skip_step

_ROLES = Check(
    "a mapping of two or more roles to RoleFields, in pythae's backward order",
    lambda value: (
        isinstance(value, Mapping)
        and len(value) >= 2
        and all(isinstance(role, str) and isinstance(f, RoleFields) for role, f in value.items())
    ),
)


@attrs.define(eq=False)
class SharedGraphUpdates:
    """``SharedGraphUpdates({"encoder": RoleFields(OptimizerSpec(...), None, "encoder_loss"),
    ...}, groups=..., metrics=...)``: one forward, pythae's gradient sums, then every step.

    ``roles`` lists the roles in the order pythae back-propagates them (encoder, decoder,
    discriminator; generator, discriminator). ``grad_clip_norm``, ``groups`` and ``metrics``
    are as for the engine's multi-optimiser strategies (``strategies/joint.py``).
    """

    roles: Mapping[str, RoleFields] = attrs.field(validator=_ROLES)
    grad_clip_norm: ClipChoice = None
    groups: GroupChoice = None
    metrics: tuple[str, ...] = ()
    joint: JointUpdates = attrs.field(init=False, repr=False)
    loss_keys: tuple[str, ...] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.joint = joint_updates(self.roles, self.grad_clip_norm, self.groups, self.metrics)
        self.loss_keys = self.joint.loss_keys

    setup, end_epoch, learning_rates, state_dict, load_state_dict = LIFECYCLE
    _, eval_step, predict_step = ONE_FORWARD

    def train_step(
        self, model: torch.nn.Module, batch: Any, ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        """One forward; pythae's gradients for the active roles; every step at the window's
        end. An inactive role (``update_<role>`` false) neither back-propagates nor steps."""
        joint = self.joint
        outputs = one_forward_for_all(joint, model, batch, ctx)
        steps = joint.read(outputs, ctx)
        losses = {role: step.loss for role, step in steps.items()}
        if ctx.nonfinite == "skip" and not losses_are_finite(list(losses.values()), ctx.world):
            skip_step(joint.updates, ctx)
            return {}
        pairs = [
            (joint.by_role[role], _checked(joint.by_role[role], step.loss, ctx))
            for role, step in steps.items()
            if step.active
        ]
        backward_shared_graph(pairs, ctx)
        apply_updates(joint.updates, ctx)
        return joint.step_metrics(losses, outputs, ctx)


def _checked(update: Update, loss: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    if not loss.requires_grad:
        raise ModelOutputError(
            f"loss {update.spec.loss_key!r} of the {update.role} update does not depend on any "
            f"trainable parameter (it has no grad_fn) at step {ctx.progress.step}"
        )
    return loss


def backward_shared_graph(pairs: Sequence[tuple[Update, torch.Tensor]], ctx: StepContext) -> None:
    """Accumulate pythae's gradients: loss ``j`` into the groups of roles ``0..j``.

    ``pairs`` are the active roles in pythae's backward order. pythae zeroes a role's gradient
    right before back-propagating its loss into every parameter, so what a role holds when the
    optimisers step is the sum of its own loss's gradient and those of the losses after it.
    Losses are divided by the accumulation window's size and scaled by the run's GradScaler,
    as every strategy's are.
    """
    last = len(pairs) - 1
    params: list[torch.nn.Parameter] = []
    for index, (update, loss) in enumerate(pairs):
        params = params + update.params
        if ctx.micro_count > 1:
            loss = loss / ctx.micro_count
        if ctx.scaler is not None:
            loss = ctx.scaler.scale(loss)
        loss.backward(inputs=params, retain_graph=index < last)
        update.pending = True
