"""Gradient averaging across ranks by PyTorch's DDP engine: one ``DistributedDataParallel``
per role, driven at the role's backward.

What each role gets. A ``RoleReplica`` holds one ``DistributedDataParallel`` over an
``nn.ParameterList`` of exactly that role's parameters (Standard: one, over every trainable
parameter). Its C++ ``Reducer`` is DDP's own: parameters in buckets (``bucket_cap_mb``, a
small first bucket), an all-reduce launched from the autograd hooks as soon as a bucket's
gradients are ready, so communication overlaps the rest of the backward; gradients are views
into the buckets (``gradient_as_bucket_view=True``: no flat copy per step); the reduction is
waited for when the backward ends, before any optimiser step. Roles never share a DDP
(``RoleReplica`` refuses none of them: each holds one role's parameters by construction) and
``static_graph`` is never used: a role may take several backwards in one step (n_critic,
phases, accumulation).

Why not wrap the model, or ``replicate()``. DDP (and the composable
``torch.distributed._composable.replicate``, which builds the same DDP over a module's
parameters) arms its reducer in forward hooks: ``_post_forward`` calls
``reducer.prepare_for_backward`` once per forward of the wrapped module. That pairing of one
forward with one backward does not hold for our roles: the default ``generator`` is "every
parameter but ``model.discriminator``" (a module DDP would have to wrap with the
discriminator's parameters ignored); a discriminator runs twice per forward (fake and real) and
in several forwards per window (n_critic, regulariser phases); a custom ``groups=`` function may
return any parameters at all; and a ``forward=`` function may call submodules without the root's
``__call__``, so hooks on a wrapper the model does not call never fire. Here the reducer is
armed where the gradient is made instead: right before each backward into the role
(``gradient_sync``), with the same calls DDP's forward makes (``_pre_forward``, which also
rebuilds the buckets in gradient order after the first step, then ``prepare_for_backward``). Any
parameter group works, whatever the forwards do.

Accumulation (``no_sync``). A backward with ``sync=False`` does not arm the reducer: the
gradient accumulates locally (DDP's ``no_sync``); the next armed backward reduces everything
accumulated. The strategies arm the backwards of the window's last micro-batch. Should a
window end with local gradients (the last micro-batch skipped as non-finite, a role switched
off by its flag on the last micro-batch only, backwards made outside ``gradient_sync``),
``finish_window`` averages them explicitly (``collectives.average_gradients``) before the step,
so every rank steps on the same gradient in every case.

Unused parameters. At a role's first armed backward, the loss's autograd graph is searched for
the role's parameters; where some rank's loss does not reach all of them, the role's DDP gets
``find_unused_parameters=True`` (a parameter unused on one rank counts as zero there, one unused
on every rank keeps no gradient), otherwise not (no graph search and no extra all-reduce per
step). The choice is logged. A parameter that the first step reached but a later step does not
is DDP's error at that step, naming the role.

Lifetime. A replica belongs to one ``fit``: it is kept on the strategy's update of the role
(``ReplicaHolder.replica``) and released when the fit ends (``StepContext.release``, which
``Engine.fit`` calls whatever way it ends, even while a callback still holds the run and its
context) or, at the latest, when the fit's ``StepContext`` is freed (a ``weakref.finalize``),
since a DDP holds the process group, and a group something still holds can not join its worker
threads when the process leaves it (``session.leave_process_group``). A strategy set up again,
or used with another context, builds new replicas.

Under FSDP2 (``ctx.sharding``) there are no replicas: ``gradient_sync`` and ``finish_window``
do nothing, FSDP reduce-scatters the gradients during the backward
(``engine/distributed/sharding.py``).

Buffers are not DDP's business here (``forward_sync_buffers=False``): DDP's broadcast of
buffers before every forward rewrites BatchNorm statistics in place, which breaks a backward
through a discriminator that ran twice (PyTorch issue #175024). The engine broadcasts rank 0's
parameters and buffers once at setup and rank 0's buffers before every evaluation. DDP's own
initial broadcast (``init_sync``) is off: the replica is built at the first armed backward,
after the forward, where an in-place broadcast would invalidate the graph.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import attrs
import torch
from loguru import logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.context import StepContext
from engine.distributed.collectives import (
    World,
    all_ranks_agree,
    average_gradients,
    collective,
)
from engine.distributed.sharding import is_dtensor
from engine.errors import DistributedError, StrategyError

# DDP's default bucket size.
BUCKET_CAP_MB = 25.0


class ReplicaHolder(Protocol):
    """What holds a role's replica: a strategy's update of one parameter group."""

    @property
    def role(self) -> str: ...

    params: list[nn.Parameter]
    replica: RoleReplica | None


@attrs.define(eq=False)
class RoleReplica:
    """One role's ``DistributedDataParallel``, built at the role's first armed backward.

    ``synced`` is true while the role's gradients are the average over the ranks (an armed
    backward finished and no local backward came after it); ``finish_window`` resets it.
    ``find_unused`` and ``unreached`` (the indices of the parameters the first armed backward's
    loss did not reach on this rank) say what was decided for the role; ``fallbacks`` counts
    the windows whose local gradients ``finish_window`` averaged explicitly.
    """

    role: str
    params: list[nn.Parameter]
    world: World
    owner: weakref.ref[StepContext]
    bucket_cap_mb: float = BUCKET_CAP_MB
    ddp: DistributedDataParallel | None = None
    find_unused: bool | None = None
    unreached: tuple[int, ...] = ()
    synced: bool = False
    fallbacks: int = 0

    def arm(self, loss: torch.Tensor) -> None:
        """Make DDP's reducer reduce the gradients the next backward of ``loss`` writes."""
        if self.ddp is None:
            self.ddp = self._build(loss)
        ddp = self.ddp
        # DDP's forward preamble; from the second step it rebuilds the buckets in the order the
        # gradients came (a broadcast of that order, once).
        collective("gradient all-reduce (bucket order)", self.world, ddp._pre_forward)
        ddp.reducer.prepare_for_backward([loss] if self.find_unused else [])

    def disarmed(self) -> None:
        """A backward into the role ran without the reducer: its gradients are local now."""
        self.synced = False

    def check(self) -> None:
        """After an armed backward: the reducer reduced every bucket (else a parameter got no
        gradient although the first step reached it: an error naming the role)."""
        assert self.ddp is not None
        try:
            self.ddp._check_reducer_finalized()
        except RuntimeError as error:
            missing = [
                f"#{index} {tuple(param.shape)}"
                for index, param in enumerate(self.params)
                if param.grad is None
            ]
            raise DistributedError(
                f"rank {self.world.rank} of {self.world.world_size}: the {self.role!r} "
                f"backward left parameters {missing or '(unknown)'} of the role without a "
                "gradient although its first step reached every parameter, so its DDP was "
                "built without find_unused_parameters; make the loss reach them in every step "
                f"(e.g. multiply an unused branch by zero); cause: {str(error).strip()[:300]}"
            ) from error
        self.synced = True

    def _build(self, loss: torch.Tensor) -> DistributedDataParallel:
        """The role's DDP; whether it must look for unused parameters is agreed by all ranks
        from the graph of ``loss`` (one small all-reduce, once)."""
        reached = _reached_parameters(loss)
        self.unreached = tuple(
            index for index, param in enumerate(self.params) if id(param) not in reached
        )
        self.find_unused = not all_ranks_agree([not self.unreached], self.world)[0]
        ddp = DistributedDataParallel(
            nn.ParameterList(self.params),
            bucket_cap_mb=self.bucket_cap_mb,
            find_unused_parameters=self.find_unused,
            gradient_as_bucket_view=True,
            forward_sync_buffers=False,
            init_sync=False,
        )
        if self.world.is_main:
            logger.info(describe(self))
        return ddp


