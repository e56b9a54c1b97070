"""engine/config/file.py: loading, overrides, checking, and the TOML writer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine import ConfigError, EngineConfig
from engine.config.file import (
    apply_overrides,
    dump_toml,
    load_config_file,
    parse_override,
    read_toml,
    resolve_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


def vae_config() -> dict[str, Any]:
    return {
        "model": {"factory": "examples.models:VAE", "latent_dim": 2, "hidden": 8},
        "data": {
            "train": {"factory": "examples.data:noise", "num_samples": 16, "shape": [1, 4, 4]},
        },
        "strategy": {
            "name": "Standard",
            "optimizers": {"model": {"name": "Adam", "lr": 1e-3}},
            "schedulers": {"model": {"name": "StepLR", "step_size": 1}},
        },
        "engine": {"epochs": 1, "batch_size": 8},
        "callbacks": [{"name": "EarlyStopping", "patience": 2}],
    }


# ----------------------------------------------------------------------------- TOML writer

_keys = st.text(min_size=1, max_size=8)
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=8,
)
_tables = st.dictionaries(_keys, _values, max_size=5)


@settings(max_examples=150, deadline=None)
@given(_tables)
@example({"0\n": {}})  # found by this property: a key with a trailing newline was left bare
@example({"a\n": [1]})
def test_dump_toml_reads_back_equal(table: dict[str, Any]) -> None:
    assert read_toml(dump_toml(table)) == table


def test_dump_toml_writes_special_floats_and_arrays_of_tables() -> None:
    table = {"a": math.inf, "b": -math.inf, "items": [{"x": 1}, {"x": 2, "y": {"z": "q"}}]}
    back = read_toml(dump_toml(table))
    assert back == table
    assert math.isnan(read_toml(dump_toml({"n": math.nan}))["n"])


def test_dump_toml_leaves_out_none_and_refuses_objects() -> None:
    assert read_toml(dump_toml({"a": None, "b": 1})) == {"b": 1}
    with pytest.raises(ConfigError, match="can not write a object"):
        dump_toml({"a": object()})


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("engine.epochs=5", (["engine", "epochs"], 5)),
        ("strategy.optimizers.model.lr=1e-4", (["strategy", "optimizers", "model", "lr"], 1e-4)),
        ("engine.shuffle=false", (["engine", "shuffle"], False)),
        ("engine.device=cpu", (["engine", "device"], "cpu")),
        ('engine.run_name="a b"', (["engine", "run_name"], "a b")),
        ("model.input_shape=[1, 8, 8]", (["model", "input_shape"], [1, 8, 8])),
    ],
)
def test_parse_override_reads_toml_values(text: str, expected: tuple[list[str], Any]) -> None:
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["epochs", "=5", "engine..epochs=5", "engine.=1"])
def test_parse_override_refuses_malformed(text: str) -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value") as info:
        parse_override(text)
    assert repr(text) in str(info.value)


def test_apply_overrides_sets_nested_and_list_items_without_touching_the_original() -> None:
    raw = vae_config()
    before = json.dumps(raw, sort_keys=True)
    result = apply_overrides(
        raw, ["engine.epochs=3", "callbacks.0.patience=7", "data.eval.factory='x:y'"]
    )
    assert result["engine"]["epochs"] == 3
    assert result["callbacks"][0]["patience"] == 7
    assert result["data"]["eval"] == {"factory": "x:y"}
    assert json.dumps(raw, sort_keys=True) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("callbacks.5.patience=1", "'5' is not an index of a list of 1"),
        ("engine.epochs.x=1", "'engine.epochs' is a int, not a table"),
    ],
)
def test_apply_overrides_refuses_bad_paths(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(vae_config(), [override])


# ----------------------------------------------------------------------------- files


def test_load_config_file_reads_toml_and_json(tmp_path: Path) -> None:
    raw = vae_config()
    (tmp_path / "a.toml").write_text(dump_toml(raw))
    (tmp_path / "a.json").write_text(json.dumps(raw))
    assert load_config_file(tmp_path / "a.toml") == raw
    assert load_config_file(tmp_path / "a.json") == raw


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.yaml", "x: 1", "must end in .toml or .json"),
        ("a.toml", "[model\nfactory=", "is not valid toml"),
        ("a.json", "{", "is not valid json"),
        ("a.json", "[1, 2]", "must hold a table, got list"),
    ],
)
def test_load_config_file_refuses_bad_files(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config_file(path)
    assert name in str(info.value)
    assert path.read_text() == text  # the file is left as it was


def test_load_config_file_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"can not read config file .*nope\.toml"):
        load_config_file(tmp_path / "nope.toml")


# ----------------------------------------------------------------------------- checking


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_example_configs_resolve_and_their_resolved_form_reads_back_equal(path: Path) -> None:
    config = resolve_config(load_config_file(path))
    again = resolve_config(read_toml(dump_toml(config.raw)))
    assert again == config


@settings(max_examples=30, deadline=None)
@given(
    epochs=st.integers(1, 1000),
    lr=st.floats(1e-6, 1.0),
    seed=st.integers(-(2**31), 2**31),
    shuffle=st.booleans(),
)
def test_overridden_config_resolves_to_what_was_set_and_reads_back_equal(
    epochs: int, lr: float, seed: int, shuffle: bool
) -> None:
    raw = apply_overrides(
        vae_config(),
        [
            f"engine.epochs={epochs}",
            f"strategy.optimizers.model.lr={lr!r}",
            f"engine.seed={seed}",
            f"engine.shuffle={str(shuffle).lower()}",
        ],
    )
    config = resolve_config(raw)
    assert config.engine == EngineConfig(epochs=epochs, batch_size=8, seed=seed, shuffle=shuffle)
    assert config.strategy.optimizers["model"].params["lr"] == lr
    assert resolve_config(read_toml(dump_toml(config.raw))) == config


def _without(raw: dict[str, Any], *path: str) -> dict[str, Any]:
    node = raw
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return raw


def _with(raw: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


BAD_CONFIGS = [
    (lambda c: _with(c, 1, "trainer"), ["'trainer'", "expected keys"]),
    (lambda c: _without(c, "model"), ["missing required key", "'model'"]),
    (lambda c: _with(c, [], "model"), ["[model] must be a table", "[]"]),
    (lambda c: _with(c, "VAE", "model", "factory"), ["model.factory", "'VAE'", "import path"]),
    (
        lambda c: _with(c, "examples.models:VAE\n", "model", "factory"),
        ["model.factory", "import path"],
    ),
    (lambda c: _with(c, "nosuch.mod:VAE", "model", "factory"), ["nosuch.mod", "can not import"]),
    (lambda c: _with(c, "examples.models:Nope", "model", "factory"), ["has no 'Nope'"]),
    (lambda c: _with(c, 3, "model", "widht"), ["[model]", "'VAE'", "widht"]),
    (lambda c: _without(c, "data", "train"), ["[data] is missing", "'train'"]),
    (lambda c: _with(c, {}, "data", "test"), ["'test'", "in [data]", "'eval'"]),
    (lambda c: _with(c, 5, "engine", "epochs_"), ["epochs_", "known keys"]),
    (lambda c: _with(c, 0, "engine", "epochs"), ["[engine]", "epochs", "positive", "0"]),
    (lambda c: _with(c, "gpu", "engine", "device"), ["device", "'gpu'"]),
    (lambda c: _with(c, 3, "strategy", "name"), ["strategy.name", "3"]),
    (lambda c: _with(c, {}, "strategy", "optimizers"), ["strategy.optimizers is empty"]),
    (
        lambda c: _with(c, "Adamm", "strategy", "optimizers", "model", "name"),
        ["strategy.optimizers.model", "'Adamm'", "known"],
    ),
    (
        lambda c: _with(c, 0.9, "strategy", "optimizers", "model", "momentum"),
        ["strategy.optimizers.model", "momentum"],
    ),
    (
        lambda c: _with(c, {"name": "StepLR"}, "strategy", "schedulers", "critic"),
        ["'critic'", "no optimizer"],
    ),
    (lambda c: _with(c, {"name": "EarlyStopping"}, "callbacks"), ["callbacks must be a list"]),
    (lambda c: _with(c, [{"patience": 2}], "callbacks"), ["callbacks.0.name", "None"]),
    (
        lambda c: _with(c, [{"name": "nosuch:Thing"}], "callbacks"),
        ["callbacks.0.name", "can not import"],
    ),
]


@pytest.mark.parametrize(("mutate", "fragments"), BAD_CONFIGS)
def test_bad_config_is_one_error_naming_key_and_value(mutate: Any, fragments: list[str]) -> None:
    raw = mutate(vae_config())
    with pytest.raises(ConfigError) as info:
        resolve_config(raw)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_resolve_config_refuses_a_non_table() -> None:
    with pytest.raises(ConfigError, match="must be a table, got list"):
        resolve_config([])  # type: ignore[arg-type]
