"""The private bridge from a shard set's keys back to the real input files.

A shard set names every input by a keyed hash only (:func:`shards.privacy.input_id`). The
mapping from those ids to real paths is written at ingest to a local file beside the secret
key, never into the set::

    ~/.config/srmri/private-input-paths/PRIVATE-<fingerprint>.json   (mode 0600, folder 0700)

(or beside ``$SRMRI_SECRET_FILE`` / the ingest's ``secret_file``). ``python -m shards locate
OUT [KEY ...]`` reads it to print the real file of a key or of every row that is not ``ok``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from shards.format import MANIFEST_NAME
from shards.privacy import default_secret_path, write_private
from shards.writer import ManifestRow, read_manifest_rows

__all__ = [
    "MAPPING_DIR",
    "Located",
    "locate",
    "mapping_path",
    "printable",
    "read_mapping",
    "write_mapping",
]

MAPPING_DIR = "private-input-paths"
_NOTE = (
    "PRIVATE: the real input paths behind a shard set's keys. Keep it on this machine; "
    "never copy it with the shard set. Read it with: python -m shards locate OUT [KEY ...]"
)


def mapping_path(fingerprint: str, secret_file: str | Path | None = None) -> Path:
    """Where the path mapping of the set with ``fingerprint`` lives (beside the secret key)."""
    key_file = Path(secret_file) if secret_file else default_secret_path()
    return key_file.parent / MAPPING_DIR / f"PRIVATE-{fingerprint}.json"


def write_mapping(path: Path, root: str | Path, paths: dict[str, str]) -> Path:
    """Write the mapping (mode 0600): the input folder and ``{input id: relative path}``.

    Non-UTF-8 names are kept exactly: JSON escapes their surrogates, which read back as the
    same ``str`` (``os.fsencode`` then gives the bytes on disk).
    """
    data = {"note": _NOTE, "input": os.path.abspath(root), "paths": dict(sorted(paths.items()))}
    return write_private(path, json.dumps(data, indent=1).encode("ascii"))


def _fingerprint_of(out: Path) -> str:
    meta = pq.read_schema(out / MANIFEST_NAME).metadata or {}
    value = meta.get(b"fingerprint", b"").decode()
    if not value:
        raise FileNotFoundError(f"{out}: its manifest records no fingerprint (an older set?)")
    return value


def read_mapping(out: str | Path, secret_file: str | Path | None = None) -> tuple[Path, dict]:
    """The input folder and ``{input id: relative path}`` of the set in ``out``.

    Raises:
        FileNotFoundError: If ``out`` has no manifest, or this machine has no mapping for it
            (made elsewhere, or with another secret file: pass ``secret_file``).
    """
    out = Path(out)
    path = mapping_path(_fingerprint_of(out), secret_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no path mapping for {out} on this machine; it is written where the set "
            "was ingested, beside the secret key (--secret-file if that was another one)"
        )
    data = json.loads(path.read_text(encoding="ascii"))
    return Path(data["input"]), dict(data["paths"])


@dataclass
class Located:
    """One manifest row with the real file it stands for."""

    row: ManifestRow
    path: str  # absolute path of the input; "" when the mapping does not know the id


def printable(path: str) -> str:
    """A path as it can be printed (non-UTF-8 bytes as backslash escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _wanted(row: ManifestRow, keys: set[str]) -> bool:
    return row.key in keys or row.input_id in keys


def locate(
    out: str | Path, keys: list[str] | None = None, secret_file: str | Path | None = None
) -> list[Located]:
    """The real files of the rows with these keys (or input ids); none given: every row that
    is not ``ok``.

    Args:
        out: The shard set's folder (finished or not: the manifest is enough).
        keys: Sample keys or input ids; None or empty for every row not stored in a shard.
        secret_file: The secret key file the ingest used, if not the default.

    Returns:
        One :class:`Located` per matching row, in manifest order.
    """
    root, paths = read_mapping(out, secret_file)
    rows = read_manifest_rows(out)
    chosen = (
        [r for r in rows if _wanted(r, set(keys))]
        if keys
        else [r for r in rows if r.status != "ok"]
    )
    return [
        Located(r, str(root / paths[r.input_id]) if r.input_id in paths else "") for r in chosen
    ]
