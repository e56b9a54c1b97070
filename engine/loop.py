"""The one training loop. ``engine/events.py`` carries it as pseudocode with every event.

``Engine.fit`` prepares a run (device, seed, strategy, batches, run folder), then
``_run_epochs`` is the loop itself: per batch it fires BATCH_START, calls the strategy, keeps the
metrics on the device, counts, fires BATCH_END. Everything else happens at interval or epoch
boundaries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from loguru import logger

from engine.checkpoint.format import load_checkpoint, resolve_resume
from engine.checkpoint.state import restore_run, restore_training
from engine.config.engine_config import EngineConfig
from engine.context import ForwardFn, StepContext, call_model
from engine.data.batches import Batches, known_length, make_batches
from engine.data.windows import in_windows
from engine.distributed.collectives import (
    World,
    any_rank,
    broadcast_buffers,
    broadcast_module,
    current_world,
    sum_named_over_ranks,
)
from engine.distributed.session import process_group
from engine.errors import ConfigError, StrategyError
from engine.events import Event, EventBus, Handler, Subscription
from engine.hardware.compiling import compile_model, compiled_backward_settings
from engine.hardware.device import resolve_device
from engine.hardware.precision import autocast_factory, make_scaler
from engine.metrics import MetricBuffer
from engine.protocols import StepStrategy
from engine.run_dir import create_run_dir, log_file
from engine.seeding import seed_everything
from engine.state import FitResult, Progress, RunState

# The name under which evaluation's sample count travels with its metric sums.
_SAMPLES = "\x00samples"


class Engine:
    """Trains a model with a ``StepStrategy`` under an ``EngineConfig``, telling callbacks.

    ``forward(model, batch, **kwargs)`` replaces the default ``model(batch, **kwargs)`` call,
    e.g. to pass pythae's ``epoch`` or ``dataset_size`` arguments.
    """

    def __init__(
        self,
        strategy: StepStrategy,
        config: EngineConfig | None = None,
        callbacks: Iterable[Any] = (),
        forward: ForwardFn | None = None,
    ) -> None:
        if not isinstance(strategy, StepStrategy):
            raise StrategyError(
                f"strategy {strategy!r} does not implement the StepStrategy protocol "
                "(setup, train_step, eval_step, end_epoch, learning_rates, state_dict, ...)"
            )
        self.strategy = strategy
        self.config = config if config is not None else EngineConfig()
        self.forward = forward or call_model
        self.callbacks = tuple(callbacks)
        self.bus = EventBus()
        self.bus.add_all(self.callbacks)
        self._stop_requested = False

    def on(
        self,
        event: Event,
        handler: Handler,
        *,
        priority: int = 0,
        every: int | None = None,
        once: int | None = None,
    ) -> None:
        """Subscribe a plain function to ``event``."""
        self.bus.subscribe(Subscription(event, handler, priority, every, once))

    def stop(self) -> None:
        """End the run cleanly at the next batch or epoch boundary (under several processes:
        at the next log interval or epoch end, on every rank at once, whichever rank asked)."""
        self._stop_requested = True

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        model: torch.nn.Module,
        train: Any,
        eval: Any = None,
        resume: str | os.PathLike[str] | None = None,
    ) -> FitResult:
        """Train ``model`` on ``train`` for ``config.epochs`` (or ``max_steps``), evaluating on
        ``eval`` every ``eval_every`` epochs.

        ``resume`` continues a run exactly where a checkpoint left it: ``"last"`` (the latest
        checkpoint of ``output_dir/run_name``), a checkpoint folder or a run folder. The resumed
        run keeps writing into the checkpoint's run folder. A checkpoint that does not fit this
        run is refused (``CheckpointError``) before anything is written.

        Under ``torchrun`` every rank calls ``fit``: it joins the process group for the run
        (``engine/distributed/session.py``) and leaves it at the end.
        """
        with process_group(self.config.device, self.config.distributed_timeout_s):
            return self._fit(model, train, eval, resume)

    def _fit(self, model: torch.nn.Module, train: Any, eval: Any, resume: Any) -> FitResult:
        config = self.config
        world = current_world()
        checkpoint = None
        if resume is not None:
            path = resolve_resume(resume, config.output_dir, config.run_name)
            checkpoint = load_checkpoint(path)
        device = resolve_device(config.device, world.local_rank)
        seed_everything(config.seed + world.rank)
        _check_trainable(model)
        model.to(device)
        broadcast_module(model, world)
        progress = Progress()
        ctx = self._context(device, progress, world)
        self.strategy.setup(model, ctx)
        train_batches = self._batches(
            train,
            "training",
            config.batch_size,
            config.shuffle,
            config.drop_last,
            device,
            world,
            lockstep=True,
        )
        eval_batches = (
            None
            if eval is None
            else self._batches(
                eval, "evaluation", config.effective_eval_batch_size, False, False, device, world
            )
        )
        if checkpoint is not None:
            restore_training(checkpoint, model, self.strategy, ctx, self.callbacks, config)
        run_dir = None
        if config.output_dir is not None and world.is_main:
            resumed_dir = None if checkpoint is None else checkpoint.run_dir
            run_dir = resumed_dir or create_run_dir(config.output_dir, config.run_name)
        run = RunState(
            engine=self,
            model=model,
            strategy=self.strategy,
            config=config,
            progress=progress,
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
        run.monitor = config.monitor or _default_monitor(self.strategy, eval is not None)
        self._stop_requested = False
        step_model = compile_model(model) if config.compile else model
        compiled_settings = compiled_backward_settings(config.compile, len(self.strategy.loss_keys))
        with log_file(run_dir), compiled_settings:
            try:
                if world.is_main:
                    run.log.info(_describe_start(model, config, device, world, run_dir))
                self.bus.fire(Event.FIT_START, run)
                self._run_epochs(run, step_model, ctx, train_batches, eval_batches)
                self.bus.fire(Event.FIT_END, run)
                if world.is_main:
                    run.log.info(
                        f"fit done: {progress.step} steps, {progress.epoch} epochs, "
                        f"best {run.monitor}={run.best_value}"
                    )
            except BaseException as error:
                run.exception = error
                self.bus.fire(Event.EXCEPTION, run)
                raise
        return FitResult(
            history=run.history,
            monitor=run.monitor,
            best_value=run.best_value,
            best_epoch=run.best_epoch,
            run_dir=run_dir,
            paths=dict(run.paths),
            steps=progress.step,
            skipped_steps=progress.skipped_steps,
            stopped_early=self._stop_requested,
        )

    def _run_epochs(
        self,
        run: RunState,
        model: torch.nn.Module,
        ctx: StepContext,
        train_batches: Batches,
        eval_batches: Batches | None,
    ) -> None:
        config, progress, fire = self.config, run.progress, self.bus.fire
        train_step = self.strategy.train_step
        buffer = run.metric_buffer or MetricBuffer()
        steps_per_epoch = run.steps_per_epoch
        for epoch in range(progress.epoch, config.epochs):
            started = time.perf_counter()
            fire(Event.EPOCH_START, run)
            model.train()
            first = progress.batch_in_epoch
            limit = None if config.max_steps is None else first + config.max_steps - progress.step
            placed = in_windows(
                train_batches.epoch(epoch, start=first),
                first,
                _known_total(steps_per_epoch, limit),
                limit,
                config.accumulate_steps,
                ctx.world,
            )
            finished_epoch = True
            for batch, micro_index, micro_count in placed:
                fire(Event.BATCH_START, run)
                ctx.micro_index, ctx.micro_count = micro_index, micro_count
                metrics = train_step(model, batch, ctx)
                buffer.add(progress.step, metrics)
                progress.step += 1
                progress.batch_in_epoch += 1
                run.step_metrics = metrics
                at_log = progress.step % config.log_every == 0
                if at_log:
                    run.logged_metrics = buffer.flush(ctx.world)
                fire(Event.BATCH_END, run)
                if self._stop_now(ctx.world, at_log) or progress.step == config.max_steps:
                    finished_epoch = progress.batch_in_epoch == steps_per_epoch
                    break
            if not finished_epoch:
                return  # the partial epoch's metrics stay in run.metric_buffer for a checkpoint
            summary = {"epoch": float(epoch)}
            summary.update({f"train/{k}": v for k, v in buffer.epoch_means(ctx.world).items()})
            if eval_batches is not None and (epoch + 1) % config.eval_every == 0:
                fire(Event.EVAL_START, run)
                run.eval_metrics = {
                    f"eval/{k}": v for k, v in self._evaluate(model, eval_batches, ctx).items()
                }
                summary.update(run.eval_metrics)
                fire(Event.EVAL_END, run)
            summary.update(self.strategy.learning_rates())
            summary["skipped_steps"] = float(progress.skipped_steps)
            summary["seconds"] = time.perf_counter() - started
            self.strategy.end_epoch(summary, ctx)
            _track_best(run, summary, epoch, config.monitor_mode)
            run.epoch_metrics = summary
            run.history.append(summary)
            progress.epoch = epoch + 1
            progress.batch_in_epoch = 0
            fire(Event.EPOCH_END, run)
            if self._stop_now(ctx.world, True) or progress.step == config.max_steps:
                return

    def _stop_now(self, world: World, boundary: bool) -> bool:
        """Whether the run stops here. One process stops as soon as ``stop()`` was called.
        Ranks decide together, at log intervals and epoch ends (``boundary``), with one small
        all-reduce: a stop asked on one rank only (a time budget, a signal) would otherwise leave
        the others waiting in a collective."""
        if not world.is_distributed:
            return self._stop_requested
        if boundary:
            self._stop_requested = any_rank(self._stop_requested, world)
            return self._stop_requested
        return False

    # ------------------------------------------------------------- evaluate

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        """Mean of each loss over every sample of ``data``; changes no state of training."""
        device, world, ctx = self._standalone(model)
        batches = self._batches(
            data, "evaluation", self.config.effective_eval_batch_size, False, False, device, world
        )
        return self._evaluate(model, batches, ctx)

    def _evaluate(
        self, model: torch.nn.Module, batches: Batches, ctx: StepContext
    ) -> dict[str, float]:
        broadcast_buffers(model, ctx.world)  # every rank evaluates rank 0's model
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        samples = torch.zeros((), dtype=torch.float64, device=ctx.device)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for batch in batches.epoch(0):
                size = _batch_size(batch)
                for key, value in self.strategy.eval_step(model, batch, ctx).items():
                    weighted = value.detach().double() * size
                    sums[key] = sums[key] + weighted if key in sums else weighted
                samples += size
        model.train(was_training)
        totals = sum_named_over_ranks({**sums, _SAMPLES: samples}, ctx.world)
        count = totals.pop(_SAMPLES)
        return {key: value / count for key, value in totals.items()}

    # -------------------------------------------------------------- predict

    def predict(self, model: torch.nn.Module, data: Any) -> dict[str, torch.Tensor]:
        """The model's per-sample outputs over ``data`` (e.g. ``recon_x``, ``z``), concatenated
        per key on the CPU; scalar outputs (losses) are left out. Under several processes every
        rank predicts all of ``data``."""
        device, _, ctx = self._standalone(model)
        batches = self._batches(
            data, "prediction", self.config.effective_eval_batch_size, False, False, device, World()
        )
        was_training = model.training
        model.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for batch in batches.epoch(0):
                size = _batch_size(batch)
                for key, value in ctx.forward(model, batch).items():
                    if isinstance(value, torch.Tensor) and value.ndim > 0 and len(value) == size:
                        parts.setdefault(key, []).append(value.detach().cpu())
        model.train(was_training)
        return {key: torch.cat(values) for key, values in parts.items()}

    # -------------------------------------------------------------- helpers

    def _context(self, device: torch.device, progress: Progress, world: World) -> StepContext:
        config = self.config
        return StepContext(
            device=device,
            precision=config.precision,
            autocast=autocast_factory(device, config.precision),
            scaler=make_scaler(device, config.precision),
            grad_clip_norm=config.grad_clip_norm,
            nonfinite=config.nonfinite,
            progress=progress,
            world=world,
            forward_fn=self.forward,
        )

    def _standalone(self, model: torch.nn.Module) -> tuple[torch.device, World, StepContext]:
        world = current_world()
        device = resolve_device(self.config.device, world.local_rank)
        model.to(device)
        return device, world, self._context(device, Progress(), world)

    def _batches(
        self,
        data: Any,
        name: str,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        device: torch.device,
        world: World,
        lockstep: bool = False,
    ) -> Batches:
        """``lockstep``: every rank must run the same number of batches (training); otherwise
        a rank whose shard of the last batch is empty just runs one batch fewer."""
        config = self.config
        return make_batches(
            data,
            name=name,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=config.seed,
            device=device,
            world=world,
            on_device=config.data_on_device,
            num_workers=config.num_workers,
            lockstep=lockstep,
        )


def _check_trainable(model: torch.nn.Module) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(param.requires_grad for param in model.parameters()):
        raise StrategyError(
            f"model {type(model).__name__} has no trainable parameters "
            f"({sum(1 for _ in model.parameters())} parameters, none with requires_grad=True)"
        )


def _describe_start(
    model: torch.nn.Module,
    config: EngineConfig,
    device: torch.device,
    world: World,
    run_dir: Any,
) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (
        f"fit start: {type(model).__name__} ({trainable:,} trainable parameters) on {device}, "
        f"precision {config.precision}, {world.world_size} process(es), run folder {run_dir}"
    )


def _default_monitor(strategy: StepStrategy, has_eval: bool) -> str:
    return f"{'eval' if has_eval else 'train'}/{strategy.loss_keys[0]}"


def _known_total(steps_per_epoch: int | None, limit: int | None) -> int | None:
    """How many batches this epoch runs in all (counting those already done), if known."""
    if steps_per_epoch is None or limit is None:
        return steps_per_epoch
    return min(steps_per_epoch, limit)


def _track_best(run: RunState, metrics: Mapping[str, float], epoch: int, mode: str) -> None:
    monitor = run.monitor
    if monitor is None:
        return
    if monitor not in metrics:
        if monitor.startswith("eval/") and not any(key.startswith("eval/") for key in metrics):
            return  # no evaluation this epoch
        raise ConfigError(
            f"monitored metric {monitor!r} is not among this epoch's metrics {sorted(metrics)}"
        )
    value = metrics[monitor]
    best = run.best_value
    if best is None or (value < best if mode == "min" else value > best):
        run.best_value, run.best_epoch = value, epoch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ConfigError(f"can not tell the batch size of a {type(batch).__name__} batch")
