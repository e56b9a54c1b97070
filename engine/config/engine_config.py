"""What the user configures for a run: one frozen, validated attrs class.

Every invalid value fails at construction with a ``ConfigError`` naming the field and the value,
so a bad run never starts. Optimiser and scheduler choices live with the strategy (see
``engine.config.specs``), not here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import attrs

from engine.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
NonFinitePolicy = Literal["raise", "skip"]
MonitorMode = Literal["min", "max"]

_DEVICE_PATTERN = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def _positive_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _optional_positive_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


def _non_negative_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name} must be a non-negative integer, got {value!r}")


def _optional_positive_float(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{attribute.name} must be a positive number or None, got {value!r}")


def _one_of(*choices: Any) -> Any:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {list(choices)}, got {value!r}")

    return check


def _positive_float(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{attribute.name} must be a positive number, got {value!r}")


def _device(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not _DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"device must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got {value!r}")


def _bool(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be true or false, got {value!r}")


def _int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{attribute.name} must be an integer, got {value!r}")


def _optional_str(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{attribute.name} must be a non-empty string or None, got {value!r}")


def _run_name(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    _optional_str(instance, attribute, value)
    if value is not None and ("/" in value or "\\" in value or value in (".", "..")):
        raise ConfigError(f"run_name must be a plain folder name, got {value!r}")


def _optional_path(value: Any) -> Path | None:
    if value is None or isinstance(value, Path):
        return value
    if isinstance(value, str) and value:
        return Path(value)
    raise ConfigError(f"output_dir must be a path or None, got {value!r}")


@attrs.frozen(kw_only=True)
class EngineConfig:
    """How the loop runs: length, batching, device, precision, logging and output.

    ``max_steps`` counts batches (calls to ``train_step``) and ends the run early when reached.
    ``accumulate_steps`` micro-batches make one optimiser step. ``output_dir=None`` writes no
    files at all (no run folder, no ``train.log``).
    ``distributed_timeout_s`` bounds how long a rank waits for the others (joining the process
    group, any collective) before it stops with an error.
    """

    epochs: int = attrs.field(default=1, validator=_positive_int)
    max_steps: int | None = attrs.field(default=None, validator=_optional_positive_int)
    batch_size: int = attrs.field(default=64, validator=_positive_int)
    eval_batch_size: int | None = attrs.field(default=None, validator=_optional_positive_int)
    shuffle: bool = attrs.field(default=True, validator=_bool)
    drop_last: bool = attrs.field(default=False, validator=_bool)
    seed: int = attrs.field(default=0, validator=_int)
    device: str = attrs.field(default="auto", validator=_device)
    precision: Precision = attrs.field(default="fp32", validator=_one_of("fp32", "bf16", "fp16"))
    grad_clip_norm: float | None = attrs.field(default=None, validator=_optional_positive_float)
    accumulate_steps: int = attrs.field(default=1, validator=_positive_int)
    eval_every: int = attrs.field(default=1, validator=_positive_int)
    log_every: int = attrs.field(default=50, validator=_positive_int)
    nonfinite: NonFinitePolicy = attrs.field(default="raise", validator=_one_of("raise", "skip"))
    monitor: str | None = attrs.field(default=None, validator=_optional_str)
    monitor_mode: MonitorMode = attrs.field(default="min", validator=_one_of("min", "max"))
    num_workers: int = attrs.field(default=0, validator=_non_negative_int)
    data_on_device: bool = attrs.field(default=True, validator=_bool)
    compile: bool = attrs.field(default=False, validator=_bool)
    output_dir: Path | None = attrs.field(default=Path("runs"), converter=_optional_path)
    run_name: str | None = attrs.field(default=None, validator=_run_name)
    distributed_timeout_s: float = attrs.field(default=600.0, validator=_positive_float)

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (paths as strings), for ``config.toml`` and checkpoints."""
        values = attrs.asdict(self)
        values["output_dir"] = None if self.output_dir is None else str(self.output_dir)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EngineConfig:
        """Build from plain values; an unknown key is an error naming it and the known ones."""
        known = {field.name for field in attrs.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown engine config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)
