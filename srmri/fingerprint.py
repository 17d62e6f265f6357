"""Fingerprints: what made an artefact, as a short stable hash, and what differs from another.

Every artefact srmri writes (a checkpoint, a shard set, an SR shard set, an evaluation, a
pipeline stage) records the fingerprint of what made it, and is used again only when the
fingerprint of what would make it now is the same. A fingerprint is the sha256 of canonical JSON;
for a config tree it is taken over the dotted keys that can change the result (log intervals,
worker counts and output paths are left out by the caller), so the same key can be named when
two differ.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "Difference",
    "config_fingerprint",
    "describe",
    "differences",
    "fingerprint",
    "flatten",
]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def fingerprint(value: Any) -> str:
    """The sha256 (hex) of ``value`` as canonical JSON (dataclasses, mappings, lists, scalars)."""
    text = json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A config tree (dataclass or nested mapping) as ``{dotted.key: leaf value}``.

    Lists stay leaves: ``arms: [hr, lr]`` is one key, so a changed list is one difference.
    """
    plain = _plain(value)
    if not isinstance(plain, dict):
        return {prefix: plain}
    out: dict[str, Any] = {}
    for key, item in plain.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(item, dict) and item:
            out.update(flatten(item, dotted))
        else:
            out[dotted] = item
    return out


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    # A pattern names a key, a section (every key below it) or a glob (``*.num_workers``).
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in ignore)


def config_fingerprint(cfg: Any, ignore: Iterable[str] = ()) -> str:
    """The fingerprint of a config tree without the keys that cannot change the result.

    Args:
        cfg: A config dataclass (or a nested mapping of one, e.g. a saved ``config.yaml``).
        ignore: Dotted keys, sections or globs left out (e.g. ``out_dir``, ``train.log_every``).

    Returns:
        A hex sha256.
    """
    ignore = tuple(ignore)
    return fingerprint({k: v for k, v in flatten(cfg).items() if not _ignored(k, ignore)})


@dataclasses.dataclass(frozen=True)
class Difference:
    """One key whose value differs between two config trees.

    Attributes:
        key: The dotted key.
        old: Its value in the first tree (None where the key did not exist there).
        new: Its value in the second tree (None where it does not exist any more).
    """

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def differences(old: Any, new: Any, ignore: Iterable[str] = ()) -> list[Difference]:
    """The keys whose values differ between two config trees, sorted by key.

    Args:
        old: The tree an artefact was made with.
        new: The tree asked for now.
        ignore: Dotted keys, sections or globs not compared.

    Returns:
        One :class:`Difference` per differing key (empty when they agree).
    """
    ignore = tuple(ignore)
    a, b = flatten(old), flatten(new)
    keys = sorted(a.keys() | b.keys())
    return [
        Difference(k, a.get(k), b.get(k))
        for k in keys
        if not _ignored(k, ignore) and a.get(k) != b.get(k)
    ]


def describe(diffs: Iterable[Difference]) -> str:
    """The differences as indented lines, one key each, for an error message."""
    return "\n".join(f"  {d}" for d in diffs)
