"""What the ranks run for ``tests/engine/test_sharded_checkpoint.py``.

``spawn``: 2 gloo ranks train the FSDP2 GAN loop of ``fsdp_worker`` (two-phase, n_critic 2,
so after the first window the generator's optimiser has no state yet), save a sharded
checkpoint after window 0, train on (the reference), then fresh models and optimisers (built
from other seeds) load the checkpoint and train the same windows: the two endings must be
bitwise equal. Each rank also records the full model and optimiser states at the save, for the
2 -> 1 load the test process makes.

``python -m tests.engine.dcp_worker kill FOLDER`` (launched per rank by the test with
torchrun's variables): saves checkpoint ``A``, then starts saving ``B`` and, once its shards
are written, says so in a file and waits to be killed (``kill -9``) before the marker.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from engine.checkpoint.sharded import latest_sharded, load_sharded, save_sharded
from engine.distributed.collectives import World
from engine.distributed.session import leave_process_group
from tests.engine.ddp_worker import free_port, global_batches, share
from tests.engine.fsdp_worker import CASES, Loop, full_parameters, make_loop

CASE = CASES["two-phase n_critic 2, accumulation 2"]
WINDOWS = 4
SAVED_AFTER = 1  # windows trained before the save


def windows(loop: Loop, world: World, start: int, stop: int) -> None:
    k = CASE.micro_count
    batches = global_batches(WINDOWS, k)
    for window in range(start, stop):
        loop.window(window, [share(b, world) for b in batches[window * k : (window + 1) * k]])


def full_optimizer_states(loop: Loop) -> dict[str, Any]:
    """Each role's optimiser state as full tensors, copied (torch hands out the live step
    counters otherwise)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        role: _copied(get_optimizer_state_dict(loop.model, optimizer, options=options))
        if optimizer.state
        else {}
        for role, optimizer in loop.optimizers.items()
    }


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item) for item in value)
    return value


def run_resume(world: World, folder: Path) -> dict[str, Any]:
    checkpoints = folder / "checkpoints"
    loop = make_loop(CASE, "fsdp", world)
    windows(loop, world, 0, SAVED_AFTER)
    at_save = {"params": full_parameters(loop.model), "optimizers": full_optimizer_states(loop)}
    training = {"windows": SAVED_AFTER, "note": "plain values only"}
    save_sharded(
        checkpoints, ["epoch-0001", "last"], loop.model, loop.optimizers, training, {}, world
    )
    windows(loop, world, SAVED_AFTER, WINDOWS)
    reference = full_parameters(loop.model)
    reference_optimizers = full_optimizer_states(loop)

    fresh = make_loop(CASE, "fsdp", world)  # initial weights: not those of the checkpoint
    found = latest_sharded(checkpoints)
    assert found is not None
    loaded = load_sharded(found, fresh.model, fresh.optimizers, world)
    after_load = {
        "params": full_parameters(fresh.model),
        "optimizers": full_optimizer_states(fresh),
        "state_sizes": {role: len(opt.state) for role, opt in fresh.optimizers.items()},
    }
    windows(fresh, world, int(loaded.training_state["windows"]), WINDOWS)
    return {
        "at_save": at_save,
        "after_load": after_load,
        "training_state": loaded.training_state,
        "found": found.name,
        "reference": reference,
        "reference_optimizers": reference_optimizers,
        "resumed": full_parameters(fresh.model),
        "resumed_optimizers": full_optimizer_states(fresh),
        "resumed_errors": fresh.errors,
    }


def _rank(rank: int, world_size: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = Path(folder)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = run_resume(World(rank, world_size, rank), out)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        leave_process_group()


def spawn(folder: Path, world_size: int = 2) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _rank,
        args=(world_size, free_port(), str(folder)),
        nprocs=world_size,
        start_method="spawn",
        join=True,
    )
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def killed_in_a_save(folder: Path) -> None:
    """Checkpoint ``A`` complete, then ``B`` stopped after its shards (until killed)."""
    torch.set_num_threads(1)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    world = World(rank, world_size, rank)
    loop = make_loop(CASE, "fsdp", world)
    windows(loop, world, 0, 1)
    save_sharded(folder / "checkpoints", ["A"], loop.model, loop.optimizers, {}, {}, world)
    torch.save(full_parameters(loop.model), folder / f"A-rank{rank}.pt")
    windows(loop, world, 1, 2)

    def wait_to_be_killed() -> None:
        (folder / f"shards-written-rank{rank}").write_text("1")
        time.sleep(600)

    save_sharded(
        folder / "checkpoints",
        ["B"],
        loop.model,
        loop.optimizers,
        {},
        {},
        world,
        shards_written=wait_to_be_killed,
    )


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        killed_in_a_save(Path(sys.argv[2]))
