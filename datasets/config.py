"""Strict configuration parsing shared by the sites file and the rest of the config:
dataclasses from TOML tables (unknown keys and wrong types are errors naming the key, with a
suggestion), and the plain values written back to TOML."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

__all__ = ["ConfigError", "dataclass_from_dict", "dataclass_to_dict", "toml_value"]


class ConfigError(ValueError):
    """A site spec or sites file that does not parse: names the key and what was expected."""


# -- strict dataclass <- dict ------------------------------------------------------------------
def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"an array of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"an array of {_describe(args[0]) if args else 'values'}"
    if hint is type(None):
        return "absent (None)"
    if dataclasses.is_dataclass(hint):
        return f"a table ({hint.__name__})"
    return getattr(hint, "__name__", str(hint))


_MISMATCH = object()


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to ``hint`` (TOML arrays -> tuples, ints -> floats), or _MISMATCH."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            out = _coerce(value, arg, where)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if hint is type(None):
        return None if value is None else _MISMATCH
    if origin is Literal:
        return value if value in args else _MISMATCH
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _MISMATCH
    if hint is str:
        return value if isinstance(value, str) else _MISMATCH
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return _MISMATCH
            items = [_coerce(v, a, where) for v, a in zip(value, args)]
        else:
            items = [_coerce(v, args[0], where) if args else v for v in value]
        if any(item is _MISMATCH for item in items):
            return _MISMATCH
        return tuple(items) if origin is tuple else list(items)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return dataclass_from_dict(hint, value, where) if isinstance(value, Mapping) else _MISMATCH
    return value if isinstance(hint, type) and isinstance(value, hint) else _MISMATCH


def dataclass_from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``: unknown keys, missing required keys and wrong
    types are a :class:`ConfigError` naming ``where``, the key and what was expected."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a table of keys; got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint} "
                              f"(valid keys: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key '{name}' "
                                  f"({_describe(hints[name])})")
            continue
        value = _coerce(data[name], hints[name], f"{where}.{name}")
        if value is _MISMATCH:
            raise ConfigError(f"{where}: key '{name}' must be {_describe(hints[name])}; "
                              f"got {data[name]!r} ({type(data[name]).__name__})")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        # a dataclass's own check (a ConfigError too) knows the value, not the file and site
        if isinstance(err, ConfigError) and str(err).startswith(where):
            raise
        raise ConfigError(f"{where}: {err}") from err


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}



def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else
                                                 "-inf" if value == -math.inf else repr(value))
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) to TOML")
