"""The attrs field validators every config, spec, strategy and callback of the project uses.

Each one raises ``ConfigError`` naming the field and the offending value, so a bad value fails
where the object is built, never later in a run. Use them as ``attrs.field(validator=...)``;
``optional(check)`` lets ``None`` through as well. Messages say what the field must be in words
a user can act on ("must be a positive integer, got 0").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from engine.errors import ConfigError

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(attribute: attrs.Attribute[Any], what: str, value: Any, optional: bool) -> None:
    suffix = " or None" if optional else ""
    raise ConfigError(f"{attribute.name} must be {what}{suffix}, got {value!r}")


def _checker(what: str, test: Callable[[Any], bool]) -> Validator:
    """A validator refusing every value ``test`` rejects, with the message "must be <what>"."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not test(value):
            _fail(attribute, what, value, optional=False)

    check.what = what  # type: ignore[attr-defined]  # read by optional() for its message
    return check


def optional(check: Validator) -> Validator:
    """``check``, with ``None`` allowed too (the message then says "... or None")."""
    what = getattr(check, "what", None)

    def check_optional(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        if what is None:
            check(instance, attribute, value)
            return
        try:
            check(instance, attribute, value)
        except ConfigError:
            _fail(attribute, what, value, optional=True)

    return check_optional


positive_int = _checker("a positive integer", lambda v: _is_int(v) and v > 0)
non_negative_int = _checker("a non-negative integer", lambda v: _is_int(v) and v >= 0)
is_int = _checker("an integer", _is_int)
is_bool = _checker("true or false", lambda v: isinstance(v, bool))
positive_number = _checker("a positive number", lambda v: _is_number(v) and v > 0)
finite_non_negative_number = _checker(
    "a finite number >= 0", lambda v: _is_number(v) and math.isfinite(v) and v >= 0
)
non_empty_str = _checker("a non-empty string", lambda v: isinstance(v, str) and bool(v))
metric_name = _checker(
    "a metric name such as 'eval/loss'", lambda v: isinstance(v, str) and bool(v)
)
plain_folder_name = _checker(
    "a plain folder name",
    lambda v: isinstance(v, str) and bool(v) and not {"/", "\\"} & set(v) and v not in (".", ".."),
)


def one_of(*choices: Any) -> Validator:
    """The value must be one of ``choices`` (compared with ``==``)."""
    return _checker(f"one of {list(choices)}", lambda v: v in choices)


def instance_of(kind: type) -> Validator:
    """The value must be an instance of ``kind``."""
    return _checker(f"a {kind.__name__}", lambda v: isinstance(v, kind))
