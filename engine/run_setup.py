"""Everything ``Engine.fit`` does before the first step, as named steps in the order they matter.

1. ``read_resume``: load the checkpoint to resume from (refused before anything changes, also
   when its kind does not fit ``parallel``: sharded under FSDP, full under DDP).
2. ``place_model``: seed, pick the device, move the model there, give every rank rank 0's weights.
   ``shard`` (``parallel="fsdp"``): shard the placed model with FSDP2 (``ctx.sharding``), so
   that the strategy builds its optimisers on the shards.
3. ``setup_strategy``: each role's scheduler is checked against its optimiser class (the first
   pre-flight check, ``engine/preflight.py``, so that a refusal names the role), then the
   strategy builds its optimisers and schedulers on the placed model's real parameter groups.
4. ``make_train_batches`` / ``make_eval_batches``: the data, sharded per rank.
5. ``restore_training``: model, strategy, scaler and RNG streams from the checkpoint.
6. ``engine/preflight.py``: every check that can run before the first step (names, data, the
   output folder, schedulers), before anything is written.
7. ``open_run``: the run folder (the checkpoint's when resuming), the ``RunState`` handlers see,
   its restored history and counters, and the monitored metric the pre-flight chose.

Nothing here trains; ``engine/loop.py`` calls these in order and then runs the loop.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
from loguru import logger

from engine.checkpoint.format import LoadedCheckpoint, load_checkpoint, resolve_resume
from engine.checkpoint.state import check_kind, restore_run, restore_training
from engine.config.engine_config import EngineConfig
from engine.context import ForwardFn, StepContext
from engine.data.batches import Batches, known_length, make_batches
from engine.distributed.collectives import World, broadcast_module, current_world
from engine.distributed.sharding import ShardingPlan, model_class_name, shard_model
from engine.errors import ConfigError, StrategyError
from engine.hardware.device import resolve_device
from engine.hardware.precision import autocast_factory, make_scaler
from engine.metrics import MetricBuffer
from engine.preflight import check_schedulers
from engine.protocols import StepStrategy
from engine.run_dir import create_run_dir
from engine.seeding import seed_everything
from engine.state import Progress, RunState

if TYPE_CHECKING:
    from engine.loop import Engine

__all__ = [
    "PreparedRun",
    "check_trainable",
    "describe_start",
    "make_context",
    "make_eval_batches",
    "make_train_batches",
    "open_run",
    "place_model",
    "read_resume",
    "restore_training",
    "setup_strategy",
    "shard",
    "sharding_plan",
]


@attrs.define(eq=False)
class PreparedRun:
    """A run ready for its first step: what handlers see, the data to loop over, and what
    ``train.log`` should say before the first step (``warnings``, and ``notes`` at INFO)."""

    run: RunState
    context: StepContext
    train_batches: Batches
    eval_batches: Batches | None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def read_resume(resume: Any, config: EngineConfig) -> LoadedCheckpoint | None:
    """The checkpoint ``resume`` names (``"last"``, a checkpoint or a run folder), or None; one
    whose kind does not fit ``config.parallel`` is refused (``check_kind``)."""
    if resume is None:
        return None
    checkpoint = load_checkpoint(resolve_resume(resume, config.output_dir, config.run_name))
    check_kind(checkpoint, config.parallel, current_world())
    return checkpoint


def place_model(model: torch.nn.Module, config: EngineConfig, world: World) -> torch.device:
    """Seed this rank, move ``model`` to its device and give it rank 0's weights."""
    device = resolve_device(config.device, world.local_rank)
    seed_everything(config.seed + world.rank)
    check_trainable(model)
    if not _is_on(model, device):  # already there (the usual second fit): no module walk
        model.to(device)
    broadcast_module(model, world)
    return device


