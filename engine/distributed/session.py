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

Every path out of a process group goes through ``leave_process_group`` (at exit, by hand, and in
the tests and benchmarks that join with ``join_process_group``): it destroys the group so that
the group's destructor waits for its pending work and joins gloo's worker threads while the
interpreter is whole. A worker thread that outlives the interpreter aborts the process ("terminate
called without an active exception"): it drops the last reference to the tensors of a finished
collective, which needs the GIL, and a thread that asks for the GIL during interpreter shutdown
is ended in the middle of a C++ destructor.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import importlib
import os
import sys
import time
from collections.abc import Iterator, Mapping

import attrs
import torch
import torch.distributed as dist

from engine.distributed.collectives import World, collective, current_world
from engine.errors import DistributedError
from engine.hardware.device import resolve_device

_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")
# torch modules that bind ``group.WORLD`` as a default argument when first imported. Imported
# while a group exists, they hold it for good, so destroying it can not join its worker threads;
# torch._dynamo imports the first one, and torch.optim imports torch._dynamo when the first
# optimiser is built, i.e. after every fit has joined. They are imported before joining.
_BINDS_THE_GROUP_AT_IMPORT = ("torch.distributed.nn.functional",)
# How long leave_process_group releases the GIL when the group outlives it (held elsewhere), so
# that its worker threads can drop what they hold before the interpreter shuts down.
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
        join_process_group(device_name, timeout_s)
    world = current_world()
    if world.is_distributed:
        collective("the opening barrier", world, dist.barrier)
    yield world
    if world.is_distributed:
        collective("the closing barrier", world, dist.barrier)


def leave_process_group() -> None:
    """Destroy the default process group if there is one (idempotent); the one way out.

    Destroying it drops the last reference to the group (``join_process_group`` made sure torch
    keeps none; references in garbage cycles, such as a failed collective's traceback, are
    collected), and the group's destructor, which runs without the GIL, waits for the work
    still queued and joins its worker threads: afterwards no thread of it is left to take the
    GIL during interpreter shutdown. A group someone else still references outlives this call
    (its threads too); the interpreter then lets go of the GIL for a moment so that those
    threads can drop the tensors of the last collective while it is whole.

    No barrier here: this also runs at exit after an error on one rank, when the others may be
    inside another collective (a barrier would be matched against it). A ``fit`` ends with its
    own closing barrier.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = dist.group.WORLD
    dist.destroy_process_group()
    # Two references: ``group`` and getrefcount's argument. A third may sit in a reference
    # cycle (a failed collective's traceback holds one): collect those first.
    if sys.getrefcount(group) > 2:
        gc.collect()
    if sys.getrefcount(group) > 2:  # held elsewhere: its threads outlive this call
        time.sleep(_GIL_HANDOVER_S)
    del group  # the destructor runs here, waiting for the group's threads


def join_process_group(device_name: str, timeout_s: float) -> World:
    """Initialise the default process group the environment describes (nothing in one
    process), on the local rank's device, with ``timeout_s`` for every collective; leave it
    with ``leave_process_group`` (registered to run at exit). Returns this process's world."""
    env = launch_environment()
    if not env.is_distributed:
        return current_world()
    if not dist.is_available():
        raise DistributedError(
            f"WORLD_SIZE={env.world_size} but this torch build has no torch.distributed"
        )
    device = resolve_device(device_name, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    for name in _BINDS_THE_GROUP_AT_IMPORT:
        importlib.import_module(name)
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
    return current_world()


def _env_int(env: Mapping[str, str], name: str, default: str) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None
