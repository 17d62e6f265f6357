"""What a shard set is made from, as hashes: its config and the bytes of every input.

The fingerprint covers the config (as the set records it: the input folder as a keyed hash,
see :func:`shards.ingest_config.shareable_config`) and, per input, its bytes (each file; every
file of a DICOM series folder; the labels table) with what the listing says of it (label,
slices, patient, as keyed hashes where they identify), plus every skipped entry of the tree. A
re-run is "nothing to do" only under the same fingerprint (see :mod:`shards.ingest`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.ingest_config import IngestConfig
from shards.privacy import input_id, pseudonymize
from shards.sources.base import SourceItem
from shards.writer import file_sha256
from srmri.config import config_hash
from srmri.fingerprint import fingerprint

__all__ = ["RUNTIME_KEYS", "SetFingerprint", "item_digests", "set_fingerprint"]

# Config keys that cannot change the set's content (where it goes, how fast it is made).
RUNTIME_KEYS = ("out", "workers", "ray_address", "overwrite", "secret_file")


@dataclass(frozen=True)
class SetFingerprint:
    """What a set is made from: its config and its inputs, each as a hash."""

    config: str
    inputs: str

    @property
    def parts(self) -> dict[str, str]:
        """The parts as recorded in ``index.json``'s ``made_from``."""
        return {"config": self.config, "inputs": self.inputs}

    @property
    def value(self) -> str:
        """The one fingerprint of config and inputs together."""
        return fingerprint(self.parts)[:32]


def _bytes_digest(item: SourceItem, secret: bytes) -> str:
    """sha256 of an input's bytes; for a series folder, of each file the reader would read."""
    if not item.path:
        return ""  # synth: the config alone decides the sample
    p = Path(item.path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():  # the files the listing found in the folder, each by its keyed id
        names = getattr(item, "files", None)
        if names is None:
            names = [f.name for f in p.iterdir() if f.is_file() and not f.name.startswith(".")]
        files = [(input_id(f"{item.rel_path}/{n}", secret), p / n) for n in sorted(names)]
        return fingerprint(
            [[fid, file_sha256(f) if f.is_file() else "missing"] for fid, f in files]
        )
    return "missing"


def _item_digest(item: SourceItem, secret: bytes) -> str:
    """A hash of one input: its bytes and what the listing says of it (label, slices, ...)."""
    fields = dataclasses.asdict(item)
    fields.pop("path")  # where the input tree lies does not change the input
    fields.pop("files", None)  # covered, by keyed ids, in the bytes digest
    fields["rel_path"] = input_id(item.rel_path, secret)  # names go in only as keyed hashes
    if fields.get("patient"):
        fields["patient"] = pseudonymize(fields["patient"], secret)
    return fingerprint({"item": fields, "bytes": _bytes_digest(item, secret)})


def item_digests(
    items: Sequence[SourceItem], ids: Mapping[str, str], secret: bytes
) -> dict[str, str]:
    """Per input id, its :func:`_item_digest`.

    Threads: sha256 releases the GIL, so reading and hashing overlap across files.
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(functools.partial(_item_digest, secret=secret), items)
        return {ids[it.rel_path]: d for it, d in zip(items, digests)}


def set_fingerprint(
    cfg: IngestConfig,
    shared_config: dict[str, Any],
    items: Sequence[SourceItem],
    ids: Mapping[str, str],
    digests: Mapping[str, str],
    skipped: Mapping[str, str],
    secret: bytes,
) -> SetFingerprint:
    """The fingerprint of the set ``cfg`` would make from these inputs now.

    Args:
        cfg: The ingest config.
        shared_config: The config as the set records it (no local path).
        items: The inputs.
        ids: Relative path -> input id.
        digests: Input id -> :func:`_item_digest`.
        skipped: Relative path -> reason, for every skipped entry (each gets a row).
        secret: The pseudonymisation key.
    """
    table = ""
    if cfg.source in ("nifti", "dicom"):
        csv_path = Path(cfg.labels_csv) if cfg.labels_csv else Path(cfg.input) / "labels.csv"
        table = file_sha256(csv_path) if csv_path.is_file() else "missing"
    inputs = {
        "items": [[ids[it.rel_path], digests[ids[it.rel_path]]] for it in items],
        "skipped": sorted([ids[rel], reason] for rel, reason in skipped.items()),
        "labels_table": table,
        # The key decides the patient groups and so the splits: another key, another set.
        "secret": pseudonymize("srmri-ingest-fingerprint", secret),
    }
    config = config_hash(shared_config, exclude=RUNTIME_KEYS)[:32]
    return SetFingerprint(config, fingerprint(inputs)[:32])
