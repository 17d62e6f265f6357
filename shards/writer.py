"""Writing a finished shard set: tar shards and ``manifest.parquet`` (whose rows it also reads).

Everything is first written inside a staging folder and moved into place by rename; the index,
which marks the set as finished, is written last. A crash at any point therefore never leaves a
set that looks finished, and re-running redoes only the cheap writing step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from shards.format import MANIFEST_NAME, SPLITS, ShardInfo, encode_sample
from srmri.atomic import atomic_path
from srmri.fingerprint import fingerprint

__all__ = [
    "GROUP_PATIENT",
    "GROUP_SAMPLE",
    "MANIFEST_SCHEMA",
    "ManifestRow",
    "content_id",
    "file_sha256",
    "legacy_group_kind",
    "read_manifest_rows",
    "write_manifest",
    "write_split_shards",
]


GROUP_PATIENT = "patient"
GROUP_SAMPLE = "sample"


@dataclass
class ManifestRow:
    """One input (or one slice of a volume, or one entry of the input tree that is not read).

    Every file or link under the ingest's INPUT folder is in exactly one row's input: its own,
    or (for the instances of a DICOM series folder) the series'. No row names a path: inputs are
    known by keyed hashes, and ``python -m shards locate`` finds the real file of a row on the
    machine that made the set.

    Attributes:
        key: The row's key: ``<source>_<input_id>[_s<slice>]`` (nothing but hashes).
        source: The source reader that read it (``kaggle``, ``nifti``, ``synth``, ...).
        input_id: Keyed hash (16 hex digits) of the input's path relative to INPUT; the rows of
            one volume's slices share it. Empty in sets derived from another (``enhance``).
        slice: Axial slice index within a volume; None for 2-D inputs.
        label: Class index into the set's classes; -1 when unknown.
        class_name: Name of the class (empty when the label is unknown).
        status: ``ok`` (stored in a shard), ``quarantined`` (unusable), ``duplicate_removed``
            or ``skipped`` (not an input: an unsupported file type, a file outside the
            reader's layout, the labels table, a hidden entry, a link outside the tree, a
            dangling or looping link, a non-DICOM file in a series folder).
        reason: Why a row is not ``ok`` (``slug: details``, naming no path); empty for ``ok``.
        split: ``train``, ``val`` or ``test`` for usable rows; empty otherwise.
        shard: The tar shard holding the sample; empty when it is in none.
        group: What the split keeps together: a pseudonymised patient id or, without one, the
            sample's own ``k<key>``; empty for inputs quarantined before a slice was read.
        group_kind: What ``group`` is: ``patient`` (a pseudonymised patient id) or ``sample``
            (no patient id, each sample its own group); empty when ``group`` is.
        sha256: sha256 of the stored uint16 pixels (exact-duplicate detection).
        phash: Perceptual hash of the stored image (near-duplicate detection).
        duplicate_of: Key of the row this one duplicates; empty when it is no duplicate.
        duplicate_kind: ``exact`` or ``near`` for duplicates; empty otherwise.
        leakage: Whether the row's duplicate cluster spans more than one split.
        steps: The preprocessing steps applied (stored in the sample's JSON, not the manifest).
    """

    key: str
    source: str
    input_id: str
    slice: int | None
    label: int
    class_name: str
    status: str
    reason: str = ""
    split: str = ""
    shard: str = ""
    group: str = ""
    group_kind: str = ""
    sha256: str = ""
    phash: str = ""
    duplicate_of: str = ""
    duplicate_kind: str = ""
    leakage: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)


def legacy_group_kind(group: str) -> str:
    """The ``group_kind`` of a record written before that column existed, from its group.

    Older manifests (and shard metadata, and staged journals) only carry the group, whose
    prefix told the kind: ``k<key>`` for a sample without a patient id, anything else for a
    pseudonymised patient.
    """
    if not group:
        return ""
    return GROUP_SAMPLE if group.startswith("k") else GROUP_PATIENT


MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("input_id", pa.string()),
        ("slice", pa.int32()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("group", pa.string()),
        ("group_kind", pa.string()),
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


def content_id(rows: Sequence[ManifestRow], classes: Sequence[str]) -> str:
    """The id of a shard set computed from what it holds, not from where it came from.

    A hash over the class list and, for every stored (``ok``) sample, its split, label and
    the sha256 of its pixels: byte-identical inputs ingested from different folders, or under
    another secret key (keys are keyed hashes of the input paths), give the same id, and any
    changed pixel, label, split or class gives another.

    Args:
        rows: The set's manifest rows (rows that are not ``ok`` are not in any shard: skipped).
        classes: The set's class names, in label order.

    Returns:
        32 hex characters.
    """
    samples = sorted((r.sha256, r.split, int(r.label)) for r in rows if r.status == "ok")
    return fingerprint({"classes": list(classes), "samples": samples})[:32]


def write_split_shards(
    stage: Path,
    split: str,
    rows: Sequence[ManifestRow],
    *,
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
        pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, mtime=0
    ) as sink:
        for row in rows:
            meta = {
                "key": row.key,
                "label": row.label,
                "class_name": row.class_name,
                "split": split,
                "group": row.group,
                "group_kind": row.group_kind,
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
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest_rows(root: str | Path) -> list[ManifestRow]:
    """All rows of a set's ``manifest.parquet`` as :class:`ManifestRow` objects.

    A manifest written before a column existed still reads: ``group_kind`` is then derived
    from the group (:func:`legacy_group_kind`); other missing columns keep their defaults, and
    an old manifest's ``source_path`` column (a plain path) is not read at all.

    Args:
        root: The shard set's folder.

    Returns:
        The rows, in manifest order.
    """
    table = pq.read_table(Path(root) / MANIFEST_NAME).to_pylist()
    rows = [
        ManifestRow(**{"input_id": "", **{k: row[k] for k in MANIFEST_SCHEMA.names if k in row}})
        for row in table
    ]
    for r in rows:
        if not r.group_kind:
            r.group_kind = legacy_group_kind(r.group)
    return rows
