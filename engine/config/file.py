"""Run config files: load TOML or JSON, apply ``--set`` overrides, check every section, and
write the resolved config back as TOML.

A run config has five sections::

    [model]                      factory = "examples.models:VAE", other keys are its arguments
    [data.train] / [data.eval]   factory = "examples.data:digits", split = "train", ...
    [strategy]                   name = "Standard", other keys are its arguments, with
    [strategy.optimizers.ROLE]   name = "Adam", lr = 1e-3, ...   (an ``OptimizerSpec``)
    [strategy.schedulers.ROLE]   name = "StepLR", interval = "epoch", ... (a ``SchedulerSpec``)
    [engine]                     ``EngineConfig`` fields
    [[callbacks]]                name = "EarlyStopping" or "package.module:Factory", + arguments

or, for a pythae model, a ``[pythae]`` section in place of ``[model]`` and ``[strategy]``::

    [pythae]                     model_config = "model_config.json" (or a saved model folder),
                                 training_config = "training_config.json" (optional),
                                 updates = "isolated" | "pythae", metrics = ["recon_loss"]

Its paths are read relative to the folder of the config file that names them (so a run
folder's ``config.toml`` names the copies beside it). The training config then sets the
engine's values, and only the ``[engine]`` keys the config writes override them: for such a
config ``raw["engine"]`` holds just those keys, not the resolved ``EngineConfig``.

``resolve_config`` checks all of it (unknown keys, wrong types, import paths that do not
resolve, arguments a factory does not take) and raises one ``ConfigError`` naming the key, the
value and what was expected, so that a bad config fails before any training. Which strategy and
callback names exist is the CLI's business (``engine.cli.main``); this module knows only the shape.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from engine.config.engine_config import EngineConfig
from engine.config.specs import OptimizerSpec, SchedulerSpec
from engine.config.validators import Check, non_empty_str
from engine.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

SECTIONS = ("model", "data", "strategy", "engine", "callbacks", "pythae")
REQUIRED_SECTIONS = ("model", "data", "strategy")
DATA_KEYS = ("train", "eval")
PYTHAE_KEYS = ("model_config", "training_config", "updates", "metrics")
PYTHAE_REPLACES = ("model", "strategy")
PYTHAE_UPDATES = ("isolated", "pythae")
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_IMPORT_PATH_WHAT = "an import path 'package.module:callable'"
_import_path = Check(
    _IMPORT_PATH_WHAT, lambda value: isinstance(value, str) and bool(_IMPORT_PATH.fullmatch(value))
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


# ----------------------------------------------------------------------------- reading


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a ``.toml`` or ``.json`` file; a missing or unparsable file is a
    ``ConfigError`` naming the file and the parser's complaint."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"config file must end in .toml or .json, got {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"can not read config file {str(path)!r}: {error}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"config file {str(path)!r} is not valid {path.suffix[1:]}: {error}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table, got {type(data).__name__}")
    return data


def read_toml(text: str) -> dict[str, Any]:
    """Parse TOML text (``tomllib``, or ``tomli`` on Python 3.10)."""
    return tomllib.loads(text)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"engine.epochs=5"`` as (``["engine", "epochs"]``, ``5``). The value is read as a TOML
    value (``5``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``); anything else is taken as a string."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not part for part in parts):
        raise ConfigError(
            f"an override must look like section.key=value (e.g. engine.epochs=5), got {text!r}"
        )
    try:
        value = tomllib.loads(f"value = {value_text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return parts, value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``key.path=value`` set; list items are addressed by index
    (``callbacks.0.patience=5``). Missing tables on the path are created."""
    result: dict[str, Any] = copy_tree(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                index = _index(node, part, text)
                if last:
                    node[index] = value
                node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                node = node.setdefault(part, {})
            else:
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[:depth])!r} is a "
                    f"{type(node).__name__}, not a table"
                )
    return result


def _index(node: list[Any], part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            f"override {text!r}: {part!r} is not an index of a list of {len(node)} item(s)"
        )
    return int(part)


