"""Several updates trained in one step, each on its own loss and its own parameter group.

``JointUpdates`` is the part that ``Adversarial``, ``Coupled`` and ``CoupledAdversarial`` are
composed of: one ``UpdateSpec`` per role, the parameter groups those roles train (checked
disjoint and covering), and the step mechanics they share. A step reads each role's loss, the
``update_<role>`` flags a forward may return, back-propagates only the active losses, each into
its own group alone, and steps only the groups that received gradients. An update that is off
therefore neither moves its parameters nor advances its optimiser (step count, moments).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.context import StepContext
from engine.distributed.collectives import all_ranks_agree
from engine.errors import ConfigError, ModelOutputError, StrategyError
from strategies.groups import GroupChoice, resolve_groups
from strategies.update import (
    Update,
    UpdateSpec,
    apply_updates,
    backward_isolated,
    build_update,
    end_epoch_schedulers,
    learning_rates,
    losses_are_finite,
    skip_step,
)

ClipChoice = float | Mapping[str, float] | None


def role_spec(
    role: str,
    loss_key: str,
    optimizer: Any,
    scheduler: Any,
    grad_clip_norm: ClipChoice,
) -> UpdateSpec:
    """The ``UpdateSpec`` of one role, with errors that name the role's argument."""
    if not isinstance(optimizer, OptimizerSpec):
        raise ConfigError(f"{role} must be an OptimizerSpec, got {optimizer!r}")
    if scheduler is not None and not isinstance(scheduler, SchedulerSpec):
        raise ConfigError(f"{role}_scheduler must be a SchedulerSpec or None, got {scheduler!r}")
    if not isinstance(loss_key, str) or not loss_key:
        raise ConfigError(f"{role}_loss_key must be a non-empty string, got {loss_key!r}")
    clip = grad_clip_norm.get(role) if isinstance(grad_clip_norm, Mapping) else grad_clip_norm
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
    ):
        raise ConfigError(f"grad_clip_norm for {role} must be a positive number, got {clip!r}")
    return UpdateSpec(role, loss_key, optimizer, scheduler, clip)


def check_clip_roles(grad_clip_norm: ClipChoice, roles: Sequence[str]) -> None:
    """A per-role clipping mapping may only name the strategy's roles."""
    if isinstance(grad_clip_norm, Mapping):
        unknown = sorted(set(grad_clip_norm) - set(roles))
        if unknown:
            raise ConfigError(
                f"grad_clip_norm names unknown role(s) {unknown}; the roles are {list(roles)}"
            )


def joint_from_fields(strategy: Any, roles: Sequence[str]) -> JointUpdates:
    """The updates a strategy's fields describe: per role, ``<role>`` (its optimiser spec),
    ``<role>_scheduler`` and ``<role>_loss_key``; for all, ``grad_clip_norm``, ``groups`` and
    ``metrics``. Checked here, at the strategy's construction."""
    check_clip_roles(strategy.grad_clip_norm, roles)
    specs = tuple(
        role_spec(
            role,
            getattr(strategy, f"{role}_loss_key"),
            getattr(strategy, role),
            getattr(strategy, f"{role}_scheduler"),
            strategy.grad_clip_norm,
        )
        for role in roles
    )
    return JointUpdates(specs, strategy.groups, check_metric_keys(strategy.metrics))


def check_metric_keys(metrics: Any) -> tuple[str, ...]:
    if isinstance(metrics, str) or not all(isinstance(key, str) for key in metrics):
        raise ConfigError(f"metrics must be a tuple of output names, got {metrics!r}")
    return tuple(metrics)


