"""EngineConfig refuses every bad value at construction, naming the field and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import ConfigError, EngineConfig

BAD_VALUES = [
    ("epochs", 0),
    ("epochs", -3),
    ("epochs", 1.5),
    ("epochs", True),
    ("batch_size", 0),
    ("batch_size", -1),
    ("batch_size", "64"),
    ("max_steps", 0),
    ("eval_batch_size", 0),
    ("accumulate_steps", 0),
    ("log_every", 0),
    ("eval_every", -1),
    ("precision", "fp8"),
    ("device", "gpu"),
    ("device", "cuda:x"),
    ("device", "cpu\n"),  # a regex "$" would let a trailing newline through
    ("device", ""),
    ("grad_clip_norm", 0.0),
    ("grad_clip_norm", -1.0),
    ("nonfinite", "ignore"),
    ("monitor_mode", "lowest"),
    ("shuffle", "yes"),
    ("seed", 1.5),
    ("num_workers", -1),
    ("run_name", "a/b"),
    ("run_name", ""),
    ("output_dir", 3),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_names_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as error:
        EngineConfig(**{field: value})
    assert field in str(error.value)
    assert repr(value) in str(error.value)


@given(st.integers(min_value=1, max_value=10_000), st.integers(min_value=1, max_value=512))
def test_valid_values_round_trip(epochs: int, batch_size: int) -> None:
    config = EngineConfig(epochs=epochs, batch_size=batch_size, output_dir="out")
    assert config.output_dir == Path("out")
    assert EngineConfig.from_dict(config.to_dict()) == config


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="epochz"):
        EngineConfig.from_dict({"epochz": 3})


def test_config_is_frozen() -> None:
    config = EngineConfig()
    with pytest.raises(AttributeError):
        config.epochs = 3  # type: ignore[misc]


def test_eval_batch_size_defaults_to_batch_size() -> None:
    assert EngineConfig(batch_size=7).effective_eval_batch_size == 7
    assert EngineConfig(batch_size=7, eval_batch_size=9).effective_eval_batch_size == 9
