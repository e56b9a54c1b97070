"""The process group a run belongs to, and the collective operations the engine needs.

A single process is a world of size one, where every operation here is free. Under ``torchrun``
the environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` describe the world.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import attrs
import torch
import torch.distributed as dist


@attrs.frozen
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def current_world() -> World:
    """The world of an initialised process group, or of this single process."""
    if dist.is_available() and dist.is_initialized():
        return World(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    return World()


def average_gradients(parameters: Iterable[torch.nn.Parameter], world: World) -> None:
    """Replace each gradient by its mean over the ranks (one flat all-reduce per call)."""
    if not world.is_distributed:
        return
    params = list(parameters)
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world.world_size)
    for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)


def sum_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum of ``values`` over the ranks (returns ``values`` in one process)."""
    if world.is_distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_ranks_agree(flags: list[bool], world: World) -> list[bool]:
    """Each flag is true only where it is true on every rank, so that every rank switches the
    same updates on and off (a rank that skipped a backward would otherwise break the gradient
    average). One small all-reduce; free in one process."""
    if not world.is_distributed or not flags:
        return flags
    values = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int64)
    dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return [bool(value) for value in values.tolist()]
