"""The process group a run belongs to, and the collective operations the engine needs.

A single process is a world of size one, where every operation here is free. Under ``torchrun``
the environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` describe the world
(``engine/distributed/session.py`` joins it). Every collective here is called by every rank in
the same order: the strategies and the loop guarantee it. A failed or hung rank makes the others'
pending collective fail with a ``DistributedError`` naming the operation (at once when the failed
process ends, otherwise at the process group's timeout), never hang.

Gradients are averaged by DDP, one ``DistributedDataParallel`` per role, during the backward
(``engine/distributed/replication.py``). ``start_gradient_average``/``average_gradients`` here
average a group's gradients explicitly after its backwards: the replication's fallback for a
window that ends with local gradients (a skipped last micro-batch), and the reference the
scaling benchmark compares DDP with. Update-flag, non-finite and stop agreements
(``all_ranks_agree``, ``any_rank``) stay ours.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import torch
import torch.distributed as dist

from engine.errors import DistributedError

# Gradients are all-reduced in flat buckets of at most this many bytes (as DDP's default).
BUCKET_BYTES = 25 * 2**20

_T = TypeVar("_T")


@attrs.frozen
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A field, not a property: every step reads it several times.
    is_distributed: bool = attrs.field(init=False, repr=False)

    @is_distributed.default
    def _more_than_one(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """The world of an initialised process group, or of this single process."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return World(
            rank=rank,
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", str(rank))),
        )
    return World()


def collective_device() -> torch.device:
    """Where tensors must live for the current process group's collectives (nccl: the GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective(what: str, world: World, operation: Callable[[], _T]) -> _T:
    """Run a collective; a failure (a rank that died, a timeout) becomes a ``DistributedError``
    naming this rank and the operation, raised on every surviving rank instead of a hang."""
    try:
        return operation()
    except RuntimeError as error:
        if isinstance(error, DistributedError):
            raise
        raise DistributedError(
            f"rank {world.rank} of {world.world_size}: {what} failed, most likely because "
            f"another rank stopped with an error (its own traceback says why) or timed out; "
            f"cause: {str(error).strip()[:500]}"
        ) from error


# ------------------------------------------------------------------ gradients


@attrs.define(eq=False)
class PendingAverage:
    """Gradient all-reduces in flight for one parameter group; ``wait`` finishes the average."""

    params: list[torch.nn.Parameter]
    buckets: list[list[int]]
    flats: list[torch.Tensor]
    works: list[Any]
    world: World
    missing: list[int] = attrs.field(factory=list)

    def wait(self) -> None:
        """Block until the reduced gradients are in place (identical on every rank)."""
        if not self.flats:
            return
        for work in self.works:
            collective("gradient all-reduce", self.world, work.wait)
        present = self.flats[0][-len(self.params) :]
        for bucket, flat in zip(self.buckets, self.flats):
            flat.div_(self.world.world_size)
            grads = [_grad(self.params[i]) for i in bucket]
            torch._foreach_copy_(grads, torch._utils._unflatten_dense_tensors(flat, grads))
        # A parameter without a gradient on every rank keeps none, so no optimiser moves it.
        # Only a rank that lacked one itself reads the flags (a device sync, off the usual path).
        if self.missing:
            counts = present[self.missing].tolist()
            for index, count in zip(self.missing, counts):
                if count == 0:
                    self.params[index].grad = None
        self.flats = []
        self.works = []


def start_gradient_average(
    parameters: Iterable[torch.nn.Parameter], world: World, bucket_bytes: int = BUCKET_BYTES
) -> PendingAverage:
    """Start averaging the gradients of ``parameters`` over the ranks (asynchronously).

    Gradients go in flat buckets of at most ``bucket_bytes`` (one all-reduce each, all in flight
    together). A gradient that is ``None`` on some ranks counts as zero there (as in DDP); one
    that is ``None`` on every rank stays ``None``. Free in one process.
    """
    params = list(parameters)
    if not world.is_distributed or not params:
        return PendingAverage(params, [], [], [], world)
    flags, missing = [], []
    for index, param in enumerate(params):
        if param.grad is None:
            param.grad = torch.zeros_like(param)
            flags.append(0.0)
            missing.append(index)
        elif param.grad.is_sparse:
            raise DistributedError(
                f"parameter {index} of shape {tuple(param.shape)} has a sparse gradient; "
                "averaging sparse gradients across ranks is not supported"
            )
        else:
            flags.append(1.0)
    present = torch.tensor(flags, dtype=params[0].dtype).to(params[0].device, non_blocking=True)
    buckets = _buckets(params, bucket_bytes)
    flats, works = [], []
    for number, bucket in enumerate(buckets):
        tensors = [_grad(params[i]) for i in bucket]
        if number == 0:
            tensors.append(present.to(tensors[0].dtype))
        flat = torch._utils._flatten_dense_tensors(tensors)
        works.append(
            collective(
                "gradient all-reduce",
                world,
                functools.partial(dist.all_reduce, flat, async_op=True),
            )
        )
        flats.append(flat)
    return PendingAverage(params, buckets, flats, works, world, missing)


def average_gradients(parameters: Iterable[torch.nn.Parameter], world: World) -> None:
    """Replace each gradient by its mean over the ranks (see ``start_gradient_average``)."""
    if world.is_distributed:
        start_gradient_average(parameters, world).wait()


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    assert param.grad is not None, "start_gradient_average gives every parameter a gradient"
    return param.grad


def _buckets(params: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``params`` grouped by dtype and device, each group cut at ``bucket_bytes``.

    The grouping depends only on the parameters (never on which gradients exist), so every rank
    builds the same buckets. The first bucket also carries the presence flags.
    """
    groups: dict[tuple[torch.dtype, torch.device], list[list[int]]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for index, param in enumerate(params):
        key = (param.dtype, param.device)
        nbytes = param.numel() * param.element_size()
        if key not in groups or sizes[key] + nbytes > bucket_bytes:
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(index)
        sizes[key] += nbytes
    return [bucket for buckets in groups.values() for bucket in buckets if bucket]


# ------------------------------------------------------------ other collectives


def broadcast_module(module: torch.nn.Module, world: World) -> None:
    """Copy rank 0's parameters and buffers to every rank, so all ranks start identical."""
    if world.is_distributed:
        _broadcast([*module.parameters(), *module.buffers()], world)


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics, which each rank updates from
    its own batches) to every rank; free for a model without buffers."""
    if world.is_distributed:
        _broadcast(list(module.buffers()), world)


def _broadcast(tensors: list[torch.Tensor], world: World) -> None:
    tensors = [tensor for tensor in tensors if tensor.numel() > 0]
    if not world.is_distributed or not tensors:
        return
    target = collective_device()
    with torch.no_grad():
        for bucket in _buckets(tensors, BUCKET_BYTES):
            group = [tensors[i].detach() for i in bucket]
            flat = torch._utils._flatten_dense_tensors(group).to(target)
            collective("parameter broadcast", world, functools.partial(dist.broadcast, flat, 0))
            flat = flat.to(group[0].device)
            for tensor, value in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                tensor.copy_(value)


def sum_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum of ``values`` over the ranks (returns ``values`` in one process), on
    the device ``values`` came from."""
    if not world.is_distributed:
        return values
    summed = values.detach().to(collective_device(), copy=True)
    collective("metric sum", world, lambda: dist.all_reduce(summed))
    return summed.to(values.device)