def describe(replica: RoleReplica) -> str:
    """One log line: the role's DDP, its size and whether it looks for unused parameters."""
    values = sum(param.numel() for param in replica.params)
    unused = "on" if replica.find_unused else "off"
    why = (
        f" (the first step's loss did not reach parameters "
        f"{[f'#{i} {tuple(replica.params[i].shape)}' for i in replica.unreached]} on rank "
        f"{replica.world.rank}, or others on another rank)"
        if replica.find_unused
        else " (its loss reaches every parameter)"
    )
    return (
        f"DDP for role {replica.role!r}: {len(replica.params)} parameters ({values:,} values), "
        f"buckets of <= {replica.bucket_cap_mb:g} MiB, find_unused_parameters {unused}{why}"
    )


def replica_of(holder: ReplicaHolder, ctx: StepContext) -> RoleReplica:
    """The holder's replica for the fit of ``ctx`` (made on first use, its DDP at its first
    armed backward; released with ``ctx``)."""
    replica = holder.replica
    if replica is None or replica.owner() is not ctx:
        replica = RoleReplica(holder.role, list(holder.params), ctx.world, weakref.ref(ctx))
        holder.replica = replica
        ctx.releases.append(weakref.finalize(ctx, _release, weakref.ref(holder), replica))
    return replica


