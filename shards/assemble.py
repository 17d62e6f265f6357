"""Assembly of processed inputs into a shard set: duplicates, splits, shards, manifest, index."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from shards.dedup import DedupConfig, duplicate_clusters, thumbnail
from shards.format import MANIFEST_NAME, SPLITS, DatasetIndex, ShardInfo
from shards.ingest_config import IngestConfig
from shards.sources.base import SourceItem
from shards.split import assign_splits, keys_hash
from shards.writer import (
    ManifestRow,
    content_id,
    legacy_group_kind,
    write_manifest,
    write_split_shards,
)
from srmri.config import config_to_dict

__all__ = ["assemble", "summarize"]


def _rows(
    cfg: IngestConfig, items: Sequence[SourceItem], done: dict[str, list[dict]]
) -> tuple[list[ManifestRow], dict[str, str | None]]:
    """Manifest rows of every journal record, in input order, and each key's split hint."""
    rows, hints = [], {}
    for item in items:
        for rec in done[item.rel_path]:
            label = int(rec["label"])
            hints[rec["key"]] = rec.get("split_hint")
            rows.append(
                ManifestRow(
                    key=rec["key"],
                    source=item.source,
                    source_path=item.rel_path,
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
    """Counts per split and class, quarantine reasons, duplicates and leakage."""
    per_split: dict[str, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    for r in rows:
        if r.status == "ok":
            per_split[r.split][r.class_name] += 1
        else:
            reasons[r.reason.split(":", 1)[0]] += 1
    return {
        "inputs": len({r.source_path for r in rows}),
        "samples": {s: dict(sorted(c.items())) for s, c in sorted(per_split.items())},
        "quarantined": dict(sorted(reasons.items())),
        "duplicates": dict(Counter(r.duplicate_kind for r in rows if r.duplicate_kind)),
        "leakage": sum(r.leakage for r in rows),
    }


def assemble(
    cfg: IngestConfig,
    items: Sequence[SourceItem],
    done: dict[str, list[dict]],
    stage: Path,
    *,
    made_from: dict[str, str],
    fingerprint: str,
) -> tuple[list[ManifestRow], DatasetIndex]:
    """Cluster duplicates, assign splits, write shards and the manifest into ``cfg.out``.

    Args:
        cfg: The ingest configuration.
        items: All inputs, in listing order.
        done: Per input (rel_path), the records its processing produced.
        stage: Staging folder holding ``items/<key>.u16`` pixels.
        made_from: Fingerprints of what makes the set (``config``, ``inputs``).
        fingerprint: Their combined fingerprint.

    Returns:
        All manifest rows and the index (not yet written: the caller writes it last). The
        index's ``dataset_id`` is the set's :func:`~shards.writer.content_id`.
    """
    out = Path(cfg.out)
    rows, hints = _rows(cfg, items, done)
    ok = [r for r in rows if r.status == "ok"]
    load_image = _staged_images(stage, cfg.preprocess.size)
    cluster = _mark_duplicates(ok, load_image, cfg.dedup)
    _assign_splits(ok, cluster, hints, cfg)
    dataset_id = content_id(ok, cfg.classes)  # splits and removed duplicates are final now
    infos = _write_shards(ok, stage=stage, load_image=load_image, cfg=cfg, dataset_id=dataset_id)
    _move_shards(infos, stage, out)
    test_hash = keys_hash([r.key for r in ok if r.split == "test" and r.status == "ok"])
    meta = {"dataset_id": dataset_id, "test_keys_sha256": test_hash, "fingerprint": fingerprint}
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
        config=config_to_dict(cfg),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    return rows, index


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
) -> None:
    """Fill ``split`` and ``leakage`` of the usable rows; with ``dedup.remove``, drop copies."""
    groups = _merge_groups(ok, cluster)
    fixed = [hints[r.key] for r in ok]
    splits = assign_splits([r.label for r in ok], groups, fixed, cfg.split)
    members: dict[int, set[str]] = defaultdict(set)
    for r, s, root in zip(ok, splits, cluster):
        r.split = s
        members[root].add(s)
    for r, root in zip(ok, cluster):
        r.leakage = len(members[root]) > 1
        if cfg.dedup.remove and r.duplicate_of:
            r.status, r.reason = "duplicate_removed", f"duplicate_removed: copy of {r.duplicate_of}"


def _write_shards(
    ok: list[ManifestRow],
    *,
    stage: Path,
    load_image: Callable[[str], np.ndarray],
    cfg: IngestConfig,
    dataset_id: str,
) -> list[ShardInfo]:
    """Write every split's kept rows, in key order, as shards inside ``stage``."""
    infos: list[ShardInfo] = []
    for split in SPLITS:
        chosen = sorted((r for r in ok if r.split == split and r.status == "ok"), key=_key)
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


def _key(row: ManifestRow) -> str:
    return row.key
