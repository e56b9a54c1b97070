"""The pre-flight stage: every check that can run before the first step, in one place.

All of it runs before the run folder or any file is written. ``check_schedulers`` runs first,
just before the strategy builds its optimisers and schedulers on the real parameter groups
(``engine/run_setup.py: setup_strategy``): each role's scheduler is built on a stand-in of that
role's optimiser class and stepped once (``engine.config.specs.check_scheduler``; roles are read
with ``role_specs``), so that values torch refuses, even only when stepping, fail naming the
role. (Optimiser values were checked when each spec was made.) ``Engine.fit`` then calls
``preflight`` once the data is batched and a checkpoint restored:

1. ``check_output_dir``: ``output_dir`` (or the resumed run's folder) is a folder this process
   may write into, or can be created as one.
2. ``first_forward``: the strategy's ``eval_step`` on the first training batch, in eval mode,
   under ``no_grad`` (``enable_grad`` with ``eval_with_grad``) and a forked RNG, the model's mode
   restored after: nothing of training changes. It resolves the strategy's loss keys and
   metrics against what the model returns, and names data problems (integer images, shapes).
   Each metric must be a 0-d tensor. An FSDP2 model's units are back on their shards after it
   (``inference`` reshards them), so FIT_START callbacks see the shards, not gathered copies.
3. ``produced_names``: every metric name the run's epochs will hold: ``train/<key>`` for the
   step's metrics, ``eval/<key>`` when evaluation runs at least once, ``lr/<role>``, ``epoch``,
   ``seconds``, ``skipped_steps``, and whatever the strategy or a callback declares with an
   optional ``metric_names()`` method (e.g. a quality callback's ``eval/fid``).
4. ``check_monitors``: every monitored name (``EngineConfig.monitor`` or the default one, each
   plateau scheduler's ``monitor``, each callback's ``monitor`` attribute) is among them. A
   callback whose ``monitor`` is None follows the run's; one with ``monitor_required = True``
   (``EarlyStopping``) needs that to exist.
5. ``capability_warnings``: a strategy declares what it honours as ``supports`` (a set holding
   ``ACCUMULATION`` and/or ``CLIPPING``; the strategies of ``strategies/`` honour both through
   ``strategies/update.py``). ``accumulate_steps > 1`` or ``grad_clip_norm`` with a strategy that
   does not declare it gives a warning in ``train.log``: it may be silently ignored.

Every failure is one of ``engine.errors``' types, naming the key and the value.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from engine.config.specs import check_scheduler, role_specs
from engine.context import StepContext
from engine.data.batches import Batches, known_length
from engine.data.prefetch import tensors_of
from engine.errors import (
    OUR_ERRORS,
    ConfigError,
    DataError,
    ModelOutputError,
)
from engine.evaluation import eval_step_checked, inference
from engine.metrics import check_metric

if TYPE_CHECKING:
    from engine.config.engine_config import EngineConfig
    from engine.loop import Engine
    from engine.protocols import StepStrategy

ACCUMULATION = "accumulation"
CLIPPING = "clipping"
# What a strategy built from ``strategies/update.py`` honours: ``supports = SUPPORTS_ALL``.
SUPPORTS_ALL = frozenset({ACCUMULATION, CLIPPING})
# Names every epoch's metrics hold, whatever the strategy.
ALWAYS_PRODUCED = frozenset({"epoch", "seconds", "skipped_steps"})


@attrs.frozen
class Checked:
    """What the pre-flight stage found: the run's monitored metric (None: no best value is
    kept), every metric name the run produces, and warnings for ``train.log``."""

    monitor: str | None
    names: frozenset[str]
    warnings: tuple[str, ...]


def preflight(
    engine: Engine,
    model: torch.nn.Module,
    ctx: StepContext,
    train_batches: Batches,
    has_eval: bool,
    run_dir: Path | None = None,
) -> Checked:
    """Run every check above for ``engine``'s strategy, callbacks and config; ``run_dir`` is
    the resumed run's folder (None for a new run)."""
    strategy, callbacks, config = engine.strategy, engine.callbacks, engine.config
    if ctx.world.is_main:
        check_output_dir(config.output_dir, run_dir)
    metrics = first_forward(strategy, model, train_batches.first_batch(), ctx)
    evaluates = has_eval and config.eval_every <= config.epochs
    names = produced_names(metrics, strategy, callbacks, evaluates)
    monitor = config.monitor or default_monitor(strategy, evaluates)
    check_monitors(names, monitor, config.monitor is not None, strategy, callbacks, evaluates)
    check_disc_start(strategy, config, known_length(train_batches))
    return Checked(monitor, names, capability_warnings(strategy, config))


