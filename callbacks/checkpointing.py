"""Checkpoints of a run: periodic, ``last``, best-by-metric, and a final ``last`` on a crash.

A save happens only at a consistent point, the state right after a completed ``train_step`` at
the end of an accumulation window, so that resuming from it continues exactly the same run:

* every ``every_n_steps`` steps (a save due inside an accumulation window waits for its end);
* every ``every_n_epochs`` epochs, and when the monitored metric is among the ``best_k`` best.
  An epoch's save is made once every EPOCH_END handler has run (at the next EPOCH_START, or at
  FIT_END), so that the counters of handlers that run after this one (early stopping) are saved
  after their update of that epoch;
* at FIT_END (``last``), and on an exception or KeyboardInterrupt (``last``), unless the error
  came inside ``train_step`` (a strategy may have stepped some optimisers but not others), in
  the middle of an accumulation window, while the epoch's end (evaluation, schedulers) was
  running, or was a non-finite loss: then the previous checkpoint stays the last one, and the
  log says why. A Ctrl-C that comes inside a step is held until the step ends
  (``hold_interrupts``), so an interrupt is saved.

Only the main process writes. Files: see ``engine/checkpoint/format.py``; plain weights exported as
``model_final.pt``/``model_best.pt`` (+ ``model_config.json``) in the run folder.

Under FSDP2 (``ctx.sharding``) every save is sharded and collective
(``engine/checkpoint/sharded.py``): each rank writes its own shards into rank 0's run folder
(on several machines it must be a shared file system), rank 0 the other files and the marker;
decisions made from the disk (is this a best?) are rank 0's, broadcast. Saves are written in
place (no background thread). There is no checkpoint on an exception: a sharded save needs every
rank, and the others may not be raising. ``model_final.pt``/``model_best.pt`` hold the full
state in plain tensors (gathered to rank 0 where no checkpoint of that moment has it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from callbacks.interrupt_hold import InterruptHold
from engine.checkpoint.export import export_config, export_weights
from engine.checkpoint.format import (
    CHECKPOINTS_DIR,
    LAST,
    MODEL_FILE,
    complete_checkpoints,
    remove_checkpoint,
    write_checkpoint,
)
from engine.checkpoint.sharded import agreed, full_model_state, save_sharded
from engine.checkpoint.state import (
    capture,
    capture_sharded,
    gather_rank_states,
    strategy_optimizers,
)
from engine.checkpoint.writer import BackgroundWriter, snapshot
from engine.config.validators import (
    is_bool,
    monitor_name,
    non_negative_int,
    one_of,
    optional,
    optional_bool,
    plain_folder_name,
    positive_int,
)
from engine.distributed.collectives import World
from engine.errors import ConfigError, NonFiniteLossError
from engine.events import CHECKPOINT_PRIORITY
from engine.state import RunState

BEST_PREFIX = "best-"


def _better(value: float, other: float, mode: str) -> bool:
    return value < other if mode == "min" else value > other


@attrs.define
class _EpochSave:
    """What an epoch's end asked to save, made once its handlers are done."""

    periodic: bool
    value: float | None
    new_best: bool


