"""Dataclass configurations built from plain dicts (YAML, JSON sidecars, keyword overrides), shared by the model
config and the run config so both refuse a bad key or value with the same kind of message.

It imports nothing of the project, so `flava_ds.model` and `flava_ds.train` can both use it (docs/DESIGN.md §5).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and what to do."""


@dataclass(frozen=True)
class Bounds:
    """The values a number field accepts: `low`/`high` inclusive unless `open` names that end."""

    low: float | None = None
    high: float | None = None
    open: str = ""  # "low", "high" or "both"

    def check(self, value: float, key: str) -> None:
        low_ok = self.low is None or (value > self.low if self.open in ("low", "both") else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.open in ("high", "both") else value <= self.high)
        if not (low_ok and high_ok and math.isfinite(value)):
            raise ConfigError(f"{key}: {value!r} is outside {self}")

    def __str__(self) -> str:
        left = "(" if self.open in ("low", "both") else "["
        right = ")" if self.open in ("high", "both") else "]"
        return f"{left}{'-inf' if self.low is None else self.low}, {'inf' if self.high is None else self.high}{right}"


def bounded(default: Any, low: float | None = None, high: float | None = None, open: str = "") -> Any:
    """A dataclass field whose value `build` checks against [low, high] (or the open ends named)."""
    return field(default=default, metadata={"bounds": Bounds(low, high, open)})


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a config dict: nested sections merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def build(cls: type, values: Any, doc: str, key: str = "") -> Any:
    """Build nested dataclasses from a dict: every value converted to its field's declared type and checked
    against the field's bounds, any unknown key named with its full path.

    `doc` names the document the values come from (`config`, `model`) and `key` their dotted place in it ("" at
    the top): unknown keys are reported under `doc.key`, bad values under `key.field`, as the user writes them.
    """
    where = f"{doc}.{key}" if key else doc
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        field_key = f"{key}.{name}" if key else name
        kwargs[name] = coerce(value, hints[name], doc, field_key)
        bounds = known[name].metadata.get("bounds")
        if bounds is not None and kwargs[name] is not None:
            bounds.check(kwargs[name], field_key)
    return cls(**kwargs)


def coerce(value: Any, hint: Any, doc: str, key: str) -> Any:
    """`value` as the declared type `hint` (`doc`, `key`: as for `build`). YAML 1.1 reads `1e-3` as a string: a
    float field accepts it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value, doc, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        errors = []
        for arm in arms:
            try:
                return coerce(value, arm, doc, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {arms}")
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:  # `--data.text.paths shards/x`: a one-element list
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, doc, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(coerce(v, item, doc, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_type = args[1] if args else Any
        return {k: coerce(v, value_type, doc, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        number = _number(value)
        if number is None or (hint is int and number != int(number)):
            kind = "an integer" if hint is int else "a number"
            raise ConfigError(f"{key}: expected {kind}, got {value!r}")
        return hint(number)
    if hint is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{key}: no conversion to {hint}")  # a field type this function does not know: a code bug


def _number(value: Any) -> float | None:
    """A YAML/JSON scalar as a number; None for anything else (booleans too, though Python counts them as ints)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None
