"""Assembly of processed inputs into a shard set: duplicates, splits, shards, manifest, index.

Rows name inputs by keyed ids only; the skipped entries of the input tree get rows too. A set
with nothing usable, or without a train or test split, stops here with its manifest written
(for the reasons) and no index; an empty validation split is a warning.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from shards.dedup import DedupConfig, duplicate_clusters, thumbnail
from shards.format import MANIFEST_NAME, SPLITS, DatasetIndex, ShardInfo
from shards.ingest_config import IngestConfig
from shards.sources.base import SourceItem, make_key
from shards.split import assign_splits, empty_splits, keys_hash
from shards.writer import (
    ManifestRow,
    content_id,
    legacy_group_kind,
    write_manifest,
    write_split_shards,
)
from srmri.config import ConfigError

__all__ = ["Listing", "UnusableSetError", "assemble", "summarize"]


@dataclass
class Listing:
    """What the set is made from: the inputs in listing order, the id of every relative path
    (inputs, their files, skipped entries) and the skipped entries with their reasons."""

    items: Sequence[SourceItem]
    ids: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)


def _rows(
    cfg: IngestConfig, listing: Listing, done: dict[str, list[dict]]
) -> tuple[list[ManifestRow], dict[str, str | None]]:
    """Manifest rows of every journal record, in input order, then of every skipped entry.

    Returns:
        The rows and each key's split hint.
    """
    rows, hints = [], {}
    ids = listing.ids
    for item in listing.items:
        own = ids[item.rel_path]
        for rec in done[own]:
            label = int(rec["label"])
            hints[rec["key"]] = rec.get("split_hint")
            rows.append(
                ManifestRow(
                    key=rec["key"],
                    source=item.source,
                    input_id=rec.get("input_id", own),
                    slice=rec.get("slice"),
                    label=label,
                    class_name=cfg.classes[label] if 0 <= label < len(cfg.classes) else "",
                    status=rec["status"],
                    reason=rec.get("reason", ""),
                    group=rec.get("group", ""),
                    # A journal staged by an older version has no kind; derive it there.
                    group_kind=rec.get("group_kind") or legacy_group_kind(rec.get("group", "")),
                    sha256=rec.get("sha256", ""),
                    phash=rec.get("phash", ""),
                    steps=rec.get("steps", []),
                )
            )
    for rel, reason in listing.skipped.items():
        key = make_key(cfg.source, ids[rel])
        rows.append(
            ManifestRow(
                key=key,
                source=cfg.source,
                input_id=ids[rel],
                slice=None,
                label=-1,
                class_name="",
                status="skipped",
                reason=reason,
            )
        )
    return rows, hints


def _merge_groups(ok: list[ManifestRow], cluster: list[int]) -> list[str]:
    """Groups joined through duplicate clusters, so a duplicate pair lands in one split."""
    parent: dict[str, str] = {r.group: r.group for r in ok}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for i, root in enumerate(cluster):
        a, b = find(ok[i].group), find(ok[root].group)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(r.group) for r in ok]


def summarize(rows: Sequence[ManifestRow]) -> dict[str, Any]:
    """Counts per split and class, quarantine and skip reasons, duplicates and leakage."""
    per_split: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    skipped: Counter = Counter()
    for r in rows:
        if r.status == "ok":
            per_split[r.split][r.class_name] += 1
        elif r.status == "skipped":
            skipped[r.reason.split(":", 1)[0]] += 1
        else:
            reasons[r.reason.split(":", 1)[0]] += 1
    return {
        "inputs": len({r.input_id for r in rows if r.status != "skipped"}),
        "samples": {s: dict(sorted(c.items())) for s, c in sorted(per_split.items())},
        "quarantined": dict(sorted(reasons.items())),
        "skipped": dict(sorted(skipped.items())),
        "duplicates": dict(Counter(r.duplicate_kind for r in rows if r.duplicate_kind)),
        "leakage": sum(r.leakage for r in rows),
    }


class UnusableSetError(ConfigError):
    """The inputs make no usable set (nothing usable, or no train or test split).

    The manifest is written first, so every input's row and reason can be looked at; the index
    is not, so the folder never looks like a finished set.

    Attributes:
        rows: All manifest rows.
    """

    def __init__(self, message: str, rows: list[ManifestRow]) -> None:
        super().__init__(message)
        self.rows = rows


def assemble(
    cfg: IngestConfig,
    listing: Listing,
    done: dict[str, list[dict]],
    stage: Path,
    *,
    made_from: dict[str, str],
    fingerprint: str,
    config: dict[str, Any],
    log: Callable[[str], None] = print,
) -> tuple[list[ManifestRow], DatasetIndex]:
    """Cluster duplicates, assign splits, write shards and the manifest into ``cfg.out``.

    Args:
        cfg: The ingest configuration.
        listing: The inputs, their ids and the skipped entries.
        done: Per input id, the records its processing produced.
        stage: Staging folder holding ``items/<key>.u16`` pixels.
        made_from: Fingerprints of what makes the set (``config``, ``inputs``).
        fingerprint: Their combined fingerprint.
        config: The config as the index records it (no local path).
        log: Where warnings go (an empty validation split).

    Returns:
        All manifest rows and the index (not yet written: the caller writes it last). The
        index's ``dataset_id`` is the set's :func:`~shards.writer.content_id`.

    Raises:
        UnusableSetError: If no input is usable, or the train or test split is empty.
    """
    out = Path(cfg.out)
    rows, hints = _rows(cfg, listing, done)
    ok = [r for r in rows if r.status == "ok"]
    meta = {"fingerprint": fingerprint}
    if not ok:
        write_manifest(out / MANIFEST_NAME, rows, meta)
        raise UnusableSetError(_nothing_usable(rows), rows)
    load_image = _staged_images(stage, cfg.preprocess.size)
    cluster = _mark_duplicates(ok, load_image, cfg.dedup)
    empty = _assign_splits(ok, cluster, hints, cfg)
    if empty:
        problem = _empty_split_message(empty, ok, cluster)
        if set(empty) & {"train", "test"}:
            write_manifest(out / MANIFEST_NAME, rows, meta)
            raise UnusableSetError(problem, rows)
        log(f"warning: {problem}")
    dataset_id = content_id(ok, cfg.classes)  # splits and removed duplicates are final now
    infos = _write_shards(ok, stage=stage, load_image=load_image, cfg=cfg, dataset_id=dataset_id)
    _move_shards(infos, stage, out)
    test_hash = keys_hash([r.key for r in ok if r.split == "test" and r.status == "ok"])
    meta.update(dataset_id=dataset_id, test_keys_sha256=test_hash)
    write_manifest(out / MANIFEST_NAME, rows, meta)
    index = DatasetIndex(
        dataset_id=dataset_id,
        classes=list(cfg.classes),
        image_size=cfg.preprocess.size,
        shards=infos,
        test_keys_sha256=test_hash,
        fingerprint=fingerprint,
        made_from=dict(made_from),
        counts=summarize(rows),
        config=config,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return rows, index


def _nothing_usable(rows: Sequence[ManifestRow]) -> str:
    counts = summarize(rows)
    parts = [f"{k} {v}" for k, v in {**counts["quarantined"], **counts["skipped"]}.items()]
    return (
        f"input: no usable input: all {len(rows)} rows are quarantined or skipped "
        f"({', '.join(parts) or 'nothing found'})"
    )


def _empty_split_message(empty: list[str], ok: list[ManifestRow], cluster: list[int]) -> str:
    """Why splits are empty, and what to do (a fraction of 0 says no such split is wanted)."""
    groups = len(set(_merge_groups(ok, cluster)))
    joined = sum(1 for i, root in enumerate(cluster) if root != i)
    fixes = " ".join(f"split.{s}_fraction=0" for s in empty if s != "train")
    plural = len(empty) > 1
    return (
        f"split: the {' and '.join(empty)} split{'s are' if plural else ' is'} empty: the "
        f"{len(ok)} usable samples form {groups} group{'' if groups == 1 else 's'}, each kept "
        f"in one split (a group is a patient, merged with others through duplicates: "
        f"{joined} samples joined one); add inputs of more patients"
        + (f", or re-run with {fixes} --overwrite if no such split is wanted" if fixes else "")
    )


def _staged_images(stage: Path, size: int) -> Callable[[str], np.ndarray]:
    """A reader of the staged ``size`` x ``size`` uint16 pixels of a key."""

    def load_image(key: str) -> np.ndarray:
        raw = (stage / "items" / f"{key}.u16").read_bytes()
        return np.frombuffer(raw, dtype=np.uint16).reshape(size, size)

    return load_image


def _mark_duplicates(
    ok: list[ManifestRow], load_image: Callable[[str], np.ndarray], dedup: DedupConfig
) -> list[int]:
    """Fill ``duplicate_of``/``duplicate_kind`` of the usable rows; returns their clusters.

    Returns:
        ``cluster[i]``: index (into ``ok``) of the first row of row i's duplicate cluster.
    """
    thumbs = np.stack([thumbnail(load_image(r.key)) for r in ok]) if ok else None
    cluster, kind = duplicate_clusters(
        [r.sha256 for r in ok],
        [r.phash for r in ok],
        thumbs,
        near_distance=dedup.near_distance,
        min_correlation=dedup.min_correlation,
        groups=[r.group for r in ok],
    )
    for i, root in enumerate(cluster):
        if root != i:
            ok[i].duplicate_of, ok[i].duplicate_kind = ok[root].key, kind[i] or "near"
    return cluster


def _assign_splits(
    ok: list[ManifestRow],
    cluster: list[int],
    hints: dict[str, str | None],
    cfg: IngestConfig,
) -> list[str]:
    """Fill ``split`` and ``leakage`` of the usable rows; with ``dedup.remove``, drop copies.

    Returns:
        The splits the config asks for that are left empty (:func:`empty_splits`).
    """
    groups = _merge_groups(ok, cluster)
    fixed = [hints[r.key] for r in ok]
    content = [r.sha256 for r in ok]
    splits = assign_splits([r.label for r in ok], groups, fixed, cfg.split, content)
    members: dict[int, set[str]] = defaultdict(set)
    for r, s, root in zip(ok, splits, cluster):
        r.split = s
        members[root].add(s)
    for r, root in zip(ok, cluster):
        r.leakage = len(members[root]) > 1
        if cfg.dedup.remove and r.duplicate_of:
            r.status, r.reason = "duplicate_removed", f"duplicate_removed: copy of {r.duplicate_of}"
    return empty_splits(splits, fixed, cfg.split)


def _write_shards(
    ok: list[ManifestRow],
    *,
    stage: Path,
    load_image: Callable[[str], np.ndarray],
    cfg: IngestConfig,
    dataset_id: str,
) -> list[ShardInfo]:
    """Write every split's kept rows, in content order, as shards inside ``stage``.

    Content order (the sha256 of the pixels, then label and key): keys are keyed hashes of
    input paths, so key order would change the loader's sample order, hence the training,
    under another secret key.
    """
    infos: list[ShardInfo] = []
    for split in SPLITS:
        kept = (r for r in ok if r.split == split and r.status == "ok")
        chosen = sorted(kept, key=_content_order)
        infos += write_split_shards(
            stage,
            split,
            chosen,
            load_image=load_image,
            meta_extra={"dataset_id": dataset_id},
            max_count=cfg.shard_max_count,
            max_bytes=int(cfg.shard_max_mb * 1e6),
        )
    return infos


def _move_shards(infos: Sequence[ShardInfo], stage: Path, out: Path) -> None:
    """Move finished shards from ``stage`` into ``out``, removing shards the set no longer has.

    Each shard is complete before its rename, so ``out`` never holds a half-written shard; the
    set only counts as finished once the caller writes ``index.json``.
    """
    keep = {i.name for i in infos}
    for stale in out.glob("*.tar"):
        if stale.name not in keep:
            stale.unlink()
    for info in infos:
        os.replace(stage / info.name, out / info.name)


def _content_order(row: ManifestRow) -> tuple[str, int, str]:
    return row.sha256, row.label, row.key
