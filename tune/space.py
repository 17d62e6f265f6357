"""The search space: checked against the trainer's config tree, then turned into Ray Tune domains.

Every searched key must be a leaf of :class:`trainer.config.TrainConfig`; every value a trial could
receive (each listed value, both bounds of a range) is put through the trainer's own loader and
``check()`` methods, so a space that would make a trial fail is rejected before any trial starts.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from ray import tune

from srmri.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from trainer.config import TrainConfig
from tune.config import ParamSpec, SearchConfig

__all__ = [
    "RESERVED_KEYS",
    "TRIAL_RUN_NAME",
    "base_config",
    "default_metric",
    "mutations",
    "param_space",
    "set_dotted",
    "trial_config",
    "trial_run_dir",
    "validate_space",
]

# Keys the search sets itself: each trial's run directory lives inside its trial folder.
RESERVED_KEYS = ("out_dir", "name", "train.resume")
# The trainer's ``name`` of every trial: its run directory is ``<trial folder>/run``.
TRIAL_RUN_NAME = "run"


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating sections on the way."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def _leaf_type(key: str) -> Any:
    """The annotated type of a TrainConfig leaf (the key is known to exist)."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for part in parts[:-1]:
        cls = get_type_hints(cls)[part]
    return get_type_hints(cls)[parts[-1]]


def _numeric(tp: Any, want: type) -> bool:
    """Whether ``tp`` is ``want`` or an Optional of it (a float key also takes randint's ints)."""
    if get_origin(tp) in (Union, types.UnionType):
        return any(_numeric(a, want) for a in get_args(tp) if a is not type(None))
    return tp is want or (want is int and tp is float)


def base_config(search: SearchConfig) -> TrainConfig:
    """The trainer config every trial starts from (``base.config`` plus ``base.overrides``)."""
    return load_config(TrainConfig, search.base.config, search.base.overrides)


def _check_value(base: dict[str, Any], key: str, value: Any, where: str) -> Any:
    """Put one candidate value through the trainer's loader; return it coerced to the key's type."""
    data = copy.deepcopy(base)
    set_dotted(data, key, value)
    try:
        cfg = config_from_dict(TrainConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: value {value!r} is not valid for the trainer: {exc}") from None
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate_space(search: SearchConfig, base: TrainConfig) -> dict[str, ParamSpec]:
    """Check every searched key and value against the trainer config tree.

    Args:
        search: The search config (its ``space`` is checked).
        base: The base trainer config trials start from.

    Returns:
        The space with choice/grid values coerced to the trainer's types (e.g. ``"1e-3"`` ->
        ``0.001``), ready for :func:`param_space`.

    Raises:
        ConfigError: Naming ``space.KEY`` for an unknown key (with the nearest known key), a
            section instead of a value, a key the search sets itself, an empty choice, an
            inverted or non-positive range, a distribution that does not fit the key's type, or
            a value the trainer rejects.
    """
    plain = config_to_dict(base)
    out: dict[str, ParamSpec] = {}
    for key, spec in search.space.items():
        where = f"space.{key}"
        spec.check_named(key)
        if key in RESERVED_KEYS:
            raise ConfigError(f"{where}: set by the search itself (each trial's run folder)")
        try:
            apply_overrides({}, [f"{key}=null"], TrainConfig)
        except ConfigError as exc:
            raise ConfigError(f"{where}: not a trainer setting: {exc}") from None
        tp = _leaf_type(key)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}: is a section of the trainer config; search its keys")
        kind = spec.kind
        if kind in ("choice", "grid"):
            values = [_check_value(plain, key, v, where) for v in getattr(spec, kind)]
            out[key] = ParamSpec(**{kind: values})
            continue
        want = int if kind == "randint" else float
        if not _numeric(tp, want):
            raise ConfigError(
                f"{where}: {kind} draws {want.__name__}s but the trainer key is "
                f"{getattr(tp, '__name__', tp)}; use choice"
            )
        low, high = getattr(spec, kind)
        top = high - 1 if kind == "randint" else high  # randint excludes its upper bound
        for bound in (low, top):
            _check_value(plain, key, bound, where)
        out[key] = spec
    return out


def param_space(space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Ray Tune domains for a validated space (keys stay dotted trainer keys)."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind = spec.kind
        if kind == "choice":
            out[key] = tune.choice(list(spec.choice or []))
        elif kind == "grid":
            out[key] = tune.grid_search(list(spec.grid or []))
        elif kind == "uniform":
            out[key] = tune.uniform(*spec.uniform)  # type: ignore[misc]
        elif kind == "loguniform":
            out[key] = tune.loguniform(*spec.loguniform)  # type: ignore[misc]
        else:
            out[key] = tune.randint(*spec.randint)  # type: ignore[misc]
    return out


def mutations(space: dict[str, ParamSpec]) -> dict[str, Any]:
    """PBT's ``hyperparam_mutations``: lists for choice/grid keys, domains for ranges."""
    out: dict[str, Any] = {}
    for key, domain in param_space(space).items():
        spec = space[key]
        out[key] = (
            list(spec.choice or spec.grid or []) if spec.kind in ("choice", "grid") else domain
        )
    return out


def trial_config(base: dict[str, Any], sampled: dict[str, Any], out_dir: str) -> TrainConfig:
    """One trial's trainer config: the base plus the sampled values, run folder ``out_dir/run``.

    Args:
        base: The base trainer config as a plain mapping.
        sampled: Dotted trainer key -> value (what Ray Tune passes the trial; other keys ignored).
        out_dir: The trial's own folder.

    Returns:
        The checked config.
    """
    data = copy.deepcopy(base)
    for key, value in sampled.items():
        if "." in key or key in TrainConfig.__dataclass_fields__:
            set_dotted(data, key, value)
    data["out_dir"] = out_dir
    data["name"] = TRIAL_RUN_NAME
    data.setdefault("train", {})["resume"] = "auto"
    return config_from_dict(TrainConfig, data)


def trial_run_dir(trial_folder: Path) -> Path:
    """The trainer's run directory inside a trial's folder (``run_dir_of`` of its config)."""
    return trial_folder / TRIAL_RUN_NAME


def default_metric(search: SearchConfig, base: TrainConfig) -> tuple[str, str]:
    """The metric and mode of the search: as configured, else the task's default (maximised)."""
    metric = search.metric or ("val_sr_psnr" if base.task == "sr" else "val_accuracy")
    return metric, search.mode or "max"
