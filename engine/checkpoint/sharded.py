"""Sharded checkpoints for FSDP2 runs: ``torch.distributed.checkpoint`` (DCP), each rank writing
its own shards, inside this engine's atomic, hash-checked checkpoint folders.

Layout of one checkpoint (``checkpoints/<name>/``)::

    shards/          DCP: one ``__<rank>_0.distcp`` per rank and ``.metadata``: the model's
                     and every role's optimiser state, as the ranks hold them (DTensor shards)
    model.pt         the full model state in plain tensors (rank 0): ``torch.load`` reads it
                     without this package, as a DDP run's ``model.pt``
    training.pt      the rest of the training state (rank 0; weights-only, as a DDP run's)
    meta.json        format version, ``"kind": "sharded"``, the world size, which parameters
                     of each role have optimiser state, the caller's meta
    COMPLETE         written last by rank 0: size and sha256 of every other file, shards too

Saving is collective: every rank writes its shards into a hidden staging folder (the name
rank 0 chose), the full model state is gathered to rank 0, rank 0 writes the other files, its
marker, fsyncs, and renames the folder into place; then every rank returns. A crash or a
``kill -9`` of the ranks at any moment leaves the staging folder without a marker, never
loaded: the previous checkpoint stays the one ``latest_sharded`` finds. Saving, the full-state
export and loading first put every FSDP unit back on its shards (``engine/distributed/units.py``):
a unit left gathered by a forward without backward (``fsdp_reshard_after_forward=False``) lists
its gathered copies as the model's parameters, which the optimisers' state can not be matched to.

Loading verifies every file against the marker first (sizes and hashes), then DCP reads the
shards into the model and optimisers as the loading ranks hold them: the same world size
resumes exactly; another world size (2 ranks to 1, or to an unsharded model) reshards. DCP
reads its ``.metadata`` with ``pickle``; it is unpickled here first through an allow-list of
DCP's metadata classes, so a checkpoint can not run code. A parameter that had no optimiser
state when saved (it never received a gradient) has none after loading.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import attrs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from engine.checkpoint.format import (
    MARKER,
    META_FILE,
    MODEL_FILE,
    OLD_PREFIX,
    SHARDED,
    SHARDS_DIR,
    STAGING_PREFIX,
    TRAINING_FILE,
    check_weights_only_payload,
    file_record,
    fsync_all,
    fsync_dir,
    load_torch_file,
    read_marker,
    remove_stale_folders,
)
from engine.distributed.collectives import World
from engine.distributed.units import reshard_model
from engine.errors import CheckpointError

FORMAT_VERSION = 1
KIND = SHARDED
SHARDS = SHARDS_DIR


@attrs.frozen
class ShardedCheckpoint:
    """A sharded checkpoint after ``load_sharded`` put its model and optimiser states in
    place: its folder, meta and the rest of its training state."""

    path: Path
    meta: dict[str, Any]
    training_state: dict[str, Any]


# ------------------------------------------------------------------ saving


def save_sharded(
    directory: Path,
    names: list[str],
    model: nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    training_state: Mapping[str, Any],
    meta: Mapping[str, Any],
    world: World,
    durable: bool = True,
    shards_written: Callable[[], None] | None = None,
) -> list[Path]:
    """Save on every rank (collective); the checkpoint is installed under each of ``names`` in
    ``directory`` once every file is written and its marker with it. ``shards_written`` is
    called on every rank once the shards are on disk, before the marker (progress reports;
    the crash tests stop the ranks there)."""
    if not names:
        raise CheckpointError(f"save_sharded needs at least one name, got {names!r}")
    check_weights_only_payload(dict(training_state), TRAINING_FILE)
    reshard_model(model)  # a unit left gathered lists copies the optimisers do not know
    staging = directory / f"{STAGING_PREFIX}{names[0]}-{_agreed_stamp(world)}"
    if world.is_main:
        staging.mkdir(parents=True)
    _barrier(world)
    states, with_state = _optimizer_states(model, optimizers)
    with _one_process_is_meant(world):
        dcp.save(
            {"model": get_model_state_dict(model), "optimizers": states},
            storage_writer=FileSystemWriter(staging / SHARDS, sync_files=durable),
            no_dist=not world.is_distributed,
        )
    if shards_written is not None:
        shards_written()
    full = full_model_state(model)
    if world.is_main:
        groups = {role: opt.state_dict()["param_groups"] for role, opt in optimizers.items()}
        torch.save(full, str(staging / MODEL_FILE))
        torch.save({**training_state, "optimizer_groups": groups}, str(staging / TRAINING_FILE))
        sharded_meta = {
            "format": FORMAT_VERSION,
            "kind": KIND,
            "world_size": world.world_size,
            "optimizer_state": with_state,
            "saved_at_ns": time.time_ns(),
            **meta,
        }
        (staging / META_FILE).write_text(json.dumps(sharded_meta, indent=2, default=str))
        _write_marker(staging, durable)
        _install_everywhere(directory, names, staging, durable)
    _barrier(world)
    return [directory / name for name in names]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state in plain CPU tensors on rank 0 (an empty dict on the other ranks,
    a sharded model's parameters gathered: collective, every rank calls it); the plain
    ``state_dict`` of a model that is not sharded."""
    reshard_model(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))


