"""What a checkpoint holds of a run, and putting it back: an explicit whitelist, both ways.

``capture`` takes the model's ``state_dict``, the strategy's state (optimisers, schedulers,
counters), the GradScaler, ``Progress``, the metric buffer of the current epoch, every RNG
stream, each stateful callback's ``state_dict()``, the run's history and best value, and the
config; its meta record also names each role's optimiser spec (class and arguments, read with
``role_specs``). ``restore_training`` checks a loaded checkpoint against this run (config fields
that decide the data order, model shapes, strategy and its roles, each role's optimiser class and
parameter groups) before it changes anything, then loads it; ``restore_run`` puts back what lives
on the ``RunState``.

Under FSDP2 (``ctx.sharding``) checkpoints are sharded (``engine/checkpoint/sharded.py``):
``capture_sharded`` leaves the optimisers' state out of ``training.pt`` (their moments are
DTensor shards, saved by DCP with the model; ``strategy_optimizers`` finds them by role), and
``restore_training`` loads a sharded checkpoint through ``load_sharded``. ``check_kind`` refuses
a full (DDP or one-process) checkpoint under FSDP and a sharded one under DDP with several
processes; one process loads a sharded checkpoint whole (e.g. 2 ranks -> 1).

Hyperparameters changed on resume: an optimiser argument whose value in this run's spec differs
from the spec the checkpoint was saved with (``lr``, ``weight_decay``, ``betas``...) is applied
to every parameter group of the restored optimiser, and logged; every other value (a learning
rate a scheduler has moved, the moments) stays as saved, so an unchanged config resumes
exactly. Another optimiser class for a role is refused (``CheckpointError``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from loguru import logger

from engine.checkpoint.format import FULL, SHARDED, LoadedCheckpoint
from engine.config.file import copy_tree
from engine.config.specs import role_specs
from engine.distributed.sharding import model_class_name
from engine.errors import CheckpointError
from engine.seeding import rng_states, seed_everything, set_rng_states

if TYPE_CHECKING:
    from engine.config.engine_config import EngineConfig
    from engine.context import StepContext
    from engine.distributed.collectives import World
    from engine.protocols import StepStrategy
    from engine.state import RunState

# Config fields that decide which samples each step sees: a resume must keep them.
SAME_RUN_FIELDS = ("seed", "batch_size", "shuffle", "drop_last", "accumulate_steps")


def stateful_callbacks(callbacks: Iterable[Any]) -> dict[str, Any]:
    """Callbacks with ``state_dict``/``load_state_dict``, keyed by class name (``#n`` for the
    n-th repeat of a class)."""
    found: dict[str, Any] = {}
    for callback in callbacks:
        if not (
            callable(getattr(callback, "state_dict", None))
            and callable(getattr(callback, "load_state_dict", None))
        ):
            continue
        name = type(callback).__name__
        key, index = name, 1
        while key in found:
            key, index = f"{name}#{index}", index + 1
        found[key] = callback
    return found


def rank_state(run: RunState) -> dict[str, Any]:
    """What differs between the ranks of a run: their RNG streams and unread metrics."""
    buffer = run.metric_buffer
    return {
        "rng": rng_states(),
        "metric_buffer": None if buffer is None else buffer.state_dict(),
    }


def gather_rank_states(run: RunState) -> list[dict[str, Any]] | None:
    """Every rank's ``rank_state``, by rank (a collective: every rank calls it at the same
    point); None in a single process."""
    world = run.context.world if run.context is not None else None
    if world is None or not world.is_distributed:
        return None
    import torch.distributed as dist

    states: list[Any] = [None] * world.world_size
    dist.all_gather_object(states, rank_state(run))
    return states


def capture(
    run: RunState,
    callbacks: Iterable[Any],
    monitor_value: float | None = None,
    rank_states: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The model state, the training state and the meta record of ``run`` as it is now.

    ``rank_states`` (from ``gather_rank_states``) keeps every rank's random streams and unread
    metrics; without it only this process's are kept."""
    model_state = {key: value.detach().cpu() for key, value in run.model.state_dict().items()}
    training, meta = _training_and_meta(run, callbacks, monitor_value, rank_states)
    return model_state, training, meta


