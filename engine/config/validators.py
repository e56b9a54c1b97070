"""The attrs field validators every config, spec, strategy and callback of the project uses.

Each one raises ``ConfigError`` naming the field and the offending value, so a bad value fails
where the object is built, never later in a run. Use them as ``attrs.field(validator=...)``;
``optional(check)`` lets ``None`` through as well. Messages say what the field must be in words
a user can act on ("must be a positive integer, got 0"). A value that is not an attrs field (a
key of a config file, an argument) is checked the same way with ``check.require(name, value)``.

A new check is one ``Check(what, test)``: ``what`` completes "<field> must be ...", ``test``
says whether a value passes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import attrs

from engine.errors import ConfigError

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

DEVICE_PATTERN = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


@attrs.frozen
class Check:
    """An attrs field validator: refuses every value ``test`` rejects with a ``ConfigError``
    "<field> must be <what>, got <value>"."""

    what: str
    test: Callable[[Any], bool]

    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        self.require(attribute.name, value)

    def require(self, name: str, value: Any) -> None:
        """Refuse ``value`` unless it passes, naming it ``name`` in the message."""
        if not self.test(value):
            raise ConfigError(f"{name} must be {self.what}, got {value!r}")


def optional(check: Check, what: str | None = None) -> Check:
    """``check``, with ``None`` allowed too; the message says ``what`` (default: "... or None")."""
    return Check(
        what if what is not None else f"{check.what} or None",
        lambda value: value is None or check.test(value),
    )


def one_of(*choices: Any) -> Check:
    """The value must be one of ``choices``: equal and of the same type (``1`` is not ``True``,
    though ``1 == True``)."""
    return Check(
        f"one of {list(choices)}",
        lambda value: any(value == c and type(value) is type(c) for c in choices),
    )


def instance_of(kind: type) -> Check:
    """The value must be an instance of ``kind``."""
    article = "an" if kind.__name__[:1].lower() in "aeiou" else "a"
    return Check(f"{article} {kind.__name__}", lambda value: isinstance(value, kind))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_folder_name(value: Any) -> bool:
    return (
        isinstance(value, str)
        and bool(value)
        and not {"/", "\\"} & set(value)
        and value not in (".", "..")
    )


def _is_positive_pair(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_is_number(v) and v > 0 for v in value)
    )


positive_int = Check("a positive integer", lambda v: _is_int(v) and v > 0)
non_negative_int = Check("a non-negative integer", lambda v: _is_int(v) and v >= 0)
is_int = Check("an integer", _is_int)
# Seeds are multiplied by about 2**20 to derive per-epoch and per-rank streams, which torch's
# generators hold in 64 bits: a seed of at most 2**40 in magnitude keeps every derived seed in
# range (``time.time_ns()``, about 2**60, would overflow the first epoch's generator).
SEED_LIMIT = 2**40
seed_value = Check(
    "an integer between -2**40 and 2**40 (e.g. 0, or time.time_ns() % 2**32)",
    lambda v: _is_int(v) and -SEED_LIMIT <= v <= SEED_LIMIT,
)
is_bool = Check("true or false", lambda v: isinstance(v, bool))
optional_bool = optional(is_bool, "true, false or None")
is_callable = Check("callable", callable)
positive_number = Check("a positive number", lambda v: _is_number(v) and v > 0)
finite_positive_number = Check(
    "a finite positive number", lambda v: _is_number(v) and math.isfinite(v) and v > 0
)
finite_non_negative_number = Check(
    "a finite number >= 0", lambda v: _is_number(v) and math.isfinite(v) and v >= 0
)
non_empty_str = Check("a non-empty string", lambda v: isinstance(v, str) and bool(v))
metric_name = Check("a metric name such as 'eval/loss'", lambda v: isinstance(v, str) and bool(v))
plain_folder_name = Check("a plain folder name", _is_folder_name)
# A strategy's ``metrics``: names of further model outputs (a string would be read as letters).
output_names = Check(
    "a tuple of output names (e.g. ('reconstruction_loss', 'reg_loss'))",
    lambda v: isinstance(v, (tuple, list)) and all(isinstance(k, str) and k for k in v),
)
device_name = Check(
    "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'",
    lambda v: isinstance(v, str) and DEVICE_PATTERN.fullmatch(v) is not None,
)
figsize_inches = Check("two positive numbers (inches)", _is_positive_pair)
min_or_max = one_of("min", "max")
# A callback's ``monitor``: a metric name, or None for the run's monitored metric.
monitor_name = optional(metric_name, metric_name.what)


def list_as_tuple(value: Any) -> Any:
    """Converter: a list (from a TOML or JSON file) as a tuple; anything else as it is, for the
    validator to judge."""
    return tuple(value) if isinstance(value, list) else value


# Module class names and model methods (FSDP's): a lone string would be read as its letters.
names_tuple = Check(
    "a tuple of non-empty names (e.g. ('ResBlock',))",
    lambda v: isinstance(v, tuple) and all(isinstance(x, str) and x for x in v),
)
# A device mesh: (shard,) over every rank, or (replicate, shard) for HSDP.
mesh_shape = optional(
    Check(
        "(shard,) or (replicate, shard), positive integers",
        lambda v: (
            isinstance(v, tuple)
            and len(v) in (1, 2)
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
        ),
    )
)