@attrs.define(eq=False)
class Checkpointing:
    """``Checkpointing(every_n_epochs=1, every_n_steps=None, keep_periodic=None, best_k=1)``.

    ``keep_periodic`` keeps that many of the newest periodic checkpoints (``None``: all; ``0``:
    none, only ``last``). ``best_k`` keeps the k best by ``monitor`` (default: the run's
    monitored metric) in ``mode`` (default: the config's ``monitor_mode``); 0 keeps none and
    exports no ``model_best.pt``. A run with no monitored metric (an adversarial strategy's
    default: its losses say nothing of the model's quality) keeps no best unless ``monitor`` is
    given. ``save_last`` refreshes ``checkpoints/last`` at every save, at the end and on a crash
    (``save_on_exception``). ``export`` writes ``model_final.pt`` at the end and
    ``model_best.pt`` at each new best (``best_k > 0``), as plain ``state_dict`` files.
    ``durable=False`` skips the fsyncs: a checkpoint still survives the process being killed,
    not a power cut.
    ``background`` writes the files in a background thread from a host-memory snapshot taken at
    the save point (see ``engine/checkpoint/writer.py``); saves at the end and on a crash are
    waited for. ``None`` (default) chooses it when the model is on an accelerator, whose memory
    the snapshot does not use; on the CPU the snapshot would be a second copy of the state in
    the same memory while the write runs, so saves are written in place unless ``True``.
    ``hold_interrupts`` holds a Ctrl-C that comes inside a training step until the step ends, so
    that the interrupt is saved (see ``callbacks/interrupt_hold.py``).
    """

    every_n_epochs: int | None = attrs.field(default=1, validator=optional(positive_int))
    every_n_steps: int | None = attrs.field(default=None, validator=optional(positive_int))
    keep_periodic: int | None = attrs.field(
        default=None, validator=optional(non_negative_int, non_negative_int.what)
    )
    best_k: int = attrs.field(default=1, validator=non_negative_int)
    monitor: str | None = attrs.field(default=None, validator=monitor_name)
    mode: str | None = attrs.field(default=None, validator=one_of("min", "max", None))
    save_last: bool = attrs.field(default=True, validator=is_bool)
    save_on_exception: bool = attrs.field(default=True, validator=is_bool)
    export: bool = attrs.field(default=True, validator=is_bool)
    directory: str = attrs.field(default=CHECKPOINTS_DIR, validator=plain_folder_name)
    durable: bool = attrs.field(default=True, validator=is_bool)
    background: bool | None = attrs.field(default=None, validator=optional_bool)
    hold_interrupts: bool = attrs.field(default=True, validator=is_bool)
    priority: int = CHECKPOINT_PRIORITY
    best_value: float | None = attrs.field(default=None, init=False)
    _folder: Path | None = attrs.field(default=None, init=False)
    _step_open: int | None = attrs.field(default=None, init=False)
    _step_due: bool = attrs.field(default=False, init=False)
    _epoch_due: _EpochSave | None = attrs.field(default=None, init=False)
    _epoch_closing: bool = attrs.field(default=False, init=False)
    _saved: tuple[int, int, int] | None = attrs.field(default=None, init=False)
    _saved_model: Path | None = attrs.field(default=None, init=False)
    _writer: BackgroundWriter = attrs.field(factory=BackgroundWriter, init=False)
    _interrupts: InterruptHold = attrs.field(factory=InterruptHold, init=False)
    _config_exported: bool = attrs.field(default=False, init=False)
    _background: bool = attrs.field(default=False, init=False)
    _sharded: bool = attrs.field(default=False, init=False)

    # ---------------------------------------------------------------- events

    def on_fit_start(self, run: RunState) -> None:
        self._folder = None
        if run.is_main_process and run.run_dir is not None:
            self._folder = run.run_dir / self.directory
        self._sharded = run.context is not None and run.context.sharding is not None
        if self._sharded:  # every rank writes its shards into rank 0's folder
            self._folder = agreed(self._folder, _world(run))
        self._step_open, self._step_due, self._epoch_due = None, False, None
        self._epoch_closing = False
        self._saved = _position(run)  # a resumed run starts where its checkpoint was saved
        if run.progress.step == 0:  # a new run (a resumed one had its best value loaded)
            self.best_value = None
        self._saved_model = None
        self._config_exported = False
        device = run.context.device.type if run.context is not None else "cpu"
        self._background = self.background if self.background is not None else device != "cpu"
        self._background = self._background and not self._sharded  # collective: in place
        holds = self.hold_interrupts and self.save_on_exception and not self._sharded
        if self._folder is not None and holds:
            self._interrupts.install()

    def on_epoch_start(self, run: RunState) -> None:
        self._save_due_epoch(run)

    def on_batch_start(self, run: RunState) -> None:
        self._step_open = run.progress.step
        self._interrupts.enter_step()

    def on_batch_end(self, run: RunState) -> None:
        self._step_open = None
        self._interrupts.leave_step()
        progress = run.progress
        if self.every_n_steps is not None and progress.step % self.every_n_steps == 0:
            self._step_due = True
        if self._step_due and _window_reason(run) is None:
            self._step_due = False
            names = self._periodic_names(f"step-{progress.step:08d}")
            if names:
                self._save(run, names, None, rank_states=_gather_ranks(run))
        self._epoch_closing = progress.batch_in_epoch == run.steps_per_epoch

    def on_eval_start(self, run: RunState) -> None:
        self._epoch_closing = True  # (also where the epoch's length is not known)

    def on_epoch_end(self, run: RunState) -> None:
        self._epoch_closing = False
        epochs = run.progress.epoch
        periodic = self.every_n_epochs is not None and epochs % self.every_n_epochs == 0
        value = self._monitored(run)
        new_best = value is not None and (
            self.best_value is None or _better(value, self.best_value, self._mode(run))
        )
        if new_best:
            self.best_value = value
        if periodic or value is not None:
            self._epoch_due = _EpochSave(periodic, value, new_best)

    def on_fit_end(self, run: RunState) -> None:
        self._interrupts.uninstall()
        try:
            self._save_due_epoch(run)
            reason = self._inconsistency(run)
            if self.save_last and reason is None:
                rank_states = _gather_ranks(run)  # on every rank, whether or not rank 0 saves
                if _position(run) != self._saved:
                    self._save(run, [LAST], None, rank_states=rank_states)
            elif self.save_last and _position(run) != self._saved:
                run.log.warning(f"no final checkpoint: {reason}")
        finally:
            self._writer.close()
        if self._folder is not None and self.export:
            source = self._saved_model if _position(run) == self._saved else None
            state = self._model_state(run) if source is None else None
            if run.is_main_process:
                run.paths["model_final"] = export_weights(
                    self._folder.parent / "model_final.pt", state, source, self.durable
                )
            self._export_config(run)

    def on_exception(self, run: RunState) -> None:
        self._interrupts.uninstall()
        try:
            self._writer.close()
        except Exception as error:  # never hide the run's own error behind ours
            run.log.error(f"a checkpoint write failed: {type(error).__name__}: {error}")
        if self._folder is None or not self.save_on_exception:
            return
        if self._sharded:
            if run.is_main_process:
                run.log.warning(
                    f"no checkpoint on {type(run.exception).__name__} under FSDP: a sharded save "
                    "needs every rank, and the others may not be raising; the checkpoint of step "
                    f"{self._saved[0] if self._saved else 'none'} stays the latest"
                )
            return
        if isinstance(run.exception, NonFiniteLossError):
            run.log.warning(
                f"no checkpoint on this error: a non-finite loss; the last good checkpoint "
                f"(step {self._saved[0] if self._saved else 'none'}) stays the latest"
            )
            return
        reason = self._inconsistency(run)
        if reason is not None:
            run.log.warning(
                f"no checkpoint on {type(run.exception).__name__}: {reason}; the checkpoint "
                f"of step {self._saved[0] if self._saved else 'none'} stays the latest"
            )
            return
        try:  # (no collective here: the other ranks may not be raising)
            self._save_due_epoch(run, gather=False)
            if self.save_last and _position(run) != self._saved:
                self._save(run, [LAST], None)
            self._writer.close()
        except Exception as error:  # never hide the run's own error behind ours
            run.log.error(f"checkpoint on exception failed: {type(error).__name__}: {error}")

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        value = state["best_value"]
        self.best_value = None if value is None else float(value)

    # ---------------------------------------------------------------- saving

    def _save_due_epoch(self, run: RunState, gather: bool = True) -> None:
        due, self._epoch_due = self._epoch_due, None
        if due is None:
            return
        rank_states = _gather_ranks(run) if gather else None  # every rank, same epochs
        if self._folder is None:
            return
        epoch = run.progress.epoch
        names = self._periodic_names(f"epoch-{epoch:04d}") if due.periodic else []
        if due.value is not None and self.best_k > 0:
            self._writer.wait()  # the best folders on disk are complete before they are ranked
            qualifies = self._qualifies(run, due.value) if run.is_main_process else None
            if agreed(qualifies, _world(run)) if self._sharded else qualifies:
                names.append(f"{BEST_PREFIX}epoch-{epoch:04d}")
        if names and self.save_last and LAST not in names:
            names.insert(0, LAST)
        export_best = due.new_best and self.export and self.best_k > 0
        if names:
            self._save(run, names, due.value, export_best, rank_states)
        elif export_best:
            state = snapshot(self._model_state(run))
            target = self._folder.parent / "model_best.pt"
            durable = self.durable
            if run.is_main_process:
                self._run_job(lambda: export_weights(target, state, None, durable))
        if export_best and run.is_main_process:
            run.paths["model_best"] = self._folder.parent / "model_best.pt"
            self._export_config(run)

    def _periodic_names(self, name: str) -> list[str]:
        names = [LAST] if self.save_last else []
        if self.keep_periodic != 0:
            names.append(name)
        return names

    def _save(
        self,
        run: RunState,
        names: list[str],
        value: float | None,
        export_best: bool = False,
        rank_states: list[dict[str, Any]] | None = None,
    ) -> None:
        folder = self._folder
        if folder is None or not names:
            return
        if self._sharded:
            self._save_sharded(run, folder, names, value, export_best, rank_states)
            return
        model_state, training, meta = capture(run, run.engine.callbacks, value, rank_states)
        if run.config.nonfinite == "raise" and not _pending_finite(training):
            run.log.warning(
                f"checkpoint at step {run.progress.step} skipped: a loss since the last log "
                "interval is not finite"
            )
            return
        if self._background:  # training changes these tensors in place from the next step on
            model_state, training = snapshot(model_state), snapshot(training)
        mode, durable = self._mode(run), self.durable

        def write() -> None:
            paths = write_checkpoint(folder, names, model_state, training, meta, durable)
            if export_best:
                best = folder.parent / "model_best.pt"
                export_weights(best, None, paths[0] / MODEL_FILE, durable)
            self._prune_periodic(folder, names)
            self._prune_best(folder, mode)

        self._run_job(write)
        self._saved = _position(run)
        self._saved_model = folder / names[0] / MODEL_FILE
        run.paths["checkpoint"] = folder / names[0]

    def _save_sharded(
        self,
        run: RunState,
        folder: Path,
        names: list[str],
        value: float | None,
        export_best: bool,
        rank_states: list[dict[str, Any]] | None,
    ) -> None:
        """``_save`` under FSDP2, on every rank: DCP shards per rank, the rest on rank 0."""
        training, meta = capture_sharded(run, run.engine.callbacks, value, rank_states)
        if run.config.nonfinite == "raise" and not _pending_finite(training):
            if run.is_main_process:  # (every rank's unread metrics are in rank_states)
                run.log.warning(
                    f"checkpoint at step {run.progress.step} skipped: a loss since the last "
                    "log interval is not finite"
                )
            return
        optimizers = strategy_optimizers(run.strategy)
        world = _world(run)
        paths = save_sharded(
            folder, names, run.model, optimizers, training, meta, world, self.durable
        )
        if run.is_main_process:
            if export_best:
                best = folder.parent / "model_best.pt"
                export_weights(best, None, paths[0] / MODEL_FILE, self.durable)
            self._prune_periodic(folder, names)
            self._prune_best(folder, self._mode(run))
            run.paths["checkpoint"] = folder / names[0]
        self._saved = _position(run)
        self._saved_model = folder / names[0] / MODEL_FILE

    def _model_state(self, run: RunState) -> dict[str, torch.Tensor]:
        """The model's full state to export (under FSDP gathered to rank 0: collective)."""
        return full_model_state(run.model) if self._sharded else run.model.state_dict()

    def _run_job(self, job: Callable[[], Any]) -> None:
        if self._background:
            self._writer.submit(job)
        else:
            job()

    def _prune_periodic(self, folder: Path, names: list[str]) -> None:
        if self.keep_periodic is None:
            return
        periodic = [
            (int(meta.get("saved_at_ns", 0)), path)
            for path, meta in complete_checkpoints(folder)
            if path.name.startswith(("epoch-", "step-"))
        ]
        periodic.sort(key=lambda item: (item[0], item[1].name in names))
        for _, path in periodic[: max(0, len(periodic) - self.keep_periodic)]:
            remove_checkpoint(path)

    def _best_entries(self, folder: Path) -> list[tuple[float, Path]]:
        entries = []
        for path, meta in complete_checkpoints(folder):
            value = (meta.get("monitor") or {}).get("value")
            if path.name.startswith(BEST_PREFIX) and isinstance(value, (int, float)):
                entries.append((float(value), path))
        return entries

    def _qualifies(self, run: RunState, value: float) -> bool:
        if self.best_k == 0 or self._folder is None:
            return False
        entries = self._best_entries(self._folder)
        if len(entries) < self.best_k:
            return True
        mode = self._mode(run)
        worst = max(entries, key=lambda e: e[0]) if mode == "min" else min(entries)
        return _better(value, worst[0], mode)

    def _prune_best(self, folder: Path, mode: str) -> None:
        entries = self._best_entries(folder)
        if len(entries) <= self.best_k:
            return
        reverse = mode == "max"
        # Best first; among equal values the older checkpoint (smaller name) stays.
        entries.sort(key=lambda e: (-e[0] if reverse else e[0], e[1].name))
        for _, path in entries[self.best_k :]:
            remove_checkpoint(path)

    # ---------------------------------------------------------------- helpers

    def _mode(self, run: RunState) -> str:
        return self.mode or run.config.monitor_mode

    def _monitored(self, run: RunState) -> float | None:
        monitor = self.monitor or run.monitor
        if monitor is None or self.best_k == 0:
            return None
        value = run.epoch_metrics.get(monitor)
        if value is None:
            if monitor.startswith("eval/") and not any(
                key.startswith("eval/") for key in run.epoch_metrics
            ):
                return None  # no evaluation this epoch
            raise ConfigError(
                f"Checkpointing monitors {monitor!r}, which is not among this epoch's metrics "
                f"{sorted(run.epoch_metrics)}"
            )
        value = float(value)
        return value if math.isfinite(value) else None

    def _inconsistency(self, run: RunState) -> str | None:
        """Why the run's state now is not one a resume could continue exactly, or None."""
        if self._step_open is not None and run.progress.step == self._step_open:
            return f"the error came inside train_step of step {run.progress.step + 1}"
        if self._epoch_closing:
            return "the error came while the epoch's end (evaluation, schedulers) was running"
        return _window_reason(run)

    def _export_config(self, run: RunState) -> None:
        """The model's config next to its exported weights, once per fit (rank 0)."""
        if self._folder is None or self._config_exported or not run.is_main_process:
            return
        self._config_exported = True
        path = export_config(self._folder.parent / "model_config.json", run.model, self.durable)
        if path is not None:
            run.paths["model_config"] = path


def _world(run: RunState) -> World:
    return run.context.world if run.context is not None else World()


def _gather_ranks(run: RunState) -> list[dict[str, Any]] | None:
    """Every rank's RNG streams and unread metrics under several processes (all ranks call this
    at the same points), so that each rank resumes its own; None in one process."""
    return gather_rank_states(run)


def _position(run: RunState) -> tuple[int, int, int]:
    progress = run.progress
    return (progress.step, progress.epoch, progress.batch_in_epoch)


def _window_reason(run: RunState) -> str | None:
    """Why the current batch position is inside an accumulation window, or None."""
    accumulate = run.config.accumulate_steps
    done = run.progress.batch_in_epoch
    if accumulate == 1 or done % accumulate == 0 or done == run.steps_per_epoch:
        return None
    return (
        f"batch {done} of the epoch is inside an accumulation window of {accumulate} batches "
        "(its gradients are not in any checkpoint)"
    )


def _pending_finite(training: Mapping[str, Any]) -> bool:
    buffers = [training.get("metric_buffer")]
    buffers += [rank["metric_buffer"] for rank in training.get("rank_states") or []]
    for buffer in buffers:
        for entry in (buffer or {}).get("pending", {}).values():
            values = entry["values"]
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                return False
    return True
