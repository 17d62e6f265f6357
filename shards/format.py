"""The on-disk shard format: sample encoding, shard names and the ``index.json`` of a shard set.

A shard set is a folder (or URL prefix) holding::

    index.json          written last and atomically: its presence means the set is complete
    manifest.parquet    one row per input, quarantined ones included
    config.yaml         the resolved configuration that made the set
    {split}-{i:06d}.tar WebDataset shards; one sample = {key}.cls, .json, .npy, .xxh3

``{key}.npy`` is a 2-D uint16 array; intensity = value / 65535 in [0, 1] (after percentile
normalisation). ``{key}.cls`` is the class index as ASCII. ``{key}.json`` holds metadata that is
free of any patient identifier or header value. ``{key}.xxh3`` records a checksum of each of the
other three (:mod:`shards.checksum`); readers verify them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shards.checksum import CHECKSUM_SUFFIX, SAMPLE_CHECKSUM, checksum_member
from shards.http_stream import HttpSettings, read_url
from srmri.atomic import atomic_path

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "SPLITS",
    "DatasetIndex",
    "ShardInfo",
    "decode_image",
    "encode_image",
    "encode_sample",
    "from_uint16",
    "is_url",
    "join_url",
    "read_index",
    "shard_name",
    "to_uint16",
    "write_index",
]

FORMAT = "srmri-shards/1"
INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.parquet"
SPLITS = ("train", "val", "test")


@dataclass
class ShardInfo:
    """One tar shard of a shard set."""

    name: str
    split: str
    count: int
    sha256: str
    nbytes: int = 0


@dataclass
class DatasetIndex:
    """Contents of ``index.json``: what the shard set holds and how it was made."""

    dataset_id: str
    classes: list[str]
    image_size: int
    shards: list[ShardInfo]
    test_keys_sha256: str
    kind: str = "hr"  # "hr" for ingested sets, "sr" for sets written by `shards enhance`
    source_dataset_id: str = ""  # for derived sets: the dataset_id they are aligned with
    # What made the set, hashed: the set in a folder is reused only under the same fingerprint.
    # Ingest: its config and the bytes of its inputs; enhance: SR model, source set,
    # degradation and seed. ``made_from`` holds the parts, so a mismatch can say what changed.
    fingerprint: str = ""
    made_from: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT
    # The checksum every sample carries (encode_sample writes it); "" for a set written
    # before samples carried checksums (its index.json has no such entry).
    sample_checksum: str = SAMPLE_CHECKSUM

    def split_shards(self, split: str) -> list[ShardInfo]:
        """The shards of one split, in order."""
        return [s for s in self.shards if s.split == split]

    def num_samples(self, split: str) -> int:
        """Number of samples stored for ``split``."""
        return sum(s.count for s in self.split_shards(split))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetIndex:
        data = dict(data)
        data["shards"] = [ShardInfo(**s) for s in data.get("shards", [])]
        data.setdefault("sample_checksum", "")
        return cls(**data)


def shard_name(split: str, number: int) -> str:
    """File name of shard ``number`` of ``split``."""
    return f"{split}-{number:06d}.tar"


def is_url(root: str | Path) -> bool:
    """Whether ``root`` is an http(s) URL rather than a local path."""
    return str(root).startswith(("http://", "https://"))


def join_url(root: str | Path, name: str) -> str:
    """Join a shard-set root (path or URL) and a file name."""
    if is_url(root):
        return str(root).rstrip("/") + "/" + name
    return str(Path(root) / name)


def read_index(root: str | Path, http: HttpSettings | None = None) -> DatasetIndex:
    """Read ``index.json`` of a shard set at a local path or http(s) URL.

    Args:
        root: The set's folder or URL prefix.
        http: Timeouts and retries for a URL (default :class:`HttpSettings`).

    Returns:
        The index.

    Raises:
        FileNotFoundError: If the set has no index (missing or never finished).
        ValueError: If the index is of another format.
    """
    where = join_url(root, INDEX_NAME)
    if is_url(root):
        try:
            text = read_url(where, http or HttpSettings()).decode()
        except OSError as exc:
            raise FileNotFoundError(f"{where}: cannot read shard index ({exc})") from exc
    else:
        p = Path(where)
        if not p.is_file():
            raise FileNotFoundError(
                f"{root}: no {INDEX_NAME}; not a finished shard set (run `python -m shards "
                "ingest` or `synth` to make one, or finish an interrupted run by re-running it)"
            )
        text = p.read_text()
    data = json.loads(text)
    if data.get("format") != FORMAT:
        raise ValueError(f"{where}: format {data.get('format')!r} is not {FORMAT!r}")
    return DatasetIndex.from_dict(data)


def write_index(root: str | Path, index: DatasetIndex) -> Path:
    """Write ``index.json`` atomically (temp file, fsync, rename); returns its path."""
    p = Path(root) / INDEX_NAME
    with atomic_path(p) as tmp, open(tmp, "w") as fh:
        fh.write(index.to_json())
        # The index marks the set finished, so its bytes must be on disk before it appears.
        fh.flush()
        os.fsync(fh.fileno())
    return p


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Quantise a float image in [0, 1] to uint16 (values outside are clipped)."""
    return np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)


def from_uint16(image: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_uint16`: float32 in [0, 1]."""
    return image.astype(np.float32) * np.float32(1.0 / 65535.0)


def encode_image(image_u16: np.ndarray) -> bytes:
    """The ``.npy`` payload a shard stores for a 2-D uint16 image (its checksum's input)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image_u16, dtype=np.uint16), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, image_u16: np.ndarray, label: int, meta: dict[str, Any]) -> dict:
    """The dict that ``webdataset.ShardWriter.write`` takes for one sample, checksum included.

    Args:
        key: The sample's key.
        image_u16: The 2-D uint16 image.
        label: Class index.
        meta: JSON-able metadata.

    Returns:
        ``{"__key__", "cls", "json", "npy", "xxh3"}``; write it with an integer ``mtime``
        (``TarWriter(..., mtime=0)``), since a float one adds a pax header to every member.
    """
    members = {
        "npy": encode_image(image_u16),
        "cls": str(int(label)).encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return {"__key__": key, **members, CHECKSUM_SUFFIX: checksum_member(members)}


def decode_image(data: bytes) -> np.ndarray:
    """Decode the ``.npy`` bytes of a sample to its uint16 array (no pickle)."""
    return np.load(io.BytesIO(data), allow_pickle=False)