def sharding_plan(config: EngineConfig) -> ShardingPlan:
    """The FSDP2 plan the config asks for (``precision="bf16"``: bf16 parameters in compute,
    fp32 reduction and master weights, instead of autocast)."""
    return ShardingPlan(
        blocks=config.fsdp_blocks,
        mesh=config.fsdp_mesh,
        param_dtype="bf16" if config.precision == "bf16" else None,
        reshard_after_forward=config.fsdp_reshard_after_forward,
        forward_methods=config.fsdp_forward_methods,
    )


def shard(model: torch.nn.Module, config: EngineConfig, ctx: StepContext) -> None:
    """Under ``parallel="fsdp"``, shard the placed model (every rank holding rank 0's weights)
    and keep the sharding in ``ctx.sharding``; what can not be sharded is refused before
    anything is: one process, a mesh that does not cover the world, fp16 (FSDP2 has no
    GradScaler of ours), ``compile="step"``, a block class or method the model lacks."""
    if config.parallel != "fsdp":
        return
    world = ctx.world
    if not world.is_distributed:
        raise ConfigError(
            "parallel='fsdp' shards the model across the ranks of a process group, and this is "
            "one process: launch with torchrun (e.g. `torchrun --nproc-per-node=2 train.py`), "
            "or use parallel='ddp'"
        )
    mesh = config.fsdp_mesh
    if mesh is not None and math.prod(mesh) != world.world_size:
        raise ConfigError(
            f"fsdp_mesh={mesh!r} holds {math.prod(mesh)} ranks but the world has "
            f"{world.world_size}: (replicate, shard) must multiply to the world size"
        )
    if config.precision == "fp16":
        raise ConfigError(
            "precision='fp16' is not supported with parallel='fsdp' (fp16 needs a GradScaler "
            "that knows the shards); use precision='bf16' (bf16 parameters, fp32 reduction)"
        )
    if config.compile == "step":
        raise ConfigError(
            "compile='step' is not supported with parallel='fsdp' (FSDP2's hooks all-gather "
            "and reduce-scatter around each unit); use compile='model' or False"
        )
    ctx.sharding = shard_model(model, sharding_plan(config), world, ctx.device)


def setup_strategy(strategy: StepStrategy, model: torch.nn.Module, ctx: StepContext) -> None:
    """Check each role's scheduler against its optimiser class, then ``strategy.setup``."""
    check_schedulers(strategy)
    strategy.setup(model, ctx)


