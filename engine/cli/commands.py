"""What the commands of ``strategy-engine`` do: build a run from a checked config and run it.

This is the edge of the engine, the one module in ``engine/`` that knows the concrete
strategies and callbacks: it turns a checked run config (``engine.config.file``) into a model,
data, a strategy and callbacks, and runs them. Those packages are imported inside functions, so
``import engine`` stays light; ``engine/cli/main.py`` (argument parsing, the one-line errors)
imports this module only when a command runs.

Config history of a run folder: ``fit`` writes the resolved config as ``config.toml``, at the
start of training (so only after the pre-flight stage passed). A ``resume`` never rewrites it:
its config (overrides applied) goes to ``config-resume-1.toml``, the next one to
``config-resume-2.toml``..., each written only once that resume passed its pre-flight stage, and
``resume``, ``evaluate`` and ``predict`` read the latest of them (``latest_config``). A failed
resume therefore leaves the run folder as it was. ``Checkpointing`` is one of the default
callbacks; its ``model_final.pt`` is what ``evaluate`` and ``predict`` load from a run folder.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from engine.config.file import (
    FactoryRef,
    RunConfig,
    apply_overrides,
    call_factory,
    check_arguments,
    dump_toml,
    import_object,
    load_config_file,
    resolve_config,
)
from engine.errors import CheckpointError, ConfigError
from engine.loop import Engine
from engine.seeding import seed_everything
from engine.state import FitResult, RunState

CONFIG_FILENAME = "config.toml"
MODEL_FILENAME = "model_final.pt"
IMAGE_BATCH_SIZE = 16
# Callbacks a fit gets unless the config lists one of the same name (whose arguments then win).
DEFAULT_CALLBACKS = ("ProgressBar", "ConsoleMetrics", "MetricsHistory", "Checkpointing")
USAGE_ERROR = 2
RUN_CONFIG_KEY = "run_config"


@attrs.define
class Built:
    """Everything a command needs, made from a checked config before anything runs."""

    config: RunConfig
    model: torch.nn.Module
    train: Any
    eval: Any
    strategy: Any
    callbacks: list[Any]


# ----------------------------------------------------------------------------- building


def strategy_classes() -> dict[str, type]:
    """The strategies a config can name, by class name."""
    import strategies

    found = {name: getattr(strategies, name) for name in strategies.__all__}
    return {
        name: value
        for name, value in found.items()
        if isinstance(value, type) and callable(getattr(value, "train_step", None))
    }


def callback_classes() -> dict[str, Any]:
    """The callbacks a config can name without an import path, by class name."""
    import callbacks

    return {name: getattr(callbacks, name) for name in callbacks.__all__}


def build_strategy(config: RunConfig) -> Any:
    """The strategy a config names, with its optimisers and schedulers bound to its roles."""
    spec = config.strategy
    known = strategy_classes()
    if ":" in spec.name:
        cls = import_object("strategy.name", spec.name)
    elif spec.name in known:
        cls = known[spec.name]
    else:
        raise ConfigError(
            f"strategy.name {spec.name!r} is not a strategy; choose one of {sorted(known)} "
            "or give an import path 'package.module:Class'"
        )
    roles = _role_arguments(cls, spec)
    clashes = sorted(set(spec.args) & set(roles))
    if clashes:
        raise ConfigError(
            f"[strategy] sets {clashes} directly; give optimisers and schedulers in "
            "[strategy.optimizers.ROLE] and [strategy.schedulers.ROLE] tables instead"
        )
    ref = FactoryRef("strategy", spec.name, {**spec.args, **roles})
    check_arguments("strategy", cls, ref.args)
    return call_factory(ref, cls)


def _role_arguments(cls: Any, spec: Any) -> dict[str, Any]:
    """Optimiser and scheduler specs as the strategy's constructor takes them: a single-role
    strategy (``Standard``) takes ``optimizer``/``scheduler`` for role ``model``; a multi-role
    one takes ``<role>`` (the optimiser) and ``<role>_scheduler`` for each of its roles."""
    accepted = set(inspect.signature(cls).parameters)
    roles = sorted(spec.optimizers)
    if "optimizer" in accepted:
        expected = ["model"]
        arguments = {"optimizer": spec.optimizers.get("model")}
        if "model" in spec.schedulers:
            arguments["scheduler"] = spec.schedulers["model"]
    else:
        expected = sorted(name for name in accepted if f"{name}_scheduler" in accepted)
        arguments = {role: spec.optimizers.get(role) for role in expected}
        arguments.update({f"{role}_scheduler": value for role, value in spec.schedulers.items()})
    if roles != expected:
        raise ConfigError(
            f"strategy {spec.name!r} has the role(s) {expected}: give one "
            f"[strategy.optimizers.ROLE] table for each; got {roles}"
        )
    return arguments


def build_callbacks(config: RunConfig, image_batch: Any, defaults: Sequence[str]) -> list[Any]:
    """The config's callbacks, after the defaults it does not list. A callback that takes an
    ``image_batch`` and was given none gets the first eval (else train) samples."""
    known = callback_classes()
    named = [ref.target for ref in config.callbacks]
    refs = [FactoryRef(f"default {name}", name, {}) for name in defaults if name not in named]
    built = []
    for ref in [*refs, *config.callbacks]:
        if ":" in ref.target:
            cls = import_object(f"{ref.key}.name", ref.target)
        elif ref.target in known:
            cls = known[ref.target]
        else:
            raise ConfigError(
                f"{ref.key}.name = {ref.target!r} is not a callback; choose one of "
                f"{sorted(known)} or give an import path 'package.module:Factory'"
            )
        check_arguments(ref.key, cls, ref.args)
        extra = {}
        if image_batch is not None and "image_batch" not in ref.args and _takes(cls, "image_batch"):
            extra["image_batch"] = image_batch
        built.append(call_factory(ref, cls, **extra))
    return built


def _takes(target: Any, name: str) -> bool:
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def first_samples(data: Any, count: int) -> Any:
    """The first ``count`` samples of ``data`` as one batch (a tensor, a dict of tensors, or a
    map-style dataset collated), or None where the data can not be indexed that way."""
    if isinstance(data, torch.Tensor):
        return data[:count]
    if (
        isinstance(data, Mapping)
        and data
        and all(isinstance(v, torch.Tensor) for v in data.values())
    ):
        return {key: value[:count] for key, value in data.items()}
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and len(data) > 0:
        from torch.utils.data import default_collate

        return default_collate([data[index] for index in range(min(count, len(data)))])
    return None


def build(config: RunConfig, *, with_callbacks: bool = True) -> Built:
    """Model, data, strategy and callbacks of a checked config; any problem is a
    ``ConfigError`` raised here, before training. The RNGs are seeded with ``engine.seed``
    first, so the model's initial weights (and random data) repeat with the config."""
    seed_everything(config.engine.seed)
    model = call_factory(config.model, import_object("model.factory", config.model.target))
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model.factory {config.model.target!r} must return a torch.nn.Module, "
            f"got {type(model).__name__}"
        )
    train = call_factory(config.train, import_object("data.train.factory", config.train.target))
    eval_data = (
        None
        if config.eval is None
        else call_factory(config.eval, import_object("data.eval.factory", config.eval.target))
    )
    strategy = build_strategy(config)
    callbacks: list[Any] = []
    if with_callbacks:
        image_batch = first_samples(eval_data if eval_data is not None else train, IMAGE_BATCH_SIZE)
        callbacks = build_callbacks(config, image_batch, DEFAULT_CALLBACKS)
    return Built(config, model, train, eval_data, strategy, callbacks)


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A config file, or a run folder's latest config (``latest_config``), with overrides
    applied and checked."""
    path = Path(path)
    if path.is_dir():
        path = latest_config(path)
    raw = load_config_file(path)
    return resolve_config(apply_overrides(raw, overrides))


# ----------------------------------------------------------------------------- run files


RESUME_CONFIG = "config-resume-{}.toml"


def resume_configs(run_dir: Path) -> list[Path]:
    """The ``config-resume-N.toml`` files of a run folder, by N."""
    found = []
    for path in run_dir.glob(RESUME_CONFIG.format("*")):
        number = path.stem.removeprefix("config-resume-")
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def latest_config(run_dir: Path) -> Path:
    """The config the run folder's latest training started from: its last resume's, else
    ``config.toml``."""
    resumed = resume_configs(run_dir)
    return resumed[-1] if resumed else run_dir / CONFIG_FILENAME


@attrs.define(eq=False)
class RunFiles:
    """Writes the resolved config into the run folder at FIT_START, on rank 0 (after the
    pre-flight stage passed): ``config.toml`` for a new run, the next free
    ``config-resume-N.toml`` for a resumed one (``config.toml`` is never rewritten). Lends it to
    the trackers as ``run.extra["run_config"]`` (its priority puts it before them), and keeps
    the run for the command line's interrupt message."""

    raw_config: dict[str, Any]
    resumed: bool = False
    priority: int = 100
    run: RunState | None = None

    def on_fit_start(self, run: RunState) -> None:
        self.run = run
        run.extra[RUN_CONFIG_KEY] = self.raw_config  # trackers log it as the run's parameters
        if run.run_dir is None or not run.is_main_process:
            return
        path = run.run_dir / CONFIG_FILENAME
        if self.resumed:
            path = run.run_dir / RESUME_CONFIG.format(len(resume_configs(run.run_dir)) + 1)
        path.write_text(dump_toml(self.raw_config), encoding="utf-8")
        run.paths["config"] = path


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a state dict file (``weights_only``: the file can not run code); a file that is
    not one (a pickle of other objects, another model's weights) is a ``CheckpointError``."""
    if not path.is_file():
        raise ConfigError(f"no weights file at {str(path)!r}")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle before refusing it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused, truncated file, not a torch file...
        reason = " ".join(str(error).split()).split(". ")[0][:200] or type(error).__name__
        raise CheckpointError(
            f"can not load weights from {str(path)!r}: it is not a plain state dict file "
            f"that loads with weights_only=True ({type(error).__name__}: {reason})"
        ) from None
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict"
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"weights file {str(path)!r} does not fit model {type(model).__name__}: {reason}"
        ) from None


