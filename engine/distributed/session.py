"""Joining and leaving the process group of a run launched by ``torchrun`` (or by hand).

``torchrun`` describes the world in the environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and the rendezvous ``MASTER_ADDR``/``MASTER_PORT``. ``process_group`` reads them, picks the
backend from the device (nccl for CUDA, gloo otherwise) and initialises the default process group
once, with the run's timeout; later ``fit`` calls in the same process reuse it, and it is
destroyed when the process exits. A process group the user initialised before ``fit`` is the
explicit setting (any backend, any rendezvous): it is used as it is.

The group is not destroyed between two fits on purpose: re-creating it races (a fast rank can
reach the previous rendezvous store before the slowest rank has closed it).

Ranks enter and leave a run together (an opening and a closing barrier): whatever rank 0 wrote
before a run is complete before any rank reads it, and when ``fit`` returns on any rank, rank 0's
checkpoints and exports of that run are on disk.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import time
from collections.abc import Iterator, Mapping

import attrs
import torch
import torch.distributed as dist

from engine.distributed.collectives import World, collective, current_world
from engine.errors import DistributedError
from engine.hardware.device import resolve_device

_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")
# How long leave_process_group releases the GIL so that collective threads can finish.
_GIL_HANDOVER_S = 0.05


@attrs.frozen
class LaunchEnvironment:
    """What the launcher's environment variables say about this process's world."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launch_environment(environ: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (a single process when ``WORLD_SIZE`` is not
    set or is 1); an incomplete or inconsistent set is a ``DistributedError`` naming it."""
    env = os.environ if environ is None else environ
    world_size = _env_int(env, "WORLD_SIZE", "1")
    if world_size < 1:
        raise DistributedError(f"WORLD_SIZE must be at least 1, got {world_size}")
    if world_size == 1:
        return LaunchEnvironment(0, 1, _env_int(env, "LOCAL_RANK", "0"))
    if "RANK" not in env:
        raise DistributedError(
            f"WORLD_SIZE={world_size} but RANK is not set; launch with torchrun "
            "(e.g. `torchrun --nproc-per-node=2 train.py`) or set RANK for every process"
        )
    missing = [name for name in _RENDEZVOUS if not env.get(name)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world_size} but no rendezvous: {', '.join(missing)} not set; launch "
            "with torchrun, which sets them, or set MASTER_ADDR and MASTER_PORT"
        )
    rank = _env_int(env, "RANK", "0")
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK must be in [0, {world_size}), got {rank}")
    local_rank = _env_int(env, "LOCAL_RANK", str(rank))
    if local_rank < 0:
        raise DistributedError(f"LOCAL_RANK must be non-negative, got {local_rank}")
    return LaunchEnvironment(rank, world_size, local_rank)


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device_name: str, timeout_s: float) -> Iterator[World]:
    """The run's world for the duration of the block.

    Joins the group the environment describes on the first call (later calls, and a group the
    user initialised, are used as they are), or is a single process. A group this joined is
    destroyed when the process exits (or by ``leave_process_group``).

    An error leaves the group as it is. When the failed rank's process ends (``torchrun`` ends
    every rank when one fails), its connections close and the other ranks' pending collective
    fails at once with a ``DistributedError``; if it lives on, they stop at ``timeout_s``.
    Errors every rank raises alike (a bad config, data that can not be sharded) leave the group
    usable, so a corrected ``fit`` in the same processes works.
    """
    if not (dist.is_available() and dist.is_initialized()):
        _join(device_name, timeout_s)
    world = current_world()
    if world.is_distributed:
        collective("the opening barrier", world, dist.barrier)
    yield world
    if world.is_distributed:
        collective("the closing barrier", world, dist.barrier)


def leave_process_group() -> None:
    """Destroy the default process group if there is one (idempotent).

    Before that, the interpreter lets go of the GIL for a moment. A gloo worker thread drops its
    references to the tensors of the last collective just after that collective completes, and
    dropping a tensor that Python has already released needs the GIL; if the process reaches
    interpreter shutdown first, that thread is killed while holding C++ objects and the process
    aborts ("terminate called without an active exception"). Seen about once in 30 two-rank runs
    that exit right after their last collective.
    """
    if dist.is_available() and dist.is_initialized():
        time.sleep(_GIL_HANDOVER_S)
        dist.destroy_process_group()


def _join(device_name: str, timeout_s: float) -> None:
    """Initialise the default process group the environment describes (nothing in one
    process), on the local rank's device, with ``timeout_s`` for every collective."""
    env = launch_environment()
    if not env.is_distributed:
        return
    if not dist.is_available():
        raise DistributedError(
            f"WORLD_SIZE={env.world_size} but this torch build has no torch.distributed"
        )
    device = resolve_device(device_name, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    try:
        dist.init_process_group(
            backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError) as error:
        raise DistributedError(
            f"rank {env.rank} of {env.world_size} could not join the {backend} process group "
            f"at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
            f"{timeout_s} s: {error}"
        ) from error
    atexit.unregister(leave_process_group)
    atexit.register(leave_process_group)


def _env_int(env: Mapping[str, str], name: str, default: str) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None