def _release(holder: weakref.ref[ReplicaHolder], replica: RoleReplica) -> None:
    """The fit that built ``replica`` ended: drop it (and its DDP's hold on the group)."""
    owner = holder()
    if owner is not None and owner.replica is replica:
        owner.replica = None
    replica.ddp = None


@contextlib.contextmanager
def gradient_sync(
    holders: Sequence[ReplicaHolder], loss: torch.Tensor, ctx: StepContext, sync: bool
) -> Iterator[None]:
    """Around one backward of ``loss`` into the groups of ``holders``.

    ``sync``: average the gradients over the ranks during this backward (the window's last
    backward into these roles); otherwise they accumulate locally (``no_sync``). Free in one
    process. A collective failure inside the backward (another rank died or timed out) becomes
    a ``DistributedError`` naming this rank. Parameters sharded by FSDP2 are refused (a
    backward with ``inputs=`` shards would silently give them no gradient): their backward is
    ``engine/distributed/sharding.py``'s (``ctx.sharding``: then this does nothing).
    """
    if ctx.sharding is not None:
        yield
        return
    for holder in holders:
        if holder.params and is_dtensor(holder.params[0]):
            raise StrategyError(
                f"the parameters of role {holder.role!r} are FSDP2 shards (DTensor): an "
                "isolated backward(inputs=...) would give them no gradient, silently; shard "
                "through engine/distributed/sharding.py (sharded_backward back-propagates "
                "into the gathered parameters instead)"
            )
    world = ctx.world
    if not world.is_distributed:
        yield
        return
    replicas = [replica_of(holder, ctx) for holder in holders]
    if not sync:
        yield
        for replica in replicas:
            replica.disarmed()
        return
    for replica in replicas:
        replica.arm(loss)
    try:
        yield
    except RuntimeError as error:
        if _is_collective_failure(error):
            raise DistributedError(
                f"rank {world.rank} of {world.world_size}: gradient all-reduce failed, most "
                "likely because another rank stopped with an error (its own traceback says "
                f"why) or timed out; cause: {str(error).strip()[:500]}"
            ) from error
        raise
    for replica in replicas:
        replica.check()


def finish_window(holder: ReplicaHolder, ctx: StepContext) -> None:
    """Before the role's optimiser step: its gradients are the average over the ranks.

    Free when an armed backward already averaged them (the usual case); otherwise (local
    gradients: see the module's docstring) they are averaged here, explicitly. Under FSDP2
    (``ctx.sharding``) the backward already reduce-scattered them: nothing to do.
    """
    world = ctx.world
    if not world.is_distributed or ctx.sharding is not None:
        return
    replica = replica_of(holder, ctx)
    if replica.synced:
        replica.synced = False
        return
    replica.fallbacks += 1
    average_gradients(holder.params, world)


def replicas(holders: Sequence[Any]) -> dict[str, RoleReplica]:
    """The replicas built so far, by role (for logs and tests)."""
    return {h.role: h.replica for h in holders if getattr(h, "replica", None) is not None}


def _reached_parameters(loss: torch.Tensor) -> set[int]:
    """The ids of the leaf tensors whose gradient a backward of ``loss`` accumulates."""
    reached: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return reached


_COLLECTIVE_MARKERS = ("gloo", "nccl", "connection", "peer", "timed out", "timeout", "socket")


def _is_collective_failure(error: RuntimeError) -> bool:
    if isinstance(error, torch.distributed.DistError):
        return True
    message = str(error).lower()
    return any(marker in message for marker in _COLLECTIVE_MARKERS)
