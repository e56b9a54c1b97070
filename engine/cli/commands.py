"""What the commands of ``strategy-engine`` do: build a run from a checked config and run it.

This is the edge of the engine, the one module in ``engine/`` that knows the concrete
strategies and callbacks: it turns a checked run config (``engine.config.file``) into a model,
data, a strategy and callbacks, and runs them. Those packages are imported inside functions, so
``import engine`` stays light; ``engine/cli/main.py`` (argument parsing, the one-line errors)
imports this module only when a command runs.

A ``[pythae]`` config (``engine.config.file``) is built by ``strategies.pythae``: the model
and training config come from pythae's JSON files (``load_from_json``), the data from
``[data]``, and ``from_pythae`` makes the engine with the written ``[engine]`` keys alone as
overrides. The run folder gets copies of the two files (``pythae_model_config.json``,
``pythae_training_config.json``) and its ``config.toml`` names them, so the folder alone
repeats or resumes the run.

Strategy arguments that TOML can only spell as tables become objects here: ``regularisers``
(``[{name = "r1", gamma = 0.1}]``: ``strategies.regularisers``' factories by name, or an import
path) and ``phases`` (an array of tables, ``[[strategy.phases]]``, each a ``Phase``); a
strategy taking ``optimizers``/``schedulers`` mappings (``Sequential``) gets the role tables as
they are, and ``SharedGraphUpdates`` its roles in the order of its ``losses`` table.

Config history of a run folder: ``fit`` writes the resolved config as ``config.toml``, at the
start of training (so only after the pre-flight stage passed). A ``resume`` never rewrites it:
its config (overrides applied) goes to ``config-resume-1.toml``, the next one to
``config-resume-2.toml``..., each written only once that resume passed its pre-flight stage, and
``resume``, ``evaluate`` and ``predict`` read the latest of them (``latest_config``). A failed
resume therefore leaves the run folder as it was. ``Checkpointing`` is one of the default
callbacks; its ``model_final.pt`` is what ``evaluate`` and ``predict`` load from a run folder.
"""

from __future__ import annotations