@attrs.define(eq=False)
class JointUpdates:
    """The updates of a multi-optimiser strategy, in the order their losses are back-propagated.

    ``metrics`` names further scalar outputs to log beside the losses.
    """

    specs: tuple[UpdateSpec, ...]
    groups: GroupChoice = None
    metrics: tuple[str, ...] = ()
    _updates: list[Update] | None = attrs.field(default=None, init=False)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(spec.role for spec in self.specs)

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec.loss_key for spec in self.specs))

    @property
    def updates(self) -> list[Update]:
        if self._updates is None:
            raise StrategyError("the strategy is not set up: Engine.fit calls setup()")
        return self._updates

    def setup(self, model: torch.nn.Module, ctx: StepContext) -> None:
        groups = resolve_groups(model, self.roles, self.groups)
        self._updates = [build_update(spec, groups[spec.role], ctx.device) for spec in self.specs]

    def read_losses(
        self, outputs: Sequence[Mapping[str, Any] | None], ctx: StepContext
    ) -> list[torch.Tensor | None]:
        """Each role's loss from the outputs of the forward that serves it (None: no forward)."""
        return [
            None if out is None else ctx.read_loss(out, spec.loss_key)
            for spec, out in zip(self.specs, outputs)
        ]

    def read_flags(
        self, outputs: Sequence[Mapping[str, Any] | None], ctx: StepContext
    ) -> list[bool]:
        """Each role's ``update_<role>`` flag (true when absent), agreed on by every rank.

        Under several processes this is one small all-reduce per step, whether or not this
        rank's forward returned flags: another rank's may have.
        """
        flags: list[bool] = []
        for spec, out in zip(self.specs, outputs):
            key = f"update_{spec.role}"
            if out is None or key not in out:
                flags.append(out is not None)
                continue
            flags.append(_as_flag(out[key], key, ctx))
        return all_ranks_agree(flags, ctx.world)

    def train(
        self, losses: Sequence[torch.Tensor | None], active: Sequence[bool], ctx: StepContext
    ) -> bool:
        """Back-propagate the active losses, isolated, and step at the window's end.

        Returns false when ``nonfinite="skip"`` dropped this batch (on every rank, when a loss
        is non-finite on any).
        """
        updates = self.updates
        if ctx.nonfinite == "skip":
            present = [loss for loss in losses if loss is not None]
            if not losses_are_finite(present, ctx.world):
                skip_step(updates, ctx)
                return False
        pairs = []
        for update, loss, on in zip(updates, losses, active):
            if not on or loss is None:
                continue
            if not loss.requires_grad:
                raise ModelOutputError(
                    f"loss {update.spec.loss_key!r} of the {update.role} update does not depend "
                    f"on any trainable parameter (it has no grad_fn) at step {ctx.progress.step}"
                )
            pairs.append((update, loss))
        if pairs:
            backward_isolated(pairs, ctx, every_group=len(pairs) == len(updates))
        apply_updates(updates, ctx)
        return True

    def step_metrics(
        self,
        losses: Sequence[torch.Tensor | None],
        outputs: Sequence[Mapping[str, Any] | None],
        ctx: StepContext,
    ) -> dict[str, torch.Tensor]:
        """Each loss (once per key) and each extra metric, detached, still on the device."""
        metrics: dict[str, torch.Tensor] = {}
        for spec, loss in zip(self.specs, losses):
            if loss is not None:
                metrics[spec.loss_key] = loss.detach()
        if self.metrics:
            sources = [out for out in outputs if out is not None]
            for key in self.metrics:
                source = next((out for out in sources if key in out), sources[0])
                metrics[key] = ctx.read_loss(source, key).detach()
        return metrics

    def end_epoch(self, metrics: Mapping[str, float]) -> None:
        end_epoch_schedulers(self.updates, metrics)

    def learning_rates(self) -> dict[str, float]:
        return learning_rates(self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": {u.role: u.state_dict() for u in self.updates}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["updates"]
        missing = [role for role in self.roles if role not in saved]
        if missing:
            raise StrategyError(
                f"strategy state has no update for role(s) {missing}; it holds {sorted(saved)}"
            )
        for update in self.updates:
            update.load_state_dict(saved[update.role])


def train_single_forward(
    joint: JointUpdates,
    model: torch.nn.Module,
    batch: Any,
    ctx: StepContext,
    scheduled: tuple[bool, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """One forward serves every role: isolated backwards of the active losses, then steps.

    ``scheduled`` switches roles off by the strategy's own schedule (alternation), on top of
    the ``update_<role>`` flags the forward returns.
    """
    outputs = ctx.forward(model, batch)
    per_role = [outputs] * len(joint.specs)
    losses = joint.read_losses(per_role, ctx)
    active = joint.read_flags(per_role, ctx)
    if scheduled is not None:
        active = [flag and on for flag, on in zip(active, scheduled)]
    if not joint.train(losses, active, ctx):
        return {}
    return joint.step_metrics(losses, per_role, ctx)


def eval_single_forward(
    joint: JointUpdates, model: torch.nn.Module, batch: Any, ctx: StepContext
) -> dict[str, torch.Tensor]:
    """Every role's loss (and extra metrics) from one forward, changing no state."""
    outputs = ctx.forward(model, batch)
    per_role = [outputs] * len(joint.specs)
    return joint.step_metrics(joint.read_losses(per_role, ctx), per_role, ctx)


def _as_flag(value: Any, key: str, ctx: StepContext) -> bool:
    """A flag is a Python bool or a one-element bool tensor (read from the device here)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.bool:
        return bool(value.item())
    shown = (
        f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
        if isinstance(value, torch.Tensor)
        else repr(value)
    )
    raise ModelOutputError(
        f"output {key!r} must be a bool or a one-element bool tensor, got {shown} "
        f"at step {ctx.progress.step}"
    )