def copy_tree(value: Any) -> Any:
    """Mappings and lists copied, leaves shared: the source (a loaded config or checkpoint)
    stays as it was read."""
    if isinstance(value, Mapping):
        return {key: copy_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_tree(item) for item in value]
    return value


# ----------------------------------------------------------------------------- checking


@attrs.frozen
class FactoryRef:
    """A callable named by import path (or by a registered name), with its arguments."""

    key: str  # where it sits in the config, e.g. "data.train", for error messages
    target: str
    args: dict[str, Any]


@attrs.frozen
class StrategyConfig:
    """The strategy's name, its optimiser and scheduler specs by role, and further arguments."""

    name: str
    optimizers: dict[str, OptimizerSpec]
    schedulers: dict[str, SchedulerSpec]
    args: dict[str, Any]


@attrs.frozen
class PythaeSection:
    """A ``[pythae]`` section: pythae's model config JSON (or saved model folder) and training
    config JSON (None: the default ``TrainingPipeline`` would use), as absolute paths; whose
    updates (``"isolated"``, or ``"pythae"``: ``SharedGraphUpdates``); further outputs to log."""

    model_config: Path
    training_config: Path | None
    updates: str
    metrics: tuple[str, ...]


@attrs.frozen
class RunConfig:
    """A checked run config. ``raw`` is the resolved mapping that ``dump_toml`` writes.

    A ``[pythae]`` config has ``pythae`` set and neither ``model`` nor ``strategy``; its
    ``engine`` is the written ``[engine]`` keys over the defaults (the run's own comes from the
    training config, see the module docstring) and ``raw["engine"]`` the written keys only."""

    model: FactoryRef | None
    train: FactoryRef
    eval: FactoryRef | None
    strategy: StrategyConfig | None
    engine: EngineConfig
    callbacks: tuple[FactoryRef, ...]
    raw: dict[str, Any]
    pythae: PythaeSection | None = None


def resolve_config(raw: Mapping[str, Any], base: str | Path | None = None) -> RunConfig:
    """Check a raw config and return it resolved; the first problem is a ``ConfigError``.
    ``base`` is the folder of the config file, which relative ``[pythae]`` paths start from
    (None: the working directory)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a run config must be a table, got {type(raw).__name__}")
    is_pythae = "pythae" in raw
    _check_keys("the config", raw, SECTIONS, ("data",) if is_pythae else REQUIRED_SECTIONS)
    both = [key for key in PYTHAE_REPLACES if key in raw] if is_pythae else []
    if both:
        raise ConfigError(
            f"[pythae] replaces [model] and [strategy] (the pythae files describe both); the "
            f"config has [pythae] and {['[' + key + ']' for key in both]}: remove one"
        )
    model = None if is_pythae else _factory("model", raw["model"])
    data = _table("data", raw["data"])
    _check_keys("[data]", data, DATA_KEYS, ("train",))
    train = _factory("data.train", data["train"])
    eval_ref = _factory("data.eval", data["eval"]) if "eval" in data else None
    strategy = None if is_pythae else _strategy(_table("strategy", raw["strategy"]))
    pythae = _pythae(raw["pythae"], base) if is_pythae else None
    engine_values = dict(_table("engine", raw.get("engine", {})))
    engine = _engine_config(engine_values)
    callbacks_raw = raw.get("callbacks", [])
    if not isinstance(callbacks_raw, list):
        raise ConfigError(
            f"callbacks must be a list of tables ([[callbacks]]), got {callbacks_raw!r}"
        )
    callbacks = tuple(
        _factory(f"callbacks.{index}", item, name_key="name", allow_names=True)
        for index, item in enumerate(callbacks_raw)
    )
    if is_pythae:
        resolved = {
            "pythae": copy_tree(raw["pythae"]),
            "data": copy_tree(data),
            "engine": copy_tree(engine_values),
            "callbacks": copy_tree(callbacks_raw),
        }
    else:
        resolved = {
            "model": copy_tree(raw["model"]),
            "data": copy_tree(data),
            "strategy": copy_tree(raw["strategy"]),
            "engine": {k: v for k, v in engine.to_dict().items() if v is not None},
            "callbacks": copy_tree(callbacks_raw),
        }
    return RunConfig(model, train, eval_ref, strategy, engine, callbacks, resolved, pythae)


def _pythae(value: Any, base: str | Path | None) -> PythaeSection:
    """The ``[pythae]`` section, its paths made absolute from ``base``; that the files exist
    and are pythae's is checked when they are read (``strategies.pythae.load_from_json``)."""
    table = _table("pythae", value)
    _check_keys("[pythae]", table, PYTHAE_KEYS, ("model_config",))
    what = "a path to pythae's model_config.json or to a saved pythae model folder"
    model_config = _name("pythae.model_config", table["model_config"], what)
    training_config = None
    if "training_config" in table:
        what = "a path to pythae's training_config.json"
        training_config = _name("pythae.training_config", table["training_config"], what)
    updates = table.get("updates", PYTHAE_UPDATES[0])
    if updates not in PYTHAE_UPDATES:
        raise ConfigError(
            f"pythae.updates must be one of {list(PYTHAE_UPDATES)} (isolated updates, or "
            f"pythae's own shared-graph updates), got {updates!r}"
        )
    metrics = table.get("metrics", [])
    if not isinstance(metrics, list) or not all(non_empty_str.test(m) for m in metrics):
        raise ConfigError(
            f"pythae.metrics must be a list of output names (e.g. ['recon_loss']), got {metrics!r}"
        )
    return PythaeSection(
        _from_base(model_config, base),
        None if training_config is None else _from_base(training_config, base),
        str(updates),
        tuple(metrics),
    )