import copy
import filecmp
import functools
import inspect
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from engine.config.file import (
    FactoryRef,
    PythaeSection,
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
# The copies of a [pythae] config's files in its run folder, by the [pythae] key naming them.
PYTHAE_COPIES = {
    "model_config": ("pythae_model_config.json", "pythae_model"),  # a JSON file, a model folder
    "training_config": ("pythae_training_config.json", "pythae_training_config.json"),
}


@attrs.define
class Built:
    """Everything a command needs, made from a checked config before anything runs.

    For a ``[pythae]`` config ``strategy`` is None and ``pythae`` the ``PythaeSetup`` (model
    and training config) that ``prepare`` turns into the engine and its strategy."""

    config: RunConfig
    model: torch.nn.Module
    train: Any
    eval: Any
    strategy: Any
    callbacks: list[Any]
    pythae: Any = None


@attrs.define
class Prepared:
    """An engine and what its ``fit``, ``evaluate`` and ``predict`` take (for a ``[pythae]``
    config the data as ``from_pythae`` converted it, and its ``evaluate``, which tells the model
    the size of the data it evaluates)."""

    engine: Engine
    model: torch.nn.Module
    train: Any
    eval: Any
    evaluate: Callable[[Any], dict[str, float]]


# ----------------------------------------------------------------------------- building


def strategy_classes() -> dict[str, type]:
    """The strategies a config can name, by class name: those ``strategies`` exports, and
    ``SharedGraphUpdates`` (pythae's update arithmetic, for any model; it needs no pythae)."""
    import strategies
    from strategies.pythae.shared_graph import SharedGraphUpdates

    found = {name: getattr(strategies, name) for name in strategies.__all__}
    found[SharedGraphUpdates.__name__] = SharedGraphUpdates
    return {
        name: value
        for name, value in found.items()
        if isinstance(value, type) and callable(getattr(value, "train_step", None))
    }


def callback_classes() -> dict[str, Any]:
    """The callbacks a config can name without an import path, by class name."""
    import callbacks

    return {name: getattr(callbacks, name) for name in callbacks.__all__}


def regulariser_factories() -> dict[str, Any]:
    """The regularisers a config can name without an import path, by factory name."""
    from strategies import regularisers

    return {"r1": regularisers.r1, "r2": regularisers.r2, "wgan_gp": regularisers.wgan_gp}


def build_strategy(config: RunConfig) -> Any:
    """The strategy a config names, with its optimisers and schedulers bound to its roles."""
    spec = config.strategy
    if spec is None:
        raise ConfigError("a [pythae] config has no [strategy]: its strategy comes from pythae")
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
    consumed = {"losses"} if "roles" in roles else set()  # SharedGraphUpdates' roles
    args = {**{k: v for k, v in spec.args.items() if k not in consumed}, **roles}
    check_arguments("strategy", cls, args)
    args.update(_strategy_objects(spec, args))
    return call_factory(FactoryRef("strategy", spec.name, args), cls)


def _strategy_objects(spec: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments TOML spells as tables, as the objects the strategy takes: ``regularisers``
    (a list of tables) and ``phases`` (an array of tables, each naming a role of
    ``[strategy.optimizers]``)."""
    objects: dict[str, Any] = {}
    if "regularisers" in args:
        objects["regularisers"] = build_regularisers("strategy.regularisers", args["regularisers"])
    if "phases" in args:
        objects["phases"] = build_phases("strategy.phases", args["phases"], list(spec.optimizers))
    return objects


def _tables(key: str, value: Any, example: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
        raise ConfigError(f"{key} must be a list of tables, e.g. {example}, got {value!r}")
    return value


def build_regularisers(key: str, value: Any) -> tuple[Any, ...]:
    """``[{name = "r1", gamma = 0.1}, ...]`` as ``GradientPenalty`` objects: ``name`` is one of
    ``regulariser_factories()`` or an import path ``package.module:factory``, the other keys
    its arguments."""
    from strategies.regularisers import GradientPenalty

    known = regulariser_factories()
    built = []
    for index, table in enumerate(_tables(key, value, '[{name = "r1", gamma = 0.1}]')):
        where = f"{key}.{index}"
        name = table.get("name")
        if isinstance(name, str) and ":" in name:
            factory = import_object(f"{where}.name", name)
        elif isinstance(name, str) and name in known:
            factory = known[name]
        else:
            raise ConfigError(
                f"{where}.name = {name!r} is not a regulariser; choose one of {sorted(known)} "
                "or give an import path 'package.module:factory'"
            )
        ref = FactoryRef(where, name, {k: v for k, v in table.items() if k != "name"})
        check_arguments(where, factory, ref.args)
        penalty = call_factory(ref, factory)
        if not isinstance(penalty, GradientPenalty):
            raise ConfigError(
                f"{where}.name = {name!r} returned a {type(penalty).__name__}, not a "
                "GradientPenalty (strategies.regularisers)"
            )
        built.append(penalty)
    return tuple(built)


def build_phases(key: str, value: Any, roles: Sequence[str]) -> tuple[Any, ...]:
    """``[[strategy.phases]]`` tables as ``Phase`` records, in order: ``role`` (one of
    ``roles``), ``forward`` (the model call's ``phase=``; absent: ``model(batch)``),
    ``loss_key``, ``regularisers`` (as ``build_regularisers``), ``every``, ``start``,
    ``adversarial_start``, ``name``."""
    from strategies.phases import Phase

    example = '[[strategy.phases]] role = "discriminator", forward = "discriminator", ...'
    tables = _tables(key, value, example)
    if not tables:
        raise ConfigError(f"{key} is empty: give one [[strategy.phases]] table per phase")
    phases = []
    for index, table in enumerate(tables):
        where = f"{key}.{index}"
        role = table.get("role")
        if not isinstance(role, str) or role not in roles:
            raise ConfigError(
                f"{where}.role = {role!r} is not a role of [strategy.optimizers]; the roles "
                f"are {list(roles)}"
            )
        args = {"forward": None, **table}
        if "regularisers" in args:
            args["regularisers"] = build_regularisers(f"{where}.regularisers", args["regularisers"])
        check_arguments(where, Phase, args)
        phases.append(call_factory(FactoryRef(where, "Phase", args), Phase))
    return tuple(phases)


def _role_arguments(cls: Any, spec: Any) -> dict[str, Any]:
    """Optimiser and scheduler specs as the strategy's constructor takes them: a single-role
    strategy (``Standard``) takes ``optimizer``/``scheduler`` for role ``model``; one with
    ``optimizers``/``schedulers`` mappings (``Sequential``) takes them by role as they are;
    ``SharedGraphUpdates`` takes ``roles``, made from ``losses`` (see ``_shared_graph_roles``);
    another multi-role one takes ``<role>`` (the optimiser) and ``<role>_scheduler`` for each
    of its roles."""
    accepted = set(inspect.signature(cls).parameters)
    roles = sorted(spec.optimizers)
    if {"optimizers", "schedulers"} <= accepted:
        return {"optimizers": dict(spec.optimizers), "schedulers": dict(spec.schedulers)}
    if "roles" in accepted and "losses" not in accepted:
        return _shared_graph_roles(spec)
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


def _shared_graph_roles(spec: Any) -> dict[str, Any]:
    """``SharedGraphUpdates``' ``roles`` from ``losses = {role = "loss key", ...}``, written in
    the order the losses are back-propagated (pythae's: encoder, decoder, discriminator); each
    role with its ``[strategy.optimizers.ROLE]`` and ``[strategy.schedulers.ROLE]``."""
    from strategies.roles import RoleFields

    losses = spec.args.get("losses")
    example = '{encoder = "encoder_loss", decoder = "decoder_loss"}'
    if not isinstance(losses, Mapping) or not all(isinstance(v, str) for v in losses.values()):
        raise ConfigError(
            f"strategy {spec.name!r} needs strategy.losses, each role's loss key in the order "
            f"they are back-propagated, e.g. {example}; got {losses!r}"
        )
    if sorted(losses) != sorted(spec.optimizers):
        raise ConfigError(
            f"strategy.losses names the role(s) {list(losses)}; [strategy.optimizers] has "
            f"{sorted(spec.optimizers)}: give each role one loss key"
        )
    return {
        "roles": {
            role: RoleFields(spec.optimizers[role], spec.schedulers.get(role), key)
            for role, key in losses.items()
        }
    }


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
    if config.pythae is not None:
        return build_pythae(config, config.pythae, with_callbacks=with_callbacks)
    if config.model is None:
        raise ConfigError("the config has neither [model] nor [pythae]")
    seed_everything(config.engine.seed)
    model = call_factory(config.model, import_object("model.factory", config.model.target))
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model.factory {config.model.target!r} must return a torch.nn.Module, "
            f"got {type(model).__name__}"
        )
    train, eval_data = _data(config)
    strategy = build_strategy(config)
    callbacks: list[Any] = []
    if with_callbacks:
        image_batch = first_samples(eval_data if eval_data is not None else train, IMAGE_BATCH_SIZE)
        callbacks = build_callbacks(config, image_batch, DEFAULT_CALLBACKS)
    return Built(config, model, train, eval_data, strategy, callbacks)


def _data(config: RunConfig) -> tuple[Any, Any]:
    train = call_factory(config.train, import_object("data.train.factory", config.train.target))
    eval_data = (
        None
        if config.eval is None
        else call_factory(config.eval, import_object("data.eval.factory", config.eval.target))
    )
    return train, eval_data


def build_pythae(config: RunConfig, section: PythaeSection, *, with_callbacks: bool) -> Built:
    """A ``[pythae]`` config's model and training config (``load_from_json``: the initial
    weights drawn after seeding with the training config's seed, or with ``engine.seed`` where
    the config writes it), its data and callbacks. A training config that saves checkpoints
    itself (``steps_saving``) takes the place of the default ``Checkpointing``."""
    from strategies.pythae import load_from_json

    for key in ("model_config", "training_config"):
        path = getattr(section, key)
        if path is not None and not path.exists():
            raise ConfigError(
                f"pythae.{key}: {str(path)!r} does not exist (a relative path is read from "
                "the folder of the config file)"
            )
    seed = config.raw.get("engine", {}).get("seed")
    setup = load_from_json(section.model_config, section.training_config, seed=seed)
    train, eval_data = _data(config)
    defaults: tuple[str, ...] = DEFAULT_CALLBACKS
    saving = getattr(setup.training_config, "steps_saving", None)
    if saving is not None:
        named = [
            ref.key for ref in config.callbacks if ref.target.split(":")[-1] == "Checkpointing"
        ]
        if named:
            raise ConfigError(
                f"the training config saves checkpoints itself (steps_saving={saving}); "
                f"{named[0]} would save a second set: drop one of them"
            )
        defaults = tuple(name for name in defaults if name != "Checkpointing")
    callbacks: list[Any] = []
    if with_callbacks:
        image_batch = first_samples(eval_data if eval_data is not None else train, IMAGE_BATCH_SIZE)
        callbacks = build_callbacks(config, image_batch, defaults)
    return Built(config, setup.model, train, eval_data, None, callbacks, pythae=setup)


def prepare(built: Built, callbacks: Sequence[Any] = ()) -> Prepared:
    """The engine of a built config with ``callbacks``; for a ``[pythae]`` config
    ``from_pythae``'s, with the written ``[engine]`` keys as its only overrides."""
    config = built.config
    if built.pythae is None:
        engine = Engine(built.strategy, config.engine, callbacks)
        evaluate = functools.partial(engine.evaluate, built.model)
        return Prepared(engine, built.model, built.train, built.eval, evaluate)
    assert config.pythae is not None, "a Built with a PythaeSetup comes from a [pythae] config"
    run = built.pythae.run(
        built.train,
        built.eval,
        updates=config.pythae.updates,
        metrics=config.pythae.metrics,
        overrides=dict(config.raw.get("engine", {})),
        callbacks=callbacks,
    )
    return Prepared(run.engine, run.model, run.train, run.eval, run.evaluate)


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A config file, or a run folder's latest config (``latest_config``), with overrides
    applied and checked; relative ``[pythae]`` paths are read from the file's folder."""
    path = Path(path)
    if path.is_dir():
        path = latest_config(path)
    raw = load_config_file(path)
    return resolve_config(apply_overrides(raw, overrides), base=path.parent)


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
    the run for the command line's interrupt message.

    ``pythae_files`` (a ``[pythae]`` key to the file or folder it names) are copied into the
    run folder first, as ``PYTHAE_COPIES`` names them, and the written config names the copies
    (relative to the run folder, where it lies). A resume whose file differs from the copy
    already there writes its own, ``<name>-resume-N``, so that no written config's file
    changes."""

    raw_config: dict[str, Any]
    resumed: bool = False
    pythae_files: Mapping[str, Path] = attrs.field(factory=dict)
    priority: int = 100
    run: RunState | None = None

    def on_fit_start(self, run: RunState) -> None:
        self.run = run
        if run.run_dir is None or not run.is_main_process:
            run.extra[RUN_CONFIG_KEY] = self.raw_config
            return
        number = len(resume_configs(run.run_dir)) + 1
        raw = copy.deepcopy(self.raw_config)
        for key, source in self.pythae_files.items():
            raw["pythae"][key] = copy_into_run(run.run_dir, key, source, number)
        self.raw_config = raw
        run.extra[RUN_CONFIG_KEY] = raw  # trackers log it as the run's parameters
        path = run.run_dir / CONFIG_FILENAME
        if self.resumed:
            path = run.run_dir / RESUME_CONFIG.format(number)
        path.write_text(dump_toml(raw), encoding="utf-8")
        run.paths["config"] = path


def copy_into_run(run_dir: Path, key: str, source: Path, number: int) -> str:
    """Copy ``source`` (the file or folder ``[pythae] key`` names) into ``run_dir``; returns the
    name of the copy. A copy already there that equals ``source`` (the run's own, on a resume)
    is kept; one that differs (a resume given another file) is left as it is, and ``source``
    goes to ``<name>-resume-<number>``."""
    file_name, folder_name = PYTHAE_COPIES[key]
    name = folder_name if source.is_dir() else file_name
    target = run_dir / name
    if target.exists() and not _same(source, target):
        stem, dot, suffix = name.partition(".")
        name = f"{stem}-resume-{number}{dot}{suffix}"
        target = run_dir / name
    if not target.exists():
        _replace(source, target)
    return name


def _same(source: Path, target: Path) -> bool:
    if source.exists() and target.exists() and source.samefile(target):
        return True
    if source.is_file() and target.is_file():
        return filecmp.cmp(source, target, shallow=False)
    return False


def _replace(source: Path, target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)


def run_files(config: RunConfig, resumed: bool = False) -> RunFiles:
    """The ``RunFiles`` of a config: its raw mapping, and a ``[pythae]`` config's files."""
    files: dict[str, Path] = {}
    if config.pythae is not None:
        files["model_config"] = config.pythae.model_config
        if config.pythae.training_config is not None:
            files["training_config"] = config.pythae.training_config
    return RunFiles(config.raw, resumed=resumed, pythae_files=files)


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
    files = run_files(config)
    return _fit(prepare(built, [files, *built.callbacks]), files)


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


def _fit(prepared: Prepared, files: RunFiles, resume: Path | None = None) -> FitResult:
    """``engine.fit``; a Ctrl-C becomes ``Interrupted``, naming where the run stopped."""
    try:
        return prepared.engine.fit(prepared.model, prepared.train, prepared.eval, resume=resume)
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
    prepared = prepare(_trained(target, overrides, weights))
    return prepared.evaluate(_split(prepared, split))


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
    prepared = prepare(_trained(target, overrides, weights))
    outputs = prepared.engine.predict(prepared.model, _split(prepared, split))
    output = Path(output)
    torch.save(outputs, output)
    return output


def _trained(target: str | Path, overrides: Sequence[str], weights: str | None) -> Built:
    config = load_run_config(target, overrides)
    built = build(config, with_callbacks=False)
    if weights is None and not Path(target).is_dir():
        raise ConfigError(
            f"{str(target)!r} is a config file: give --weights PATH, or a run folder instead"
        )
    load_weights(built.model, Path(weights) if weights else Path(target) / MODEL_FILENAME)
    return built


def _split(built: Prepared, split: str) -> Any:
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
    files = run_files(config, resumed=True)
    return _fit(prepare(built, [files, *built.callbacks]), files, resume=run_dir)


def export_pythae(run_dir: str | Path, folder: str | Path, overrides: Sequence[str] = ()) -> Path:
    """The latest checkpoint of a ``[pythae]`` run folder as a pythae model folder at
    ``folder`` (``pythae.models.AutoModel.load_from_folder`` reads it)."""
    from strategies.pythae import export_to_pythae

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILENAME).is_file():
        raise ConfigError(
            f"export-pythae needs a run folder holding {CONFIG_FILENAME}, got {str(run_dir)!r}"
        )
    config = load_run_config(run_dir, overrides)
    if config.pythae is None:
        raise ConfigError(
            f"export-pythae needs a run of a [pythae] config; {str(run_dir)!r} trained "
            f"[model] {config.model.target if config.model else None!r}"
        )
    built = build(config, with_callbacks=False)
    return export_to_pythae(built.model, folder, checkpoint=run_dir)
