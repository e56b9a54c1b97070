"""The one training loop. It reads top to bottom as this pseudocode (``engine/events.py`` has
the same with the table of what fires when a run ends early)::

    fit(model, train, eval, resume):
        prepare (engine/run_setup.py): read the checkpoint, seed, place (and shard) the model,
            set up the strategy, batches, restore, pre-flight (engine/preflight.py), run folder
        FIT_START
        for epoch:
            EPOCH_START
            for batch, its place in the accumulation window:          # _train_epoch
                BATCH_START
                metrics = strategy.train_step(model, batch, ctx)       # stays on the device
                count the step; every log_every steps read the buffered metrics
                BATCH_END
                stop here on stop() or max_steps (the partial epoch ends the run)
            summary = train means                                      # _end_epoch
            if eval is due: EVAL_START; strategy.eval_step per batch; EVAL_END
            learning rates; strategy.end_epoch(summary) (per-epoch schedulers); best value
            EPOCH_END
            stop here on stop() or max_steps
        FIT_END
        on any error or interrupt: EXCEPTION, then it propagates

``evaluate``/``predict`` run the strategy's ``eval_step``/``predict_step`` (engine/evaluation.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from engine.config.engine_config import EngineConfig
from engine.context import ForwardFn, call_model
from engine.data.windows import epoch_windows
from engine.distributed.collectives import World, any_rank, current_world
from engine.distributed.session import process_group
from engine.errors import StrategyError
from engine.evaluation import evaluate_batches, predict_batches
from engine.events import Event, EventBus, Handler, Subscription
from engine.hardware.compiling import RunCompilation, compile_run
from engine.metrics import MetricBuffer, track_best
from engine.preflight import preflight
from engine.protocols import StepStrategy
from engine.run_dir import log_file
from engine.run_setup import (
    PreparedRun,
    log_end,
    log_start,
    make_context,
    make_eval_batches,
    make_train_batches,
    open_run,
    place_model,
    read_resume,
    restore_training,
    setup_strategy,
    shard,
    standalone_context,
)
from engine.seeding import seed_everything
from engine.state import FitResult, Progress, RunState, fit_result

_STRATEGY_METHODS = sorted(name for name in dir(StepStrategy) if not name.startswith("_"))


class Engine:
    """Trains a model with a ``StepStrategy`` under an ``EngineConfig``, telling callbacks.

    ``forward(model, batch, **kwargs)`` replaces the default ``model(batch, **kwargs)`` call,
    e.g. to pass pythae's ``epoch`` or ``dataset_size`` arguments.

    Constructing an ``Engine`` seeds every random stream (python, numpy, torch) with
    ``config.seed``, so that a model built after it (``engine.fit(VAE(), ...)``, or any line
    below ``Engine(...)``) starts from the same weights in every process that runs the same
    script; ``fit`` seeds again (``seed + rank``) before it trains.
    """

    def __init__(
        self,
        strategy: StepStrategy,
        config: EngineConfig | None = None,
        callbacks: Iterable[Any] = (),
        forward: ForwardFn | None = None,
    ) -> None:
        if not isinstance(strategy, StepStrategy):
            missing = [name for name in _STRATEGY_METHODS if not hasattr(strategy, name)]
            raise StrategyError(
                f"strategy {strategy!r} does not implement the StepStrategy protocol: "
                f"it lacks {missing}"
            )
        self.strategy = strategy
        self.config = config if config is not None else EngineConfig()
        seed_everything(self.config.seed)  # the model built next starts from the same weights
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

        Under ``torchrun`` every rank calls ``fit``; it joins the process group for the run
        and leaves it at the end (``engine/distributed/session.py``)."""
        with process_group(self.config.device, self.config.distributed_timeout_s):
            prepared = self._prepare(model, train, eval, resume)
            try:
                self._train(prepared, model)
            finally:
                prepared.context.release()  # each role's DDP lets go of the process group
            return fit_result(prepared.run, self._stop_requested)

    def _prepare(self, model: torch.nn.Module, train: Any, eval: Any, resume: Any) -> PreparedRun:
        """Every step before the first batch, in order (``engine/run_setup.py``)."""
        config, world = self.config, current_world()
        checkpoint = read_resume(resume, config)
        device = place_model(model, config, world)
        ctx = make_context(config, device, Progress(), world, self.forward)
        shard(model, config, ctx)
        setup_strategy(self.strategy, model, ctx)
        train_batches = make_train_batches(train, config, ctx)
        eval_batches = None if eval is None else make_eval_batches(eval, config, ctx)
        notes: tuple[str, ...] = ()
        if checkpoint is not None:
            notes = restore_training(checkpoint, model, self.strategy, ctx, self.callbacks, config)
        resumed_dir = None if checkpoint is None else checkpoint.run_dir
        checked = preflight(self, model, ctx, train_batches, eval is not None, resumed_dir)
        run = open_run(self, model, ctx, train_batches, checked.monitor, checkpoint)
        self._stop_requested = False
        return PreparedRun(run, ctx, train_batches, eval_batches, checked.warnings, notes)

    def _train(self, prepared: PreparedRun, model: torch.nn.Module) -> None:
        """FIT_START, the epochs, FIT_END; EXCEPTION on any error before it propagates."""
        run, config = prepared.run, self.config
        strategy, device = self.strategy, prepared.context.device
        loss_count, k = len(strategy.loss_keys), config.accumulate_steps
        compiled = compile_run(config.compile, model, strategy.train_step, loss_count, device, k)
        with log_file(run.run_dir), compiled.settings():
            try:
                log_start(model, config, prepared)
                self.bus.fire(Event.FIT_START, run)
                self._run_epochs(run, compiled, prepared)
                self.bus.fire(Event.FIT_END, run)
                log_end(run)
            except BaseException as error:
                run.exception = error
                self.bus.fire(Event.EXCEPTION, run)
                raise

    def _run_epochs(self, run: RunState, compiled: RunCompilation, prepared: PreparedRun) -> None:
        for epoch in range(run.progress.epoch, self.config.epochs):
            started = time.perf_counter()
            self.bus.fire(Event.EPOCH_START, run)
            if not self._train_epoch(run, compiled, prepared, epoch):
                return  # the partial epoch's metrics stay in run.metric_buffer for a checkpoint
            self._end_epoch(run, compiled.model, prepared, epoch, started)
            if self._stop_now(prepared.context.world, True) or self._at_max_steps(run):
                return

    def _train_epoch(
        self, run: RunState, compiled: RunCompilation, prepared: PreparedRun, epoch: int
    ) -> bool:
        """The batches of one epoch (from where a resumed run left it); false when the run
        stopped inside the epoch (``stop()`` or ``max_steps`` before its last batch)."""
        config, progress, ctx, fire = self.config, run.progress, prepared.context, self.bus.fire
        model, train_step = compiled.model, compiled.train_step
        buffer = run.metric_buffer or MetricBuffer()
        model.train()
        first = progress.batch_in_epoch
        steps_left = None if config.max_steps is None else config.max_steps - progress.step
        batches = prepared.train_batches.epoch(epoch, start=first)
        world, log_every, max_steps = ctx.world, config.log_every, config.max_steps
        placed = epoch_windows(
            batches, first, run.steps_per_epoch, steps_left, config.accumulate_steps, world
        )
        # Per batch, only what the batch needs: an event with no handler costs a truth test,
        # and one process reads its own stop flag (tests/engine/test_hot_path.py counts calls).
        starts, ends = self.bus.holder(Event.BATCH_START), self.bus.holder(Event.BATCH_END)
        alone = not world.is_distributed
        for batch, micro_index, micro_count in placed:
            if starts.handlers:
                fire(Event.BATCH_START, run)
            ctx.micro_index, ctx.micro_count = micro_index, micro_count
            metrics = train_step(model, batch, ctx)
            buffer.add(progress.step, metrics)
            progress.step += 1
            progress.batch_in_epoch += 1
            run.step_metrics = metrics
            at_log = progress.step % log_every == 0
            if at_log:
                run.logged_metrics = buffer.flush(world)
            if ends.handlers:
                fire(Event.BATCH_END, run)
            stop = self._stop_requested if alone else self._stop_now(world, at_log)
            if stop or progress.step == max_steps:
                return progress.batch_in_epoch == run.steps_per_epoch
        return True

    def _end_epoch(
        self, run: RunState, model: nn.Module, prepared: PreparedRun, epoch: int, started: float
    ) -> None:
        """Train means, evaluation when due, per-epoch schedulers, the best value, EPOCH_END."""
        config, ctx, buffer = self.config, prepared.context, run.metric_buffer or MetricBuffer()
        summary = {"epoch": float(epoch)}
        summary.update({f"train/{k}": v for k, v in buffer.epoch_means(ctx.world).items()})
        if prepared.eval_batches is not None and (epoch + 1) % config.eval_every == 0:
            self.bus.fire(Event.EVAL_START, run)
            metrics = evaluate_batches(self.strategy, model, prepared.eval_batches, ctx)
            run.eval_metrics = {f"eval/{k}": v for k, v in metrics.items()}
            summary.update(run.eval_metrics)
            self.bus.fire(Event.EVAL_END, run)
        summary.update(self.strategy.learning_rates())
        summary["skipped_steps"] = float(run.progress.skipped_steps)
        summary["seconds"] = time.perf_counter() - started
        self.strategy.end_epoch(summary, ctx)
        track_best(run, summary, epoch, config.monitor_mode)
        run.epoch_metrics = summary
        run.history.append(summary)
        run.progress.epoch = epoch + 1
        run.progress.batch_in_epoch = 0
        self.bus.fire(Event.EPOCH_END, run)

    def _at_max_steps(self, run: RunState) -> bool:
        return run.progress.step == self.config.max_steps

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

    # ---------------------------------------------------- evaluate, predict

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        """Mean of each of the strategy's eval metrics over every sample of ``data`` (each rank
        evaluates its shard under torchrun); changes no state of training.

        Moves ``model`` to the config's device (as ``fit`` does) and leaves it there; the
        strategy must have been set up (by ``fit``, or ``strategy.setup`` by hand).
        """
        ctx = standalone_context(self.config, model, current_world(), self.forward)
        return evaluate_batches(
            self.strategy, model, make_eval_batches(data, self.config, ctx), ctx
        )

    def predict(self, model: torch.nn.Module, data: Any) -> dict[str, torch.Tensor]:
        """The model's per-sample outputs over ``data`` (e.g. ``recon_x``, ``z``) from the
        strategy's ``predict_step`` (a two-phase GAN predicts with its generator's forward),
        concatenated per key on the CPU; scalar outputs (losses) are left out. Under several
        processes every rank predicts all of ``data``.

        Moves ``model`` to the config's device (as ``fit`` does) and leaves it there.
        """
        ctx = standalone_context(self.config, model, World(), self.forward)
        batches = make_eval_batches(data, self.config, ctx, name="prediction")
        return predict_batches(self.strategy, model, batches, ctx)