def capture_sharded(
    run: RunState,
    callbacks: Iterable[Any],
    monitor_value: float | None = None,
    rank_states: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training state and meta record of a sharded checkpoint (``save_sharded`` adds the
    model and the optimisers' state): ``capture``'s, the optimisers' per-parameter state left
    out (their parameter groups stay, for the checks on resume). A callback state holding a
    sharded tensor (DTensor) is refused, naming it: ``training.pt`` holds plain tensors."""
    training, meta = _training_and_meta(run, callbacks, monitor_value, rank_states)
    strategy = copy_tree(training["strategy"])
    for _, optimizer in optimizer_states(strategy):
        optimizer["state"] = {}
    training["strategy"] = strategy
    _refuse_sharded_tensors(training, "training.pt")
    return training, meta


def _refuse_sharded_tensors(value: Any, where: str) -> None:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        raise CheckpointError(
            f"{where} holds a sharded tensor (DTensor) that only DCP can save; a callback that "
            "keeps parameters under FSDP must save them as full tensors (.full_tensor())"
        )
    if isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_sharded_tensors(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _refuse_sharded_tensors(item, f"{where}[{index}]")


def _training_and_meta(
    run: RunState,
    callbacks: Iterable[Any],
    monitor_value: float | None,
    rank_states: list[dict[str, Any]] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    ctx = run.context
    own = rank_state(run) if rank_states is None else rank_states[0]
    training = {
        "strategy": run.strategy.state_dict(),
        "scaler": None if ctx is None or ctx.scaler is None else ctx.scaler.state_dict(),
        "progress": run.progress.state_dict(),
        "metric_buffer": own["metric_buffer"],
        "rng": own["rng"],
        "rank_states": rank_states,
        "callbacks": {key: cb.state_dict() for key, cb in stateful_callbacks(callbacks).items()},
        "run": {
            "history": [dict(record) for record in run.history],
            "best_value": run.best_value,
            "best_epoch": run.best_epoch,
            "monitor": run.monitor,
        },
    }
    meta = {
        "config": run.config.to_dict(),
        "progress": run.progress.state_dict(),
        "world_size": 1 if ctx is None else ctx.world.world_size,
        "strategy": type(run.strategy).__name__,
        "optimizers": optimizer_specs(run.strategy),
        "model": model_class_name(run.model),
        "monitor": {"name": run.monitor, "value": monitor_value, "mode": run.config.monitor_mode},
        "saved_at_ns": time.time_ns(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }
    return training, meta


def strategy_optimizers(strategy: Any) -> dict[str, torch.optim.Optimizer]:
    """Each role's optimiser, read from the strategy's ``updates`` (``Standard``) or its
    ``joint.updates`` (the multi-role strategies): what a sharded checkpoint saves by role. A
    strategy that keeps its optimisers otherwise can not be checkpointed sharded (an error
    naming it)."""
    updates = getattr(strategy, "updates", None)
    if updates is None:
        updates = getattr(getattr(strategy, "joint", None), "updates", None)
    if updates is None:
        raise CheckpointError(
            f"strategy {type(strategy).__name__} exposes no per-role optimisers (an `updates` "
            "list of objects with `role` and `optimizer`); a sharded (FSDP) checkpoint saves "
            "each role's optimiser state through them"
        )
    return {update.role: update.optimizer for update in updates}


def check_kind(checkpoint: LoadedCheckpoint, parallel: str, world: World) -> None:
    """The checkpoint's kind fits this run: sharded under ``parallel="fsdp"``, full under
    ``"ddp"`` with several processes; one process (which can not shard) also loads a sharded
    checkpoint whole. Checked before anything is placed or loaded."""
    if parallel == "fsdp" and checkpoint.kind != SHARDED:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} is a {checkpoint.kind} checkpoint (written by a DDP "
            f"or one-process run); this run has parallel='fsdp', which resumes from {SHARDED} "
            "checkpoints only: resume it with parallel='ddp', or start from its model.pt"
        )
    if parallel == "ddp" and checkpoint.kind == SHARDED and world.is_distributed:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} is a {SHARDED} checkpoint (written by an FSDP run); "
            f"this run has parallel='ddp' on {world.world_size} processes, which resumes from "
            f"{FULL} checkpoints: resume it with parallel='fsdp' (or in one process, which "
            "loads it whole)"
        )


def optimizer_specs(strategy: Any) -> dict[str, dict[str, Any]]:
    """Each role's optimiser spec as plain JSON values: ``{role: {"name", "params"}}``."""
    return {
        role: {"name": spec.name, "params": _plain(dict(spec.params))}
        for role, (spec, _) in role_specs(strategy).items()
    }


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples as lists), so saved and new specs compare."""
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------ checks before loading


def _check_same_run(checkpoint: LoadedCheckpoint, config: EngineConfig, world: World) -> None:
    """The data order must be the same: the same seed, shuffle, drop_last and accumulation, and
    the same batch per process; or, at an epoch boundary, another number of processes with the
    same global batch (``batch_size * world_size``: every global batch then holds the same
    samples, split differently)."""
    saved = checkpoint.meta.get("config", {})
    current = config.to_dict()
    for field in SAME_RUN_FIELDS:
        if field == "batch_size" or field not in saved or saved[field] == current[field]:
            continue
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written with {field}={saved[field]!r}; this "
            f"run has {field}={current[field]!r}. Resuming would not continue the same run "
            f"(these fields must match: {list(SAME_RUN_FIELDS)})"
        )
    saved_world = int(checkpoint.meta.get("world_size", 1))
    saved_batch = saved.get("batch_size", config.batch_size)
    if saved_world == world.world_size:
        if saved_batch != config.batch_size:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written with batch_size={saved_batch!r}; this "
                f"run has batch_size={config.batch_size!r}. Resuming would not continue the same "
                f"run (these fields must match: {list(SAME_RUN_FIELDS)})"
            )
        return
    saved_global, global_batch = saved_batch * saved_world, config.batch_size * world.world_size
    if saved_global != global_batch:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written by {saved_world} process(es) with "
            f"batch_size={saved_batch} (global batch {saved_global}); this run has "
            f"{world.world_size} with batch_size={config.batch_size} (global batch "
            f"{global_batch}): the global batch must stay the same"
        )
    position = checkpoint.meta.get("progress", {}).get("batch_in_epoch", 0)
    if position != 0:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was saved at batch {position} of an epoch by "
            f"{saved_world} process(es); a run with {world.world_size} can resume only from "
            "a checkpoint saved at an epoch boundary"
        )


def _check_model(checkpoint: LoadedCheckpoint, model: torch.nn.Module) -> None:
    where = checkpoint.path / "model.pt"
    saved, current = checkpoint.model_state, model.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {where} is foreign to model {type(model).__name__}: missing keys "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in current.items():
        other = saved[key]
        if not isinstance(other, torch.Tensor):
            raise CheckpointError(f"checkpoint {where} entry {key!r} is not a tensor")
        if other.shape != value.shape or other.dtype != value.dtype:
            raise CheckpointError(
                f"checkpoint {where} is foreign to model {type(model).__name__}: {key!r} is "
                f"{tuple(other.shape)} {other.dtype} there, {tuple(value.shape)} {value.dtype} "
                "here"
            )


def _key_tree(value: Any, depth: int) -> Any:
    if depth == 0 or not isinstance(value, Mapping):
        return None
    return {key: _key_tree(item, depth - 1) for key, item in value.items()}


def _check_strategy(checkpoint: LoadedCheckpoint, strategy: StepStrategy) -> None:
    saved_name = checkpoint.meta.get("strategy")
    name = type(strategy).__name__
    if saved_name != name:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written by strategy {saved_name!r}; this run uses "
            f"{name!r}"
        )
    saved = checkpoint.training_state.get("strategy")
    # Two levels of keys: the strategy's parts and, below them, its roles.
    expected, found = _key_tree(strategy.state_dict(), 2), _key_tree(saved, 2)
    if expected != found:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds strategy state with parts/roles {found}; "
            f"this {name} strategy has {expected}"
        )


def optimizer_states(
    state: Any, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every optimiser ``state_dict`` (a mapping with ``state`` and ``param_groups``) inside a
    strategy's state, with its path of keys (e.g. ``("updates", "generator", "optimizer")``)."""
    if not isinstance(state, Mapping):
        return
    if set(state) == {"state", "param_groups"}:
        yield path, state
        return
    for key, value in state.items():
        yield from optimizer_states(value, (*path, str(key)))


def _check_optimizers(checkpoint: LoadedCheckpoint, strategy: StepStrategy) -> None:
    """Each role's optimiser: the same class as saved (where the checkpoint names it), and the
    same parameter groups (count, parameters per group, hyperparameter names)."""
    saved_specs = checkpoint.meta.get("optimizers") or {}
    for role, (spec, _) in role_specs(strategy).items():
        saved = saved_specs.get(role, {}).get("name")
        if saved is not None and saved != spec.name:
            raise CheckpointError(
                f"checkpoint {checkpoint.path}: role {role!r} was trained with optimiser "
                f"{saved}; this run gives it {spec.name}. Its saved state (moments, step counts) "
                f"does not fit another class: resume with {saved}, or start a new run"
            )
    saved_states = dict(optimizer_states(checkpoint.training_state.get("strategy")))
    for path, current in optimizer_states(strategy.state_dict()):
        if path in saved_states:
            _check_groups(checkpoint, ".".join(path), saved_states[path], current)


def _check_groups(checkpoint: LoadedCheckpoint, where: str, saved: Any, current: Any) -> None:
    saved_groups, groups = saved["param_groups"], current["param_groups"]
    if len(saved_groups) != len(groups):
        raise CheckpointError(
            f"checkpoint {checkpoint.path}: optimiser {where} has {len(saved_groups)} parameter "
            f"group(s) there, {len(groups)} in this run"
        )
    for index, (old, new) in enumerate(zip(saved_groups, groups)):
        if len(old["params"]) != len(new["params"]):
            raise CheckpointError(
                f"checkpoint {checkpoint.path}: parameter group {index} of optimiser {where} "
                f"holds {len(old['params'])} parameters there, {len(new['params'])} in this run"
            )
        old_keys, new_keys = set(old) - {"params"}, set(new) - {"params"}
        if old_keys != new_keys:
            raise CheckpointError(
                f"checkpoint {checkpoint.path}: optimiser {where} was saved with "
                f"hyperparameters {sorted(old_keys)}, this run's has {sorted(new_keys)}: "
                "another optimiser class"
            )


def changed_hyperparameters(
    checkpoint: LoadedCheckpoint, strategy: Any
) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Per role, the optimiser arguments whose value in this run's spec differs from the spec
    the checkpoint was saved with: ``{role: {name: (saved, new)}}`` (a removed argument goes
    back to the class's default and is not listed)."""
    saved_specs = checkpoint.meta.get("optimizers") or {}
    changed: dict[str, dict[str, tuple[Any, Any]]] = {}
    for role, (spec, _) in role_specs(strategy).items():
        saved = saved_specs.get(role)
        if saved is None or saved.get("name") != spec.name:
            continue
        new = _plain(dict(spec.params))
        old = saved.get("params", {})
        differ = {key: (old.get(key), value) for key, value in new.items() if old.get(key) != value}
        if differ:
            changed[role] = differ
    return changed


def _apply_hyperparameters(
    checkpoint: LoadedCheckpoint, strategy: Any, state: Mapping[str, Any]
) -> tuple[Mapping[str, Any], list[str]]:
    """``state`` (the saved strategy state) with each changed argument set in every parameter
    group of its role's optimiser (the optimiser under a path that names the role); a changed
    ``lr`` also becomes the base learning rate of the scheduler beside it. With a line per role
    for ``train.log``."""
    changed = changed_hyperparameters(checkpoint, strategy)
    notes: list[str] = []
    if not changed:
        return state, notes
    patched = copy_tree(state)
    for path, optimizer in list(optimizer_states(patched)):
        role = next((role for role in changed if role in path), None)
        if role is None:
            continue
        values = {key: new for key, (_, new) in changed[role].items()}
        for group in optimizer["param_groups"]:
            _set_group(group, values)
        if "lr" in values:
            _rebase_scheduler(_parent(patched, path), values["lr"])
        text = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed[role].items())
        notes.append(
            f"resume: role {role!r} optimiser arguments changed in the config: {text}; "
            "applied to the restored optimiser"
        )
    return patched, notes


def _set_group(group: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if key in group:
            group[key] = tuple(value) if isinstance(group[key], tuple) else value
    if "lr" in values and "initial_lr" in group:
        group["initial_lr"] = values["lr"]


def _parent(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in path[:-1]:
        node = node[key]
    return node


def _rebase_scheduler(parent: Any, lr: Any) -> None:
    """The schedule continues at its position from the new base learning rate."""
    scheduler = parent.get("scheduler") if isinstance(parent, Mapping) else None
    if isinstance(scheduler, dict) and isinstance(scheduler.get("base_lrs"), list):
        scheduler["base_lrs"] = [lr] * len(scheduler["base_lrs"])


def _required(checkpoint: LoadedCheckpoint, key: str) -> Any:
    state = checkpoint.training_state
    if key not in state:
        raise CheckpointError(
            f"checkpoint file {checkpoint.path / 'training.pt'} has no {key!r} entry; "
            f"entries: {sorted(state)}"
        )
    return state[key]


# ------------------------------------------------------------------ loading


def restore_training(
    checkpoint: LoadedCheckpoint,
    model: torch.nn.Module,
    strategy: StepStrategy,
    ctx: StepContext,
    callbacks: Iterable[Any],
    config: EngineConfig,
) -> tuple[str, ...]:
    """Check ``checkpoint`` against this run, then load model, strategy (with the optimiser
    arguments this run changed applied), scaler, progress and callback states. Nothing is
    changed when a check fails. Returns lines for ``train.log`` (the arguments applied)."""
    _check_same_run(checkpoint, config, ctx.world)
    _check_model(checkpoint, model)
    _check_strategy(checkpoint, strategy)
    _check_optimizers(checkpoint, strategy)
    for key in ("progress", "rng", "run", "callbacks", "scaler", "metric_buffer"):
        _required(checkpoint, key)
    scaler_state = checkpoint.training_state["scaler"]
    if (scaler_state is None) != (ctx.scaler is None):
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written with precision "
            f"{checkpoint.meta.get('config', {}).get('precision')!r} "
            f"({'no ' if scaler_state is None else ''}GradScaler); this run has precision "
            f"{config.precision!r}"
        )
    notes = _load_strategy(checkpoint, strategy)
    if checkpoint.kind == SHARDED:
        _load_shards(checkpoint, model, strategy, ctx.world)
    else:
        with torch.no_grad():
            model.load_state_dict(checkpoint.model_state)
    if ctx.scaler is not None:
        ctx.scaler.load_state_dict(scaler_state)
    try:
        ctx.progress.load_state_dict(checkpoint.training_state["progress"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {checkpoint.path}: malformed progress ({type(error).__name__}: {error})"
        ) from error
    _load_callbacks(checkpoint, callbacks)
    return tuple(notes)


def _load_shards(
    checkpoint: LoadedCheckpoint, model: torch.nn.Module, strategy: Any, world: World
) -> None:
    """The model's and the optimisers' state from a sharded checkpoint's DCP shards, into the
    model as this run holds it (sharded on any number of ranks, or whole in one process); the
    parameter groups stay as ``_load_strategy`` set them (with the arguments this run
    changed)."""
    from engine.checkpoint.sharded import load_sharded

    optimizers = strategy_optimizers(strategy)
    groups = {
        role: [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
        for role, opt in optimizers.items()
    }
    load_sharded(checkpoint.path, model, optimizers, world)
    for role, optimizer in optimizers.items():
        for group, kept in zip(optimizer.param_groups, groups[role]):
            group.update(kept)


def _load_strategy(checkpoint: LoadedCheckpoint, strategy: StepStrategy) -> list[str]:
    saved = checkpoint.training_state["strategy"]
    state, notes = _apply_hyperparameters(checkpoint, strategy, saved)
    try:
        strategy.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {checkpoint.path}: the strategy state does not fit this "
            f"{type(strategy).__name__} strategy ({type(error).__name__}: {error})"
        ) from error
    return notes


def _load_callbacks(checkpoint: LoadedCheckpoint, callbacks: Iterable[Any]) -> None:
    """Each stateful callback's saved state; one missing on either side is a warning."""
    saved_callbacks = checkpoint.training_state["callbacks"]
    current = stateful_callbacks(callbacks)
    for key, callback in current.items():
        if key not in saved_callbacks:
            logger.warning(f"checkpoint {checkpoint.path} has no state for callback {key}")
            continue
        try:
            callback.load_state_dict(saved_callbacks[key])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint {checkpoint.path}: the state of callback {key} does not load "
                f"({type(error).__name__}: {error})"
            ) from error
    for key in sorted(set(saved_callbacks) - set(current)):
        logger.warning(f"checkpoint {checkpoint.path} holds state of callback {key}, not in run")


def restore_run(checkpoint: LoadedCheckpoint, run: RunState) -> None:
    """Put back the run's history, best value, metric buffer and, last, the RNG streams (this
    rank's own where the checkpoint holds every rank's)."""
    try:
        saved = checkpoint.training_state["run"]
        run.history[:] = [dict(record) for record in saved["history"]]
        run.best_value = saved["best_value"]
        run.best_epoch = saved["best_epoch"]
        own = checkpoint.training_state
        per_rank = own.get("rank_states")
        world = run.context.world if run.context is not None else None
        has_own = False
        if per_rank is not None and world is not None and len(per_rank) == world.world_size:
            own, has_own = per_rank[world.rank], True
        # (else one process, or saved without the other ranks' states: rank 0's)
        buffer_state = own["metric_buffer"]
        if run.metric_buffer is not None and buffer_state is not None:
            device = run.context.device if run.context is not None else torch.device("cpu")
            run.metric_buffer.load_state_dict(buffer_state, device)
        set_rng_states(own["rng"])
        if world is not None and world.rank > 0 and not has_own:
            _reseed_missing_rank(run, checkpoint.path, world.rank)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint file {checkpoint.path / 'training.pt'} has a malformed run state "
            f"({type(error).__name__}: {error})"
        ) from error


def _reseed_missing_rank(run: RunState, path: Path, rank: int) -> None:
    """A checkpoint without this rank's random streams (written by one process, or by rank 0
    alone when a run crashed) would give every rank rank 0's streams, and so the same dropout
    and sampling noise. Rank ``r`` draws fresh streams from ``(seed + r, step)`` instead, as a
    new run would; the resumed run is then not bitwise the uninterrupted one on this rank."""
    seed_everything((run.config.seed + rank) * 1_000_003 + run.progress.step)
    logger.warning(
        f"rank {rank}: checkpoint {path} holds no random state for this rank; reseeded from "
        f"(seed {run.config.seed} + rank {rank}, step {run.progress.step})"
    )