def _from_base(path: str, base: str | Path | None) -> Path:
    """``path`` itself when absolute, else ``path`` inside ``base`` (the working directory
    when None), made absolute."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return given
    return (Path(base) if base is not None else Path.cwd()).absolute() / given


def _table(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{key}] must be a table, got {value!r}")
    return value


def _check_keys(
    where: str, table: Mapping[str, Any], known: Sequence[str], required: Sequence[str]
) -> None:
    unknown = sorted(str(key) for key in table if key not in known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; expected keys: {list(known)}")
    missing = [key for key in required if key not in table]
    if missing:
        raise ConfigError(f"{where} is missing required key(s) {missing}")


def _factory(
    key: str, value: Any, *, name_key: str = "factory", allow_names: bool = False
) -> FactoryRef:
    table = _table(key, value)
    target = _name(
        f"{key}.{name_key}",
        table.get(name_key),
        ("a registered name or " if allow_names else "") + _IMPORT_PATH_WHAT,
    )
    args = {k: copy_tree(v) for k, v in table.items() if k != name_key}
    if ":" in target or not allow_names:
        check_arguments(key, import_object(f"{key}.{name_key}", target), args)
    return FactoryRef(key, target, args)


def _name(key: str, value: Any, what: str) -> str:
    """``value``, a non-empty string; else a ``ConfigError`` "<key> must be <what>, got ..."."""
    Check(what, non_empty_str.test).require(key, value)
    return str(value)


def import_object(key: str, path: str) -> Any:
    """The object at ``package.module:name``; a bad path is a ``ConfigError`` naming ``key``."""
    _import_path.require(key, path)
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"{key} = {path!r}: can not import module {module_name!r} ({error})"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key} = {path!r}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key} = {path!r} is not callable (a {type(target).__name__})")
    return target


def check_arguments(key: str, target: Callable[..., Any], args: Mapping[str, Any]) -> None:
    """Refuse arguments that ``target`` does not take, and required ones that are missing."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**args)
    except TypeError as error:
        accepted = [
            name
            for name, param in signature.parameters.items()
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        ]
        raise ConfigError(
            f"[{key}] {getattr(target, '__name__', target)!r} can not take arguments "
            f"{sorted(args)}: {error}; it takes {accepted}"
        ) from None


