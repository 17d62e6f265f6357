"""``shards verify``: every shard's sha256 and sample count against the index and manifest."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from shards.format import MANIFEST_NAME, read_index
from shards.loader import iter_shard
from shards.writer import file_sha256

__all__ = ["verify"]


def _count_samples(path: Path) -> int:
    return len({key for key, _ in iter_shard(str(path), 0, frozenset({"cls"}))})


def verify(root: str | Path) -> list[str]:
    """Check a local shard set; returns a list of problems (empty when all is well).

    Checks: the index exists; every listed shard exists with the recorded sha256 and sample
    count; the manifest's usable rows agree with the per-shard counts; no unlisted shard.
    """
    root = Path(root)
    try:
        index = read_index(root)
    except (FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    problems = []
    for info in index.shards:
        path = root / info.name
        if not path.is_file():
            problems.append(f"{path}: missing (listed in index.json)")
            continue
        digest = file_sha256(path)
        if digest != info.sha256:
            problems.append(
                f"{path}: sha256 {digest[:12]}… does not match index {info.sha256[:12]}…"
            )
            continue
        try:
            n = _count_samples(path)
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: not a readable tar ({exc})")
            continue
        if n != info.count:
            problems.append(f"{path}: {n} samples, index says {info.count}")
    listed = {i.name for i in index.shards}
    for extra in sorted(p.name for p in root.glob("*.tar")):
        if extra not in listed:
            problems.append(f"{root / extra}: shard not listed in index.json")
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        problems.append(f"{manifest}: missing")
        return problems
    table = pq.read_table(manifest, columns=["status", "shard"]).to_pydict()
    per_shard: dict[str, int] = {}
    for status, shard in zip(table["status"], table["shard"]):
        if status == "ok":
            per_shard[shard] = per_shard.get(shard, 0) + 1
    for info in index.shards:
        if per_shard.get(info.name, 0) != info.count:
            problems.append(
                f"{manifest}: {per_shard.get(info.name, 0)} usable rows for {info.name}, "
                f"index says {info.count}"
            )
    return problems
