"""The part every strategy is composed of: one "update" of one parameter group.

An ``UpdateSpec`` says what the user chose for a role (which loss trains it, with which
optimiser, scheduler and clipping); ``build_update`` binds it to a parameter group on a device.
The functions below are the optimiser mechanics shared by all strategies, in the order a step
uses them: ``backward_isolated`` (isolated per group, scaled, accumulated), then ``apply_updates``
(average across ranks, unscale, clip, step, zero, per-step schedulers, one scaler update).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.config.validators import instance_of, optional, positive_number
from engine.context import StepContext
from engine.distributed.collectives import World, all_ranks_agree
from engine.distributed.replication import RoleReplica, finish_window, gradient_sync
from engine.distributed.sharding import is_dtensor, sharded_backward
from engine.errors import ConfigError


@attrs.frozen
class UpdateSpec:
    """What trains one role: its loss key, optimiser, optional scheduler and clipping norm
    (``grad_clip_norm`` overrides the engine's for this group)."""

    role: str
    loss_key: str
    optimizer: OptimizerSpec = attrs.field(validator=instance_of(OptimizerSpec))
    scheduler: SchedulerSpec | None = attrs.field(
        default=None, validator=optional(instance_of(SchedulerSpec))
    )
    grad_clip_norm: float | None = attrs.field(default=None, validator=optional(positive_number))


@attrs.define(eq=False)
class Update:
    """An ``UpdateSpec`` bound to its parameters: the optimiser and scheduler that step them.

    ``pending`` is true once a backward wrote gradients for this group in the current
    accumulation window.
    """

    spec: UpdateSpec
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    pending: bool = False
    replica: RoleReplica | None = None  # its DDP under several processes (replication.py)
    accumulators: list[torch.Tensor] = attrs.field(factory=list, repr=False)  # held_accumulators

    @property
    def role(self) -> str:
        return self.spec.role

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def build_update(
    spec: UpdateSpec,
    params: Sequence[torch.nn.Parameter],
    device: torch.device,
    lazy_ratio: float = 1.0,
) -> Update:
    """Bind ``spec`` to ``params``: build its optimiser (fused where possible) and scheduler.

    ``lazy_ratio`` ``c < 1`` is StyleGAN2's correction for a group that also steps in lazy
    regulariser phases: its learning rate is multiplied by ``c`` and each of its betas (Adam's)
    raised to the power ``c``, before the scheduler reads them.
    """
    optimizer = spec.optimizer.build(params, device, role=spec.role)
    optimizer.zero_grad(set_to_none=True)
    if lazy_ratio != 1.0:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * lazy_ratio
            if "betas" in group:
                group["betas"] = tuple(beta**lazy_ratio for beta in group["betas"])
    scheduler = None if spec.scheduler is None else spec.scheduler.build(optimizer, role=spec.role)
    update = Update(spec, list(params), optimizer, scheduler)
    update.accumulators = held_accumulators(update.params)
    return update


def is_plain_step(update: Update, ctx: StepContext) -> bool:
    """Whether a window of one batch trains ``update`` by its loss's ``backward()`` and its
    optimiser's ``step()`` and ``zero_grad()`` alone, as a hand-written loop does: one process
    (nothing to average), unsharded, no GradScaler, no clipping, no per-step scheduler,
    ``nonfinite`` not ``"skip"`` and not ``compile="step"`` (whose optimiser steps run between
    graphs). A strategy then calls those three directly: ``backward_isolated`` and
    ``apply_updates`` come to the same calls in such a step, after a dozen checks and four
    Python calls, and each Python call in a step costs several times its warm cost (the step's
    kernels leave it cold: ``benchmarks/python_in_step.py``)."""
    scheduler = update.spec.scheduler
    return (
        not ctx.world.is_distributed
        and ctx.sharding is None
        and ctx.scaler is None
        and update.spec.grad_clip_norm is None
        and ctx.grad_clip_norm is None
        and (scheduler is None or scheduler.interval != "step")
        and ctx.nonfinite != "skip"
        and not ctx.compiled_step
    )


def held_accumulators(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's gradient accumulator (the autograd node that writes ``param.grad``),
    held for the run through a one-node graph per parameter (``param.sum()``, computed once).

    Autograd keeps a parameter's accumulator only while something references it: when a step's
    graph dies with the step, the next forward builds every accumulator anew (about 10k
    instructions a step for a small MLP, counted by ``benchmarks/instructions.py``). Holding
    them makes every step reuse them, as DDP's reducer and a hand-written loop (whose last
    step's tensors outlive the next forward) do. They are held through autograd's own
    reference (the sum's edge), not through the Python object of the node
    (``grad_fn.next_functions``): a node with a Python object takes the GIL each time a step
    uses and releases it, about 1k instructions per parameter a step. Sharded parameters
    (FSDP2's DTensors) are not the graph's leaves: none is held for them.
    """
    if not params or is_dtensor(params[0]):
        return []
    with torch.enable_grad():
        return [param.sum() for param in params if param.requires_grad]


def losses_are_finite(losses: Sequence[torch.Tensor], world: World) -> bool:
    """True when every loss is finite on every rank, so that all ranks skip a batch together
    (a rank that skipped alone would leave the others waiting in the gradient all-reduce).
    Reads the device: used only by ``nonfinite="skip"``."""
    finite = not losses or bool(
        torch.isfinite(torch.stack([loss.detach().float() for loss in losses])).all()
    )
    return all_ranks_agree([finite], world)[0]


def skip_step(updates: Sequence[Update], ctx: StepContext) -> dict[str, torch.Tensor]:
    """Drop this batch's contribution and count it as skipped (``nonfinite="skip"``)."""
    ctx.progress.skipped_steps += 1
    if ctx.is_update_step:
        apply_updates(updates, ctx)
    return {}


def backward_isolated(
    pairs: Sequence[tuple[Update, torch.Tensor]],
    ctx: StepContext,
    every_group: bool = False,
    sync: bool | None = None,
) -> None:
    """Accumulate into each group the gradient of its own loss only.

    Each loss is back-propagated into its own group's parameters alone (``backward(inputs=...)``),
    so a loss never leaks into another group's gradient; the graph is kept until the last loss.
    Losses are divided by the accumulation window's size and scaled by the run's GradScaler when
    there is one. All backwards happen before any step (``apply_updates``), so every gradient is
    taken at the same parameters.

    Groups trained on the very same loss (pythae's RAE_L2 returns one tensor as both
    ``encoder_loss`` and ``decoder_loss``) share one backward into the union of their
    parameters: isolation then costs no extra backward. Distinct losses each get their own.
    ``every_group`` says that ``pairs`` holds every group of the strategy (which together cover
    all trainable parameters): then one loss shared by all of them is back-propagated without
    ``inputs=``, which reaches the same parameters and spares autograd's input bookkeeping.
    ``sync`` says whether these backwards average the gradients over the ranks as they run
    (``engine/distributed/replication.py``); by default, those of the window's last micro-batch.
    Under FSDP2 (``ctx.sharding``) ``inputs=`` can not reach the sharded parameters the
    optimisers step: each loss is back-propagated into its group's gathered (unsharded)
    parameters instead, so only that group's units are reduce-scattered (``sharded_backward``;
    a plain backward that drops what leaks into the other groups is its fallback).
    """
    # one pair (a Standard step) needs no grouping; per-batch calls are kept to what is used
    merged = [(pairs[0][1], [pairs[0][0]])] if len(pairs) == 1 else _by_loss(pairs)
    last = len(merged) - 1
    for index, (loss, sharers) in enumerate(merged):
        if ctx.micro_count > 1 or ctx.scaler is not None:
            loss = _scaled(loss, ctx)
        retain = index < last
        if ctx.world.is_distributed:
            sync_now = ctx.is_update_step if sync is None else sync
            with gradient_sync(sharers, loss, ctx, sync_now):
                _backward(loss, sharers, ctx, every_group and len(merged) == 1, retain)
        else:  # one process: nothing to synchronise (and no FSDP2 shards)
            _backward(loss, sharers, ctx, every_group and len(merged) == 1, retain)
        for update in sharers:
            update.pending = True


def isolated_gradients(
    pairs: Sequence[tuple[Update, torch.Tensor]], ctx: StepContext
) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """Each group's gradient of its own loss, keyed by role, returned rather than accumulated:
    what ``backward_isolated`` would add to the groups' ``param.grad`` (scaled the same way; one
    ``autograd.grad`` per distinct loss), for a compiled step that traces every backward into
    its graph before it can read which of them to keep (``add_gradients`` keeps one). ``None``
    stands for a parameter the loss does not reach. One process, unsharded parameters."""
    gradients: dict[str, tuple[torch.Tensor | None, ...]] = {}
    for loss, sharers in _by_loss(pairs):
        params = [param for update in sharers for param in update.params]
        # retain_graph for every loss: dynamo refuses to let autograd.grad free the graph of
        # tensors the traced code can still reach (the forward's outputs); inside the compiled
        # graph it frees nothing either way.
        grads = torch.autograd.grad(
            _scaled(loss, ctx), params, retain_graph=True, allow_unused=True
        )
        start = 0
        for update in sharers:
            gradients[update.spec.role] = grads[start : start + len(update.params)]
            start += len(update.params)
    return gradients


def add_gradients(update: Update, gradients: Sequence[torch.Tensor | None]) -> None:
    """Accumulate ``gradients`` (``isolated_gradients``' entry for ``update``'s role) into its
    parameters, as its backward would have."""
    _accumulate(update.params, gradients)
    update.pending = True


def _by_loss(
    pairs: Sequence[tuple[Update, torch.Tensor]],
) -> list[tuple[torch.Tensor, list[Update]]]:
    """The updates grouped by the very loss tensor they train on, in ``pairs``' order."""
    merged: list[tuple[torch.Tensor, list[Update]]] = []
    for update, loss in pairs:
        for shared_loss, sharers in merged:
            if shared_loss is loss:
                sharers.append(update)
                break
        else:
            merged.append((loss, [update]))
    return merged


def _scaled(loss: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """``loss`` divided by the accumulation window's size and scaled by the run's GradScaler:
    the accumulated gradient is then that of the window's mean loss, scaled as fp16 needs."""
    if ctx.micro_count > 1:
        loss = loss / ctx.micro_count
    if ctx.scaler is not None:
        loss = ctx.scaler.scale(loss)
    return loss


def _backward(
    loss: torch.Tensor, sharers: list[Update], ctx: StepContext, whole: bool, retain: bool
) -> None:
    """One backward of ``loss`` into the groups of ``sharers`` (``whole``: into everything)."""
    if whole:
        loss.backward()
        return
    params = sharers[0].params if len(sharers) == 1 else [p for u in sharers for p in u.params]
    if ctx.sharding is not None:  # FSDP2: into the gathered parameters, not the shards
        sharded_backward(ctx.sharding, loss, params, retain)
    elif ctx.compiled_step and torch.compiler.is_compiling():
        _traced_backward_into(loss, params, retain_graph=retain)
    else:
        loss.backward(inputs=params, retain_graph=retain)


def _traced_backward_into(
    loss: torch.Tensor, params: Sequence[torch.nn.Parameter], retain_graph: bool
) -> None:
    """``loss.backward(inputs=params)`` as ``compile="step"`` traces it: spelled out as
    ``autograd.grad(allow_unused=True)`` and an accumulation, because torch 2.13's dynamo traces
    ``backward(inputs=...)`` as ``autograd.grad`` without ``allow_unused`` and so refuses a
    parameter of the group that the loss does not reach, whose gradient backward leaves alone."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    _accumulate(params, grads)


def _accumulate(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
    """Add each gradient into its parameter's ``grad``, as a backward does (``None``: not
    reached, left alone)."""
    for param, grad in zip(params, grads):
        if grad is None:
            continue
        if param.grad is None:
            param.grad = grad
        else:
            param.grad.add_(grad)


def apply_updates(updates: Sequence[Update], ctx: StepContext) -> None:
    """At the end of an accumulation window, step every group that received gradients
    (``step_update``); the GradScaler is updated once, after all groups.

    Under ``compile="step"`` this runs eagerly between the compiled graphs (fused optimiser
    kernels; a compiled optimiser step would be recompiled for every fit's new optimisers:
    ``engine/hardware/compiling.py``)."""
    if ctx.compiled_step and torch.compiler.is_compiling():
        return _apply_updates_eagerly(updates, ctx)
    if not ctx.is_update_step:
        return
    stepped = False
    for update in updates:  # a loop, not a comprehension: no frame of its own, per batch
        stepped |= step_update(update, ctx)
    if stepped and ctx.scaler is not None:
        ctx.scaler.update()


def step_update(update: Update, ctx: StepContext) -> bool:
    """Step one group if a backward wrote its gradients since its last step.

    Order: average gradients over ranks, unscale (fp16), clip, step, zero, then its per-step
    scheduler. Returns whether it stepped; the caller updates the GradScaler after its steps.
    Runs eagerly under ``compile="step"``, as ``apply_updates``.
    """
    if ctx.compiled_step and torch.compiler.is_compiling():
        return _step_update_eagerly(update, ctx)
    if not update.pending:
        return False
    update.pending = False
    scaler = ctx.scaler
    if ctx.world.is_distributed:  # one process has nothing to average
        finish_window(update, ctx)
    clip = update.spec.grad_clip_norm or ctx.grad_clip_norm
    if scaler is not None:
        if all(param.grad is None for param in update.params):
            return False  # its loss reached none of its parameters: nothing to unscale or step
        scaler.unscale_(update.optimizer)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(update.params, clip, foreach=True)
    if scaler is not None:
        scaler.step(update.optimizer)
    else:
        update.optimizer.step()
    update.optimizer.zero_grad(set_to_none=True)
    if update.scheduler is not None and update.spec.scheduler.interval == "step":  # type: ignore[union-attr]
        update.scheduler.step()
    return True


_apply_updates_eagerly = torch.compiler.disable(apply_updates)
_step_update_eagerly = torch.compiler.disable(step_update)


def end_epoch_schedulers(updates: Sequence[Update], metrics: Mapping[str, float]) -> None:
    """Step per-epoch schedulers; a plateau scheduler gets its monitored metric.

    On an epoch with no evaluation, a plateau scheduler watching an ``eval/`` metric waits.
    """
    for update in updates:
        spec = update.spec.scheduler
        if update.scheduler is None or spec is None or spec.interval != "epoch":
            continue
        if not spec.is_plateau:
            update.scheduler.step()
            continue
        monitor = spec.monitor
        assert monitor is not None  # SchedulerSpec refuses a plateau scheduler without one
        if monitor in metrics:
            update.scheduler.step(metrics[monitor])
        elif not (monitor.startswith("eval/") and not any(k.startswith("eval/") for k in metrics)):
            raise ConfigError(
                f"{update.role} scheduler monitors {monitor!r}, which is not among this "
                f"epoch's metrics {sorted(metrics)}"
            )


def learning_rates(updates: Sequence[Update]) -> dict[str, float]:
    """The first parameter group's learning rate of each optimiser, as ``lr/<role>``."""
    return {f"lr/{u.role}": float(u.optimizer.param_groups[0]["lr"]) for u in updates}