# ----------------------------------------------------------------------------- commands


def fit(config_path: str | Path, overrides: Sequence[str] = ()) -> FitResult:
    """Train as the config says; returns the engine's ``FitResult``."""
    config = load_run_config(config_path, overrides)
    built = build(config)
    files = RunFiles(config.raw)
    engine = Engine(built.strategy, config.engine, [files, *built.callbacks])
    return _fit(engine, built, files)


class Interrupted(Exception):
    """Ctrl-C during a command's run: the step it stopped at and the run folder, if any."""

    def __init__(self, step: int | None, run_dir: Path | None) -> None:
        self.step, self.run_dir = step, run_dir
        if step is None:
            text = "interrupted before the first step"
        elif run_dir is None:
            text = f"interrupted at step {step} (no run folder: engine.output_dir is unset)"
        else:
            text = f"interrupted at step {step}; resume with: strategy-engine resume {run_dir}"
        super().__init__(text)


def _fit(engine: Engine, built: Built, files: RunFiles, resume: Path | None = None) -> FitResult:
    """``engine.fit``; a Ctrl-C becomes ``Interrupted``, naming where the run stopped."""
    try:
        return engine.fit(built.model, built.train, built.eval, resume=resume)
    except KeyboardInterrupt:
        run = files.run
        if run is None:
            raise Interrupted(None, None) from None
        raise Interrupted(run.progress.step, run.run_dir) from None


