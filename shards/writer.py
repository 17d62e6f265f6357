"""Writing a finished shard set: tar shards, ``manifest.parquet``, ``config.yaml``, ``index.json``.

Everything is first written inside a staging folder and moved into place by rename; the index,
which marks the set as finished, is written last. A crash at any point therefore never leaves a
set that looks finished, and re-running redoes only the cheap writing step.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from shards.format import MANIFEST_NAME, SPLITS, ShardInfo, encode_sample

__all__ = ["MANIFEST_SCHEMA", "ManifestRow", "file_sha256", "write_manifest", "write_split_shards"]


@dataclass
class ManifestRow:
    """One input (or one slice of a volume) in ``manifest.parquet``; quarantined ones too."""

    key: str
    source: str
    source_path: str
    slice: int | None
    label: int
    class_name: str
    status: str  # ok | quarantined | duplicate_removed
    reason: str = ""
    split: str = ""
    shard: str = ""
    group: str = ""
    sha256: str = ""
    phash: str = ""
    duplicate_of: str = ""
    duplicate_kind: str = ""  # "", exact, near
    leakage: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)


MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("source_path", pa.string()),
        ("slice", pa.int32()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("group", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("duplicate_of", pa.string()),
        ("duplicate_kind", pa.string()),
        ("leakage", pa.bool_()),
    ]
)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_split_shards(
    stage: Path,
    split: str,
    rows: Sequence[ManifestRow],
    load_image: Callable[[str], Any],
    meta_extra: dict[str, Any],
    max_count: int,
    max_bytes: int,
) -> list[ShardInfo]:
    """Write the usable samples of one split into numbered tar shards inside ``stage``.

    Args:
        stage: Staging folder (shards are moved out of it later).
        split: Split name; rows must all belong to it, in the order to store.
        rows: Manifest rows (their ``shard`` field is filled in here).
        load_image: Returns the stored uint16 image for a key.
        meta_extra: Metadata added to every sample's JSON (e.g. the dataset id).
        max_count: Samples per shard at most.
        max_bytes: Bytes per shard at most (approximately).

    Returns:
        One :class:`ShardInfo` per written shard.
    """
    assert split in SPLITS
    for old in stage.glob(f"{split}-*.tar"):
        old.unlink()
    if not rows:
        return []
    pattern = str(stage / f"{split}-%06d.tar")
    # mtime=0 makes the tar bytes (and so the recorded sha256) reproducible run to run.
    with wds.ShardWriter(
        pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, mtime=0.0
    ) as sink:
        for row in rows:
            meta = {
                "key": row.key,
                "label": row.label,
                "class_name": row.class_name,
                "split": split,
                "group": row.group,
                "source": row.source,
                "slice": row.slice,
                "steps": row.steps,
                **meta_extra,
            }
            sink.write(encode_sample(row.key, load_image(row.key), row.label, meta))
            row.shard = Path(sink.fname).name
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.shard] = counts.get(row.shard, 0) + 1
    infos = []
    for name in sorted(counts):
        path = stage / name
        infos.append(ShardInfo(name, split, counts[name], file_sha256(path), path.stat().st_size))
    return infos


def write_manifest(path: Path, rows: Sequence[ManifestRow], metadata: dict[str, str]) -> None:
    """Write ``manifest.parquet`` atomically; ``metadata`` goes into the file's key-value meta."""
    columns = {name: [getattr(r, name) for r in rows] for name in MANIFEST_SCHEMA.names}
    table = pa.table(columns, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