def sum_named_over_ranks(values: Mapping[str, torch.Tensor], world: World) -> dict[str, float]:
    """Sums over the ranks of named scalars, read once. A name missing on some rank (one that
    ran no evaluation batch) counts as zero there; the names are agreed first."""
    names = sorted(values)
    if world.is_distributed:
        gathered: list[Any] = [None] * world.world_size
        collective("metric names", world, lambda: dist.all_gather_object(gathered, names))
        names = sorted({name for rank_names in gathered for name in rank_names})
    if not names:
        return {}
    device = next(iter(values.values())).device if values else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float64, device=device)
    stacked = torch.stack(
        [values[name].detach().double().reshape(()) if name in values else zero for name in names]
    ).cpu()
    totals = sum_over_ranks(stacked, world).tolist()
    return dict(zip(names, totals))


def any_rank(flag: bool, world: World) -> bool:
    """Whether ``flag`` is true on at least one rank (one small all-reduce; ``flag`` itself in
    one process)."""
    if not world.is_distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=collective_device())
    collective("stop agreement", world, lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
    return bool(value.item())


def all_ranks_agree(flags: list[bool], world: World) -> list[bool]:
    """Each flag is true only where it is true on every rank, so that every rank switches the
    same updates on and off (a rank that skipped a backward would otherwise break the gradient
    average). One small all-reduce; free in one process."""
    if not world.is_distributed or not flags:
        return flags
    values = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int64)
    values = values.to(collective_device())
    collective(
        "update flag agreement", world, lambda: dist.all_reduce(values, op=dist.ReduceOp.MIN)
    )
    return [bool(value) for value in values.tolist()]
