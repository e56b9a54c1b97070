"""engine/config/validators.py and everything built on it: a bad value for any EngineConfig
field, any argument of any torch optimiser or scheduler, or any key of a config file that is the
engine's is our error before the first step, and the files of an earlier run stay
byte-identical."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import (
    CheckpointError,
    ConfigError,
    DataError,
    Engine,
    EngineConfig,
    Event,
    ModelOutputError,
    OptimizerSpec,
    SchedulerSpec,
    StrategyError,
)
from engine.cli.main import main
from engine.config.file import dump_toml
from engine.config.specs import optimizer_classes, scheduler_classes
from engine.config.validators import (
    DEVICE_PATTERN,
    SEED_LIMIT,
    finite_positive_number,
    output_names,
    positive_int,
    seed_value,
)
from strategies import Standard
from tests.helpers import EventRecorder, TinyRegressor

OURS = (CheckpointError, ConfigError, DataError, ModelOutputError, StrategyError)
HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]


# ----------------------------------------------------------------------------- checks


@given(st.integers(-(2**70), 2**70))
def test_seed_value_accepts_exactly_the_range_every_derived_generator_holds(seed: int) -> None:
    inside = -SEED_LIMIT <= seed <= SEED_LIMIT
    if not inside:
        with pytest.raises(ConfigError, match=f"seed must be .* got {seed}"):
            seed_value.require("seed", seed)
        return
    seed_value.require("seed", seed)
    # what the engine derives from it (the epoch shuffle, a rank's reseed) fits torch's range
    torch.Generator().manual_seed(seed * 1_000_003 + 10**6)


@pytest.mark.parametrize("value", ["reg_loss", ("a", 1), ("",), 3, None])
def test_output_names_refuse_what_is_not_a_tuple_of_names(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"metrics must be a tuple of output names"):
        output_names.require("metrics", value)


@pytest.mark.parametrize("value", [math.inf, math.nan, 0, -1.0, "1", True])
def test_finite_positive_number_refuses_each(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"timeout must be a finite positive number, got"):
        finite_positive_number.require("timeout", value)


def test_messages_name_the_field_and_the_value() -> None:
    with pytest.raises(ConfigError) as caught:
        positive_int.require("epochs", 0)
    assert str(caught.value) == "epochs must be a positive integer, got 0"


# ----------------------------------------------------------------------------- an earlier run


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output root holding one finished run, ``earlier``."""
    root = tmp_path_factory.mktemp("root")
    engine = Engine(
        Standard(OptimizerSpec("Adam", lr=1e-2)),
        EngineConfig(epochs=1, batch_size=4, device="cpu", output_dir=root, run_name="earlier"),
    )
    engine.fit(TinyRegressor(), torch.randn(8, 4))
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