def evaluate(
    target: str | Path,
    overrides: Sequence[str] = (),
    weights: str | None = None,
    split: str = "eval",
) -> dict[str, float]:
    """The strategy's eval losses of trained weights on the config's ``split`` data."""
    config, built = _trained(target, overrides, weights)
    engine = Engine(built.strategy, config.engine)
    return engine.evaluate(built.model, _split(built, split))


def predict(
    target: str | Path,
    output: str | Path | None,
    overrides: Sequence[str] = (),
    weights: str | None = None,
    split: str = "eval",
) -> Path:
    """The model's per-sample outputs on the config's ``split`` data, saved with
    ``torch.save`` to ``output`` (default ``RUN_DIR/predictions.pt``)."""
    if output is None:
        if not Path(target).is_dir():
            raise ConfigError("predict needs --output FILE when given a config file")
        output = Path(target) / "predictions.pt"
    config, built = _trained(target, overrides, weights)
    outputs = Engine(built.strategy, config.engine).predict(built.model, _split(built, split))
    output = Path(output)
    torch.save(outputs, output)
    return output


def _trained(
    target: str | Path, overrides: Sequence[str], weights: str | None
) -> tuple[RunConfig, Built]:
    config = load_run_config(target, overrides)
    built = build(config, with_callbacks=False)
    if weights is None and not Path(target).is_dir():
        raise ConfigError(
            f"{str(target)!r} is a config file: give --weights PATH, or a run folder instead"
        )
    load_weights(built.model, Path(weights) if weights else Path(target) / MODEL_FILENAME)
    return config, built


def _split(built: Built, split: str) -> Any:
    if split == "train":
        return built.train
    if split == "eval":
        if built.eval is None:
            raise ConfigError("--split eval: the config has no [data.eval]; use --split train")
        return built.eval
    raise ConfigError(f"--split must be 'train' or 'eval', got {split!r}")


def resume(run_dir: str | Path, overrides: Sequence[str] = ()) -> FitResult:
    """Continue the run in ``run_dir`` from its latest checkpoint, with its latest config
    (``latest_config``) and ``overrides`` (e.g. ``engine.epochs=20`` to train longer); it writes
    on into ``run_dir``, its config as the next ``config-resume-N.toml``."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILENAME).is_file():
        raise ConfigError(
            f"resume needs a run folder holding {CONFIG_FILENAME}, got {str(run_dir)!r}"
        )
    config = load_run_config(run_dir, overrides)
    built = build(config)
    files = RunFiles(config.raw, resumed=True)
    engine = Engine(built.strategy, config.engine, [files, *built.callbacks])
    return _fit(engine, built, files, resume=run_dir)
