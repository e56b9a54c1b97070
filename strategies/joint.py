"""Several updates trained in one step, each on its own loss and its own parameter group.

How a multi-loss strategy (``Adversarial``, ``Coupled``, ``CoupledAdversarial``) is composed:

1. Its fields say, per role, the optimiser, scheduler and loss key, each checked by its field's
   validator (``engine/config/validators.py``). ``__attrs_post_init__`` writes them into one
   ``RoleFields`` record per role, by hand, in a mapping ``{role: RoleFields(...)}``: nothing is
   looked up by an attribute name built from a string.
2. ``joint_updates(roles, grad_clip_norm, groups, metrics, every)`` checks what concerns all
   roles and returns a ``JointUpdates``: the roles' ``UpdateSpec`` records keyed by role, each
   role's schedule (``every``: its interval in optimiser windows), the parameter groups (resolved
   at setup, disjoint and covering), and the step mechanics every such strategy shares.
3. A training step runs the forwards it needs and hands their outputs keyed by the role each
   serves to ``train_step_of``: ``JointUpdates.read`` makes one ``RoleStep`` per role whose
   forward ran (its loss, its ``update_<role>`` flag, whether its schedule lets it update in
   this window). A role whose forward did not run has no record: "not run" is never read as
   "flag false". ``JointUpdates.train`` back-propagates each active loss into its own group
   alone and steps at the window's end; an update that is off neither moves its parameters nor
   advances its optimiser (step count, moments). A plain step (one process, a window of one
   batch, nothing to clip, scale or check: ``is_plain_step``) does the same in one function,
   ``_train_plain``.
4. The strategy holds its ``JointUpdates`` as its attribute ``joint`` and takes the StepStrategy
   methods that are the same for every such strategy from ``strategies/joint_methods.py``
   (``setup, end_epoch, learning_rates, state_dict, load_state_dict = LIFECYCLE``; one forward
   for all roles: ``train_step, eval_step, predict_step = ONE_FORWARD``); no base class. It
   writes only what is its own: its fields, ``loss_keys`` and, when its forwards differ per role
   (two-phase ``Adversarial``), its ``train_step``/``eval_step``/``predict_step``.

A new strategy with roles ``a`` and ``b`` therefore declares their fields, builds
``self.joint = joint_updates({"a": RoleFields(...), "b": RoleFields(...)}, ...)`` and takes the
shared methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from engine.config.validators import Check, positive_number
from engine.context import StepContext
from engine.distributed.collectives import all_ranks_agree
from engine.errors import ConfigError, ModelOutputError, StrategyError
from strategies.groups import GroupChoice, resolve_groups
from strategies.roles import ClipChoice, RoleFields
from strategies.update import (
    Update,
    UpdateSpec,
    add_gradients,
    apply_updates,
    backward_isolated,
    build_update,
    is_plain_step,
    isolated_gradients,
    losses_are_finite,
    skip_step,
)

_METRICS = Check(
    "a tuple of output names",
    lambda value: not isinstance(value, str) and all(isinstance(key, str) for key in value),
)


def joint_updates(
    roles: Mapping[str, RoleFields],
    grad_clip_norm: ClipChoice,
    groups: GroupChoice,
    metrics: Any,
    every: Mapping[str, int] | None = None,
    lazy_ratios: Mapping[str, float] | None = None,
) -> JointUpdates:
    """The ``JointUpdates`` of a strategy's roles, checked at the strategy's construction:
    ``grad_clip_norm`` is one positive norm or ``{role: norm}`` naming only these roles."""
    if isinstance(grad_clip_norm, Mapping):
        unknown = sorted(set(grad_clip_norm) - set(roles))
        if unknown:
            raise ConfigError(
                f"grad_clip_norm names unknown role(s) {unknown}; the roles are {list(roles)}"
            )
    _METRICS.require("metrics", metrics)
    specs = {}
    for role, fields in roles.items():
        clip = grad_clip_norm.get(role) if isinstance(grad_clip_norm, Mapping) else grad_clip_norm
        if clip is not None:
            positive_number.require(f"grad_clip_norm for {role}", clip)
        specs[role] = UpdateSpec(role, fields.loss_key, fields.optimizer, fields.scheduler, clip)
    return JointUpdates(specs, groups, tuple(metrics), dict(every or {}), dict(lazy_ratios or {}))


@attrs.define(eq=False)  # not frozen: torch.compile cannot trace a frozen attrs __init__
class RoleStep:
    """One role's part of one training step (never changed once built).

    ``outputs`` are those of the forward that served the role, ``loss`` its loss, ``flag`` the
    forward's ``update_<role>`` (true when absent), agreed on by every rank, and ``scheduled``
    whether the strategy's own schedule (alternation) lets the role update in this window.
    """

    outputs: Mapping[str, Any]
    loss: torch.Tensor
    flag: bool
    scheduled: bool = True

    @property
    def active(self) -> bool:
        return self.flag and self.scheduled


@attrs.define(eq=False)
class JointUpdates:
    """The updates of a multi-optimiser strategy, keyed by role.

    ``specs`` maps each role to what trains it; its order is the order in which the losses are
    back-propagated and reported, which changes no value (each loss reaches its own group only).
    ``metrics`` names further scalar outputs to log beside the losses. ``every`` is each role's
    schedule: a role with interval ``k`` updates in the windows ``w`` (optimiser windows
    completed before this one, kept in ``state_dict()["windows"]``) where ``w % k == k - 1``, so
    exactly ``W // k`` times over ``W`` windows; a role it does not name updates every window.
    """

    specs: Mapping[str, UpdateSpec]
    groups: GroupChoice = None
    metrics: tuple[str, ...] = ()
    every: Mapping[str, int] = attrs.field(factory=dict)
    lazy_ratios: Mapping[str, float] = attrs.field(factory=dict)
    _updates: dict[str, Update] | None = attrs.field(default=None, init=False)
    _windows: int = attrs.field(default=0, init=False)
    # Per step these are read, not rebuilt: the roles, each role's flag key and loss key, the
    # intervals of the roles that do not update every window and, once set up, the updates.
    _roles: tuple[str, ...] = attrs.field(init=False)
    _flag_keys: dict[str, str] = attrs.field(init=False)
    _loss_keys: dict[str, str] = attrs.field(init=False)
    _intervals: dict[str, int] = attrs.field(init=False)
    _update_list: tuple[Update, ...] = attrs.field(default=(), init=False)
    _plain: bool = attrs.field(default=False, init=False)  # every update's is_plain_step
    # What ``_train_plain`` reads per role, in the roles' order: role, loss key, flag key, update.
    _plain_roles: tuple[tuple[str, str, str, Update], ...] = attrs.field(default=(), init=False)

    def __attrs_post_init__(self) -> None:
        self._roles = tuple(self.specs)
        self._flag_keys = {role: f"update_{role}" for role in self.specs}
        self._loss_keys = {role: spec.loss_key for role, spec in self.specs.items()}
        self._intervals = {role: every for role, every in self.every.items() if every != 1}

    @property
    def roles(self) -> tuple[str, ...]:
        return self._roles

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec.loss_key for spec in self.specs.values()))

    @property
    def windows(self) -> int:
        """Optimiser windows completed so far: the position in the schedule."""
        return self._windows

    def scheduled(self, role: str) -> bool:
        """Whether ``role``'s schedule lets it update in the current window. A role updating
        every window does not read the window count (a compiled step would otherwise be
        specialised to, and recompiled for, each count)."""
        every = self.every.get(role, 1)
        return every == 1 or self._windows % every == every - 1

    @property
    def updates(self) -> list[Update]:
        return list(self.by_role.values())

    @property
    def by_role(self) -> dict[str, Update]:
        """Each role's update, once set up."""
        if self._updates is None:
            raise StrategyError("the strategy is not set up: Engine.fit calls setup()")
        return self._updates

    def setup(self, model: torch.nn.Module, ctx: StepContext) -> None:
        groups = resolve_groups(model, self.roles, self.groups)
        self._updates = {
            role: build_update(spec, groups[role], ctx.device, self.lazy_ratios.get(role, 1.0))
            for role, spec in self.specs.items()
        }
        self._update_list = tuple(self._updates.values())
        self._plain = all(is_plain_step(update, ctx) for update in self._update_list)
        self._plain_roles = tuple(
            (role, spec.loss_key, self._flag_keys[role], self._updates[role])
            for role, spec in self.specs.items()
        )

    def read_losses(
        self, outputs: Mapping[str, Mapping[str, Any]], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """The loss of each role whose forward ran (``outputs`` is keyed by role)."""
        return {
            role: ctx.read_loss(outputs[role], spec.loss_key)
            for role, spec in self.specs.items()
            if role in outputs
        }

    def read_flags(
        self, outputs: Mapping[str, Mapping[str, Any]], ctx: StepContext
    ) -> dict[str, bool]:
        """The ``update_<role>`` flag (true when absent) of each role whose forward ran, agreed
        on by every rank. A role that did not run has no flag.

        Under several processes this is one small all-reduce per step, whether or not this
        rank's forward returned flags: another rank's may have. Every rank runs the same
        forwards (the schedule is the same on all), so all reduce the same roles.
        """
        keys = self._flag_keys
        values = {role: outputs[role].get(keys[role], True) for role in keys if role in outputs}
        flags = flags_from(values, keys, ctx)
        return self._agreed(flags, ctx) if ctx.world.is_distributed else flags

    def host_outputs(
        self, outputs: Mapping[str, Mapping[str, Any]], metrics: Mapping[str, torch.Tensor]
    ) -> dict[str, dict[str, Any]]:
        """What ``read`` needs of each role whose loss is in ``metrics`` (detached): that loss
        and the role's ``update_<role>`` flag as the forward returned it (absent: true)."""
        flag_keys, loss_keys = self._flag_keys, self._loss_keys
        return {
            role: {
                loss_keys[role]: metrics[loss_keys[role]],
                flag_keys[role]: served.get(flag_keys[role], True),
            }
            for role, served in outputs.items()
            if role in loss_keys
        }

    def can_trace_gradients(self, ctx: StepContext) -> bool:
        """Whether a compiled step can trace every role's gradient before reading its flags
        (``_train_on_traced_gradients``): one process, unsharded, and no role on a schedule
        (which the step would read from the window count, recompiling for each)."""
        return not ctx.world.is_distributed and ctx.sharding is None and not self._intervals

    def has_device_flags(self, outputs: Mapping[str, Mapping[str, Any]]) -> bool:
        """Whether a forward that ran returned its role's ``update_<role>`` flag as a tensor."""
        keys = self._flag_keys
        return any(
            isinstance(outputs[role].get(keys[role]), torch.Tensor)
            for role in keys
            if role in outputs
        )

    def _agreed(self, flags: dict[str, bool], ctx: StepContext) -> dict[str, bool]:
        """``flags`` as every rank agrees (each true only where it is true on all ranks)."""
        return dict(zip(flags, all_ranks_agree(list(flags.values()), ctx.world)))

    def read(
        self, outputs: Mapping[str, Mapping[str, Any]], ctx: StepContext
    ) -> dict[str, RoleStep]:
        """One ``RoleStep`` per role whose forward ran, with its schedule in this window."""
        losses: dict[str, torch.Tensor] = {}
        unread: dict[str, Any] = {}  # the flags a forward returned (absent: true)
        flag_keys, intervals = self._flag_keys, self._intervals
        for role, key in self._loss_keys.items():  # one pass, in the roles' order
            served = outputs.get(role)
            if served is not None:
                losses[role] = ctx.read_loss(served, key)
                flag = served.get(flag_keys[role], True)
                if flag is not True:
                    unread[role] = flag
        flags = dict.fromkeys(losses, True)
        if unread:
            flags.update(flags_from(unread, flag_keys, ctx))
        if ctx.world.is_distributed:
            flags = self._agreed(flags, ctx)
        return {
            role: RoleStep(
                outputs[role], loss, flags[role], role not in intervals or self.scheduled(role)
            )
            for role, loss in losses.items()
        }

    def train(
        self,
        steps: Mapping[str, RoleStep],
        ctx: StepContext,
        gradients: Mapping[str, tuple[torch.Tensor | None, ...]] | None = None,
    ) -> bool:
        """Back-propagate the active losses, isolated, and step at the window's end, which
        counts as a window whether or not its updates ran.

        ``gradients``: each role's gradient already computed (``isolated_gradients``, traced
        by a compiled step); the active roles' are accumulated instead of back-propagating.
        Returns false when ``nonfinite="skip"`` dropped this batch (on every rank, when a loss
        is non-finite on any).
        """
        updates = self._update_list
        if not updates:
            raise StrategyError("the strategy is not set up: Engine.fit calls setup()")
        trained = ctx.nonfinite != "skip" or losses_are_finite(
            [step.loss for step in steps.values()], ctx.world
        )
        if trained:
            pairs = []
            for update in updates:
                step = steps.get(update.spec.role)
                if step is None or not (step.flag and step.scheduled):  # not step.active: a call
                    continue
                if gradients is not None:
                    add_gradients(update, gradients[update.spec.role])
                    continue
                if not step.loss.requires_grad:
                    require_grad(update, step.loss, ctx)
                pairs.append((update, step.loss))
            if pairs:
                backward_isolated(pairs, ctx, every_group=len(pairs) == len(updates))
            apply_updates(updates, ctx)
        else:
            skip_step(updates, ctx)
        if ctx.is_update_step:
            self._windows += 1  # the window that just ended
        return trained

    def advance(self) -> None:
        """Count the window that just ended."""
        self._windows += 1

    def step_metrics(
        self,
        losses: Mapping[str, torch.Tensor],
        outputs: Mapping[str, Mapping[str, Any]],
        ctx: StepContext,
    ) -> dict[str, torch.Tensor]:
        """Each loss (once per key, in the roles' order; ``losses`` is keyed by role) and each
        extra metric, detached, still on the device."""
        metrics: dict[str, torch.Tensor] = {}
        loss_keys = self._loss_keys
        last: torch.Tensor | None = None
        for role, loss in losses.items():
            if loss is not last:  # one tensor serving the next role too (RAE-L2): one detach
                last, detached = loss, loss.detach()
            metrics[loss_keys[role]] = detached
        if self.metrics:
            sources = [outputs[role] for role in self.roles if role in outputs]
            for key in self.metrics:
                source = next((out for out in sources if key in out), sources[0])
                metrics[key] = ctx.read_loss(source, key).detach()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        updates = {role: u.state_dict() for role, u in self.by_role.items()}
        return {"updates": updates, "windows": self._windows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["updates"]
        missing = [role for role in self.roles if role not in saved]
        if missing:
            raise StrategyError(
                f"strategy state has no update for role(s) {missing}; it holds {sorted(saved)}"
            )
        for role, update in self.by_role.items():
            update.load_state_dict(saved[role])
        self._windows = int(state.get("windows", 0))


def train_step_of(
    joint: JointUpdates, outputs: Mapping[str, Mapping[str, Any]], ctx: StepContext
) -> dict[str, torch.Tensor]:
    """Train on the outputs of the forwards a step ran (keyed by role); its metrics.

    The metrics are detached before the backwards (the same values): then no live tensor
    needs the graph after them, which lets ``compile="step"`` trace forward and backwards as
    one graph (``engine/hardware/compiling.py``).

    Traced by ``compile="step"``, a step whose forward returned ``update_<role>`` flags as
    device tensors (VAEGAN's equilibrium rule) computes every role's gradient inside the graph
    and reads the flags after it (``_train_on_traced_gradients``): reading them before the
    backwards would end the graph there, and dynamo, resuming after that read, can neither
    trace backwards into a graph it has closed nor keep its resumed code (it recompiled it
    every step until its limit). Under several processes, or with a role on a schedule, such a
    step trains eagerly after its compiled forward instead.
    """
    if joint._plain and ctx.micro_count == 1:
        return _train_plain(joint, outputs, ctx)
    if ctx.compiled_step and torch.compiler.is_compiling() and joint.has_device_flags(outputs):
        if joint.can_trace_gradients(ctx):
            return _train_on_traced_gradients(joint, outputs, ctx)
        return _train_step_eagerly(joint, outputs, ctx)
    steps = joint.read(outputs, ctx)
    losses = {role: step.loss for role, step in steps.items()}
    metrics = joint.step_metrics(losses, outputs, ctx)
    if not joint.train(steps, ctx):
        return {}
    return metrics


_train_step_eagerly = torch.compiler.disable(train_step_of)


def _train_plain(
    joint: JointUpdates, outputs: Mapping[str, Mapping[str, Any]], ctx: StepContext
) -> dict[str, torch.Tensor]:
    """``train_step_of`` for a plain step (every update ``is_plain_step``, a window of one
    batch): what ``read``, ``step_metrics``, ``train`` and ``backward_isolated`` come to there,
    in one function. The same losses, flags, metrics, backwards and steps, in the same order,
    with no ``RoleStep`` and none of those calls: each Python call in a step costs several
    times its warm cost, the step's kernels leaving it cold (``benchmarks/python_in_step.py``).
    """
    metrics: dict[str, torch.Tensor] = {}
    served_losses: list[tuple[str, torch.Tensor, Update]] = []
    unread: dict[str, Any] = {}  # the flags a forward returned (absent: true)
    last: torch.Tensor | None = None
    for role, loss_key, flag_key, update in joint._plain_roles:
        served = outputs.get(role)
        if served is None:  # this role's forward did not run: no loss, no flag, no update
            continue
        loss = ctx.read_loss(served, loss_key)
        if loss is not last:  # one tensor serving the next role too (RAE-L2): one detach
            last, detached = loss, loss.detach()
        metrics[loss_key] = detached
        served_losses.append((role, loss, update))
        flag = served.get(flag_key, True)
        if flag is not True:
            unread[role] = flag
    flags = flags_from(unread, joint._flag_keys, ctx) if unread else {}
    if joint.metrics:
        metrics.update(joint.step_metrics({}, outputs, ctx))
    intervals = joint._intervals
    active: list[Update] = []
    merged: list[tuple[torch.Tensor, list[Update]]] = []  # the active updates by loss tensor
    for role, loss, update in served_losses:
        if not flags.get(role, True) or (role in intervals and not joint.scheduled(role)):
            continue
        if not loss.requires_grad:
            require_grad(update, loss, ctx)
        active.append(update)
        for shared, sharers in merged:  # update.py's _by_loss, inline: no call per step
            if shared is loss:
                sharers.append(update)
                break
        else:
            merged.append((loss, [update]))
    if len(merged) == 1 and len(active) == len(joint._plain_roles):
        merged[0][0].backward()  # one loss for every group: they cover every parameter
    else:
        end = len(merged) - 1
        for index, (loss, sharers) in enumerate(merged):
            params = (
                sharers[0].params
                if len(sharers) == 1
                else [param for update in sharers for param in update.params]
            )
            loss.backward(inputs=params, retain_graph=index < end)
    for update in active:
        update.optimizer.step()
        update.optimizer.zero_grad(set_to_none=True)
    joint._windows += 1  # a window of one batch ends with its batch
    return metrics


def _train_on_traced_gradients(
    joint: JointUpdates, outputs: Mapping[str, Mapping[str, Any]], ctx: StepContext
) -> dict[str, torch.Tensor]:
    """``train_step_of`` traced by ``compile="step"`` when the forward returned its flags as
    device tensors: every role's isolated gradient is traced into the forward's graph (one
    program, as for a step without flags), and the flags are read after it, eagerly, which keep
    the active roles' gradients and drop the others' (an update that is off still neither
    moves nor advances). Only detached values leave the graph, so it saves nothing for a
    backward. A role that is off costs its backward's kernels, inside the graph."""
    losses = joint.read_losses(outputs, ctx)
    updates = joint.by_role
    for role, loss in losses.items():
        require_grad(updates[role], loss, ctx)
    metrics = joint.step_metrics(losses, outputs, ctx)
    gradients = isolated_gradients([(updates[role], loss) for role, loss in losses.items()], ctx)
    on_host = joint.host_outputs(outputs, metrics)
    return _keep_active_gradients(joint, on_host, gradients, metrics, ctx)


@torch.compiler.disable
def _keep_active_gradients(
    joint: JointUpdates,
    on_host: Mapping[str, Mapping[str, Any]],
    gradients: Mapping[str, tuple[torch.Tensor | None, ...]],
    metrics: dict[str, torch.Tensor],
    ctx: StepContext,
) -> dict[str, torch.Tensor]:
    """The eager end of ``_train_on_traced_gradients``: ``on_host`` holds each role's detached
    loss and flag; the flags are read, the active roles' gradients accumulated, the optimisers
    stepped."""
    if not joint.train(joint.read(on_host, ctx), ctx, gradients):
        return {}
    return metrics


def require_grad(update: Update, loss: torch.Tensor, ctx: StepContext) -> None:
    """An error naming ``update``'s loss when it depends on no trainable parameter."""
    if not loss.requires_grad:
        raise ModelOutputError(
            f"loss {update.spec.loss_key!r} of the {update.spec.role} update does not depend "
            f"on any trainable parameter (it has no grad_fn) at step {ctx.progress.step}"
        )


def eval_step_of(
    joint: JointUpdates, outputs: Mapping[str, Mapping[str, Any]], ctx: StepContext
) -> dict[str, torch.Tensor]:
    """Every loss (and extra metric) of the forwards an evaluation step ran, changing no state."""
    return joint.step_metrics(joint.read_losses(outputs, ctx), outputs, ctx)


def one_forward_for_all(
    joint: JointUpdates, model: torch.nn.Module, batch: Any, ctx: StepContext
) -> dict[str, Mapping[str, Any]]:
    """One ``model(batch)`` serves every role: its outputs, keyed by role."""
    return dict.fromkeys(joint.specs, ctx.forward(model, batch))


def read_flag(outputs: Mapping[str, Any], key: str, ctx: StepContext) -> bool:
    """A flag is absent (true), a Python bool or a one-element bool tensor (read from the
    device here)."""
    value = outputs.get(key, True)
    return value if isinstance(value, bool) else bool(flag_tensor(value, key, ctx).item())


def flags_from(
    values: Mapping[str, Any], keys: Mapping[str, str], ctx: StepContext
) -> dict[str, bool]:
    """Each role's ``update_<role>`` output (``values``, keyed by role) as a bool: a Python
    bool as it is, a one-element bool tensor read on the host. Several tensors on one
    accelerator are read together, in one transfer (``read_together``: VAEGAN's equilibrium
    rule returns three, so one synchronisation a step instead of three); on the CPU a read is
    no transfer, and each is read alone (fewer instructions than stacking them)."""
    flags: dict[str, bool] = {}
    tensors: dict[str, torch.Tensor] = {}
    for role, value in values.items():  # per step: the usual values are checked inline
        if value is True or value is False:
            flags[role] = value
        elif isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
            tensors[role] = value
        else:
            tensors[role] = flag_tensor(value, keys[role], ctx)  # raises, naming the value
    if len(tensors) > 1:
        device = next(iter(tensors.values())).device
        if device.type != "cpu" and all(t.device == device for t in tensors.values()):
            flags.update(read_together(tensors))
            return flags
    for role, tensor in tensors.items():
        flags[role] = bool(tensor)
    return flags


def read_together(tensors: Mapping[str, torch.Tensor]) -> dict[str, bool]:
    """One-element bool tensors of one device, keyed by role, read in one transfer."""
    read = torch.stack([tensor.reshape(()) for tensor in tensors.values()]).tolist()
    return dict(zip(tensors, read))


def flag_tensor(value: Any, key: str, ctx: StepContext) -> torch.Tensor:
    """``value`` when it is a one-element bool tensor; otherwise an error naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.bool:
        return value
    shown = (
        f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
        if isinstance(value, torch.Tensor)
        else repr(value)
    )
    raise ModelOutputError(
        f"output {key!r} must be a bool or a one-element bool tensor, got {shown} "
        f"at step {ctx.progress.step}"
    )