_junk = st.one_of(
    st.text(max_size=5),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
_not_int = st.one_of(_junk.filter(lambda v: not isinstance(v, int)), st.booleans())
_not_positive_int = st.one_of(st.integers(max_value=0), _not_int)
_not_bool = st.one_of(st.integers(), st.text(max_size=4), st.none())
_not_number = st.one_of(st.text(max_size=4), st.booleans(), st.lists(st.floats(), max_size=2))


def _bad_values(root: Path) -> dict[str, st.SearchStrategy[Any]]:
    """For each EngineConfig field, values that must be refused (at construction, or by the
    pre-flight stage, or where the device is chosen)."""
    run_file = root / "earlier" / "train.log"
    return {
        "epochs": _not_positive_int,
        "max_steps": _not_positive_int,
        "batch_size": _not_positive_int,
        "eval_batch_size": _not_positive_int,
        "shuffle": _not_bool,
        "drop_last": _not_bool,
        "seed": st.one_of(
            st.integers(min_value=SEED_LIMIT + 1),
            st.integers(max_value=-SEED_LIMIT - 1),
            _not_int,
        ),
        "device": st.one_of(
            st.text(max_size=6).filter(lambda v: DEVICE_PATTERN.fullmatch(v) is None),
            st.just("cuda:99"),
        ),
        "precision": st.text(max_size=5).filter(lambda v: v not in ("fp32", "bf16", "fp16")),
        "grad_clip_norm": st.one_of(st.floats(max_value=0), st.just(math.nan), _not_number),
        "accumulate_steps": _not_positive_int,
        "eval_every": _not_positive_int,
        "log_every": _not_positive_int,
        "nonfinite": st.text(max_size=6).filter(lambda v: v not in ("raise", "skip")),
        "monitor": st.one_of(
            st.just(""),
            st.text(min_size=1, max_size=6)
            .map(lambda v: f"train/{v}")
            .filter(lambda v: v != "train/loss"),
            st.sampled_from(["eval/loss", "loss", "lr/models"]),
            st.integers(),
        ),
        "monitor_mode": st.text(max_size=4).filter(lambda v: v not in ("min", "max")),
        "num_workers": st.one_of(st.integers(max_value=-1), _not_int),
        "data_on_device": _not_bool,
        "compile": st.one_of(
            st.integers(0, 9),
            st.none(),
            st.text(max_size=5).filter(lambda v: v not in ("model", "step")),
        ),
        "output_dir": st.one_of(
            st.just(str(run_file)), st.just(str(run_file / "below")), st.integers(), st.just("")
        ),
        "run_name": st.one_of(
            st.sampled_from(["", ".", "..", "a/b", "a\\b"]), st.integers(), st.booleans()
        ),
        "distributed_timeout_s": st.one_of(
            st.floats(max_value=0), st.sampled_from([math.inf, math.nan]), _not_number
        ),
        "eval_with_grad": _not_bool,
        "parallel": st.text(max_size=5).filter(lambda v: v not in ("ddp", "fsdp")),
        "fsdp_blocks": st.one_of(st.text(min_size=1, max_size=4), st.just(("",)), st.integers()),
        "fsdp_mesh": st.one_of(st.just((0,)), st.just((1, 2, 2)), st.integers(), st.just(("a",))),
        "fsdp_reshard_after_forward": _not_bool,
        "fsdp_forward_methods": st.one_of(st.text(min_size=1, max_size=4), st.just((3,))),
    }


def test_every_engine_config_field_has_bad_values_drawn() -> None:
    fields = {field.name for field in attrs.fields(EngineConfig)}
    assert set(_bad_values(Path("x"))) == fields


@settings(max_examples=150, deadline=None, suppress_health_check=HEALTH, derandomize=True)
@given(data=st.data())
def test_a_bad_engine_config_value_is_our_error_before_any_step(data: Any, earlier: Path) -> None:
    before = files_of(earlier)
    field = data.draw(st.sampled_from(sorted(_bad_values(earlier))), label="field")
    value = data.draw(_bad_values(earlier)[field], label="value")
    recorder = EventRecorder()
    settings_ = {"epochs": 1, "batch_size": 4, "device": "cpu", "output_dir": earlier}
    with pytest.raises(OURS) as caught:
        config = EngineConfig(**{**settings_, "run_name": "new", field: value})
        engine = Engine(Standard(OptimizerSpec("Adam")), config, [recorder])
        engine.fit(TinyRegressor(), torch.randn(8, 4))
    assert field in str(caught.value) or repr(value) in str(caught.value)
    assert recorder.count(Event.BATCH_START) == 0
    assert files_of(earlier) == before
    assert sorted(p.name for p in earlier.iterdir()) == ["earlier"]


# ----------------------------------------------------------------------------- spec arguments


def _arguments(classes: dict[str, type]) -> list[tuple[str, str, Any]]:
    """Every (class, argument, default) a spec can set, where the default says its kind."""
    found = []
    for name, cls in sorted(classes.items()):
        for parameter in list(inspect.signature(cls).parameters.values())[1:]:
            default = parameter.default
            if isinstance(default, (bool, int, float, str, tuple)):
                found.append((name, parameter.name, default))
    return found


def _wrong_kind(default: Any) -> st.SearchStrategy[Any]:
    """Values of another kind than ``default``."""
    if isinstance(default, bool):
        return st.one_of(st.integers(), st.text(max_size=3), st.none())
    if isinstance(default, (int, float)):
        return st.one_of(st.text(max_size=3), st.booleans(), st.none(), st.just([]), st.just({}))
    if isinstance(default, tuple):
        return st.one_of(
            st.floats(), st.text(max_size=3), st.lists(st.floats(), min_size=len(default) + 1)
        )
    return st.one_of(st.integers(), st.floats(), st.booleans(), st.none())


OPTIMIZER_ARGUMENTS = _arguments(optimizer_classes())
SCHEDULER_ARGUMENTS = [a for a in _arguments(scheduler_classes()) if a[1] != "last_epoch"]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_a_wrong_kind_of_value_for_any_optimiser_argument_is_refused_naming_it(data: Any) -> None:
    name, argument, default = data.draw(st.sampled_from(OPTIMIZER_ARGUMENTS), label="argument")
    value = data.draw(_wrong_kind(default), label="value")
    with pytest.raises(ConfigError, match=f"argument {argument}="):
        OptimizerSpec(name, **{argument: value})


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_a_wrong_kind_of_value_for_any_scheduler_argument_is_refused_naming_it(data: Any) -> None:
    name, argument, default = data.draw(st.sampled_from(SCHEDULER_ARGUMENTS), label="argument")
    value = data.draw(_wrong_kind(default), label="value")
    monitor = "train/loss" if name == "ReduceLROnPlateau" else None
    with pytest.raises(ConfigError, match=f"argument {argument}="):
        SchedulerSpec(name, monitor=monitor, **{argument: value})


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("Adam", {"lr": -1}),
        ("Adam", {"eps": -1e-8}),
        ("Adam", {"betas": (1.5, 0.9)}),
        ("Adam", {"weight_decay": -0.1}),
        ("AdamW", {"lr": math.nan}),
        ("SGD", {"lr": 0.1, "momentum": -0.5}),
        ("SGD", {"lr": 0.1, "nesterov": True}),
        ("RMSprop", {"alpha": -1}),
    ],
)
def test_values_torch_refuses_are_refused_at_construction_naming_them(
    name: str, params: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError, match=rf"optimizer {name}"):
        OptimizerSpec(name, **params)


