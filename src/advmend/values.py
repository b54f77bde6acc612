"""The rules of every config value: ints in int64, finite floats or fractions ("8/255"), strict bools,
lists to tuples, strict keys, each error naming the dotted path (``train.attack.eps``).

On the ground floor so that config sections, model options (`advmend.models.registry`) and data-set
options all check their values by the same rules without importing each other.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Union

from advmend.errors import ConfigError

_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def _to_float(value: Any) -> float | None:
    """A float from a number, a numeric string ("1e-3") or a fraction ("8/255"); None otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range: rejected as non-finite below
            return math.inf
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
        if m := _FRACTION.match(value):
            try:
                return float(m.group(1)) / float(m.group(2))
            except (ValueError, ZeroDivisionError, OverflowError):
                pass
    return None


def _show(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, so a pasted blob or a 400-digit number keeps the error on one
    readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def coerce_value(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` by the rules of every config value (ints in int64, finite
    floats or fractions, strict bools, lists to tuples); a ConfigError naming `path` otherwise."""
    return _coerce(value, tp, path)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        sections = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # a mapping can only mean the section: its own error
            return _coerce(value, sections[0], path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: invalid value {_show(value)}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # tp is a type hint: a class, never an instance
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {_show(value)}")
        return from_dict(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        for key in value:  # options become keyword arguments: their names must be strings
            if not isinstance(key, str):
                raise ConfigError(f"{path}: option names must be strings, got {_show(key)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            # Every integer setting ends up in a C int64 (seeds, sizes, counts): a larger one is
            # a typo, and torch would fail on it deep inside a run ("Overflow when unpacking long").
            if not _INT_MIN <= value <= _INT_MAX:
                raise ConfigError(f"{path}: integer {_show(value)} is out of range (|value| < 2**63)")
            return value
        raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
    if tp is float:
        number = _to_float(value)
        if number is None:
            raise ConfigError(f"{path}: expected a number (or a fraction like 8/255), got {_show(value)}")
        # No setting means anything at inf or nan (an inf lr or eps trains or attacks garbage
        # without an error), and "1e400" or "1e308/1e-308" overflow to inf silently.
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {_show(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {_show(value)}")
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - a bug in this module


def parse_number(value: Any, key: str) -> float:
    """A float from a number or a string such as "0.5", "1e-3" or "8/255" (the rule of every config
    value); a ConfigError naming `key` otherwise."""
    return _coerce(value, float, key)


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError.

    A section with a `checked(path)` method (see `advmend.config.ModelConfig`) checks what the value rules
    cannot (names the section's values must refer to), so every way of building a config checks it.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    obj = cls(**kwargs)
    return obj.checked(path) if hasattr(obj, "checked") else obj
