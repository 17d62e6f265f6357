"""``shards verify``: every shard's sha256, sample count and per-sample checksums.

Sets written before samples carried checksums (their index records none) are still verified
against their sha256 and counts; only the per-sample check is skipped for them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from shards.checksum import CorruptSampleError
from shards.format import MANIFEST_NAME, DatasetIndex, read_index
from shards.shard_reader import Checksums, iter_shard
from shards.writer import file_sha256

__all__ = ["verify"]

_MAX_PER_SHARD = 5  # damaged samples named per shard; the rest are counted


def _check_samples(path: Path, checksums: Checksums) -> tuple[int, list[str]]:
    """Samples in a shard and problems with them: each damaged sample, named by key.

    A damaged sample does not stop the check: the shard is read again from the sample after it.
    """
    count, problems, damaged = 0, [], 0
    suffixes = frozenset({"npy", "cls", "json"})
    while True:
        try:
            for _ in iter_shard(str(path), count, suffixes, checksums=checksums):
                count += 1
            return count, problems
        except CorruptSampleError as exc:
            damaged += 1
            count += 1
            if damaged <= _MAX_PER_SHARD:
                problems.append(exc.where)
            elif damaged == _MAX_PER_SHARD + 1:
                problems.append(f"{path}: more damaged samples (only the first are named)")


def _check_shard(root: Path, index: DatasetIndex, name: str, count: int, sha: str) -> list[str]:
    path = root / name
    if not path.is_file():
        return [f"{path}: missing (listed in index.json)"]
    problems = []
    digest = file_sha256(path)
    if digest != sha:
        problems.append(f"{path}: sha256 {digest[:12]}… does not match index {sha[:12]}…")
    checksums: Checksums = "require" if index.sample_checksum else "off"
    try:
        n, damaged = _check_samples(path, checksums)
    except (OSError, ValueError) as exc:
        return [*problems, f"{path}: not a readable tar ({exc})"]
    if n != count:
        problems.append(f"{path}: {n} samples, index says {count}")
    return problems + damaged


def verify(root: str | Path) -> list[str]:
    """Check a local shard set; returns a list of problems (empty when all is well).

    Checks: the index exists; every listed shard exists with the recorded sha256 and sample
    count, and (for sets that record them) every sample matches its checksums, each damaged
    sample named by shard and key; the manifest's usable rows agree with the per-shard counts;
    no unlisted shard.

    Args:
        root: The shard set's folder.

    Returns:
        One line per problem.
    """
    root = Path(root)
    try:
        index = read_index(root)
    except (FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    problems = []
    for info in index.shards:
        problems += _check_shard(root, index, info.name, info.count, info.sha256)
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
