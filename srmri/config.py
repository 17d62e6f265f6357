"""Typed configuration trees: dataclasses loaded from YAML plus dotted command-line overrides.

Every part of srmri describes its settings as a tree of dataclasses. This module turns a YAML
file and overrides such as ``optim.lr=3e-4`` into an instance of such a tree, checking every key
and value on the way, and writes the resolved tree back out so each run records what it used.

A dataclass may define ``check(self) -> None`` that raises :class:`ConfigError` (via
:func:`require`) for values that are well-typed but invalid; it is called after loading. Float
settings must be finite (nan and infinities slip past every range check) unless the field's
metadata sets :data:`ALLOW_NONFINITE`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from srmri.atomic import write_text

__all__ = [
    "ALLOW_NONFINITE",
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_hash",
    "config_to_dict",
    "dump_config",
    "load_config",
    "require",
    "save_config",
]

T = TypeVar("T")

ALLOW_NONFINITE = "allow_nonfinite"
"""Field metadata key: ``field(metadata={ALLOW_NONFINITE: True})`` lets a float field hold nan
or an infinity; every other float setting refuses them at load."""


class ConfigError(ValueError):
    """A configuration file, key or value is invalid; the message names the key."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``condition`` holds.

    Args:
        condition: The check that must be true.
        key: Dotted name of the offending key (e.g. ``optim.lr``).
        message: What is wrong, in words a user understands.
    """
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _allows_nonfinite(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get(ALLOW_NONFINITE)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, finite: bool = True) -> Any:
    """Convert ``value`` (from YAML or an override) to type ``tp`` or raise ConfigError.

    ``finite`` refuses nan and infinities for floats (the field's ``allow_nonfinite`` lifts it).
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[str] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, finite)
            except ConfigError as exc:
                errors.append(str(exc))  # try the next member; the error names the union
        if len(errors) == 1:
            raise ConfigError(errors[0])  # e.g. `float | None`: the float's own message
        literals = [str(x) for arg in args if get_origin(arg) is Literal for x in get_args(arg)]
        hint = _suggest(str(value), literals) if literals else ""
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}{hint}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        hint = _suggest(str(value), [str(a) for a in allowed])
        raise ConfigError(
            f"{key}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{hint}"
        )
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(items)}")
            return tuple(
                _coerce(v, a, f"{key}[{i}]", finite) for i, (v, a) in enumerate(zip(items, args))
            )
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{key}[{i}]", finite) for i, v in enumerate(items)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, args[1], f"{key}.{k}", finite) for k, v in value.items()}
    return _coerce_scalar(value, tp, key, finite)


def _coerce_float(value: Any, key: str, finite: bool) -> float:
    out: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            out = float(value)
    if out is None:
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if finite and not math.isfinite(out):
        # nan compares false with every bound, so no check() range would catch it, and inf
        # passes "> 0": either trains on at loss nan instead of failing here.
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return out


def _coerce_scalar(value: Any, tp: Any, key: str, finite: bool) -> Any:
    """The leaf types: bool, int, float, str and Path."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        return _coerce_float(value, key, finite)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    raise ConfigError(f"{key}: unsupported setting type {_type_name(tp)}")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    fields = _fields(cls)
    nonfinite = _allows_nonfinite(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(f"unknown key '{key}'{_suggest(str(name), fields)}")
        kwargs[name] = _coerce(value, fields[name], key, finite=name not in nonfinite)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a field without default that the YAML did not give
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def _check(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check(value)
    check = getattr(cfg, "check", None)
    if callable(check):
        check()


def config_from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
    """Build and check a config tree of type ``cls`` from a plain nested mapping.

    Args:
        cls: The root dataclass type.
        data: Nested mapping (e.g. parsed YAML); missing keys keep their defaults.

    Returns:
        The checked config instance.

    Raises:
        ConfigError: On an unknown key, a wrongly typed value or a failed check.
    """
    cfg = _build(cls, data or {}, "")
    _check(cfg)
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], cls: type) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested mapping, checking each key against ``cls``.

    Args:
        data: Nested mapping to update (modified in place and returned).
        overrides: Strings of the form ``dotted.key=value``; the value is read as YAML.
        cls: Root dataclass type, used to reject unknown keys with a suggestion.

    Returns:
        The updated mapping.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=3e-4)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node_cls: Any = cls
        node = data
        for depth, part in enumerate(parts):
            fields = _fields(node_cls)
            key = ".".join(parts[: depth + 1])
            if part not in fields:
                raise ConfigError(f"unknown key '{key}'{_suggest(part, fields)}")
            field_tp = fields[part]
            if depth == len(parts) - 1:
                node[part] = _parse_value(text)
                break
            if not _is_dataclass_type(field_tp):
                raise ConfigError(f"'{key}' is a value, not a section; cannot set '{dotted}'")
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node, node_cls = child, field_tp
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load a config tree from an optional YAML file plus dotted overrides.

    Args:
        cls: The root dataclass type.
        path: YAML file, or None for the defaults.
        overrides: ``dotted.key=value`` strings applied after the file.

    Returns:
        The checked config instance.

    Raises:
        ConfigError: With the file and key named, on any invalid input.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of settings")
        data = loaded or {}
    apply_overrides(data, overrides, cls)
    try:
        return config_from_dict(cls, data)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return the config tree as plain nested dicts/lists of YAML-safe scalars."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def dump_config(cfg: Any) -> str:
    """Render the resolved config tree as YAML text (what is printed at start)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config tree as YAML, atomically; returns the path."""
    return write_text(path, dump_config(cfg))


def config_hash(cfg: Any, exclude: Sequence[str] = ()) -> str:
    """A stable sha256 of the config tree (optionally without some top-level keys)."""
    data = config_to_dict(cfg)
    for key in exclude:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