def check_output_dir(output_dir: Path | None, run_dir: Path | None = None) -> None:
    """The run's folder can be written: the nearest existing folder on its path is a folder
    (not a file) this process may write into."""
    target = run_dir if run_dir is not None else output_dir
    if target is None:
        return
    key = "the resumed run folder" if run_dir is not None else "output_dir"
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key} {str(target)!r} can not be a folder: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {str(target)!r} is not writable: {str(existing)!r} is read-only")


def check_disc_start(strategy: Any, config: EngineConfig, steps_per_epoch: int | None) -> None:
    """A strategy's ``disc_start`` (optimiser windows before the discriminator trains) falls
    inside the run; a start the run never reaches would train no discriminator at all."""
    start = getattr(strategy, "disc_start", 0)
    if not start or steps_per_epoch is None:
        return
    windows_per_epoch = -(-steps_per_epoch // config.accumulate_steps)
    windows = windows_per_epoch * config.epochs
    if config.max_steps is not None:
        windows = min(windows, -(-config.max_steps // config.accumulate_steps))
    if start >= windows:
        raise ConfigError(
            f"disc_start={start} is beyond the run: it has {windows} optimiser window(s) "
            f"({config.epochs} epoch(s) of {windows_per_epoch}, max_steps={config.max_steps}, "
            f"accumulate_steps={config.accumulate_steps}), so the discriminator would never train"
        )


def check_schedulers(strategy: Any) -> None:
    """Each role's scheduler against a stand-in of its own optimiser (``check_scheduler``)."""
    for role, (optimizer, scheduler) in role_specs(strategy).items():
        if scheduler is not None:
            check_scheduler(role, optimizer, scheduler)


def first_forward(
    strategy: StepStrategy, model: torch.nn.Module, batch: Any, ctx: StepContext
) -> Mapping[str, torch.Tensor]:
    """``strategy.eval_step`` on ``batch``, changing no state of training; its metrics, each
    checked to be a 0-d tensor. A failure inside the model is a ``DataError`` describing the
    batch (with how to convert integer data)."""
    try:
        with inference(model, ctx):
            metrics = eval_step_checked(strategy, model, batch, ctx)
    except OUR_ERRORS:
        raise
    except Exception as error:  # raised by the model on this batch: name the batch
        raise DataError(_forward_failure(batch, error)) from error
    if not isinstance(metrics, Mapping):
        raise ModelOutputError(
            f"{type(strategy).__name__}.eval_step must return a mapping of metric tensors, "
            f"got {type(metrics).__name__}"
        )
    for key, value in metrics.items():
        check_metric(type(strategy).__name__, key, value)
    return metrics


def _forward_failure(batch: Any, error: BaseException) -> str:
    text = (
        f"the model failed on the first training batch ({describe_batch(batch)}): "
        f"{type(error).__name__}: {' '.join(str(error).split())}"
    )
    integers = [
        name for name, tensor in _named_tensors(batch) if _is_integer(tensor) and tensor.ndim >= 2
    ]
    if integers:
        text += (
            f"; {', '.join(integers)} holds integers, and models compute in floats: convert "
            "them before fit, e.g. images as data.float() / 255"
        )
    return text


def describe_batch(batch: Any) -> str:
    """``data: torch.uint8 (64, 1, 8, 8)``, one entry per tensor of the batch."""
    parts = [f"{name}: {t.dtype} {tuple(t.shape)}" for name, t in _named_tensors(batch)]
    return ", ".join(parts) or f"a {type(batch).__name__} without tensors"


def _named_tensors(batch: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [("tensor", batch)]
    if isinstance(batch, Mapping):
        return [
            (repr(key), value) for key, value in batch.items() if isinstance(value, torch.Tensor)
        ]
    return [(f"item {index}", t) for index, t in enumerate(tensors_of(batch))]


def _is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def produced_names(
    metrics: Mapping[str, Any],
    strategy: StepStrategy,
    callbacks: Iterable[Any],
    evaluates: bool,
) -> frozenset[str]:
    """Every name the epochs' metrics will hold (see the module's docstring)."""
    names = set(ALWAYS_PRODUCED)
    names.update(f"train/{key}" for key in metrics)
    if evaluates:
        names.update(f"eval/{key}" for key in metrics)
    names.update(strategy.learning_rates())
    for source in (strategy, *callbacks):
        names.update(declared_names(source))
    return frozenset(names)


def declared_names(source: Any) -> list[str]:
    """The names ``source.metric_names()`` declares (none without that method)."""
    method = getattr(source, "metric_names", None)
    if not callable(method):
        return []
    names = list(method())
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"{type(source).__name__}.metric_names() must give metric names such as "
                f"'eval/fid', got {name!r}"
            )
    return names


def default_monitor(strategy: StepStrategy, evaluates: bool) -> str | None:
    """The metric best checkpoints follow unless the config names one: the first loss, on the
    eval data where there is some. None where the strategy declares ``loss_is_quality = False``
    (adversarial losses: a GAN's lowest discriminator loss is not its best model)."""
    if not getattr(strategy, "loss_is_quality", True):
        return None
    return f"{'eval' if evaluates else 'train'}/{strategy.loss_keys[0]}"


def check_monitors(
    names: frozenset[str],
    monitor: str | None,
    named_by_user: bool,
    strategy: StepStrategy,
    callbacks: Iterable[Any],
    evaluates: bool,
) -> None:
    """Every monitored name is among ``names`` (an ``eval/`` one needs evaluation to run)."""
    if named_by_user and monitor is not None:
        _resolve_name("EngineConfig(monitor=...)", monitor, names, evaluates)
    for role, (_, scheduler) in role_specs(strategy).items():
        if scheduler is not None and scheduler.monitor is not None and scheduler.is_plateau:
            where = f"the {role} scheduler {scheduler.name}"
            _resolve_name(where, scheduler.monitor, names, evaluates)
    for callback in callbacks:
        watched = getattr(callback, "monitor", None)
        if isinstance(watched, str):
            _resolve_name(type(callback).__name__, watched, names, evaluates)
        elif watched is None and monitor is None and getattr(callback, "monitor_required", False):
            raise ConfigError(
                f"{type(callback).__name__} follows the run's monitored metric, and this run "
                f"has none ({type(strategy).__name__}'s loss is not a quality measure): pass "
                f"{type(callback).__name__}(monitor='<metric>') or EngineConfig(monitor=...); "
                f"metrics: {sorted(names)}"
            )


def _resolve_name(where: str, name: str, names: frozenset[str], evaluates: bool) -> None:
    if name in names:
        return
    if name.startswith("eval/") and not evaluates:
        raise ConfigError(
            f"{where} monitors {name!r}, but this run never evaluates (no eval data passed to "
            "fit, or eval_every beyond epochs): pass eval data, or monitor a train/ metric"
        )
    close = difflib.get_close_matches(name, sorted(names), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"{where} monitors {name!r}, which this run does not produce{hint}; it produces "
        f"{sorted(names)}"
    )


def capability_warnings(strategy: Any, config: EngineConfig) -> tuple[str, ...]:
    """Warnings for settings a strategy does not declare it honours (its ``supports``)."""
    supports = frozenset(getattr(strategy, "supports", ()))
    name = type(strategy).__name__
    found = []
    wanted = (
        (config.accumulate_steps > 1, ACCUMULATION, f"accumulate_steps={config.accumulate_steps}"),
        (config.grad_clip_norm is not None, CLIPPING, f"grad_clip_norm={config.grad_clip_norm}"),
    )
    for asked, capability, setting in wanted:
        if asked and capability not in supports:
            found.append(
                f"strategy {name} does not declare that it honours {setting} (its supports "
                f"lacks {capability!r}): the setting may be ignored. A strategy that steps "
                "through strategies.update.apply_updates honours it: declare supports = "
                "SUPPORTS_ALL (engine.preflight)"
            )
    return tuple(found)