# ----------------------------------------------------------------------------- config files


def _valid(root: Path) -> dict[str, Any]:
    return {
        "model": {"factory": "examples.models:VAE", "input_shape": [1, 4, 4], "latent_dim": 2},
        "data": {
            "train": {"factory": "examples.data:noise", "num_samples": 16},
            "eval": {"factory": "examples.data:noise", "num_samples": 8},
        },
        "strategy": {
            "name": "Standard",
            "metrics": ["reg_loss"],
            "loss_key": "loss",
            "optimizers": {"model": {"name": "Adam", "lr": 1e-3}},
            "schedulers": {"model": {"name": "StepLR", "step_size": 2}},
        },
        "engine": {
            "epochs": 1,
            "batch_size": 8,
            "seed": 0,
            "monitor": "eval/loss",
            "output_dir": root.as_posix(),
            "run_name": "new",
        },
        "callbacks": [
            {"name": "EarlyStopping", "monitor": "eval/loss", "patience": 2},
            {"name": "ProgressBar", "disable": True},
            {"name": "Checkpointing", "best_k": 1, "monitor": "eval/loss"},
        ],
    }


def _our_keys(raw: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Every key whose meaning is the engine's (model and data factories' own arguments are
    their authors'): factory and section names, the strategy's, engine's and callbacks' keys."""
    keys: list[tuple[Any, ...]] = [("model", "factory"), ("data", "train", "factory")]
    keys += [("strategy", key) for key in ("name", "metrics", "loss_key")]
    for kind in ("optimizers", "schedulers"):
        keys += [("strategy", kind, "model", key) for key in raw["strategy"][kind]["model"]]
    keys += [("engine", key) for key in raw["engine"]]
    for index, callback in enumerate(raw["callbacks"]):
        keys += [("callbacks", index, key) for key in callback]
    keys += [("model",), ("data",), ("strategy",), ("engine",), ("callbacks",)]
    return keys


def _other_kind(value: Any) -> st.SearchStrategy[Any]:
    """A TOML value of another kind than ``value`` (a table for a scalar, and so on)."""
    kinds: list[st.SearchStrategy[Any]] = [
        st.sampled_from(["", "x y", "nope:thing", "eval/los"]),
        st.integers(-3, 0),
        st.booleans(),
        st.lists(st.integers(0, 2), min_size=1, max_size=2),
        st.just({"k": 1}),
    ]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    chosen = [
        s
        for s, kind in zip(kinds, (str, int, bool, list, dict))
        if not (isinstance(value, kind) or (kind is int and number))
    ]
    return st.one_of(*chosen)


@settings(max_examples=80, deadline=None, suppress_health_check=HEALTH, derandomize=True)
@given(data=st.data())
def test_a_bad_value_for_any_config_key_is_one_error_line_and_nothing_written(
    data: Any, earlier: Path, tmp_path_factory: pytest.TempPathFactory, capsys: Any
) -> None:
    raw = _valid(earlier)
    path = data.draw(st.sampled_from(_our_keys(raw)), label="key")
    parent: Any = raw
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = data.draw(_other_kind(parent[path[-1]]), label="value")
    config = tmp_path_factory.mktemp("config") / "run.toml"
    config.write_text(dump_toml(raw))
    before = files_of(earlier)
    capsys.readouterr()
    assert main(["fit", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert files_of(earlier) == before
    assert sorted(p.name for p in earlier.iterdir()) == ["earlier"]