def _is_on(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer of ``model`` is on ``device``."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return all(tensor.device == device for tensor in tensors)


def check_trainable(model: Any) -> None:
    """``model`` is a module with at least one parameter to train."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(param.requires_grad for param in model.parameters()):
        raise StrategyError(
            f"model {type(model).__name__} has no trainable parameters "
            f"({sum(1 for _ in model.parameters())} parameters, none with requires_grad=True)"
        )


def make_context(
    config: EngineConfig, device: torch.device, progress: Progress, world: World, forward: ForwardFn
) -> StepContext:
    """The ``StepContext`` lent to the strategy for a run (or for a standalone evaluation).
    Under ``parallel="fsdp"`` bf16 is FSDP's parameter dtype, not autocast (``shard``)."""
    sharded = config.parallel == "fsdp"
    return StepContext(
        device=device,
        precision=config.precision,
        autocast=contextlib.nullcontext if sharded else autocast_factory(device, config.precision),
        scaler=make_scaler(device, config.precision),
        grad_clip_norm=config.grad_clip_norm,
        nonfinite=config.nonfinite,
        progress=progress,
        world=world,
        forward_fn=forward,
        eval_with_grad=config.eval_with_grad,
        compiled_step=config.compile == "step",
    )


def make_train_batches(data: Any, config: EngineConfig, ctx: StepContext) -> Batches:
    """Training batches: shuffled per ``(seed, epoch)``; every rank runs the same count."""
    return _batches(
        data,
        "training",
        config,
        config.batch_size,
        ctx,
        shuffle=config.shuffle,
        drop_last=config.drop_last,
        lockstep=True,
    )


def make_eval_batches(
    data: Any, config: EngineConfig, ctx: StepContext, name: str = "evaluation"
) -> Batches:
    """Evaluation (or prediction) batches in order; each rank reads its own shard of
    ``ctx.world`` (a one-process world reads everything)."""
    return _batches(
        data,
        name,
        config,
        config.effective_eval_batch_size,
        ctx,
        shuffle=False,
        drop_last=False,
        lockstep=False,
    )


def _batches(
    data: Any,
    name: str,
    config: EngineConfig,
    batch_size: int,
    ctx: StepContext,
    *,
    shuffle: bool,
    drop_last: bool,
    lockstep: bool,
) -> Batches:
    """``lockstep``: every rank must run the same number of batches (training); otherwise a rank
    whose shard of the last batch is empty just runs one batch fewer."""
    return make_batches(
        data,
        name=name,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=config.seed,
        device=ctx.device,
        world=ctx.world,
        on_device=config.data_on_device,
        num_workers=config.num_workers,
        lockstep=lockstep,
    )


def open_run(
    engine: Engine,
    model: torch.nn.Module,
    ctx: StepContext,
    train_batches: Batches,
    monitor: str | None,
    checkpoint: LoadedCheckpoint | None,
) -> RunState:
    """The run folder (created on the main process, or the resumed run's), the ``RunState``
    handlers see with its history and counters restored, and the monitored metric (None: no
    best value is kept)."""
    config, world = engine.config, ctx.world
    run_dir: Path | None = None
    if config.output_dir is not None and world.is_main:
        resumed_dir = None if checkpoint is None else checkpoint.run_dir
        run_dir = resumed_dir or create_run_dir(config.output_dir, config.run_name)
    run = RunState(
        engine=engine,
        model=model,
        strategy=engine.strategy,
        config=config,
        progress=ctx.progress,
        run_dir=run_dir,
        steps_per_epoch=known_length(train_batches),
        is_main_process=world.is_main,
        log=logger.bind(run=str(run_dir)),
        context=ctx,
        metric_buffer=MetricBuffer(),
    )
    if checkpoint is not None:
        restore_run(checkpoint, run)
    if run_dir is not None:
        run.paths["run_dir"] = run_dir
    run.monitor = monitor
    return run


def describe_start(model: torch.nn.Module, config: EngineConfig, run: RunState) -> str:
    """The first line of ``train.log``: what trains, where, how."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    world = run.context.world if run.context is not None else World()
    device = run.context.device if run.context is not None else "?"
    sharding = None if run.context is None else run.context.sharding
    parallel = (
        ""
        if sharding is None
        else f" (FSDP2: {len(sharding.units)} units on mesh {tuple(sharding.mesh.shape)})"
    )
    return (
        f"fit start: {model_class_name(model)} ({trainable:,} trainable parameters) on {device}, "
        f"precision {config.precision}, {world.world_size} process(es){parallel}, "
        f"run folder {run.run_dir}"
    )


def log_start(model: torch.nn.Module, config: EngineConfig, prepared: PreparedRun) -> None:
    """What ``train.log`` says before the first step (main process): what trains where, the
    resume notes, pre-flight's warnings."""
    run = prepared.run
    if not run.is_main_process:
        return
    run.log.info(describe_start(model, config, run))
    for note in prepared.notes:
        run.log.info(note)
    for warning in prepared.warnings:
        run.log.warning(warning)


def log_end(run: RunState) -> None:
    """The last line of a finished fit in ``train.log`` (main process)."""
    if run.is_main_process:
        run.log.info(
            f"fit done: {run.progress.step} steps, {run.progress.epoch} epochs, "
            f"best {run.monitor}={run.best_value}"
        )


def standalone_context(
    config: EngineConfig, model: torch.nn.Module, world: World, forward: ForwardFn
) -> StepContext:
    """The context of an ``evaluate``/``predict`` outside ``fit``: ``model`` is moved to the
    config's device (as ``fit`` does) and left there."""
    device = resolve_device(config.device, current_world().local_rank)
    model.to(device)
    return make_context(config, device, Progress(), world, forward)