def agreed(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (collective): the folder every rank writes its shards
    into, a decision made from what only rank 0 reads."""
    if not world.is_distributed:
        return value
    chosen = [value]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


@contextlib.contextmanager
def _one_process_is_meant(world: World) -> Iterator[None]:
    """Without DCP's warning that it assumes one process, where one process is meant."""
    with warnings.catch_warnings():
        if not world.is_distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _agreed_stamp(world: World) -> str:
    """A name for the staging folder, chosen by rank 0 and known to every rank."""
    stamp = [f"{os.getpid()}-{time.time_ns()}"]
    if world.is_distributed:
        dist.broadcast_object_list(stamp, src=0)
    return str(stamp[0])


def _barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()


def _optimizer_states(
    model: nn.Module, optimizers: Mapping[str, torch.optim.Optimizer]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Each role's optimiser state keyed by parameter name, and the names that have state.

    An optimiser that never stepped is left out: asking torch for its state dict would first
    initialise its state with a step at learning rate 0, which changes what a run resumed
    from this checkpoint does next (Adam's step count)."""
    states: dict[str, Any] = {}
    with_state: dict[str, list[str]] = {}
    for role, optimizer in optimizers.items():
        if not optimizer.state:
            with_state[role] = []
            continue
        state = get_optimizer_state_dict(model, optimizer)
        states[role] = state
        with_state[role] = sorted(state["state"])  # type: ignore[arg-type]
    return states, with_state


def _write_marker(folder: Path, durable: bool) -> None:
    """Sizes and hashes of every file of ``folder`` (shards included), then the marker."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    records = {str(p.relative_to(folder)): attrs.asdict(file_record(p)) for p in files}
    text = json.dumps({"format": FORMAT_VERSION, "kind": KIND, "files": records}, indent=2)
    if durable:
        fsync_all([*files, *(p for p in folder.rglob("*") if p.is_dir()), folder])
    (folder / MARKER).write_text(text)
    if durable:
        fsync_all([folder / MARKER, folder])


def _install_everywhere(directory: Path, names: list[str], staging: Path, durable: bool) -> None:
    """Rename the staging folder to the first name, copies (hard links) to the others; each
    name replaced whole or not at all."""
    stagings = [staging]
    for name in names[1:]:
        copy = staging.with_name(f"{staging.name}-{name}")
        shutil.copytree(staging, copy, copy_function=_link_or_copy)
        stagings.append(copy)
    replaced = []
    for name, folder in zip(names, stagings):
        final = directory / name
        if final.exists():
            old = directory / f"{OLD_PREFIX}{name}-{os.getpid()}-{time.time_ns()}"
            os.rename(final, old)
            replaced.append(old)
        os.rename(folder, final)
    if durable:
        fsync_dir(directory)
    for old in replaced:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_folders(directory)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# ------------------------------------------------------------------ loading


def read_sharded_marker(path: Path) -> dict[str, Any]:
    """The marker of sharded checkpoint ``path``; a missing, corrupt or foreign one (a DDP
    run's checkpoint) is a ``CheckpointError`` naming it."""
    marker = read_marker(Path(path))
    if marker.get("kind") != KIND:
        raise CheckpointError(
            f"checkpoint {path} was written by a DDP (unsharded) run; an FSDP run resumes "
            "from sharded checkpoints only (load its model.pt as weights instead)"
        )
    return marker


def verify_sharded(path: Path) -> None:
    """Every file of sharded checkpoint ``path`` has the size and hash its marker records."""
    marker = read_sharded_marker(path)
    for name, record in marker["files"].items():
        target = Path(path) / name
        if not target.is_file():
            raise CheckpointError(f"checkpoint file {target} is missing")
        found = file_record(target)
        if found.size != record.get("size") or found.sha256 != record.get("sha256"):
            raise CheckpointError(
                f"checkpoint file {target} is truncated or corrupt: its size or sha256 "
                "differs from the one its marker records"
            )


def latest_sharded(directory: Path) -> Path | None:
    """The most recently saved sharded checkpoint of ``directory`` whose files match its
    marker, or None; folders without a marker (interrupted saves) are never taken."""
    found: list[tuple[int, Path]] = []
    if not Path(directory).is_dir():
        return None
    for entry in Path(directory).iterdir():
        if entry.is_dir() and (entry / MARKER).is_file():
            try:
                meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
                read_sharded_marker(entry)
            except (CheckpointError, OSError, ValueError):
                continue
            found.append((int(meta.get("saved_at_ns", 0)), entry))
    for _, path in sorted(found, reverse=True):
        try:
            verify_sharded(path)
        except CheckpointError:
            continue
        return path
    return None


def load_sharded(
    path: Path,
    model: nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    world: World,
) -> ShardedCheckpoint:
    """Put checkpoint ``path``'s model and optimiser states into ``model`` and
    ``optimizers`` (fresh, as built for this run: sharded or not, any world size), after
    verifying it; collective under several ranks. Refusals come before anything changes."""
    path = Path(path)
    verify_sharded(path)
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    _check_metadata(path / SHARDS / ".metadata")
    training = load_torch_file(path / TRAINING_FILE)
    reshard_model(model)
    with_state: dict[str, list[str]] = meta["optimizer_state"]
    unknown = sorted(set(with_state) ^ set(optimizers))
    if unknown:
        raise CheckpointError(
            f"checkpoint {path} holds optimisers for roles {sorted(with_state)}, this run has "
            f"{sorted(optimizers)}"
        )
    model_state = get_model_state_dict(model)
    templates = {
        role: get_optimizer_state_dict(model, optimizers[role])  # initialises fresh state
        for role, names in with_state.items()
        if names
    }
    with _one_process_is_meant(world):
        dcp.load(
            {"model": model_state, "optimizers": templates},
            storage_reader=FileSystemReader(path / SHARDS),
            planner=DefaultLoadPlanner(allow_partial_load=True),
            no_dist=not world.is_distributed,
        )
    set_model_state_dict(model, model_state)
    groups = training.pop("optimizer_groups")
    for role, optimizer in optimizers.items():
        if role in templates:
            set_optimizer_state_dict(model, optimizer, templates[role])
        _keep_state_of(model, optimizer, set(with_state[role]))
        for group, saved in zip(optimizer.param_groups, groups[role]):
            group.update({k: v for k, v in saved.items() if k != "params"})
    return ShardedCheckpoint(path, meta, training)


def _keep_state_of(model: nn.Module, optimizer: torch.optim.Optimizer, names: set[str]) -> None:
    """Drop the optimiser state of parameters that had none when saved."""
    by_id = {id(param): name for name, param in model.named_parameters()}
    for param in list(optimizer.state):
        if by_id.get(id(param)) not in names:
            del optimizer.state[param]


# DCP's metadata classes and what they hold; anything else in ``.metadata`` is refused.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "dtype"),
    ("torch.serialization", "_get_layout"),  # a layout (torch.strided) by its name
    ("pathlib", "PosixPath"),  # where the checkpoint was written (StorageMeta)
    ("pathlib", "WindowsPath"),
}
_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata classes, torch sizes and dtypes; refuses everything else
    (``find_class`` is the one place ``pickle`` lets a reader restrict what loads)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module, name) in _ALLOWED
            or module in _ALLOWED_MODULES
            or (module == "torch" and name in _DTYPES)
        )
        if not allowed:
            raise CheckpointError(f"refused: it names {module}.{name}")
        return super().find_class(module, name)


def _check_metadata(path: Path) -> None:
    """Refuse a ``.metadata`` that would make DCP's ``pickle.load`` run code."""
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except CheckpointError as error:
        raise CheckpointError(
            f"checkpoint file {path} {error}: only DCP's metadata classes may be loaded"
        ) from None
    except Exception as error:
        raise CheckpointError(f"checkpoint file {path} can not be read: {error}") from error