def call_factory(ref: FactoryRef, target: Callable[..., Any], **extra: Any) -> Any:
    """``target(**ref.args, **extra)``; any error raised while building is a ``ConfigError``
    naming the config key and the arguments (the original is its ``__cause__``), so a bad
    argument value stops the run up front."""
    try:
        return target(**ref.args, **extra)
    except ConfigError as error:
        raise ConfigError(f"[{ref.key}] {ref.target}: {error}") from None
    except Exception as error:  # whatever a factory raises on these arguments is a config error
        raise ConfigError(
            f"[{ref.key}] {ref.target}({_arguments_text(ref.args)}) failed: "
            f"{type(error).__name__}: {error}"
        ) from error


def _arguments_text(args: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in args.items())


def _strategy(table: Mapping[str, Any]) -> StrategyConfig:
    name = _name("strategy.name", table.get("name"), "a strategy name (e.g. 'Standard')")
    optimizer_tables = _table("strategy.optimizers", table.get("optimizers", {}))
    scheduler_tables = _table("strategy.schedulers", table.get("schedulers", {}))
    if not optimizer_tables:
        raise ConfigError(
            "strategy.optimizers is empty: give one table per role, e.g. "
            "[strategy.optimizers.model] name = 'Adam', lr = 1e-3"
        )
    orphans = sorted(set(scheduler_tables) - set(optimizer_tables))
    if orphans:
        raise ConfigError(
            f"strategy.schedulers has role(s) {orphans} with no optimizer; "
            f"optimizer roles: {sorted(optimizer_tables)}"
        )
    optimizers = {
        role: _spec("optimizers", role, spec, OptimizerSpec)
        for role, spec in optimizer_tables.items()
    }
    schedulers = {
        role: _spec("schedulers", role, spec, SchedulerSpec)
        for role, spec in scheduler_tables.items()
    }
    args = {
        k: copy_tree(v) for k, v in table.items() if k not in ("name", "optimizers", "schedulers")
    }
    return StrategyConfig(name, optimizers, schedulers, args)


def _spec(kind: str, role: str, value: Any, spec_type: Any) -> Any:
    key = f"strategy.{kind}.{role}"
    table = _table(key, value)
    name = _name(f"{key}.name", table.get("name"), "a torch class name (e.g. 'Adam')")
    params = {k: v for k, v in table.items() if k != "name"}
    try:
        return spec_type(name, **params)
    except ConfigError as error:
        raise ConfigError(f"[{key}] {error}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[{key}] {name}({_arguments_text(params)}): {error}") from None


def _engine_config(values: dict[str, Any]) -> EngineConfig:
    try:
        return EngineConfig.from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"[engine] {error}") from None


# ----------------------------------------------------------------------------- writing


def dump_toml(data: Mapping[str, Any]) -> str:
    """``data`` as TOML that ``tomllib`` reads back equal. ``None`` values are left out (TOML
    has no null; an absent key means the default). Lists of tables become ``[[arrays]]``."""
    lines: list[str] = []
    _write_table(lines, [], data)
    return "\n".join(lines).strip() + "\n"


def _write_table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    subtables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            subtables.append((key, value))
        elif _is_table_array(value):
            arrays.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables:
        lines.append("")
        lines.append(f"[{'.'.join(_key(part) for part in (*path, key))}]")
        _write_table(lines, [*path, key], value)
    for key, items in arrays:
        for item in items:
            lines.append("")
            lines.append(f"[[{'.'.join(_key(part) for part in (*path, key))}]]")
            _write_inline_members(lines, item)


def _write_inline_members(lines: list[str], table: Mapping[str, Any]) -> None:
    for key, value in table.items():
        if value is not None:
            lines.append(f"{_key(key)} = {_value(value)}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"TOML keys must be strings, got {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    escaped = json.dumps(text, ensure_ascii=False)
    return escaped.replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Path):
        return _string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value if item is not None) + "]"
    if isinstance(value, Mapping):
        members = [f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(members) + "}"
    raise ConfigError(f"can not write a {type(value).__name__} to TOML: {value!r}")
