"""Exact and near-duplicate detection over processed slices.

Exact duplicates share the sha256 of their processed pixels. Near duplicates have perceptual
hashes (imagehash.phash, 64 bits) within a Hamming distance *and* 32x32 thumbnails correlated
above a threshold: brain slices share so much anatomy that the 64-bit hash alone calls
different patients' slices duplicates (seen on the synthetic set: distance 0 between
subjects), while re-encoded or resized copies of one image keep a thumbnail correlation above
0.998 and different subjects stay below 0.97. Duplicates are clustered, so the splitter keeps
a cluster in one split and any cluster that still crosses splits is reported as leakage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from srmri.config import require

__all__ = ["DedupConfig", "duplicate_clusters", "phash", "thumbnail"]


@dataclass
class DedupConfig:
    """Duplicate handling.

    Attributes:
        near_distance: Max Hamming distance between perceptual hashes for a near duplicate
            (0 disables near-duplicate search).
        min_correlation: Min correlation of 32x32 thumbnails that confirms a near duplicate.
        remove: Drop the later copy of each duplicate (``--dedup``); it stays in the manifest.
    """

    near_distance: int = 6
    min_correlation: float = 0.99
    remove: bool = False

    def check(self) -> None:
        require(0 <= self.near_distance <= 32, "dedup.near_distance", "must be in 0..32")
        require(0 < self.min_correlation <= 1, "dedup.min_correlation", "must be in (0, 1]")


def phash(image: np.ndarray) -> str:
    """64-bit perceptual hash (hex) of a float image in [0, 1]."""
    img8 = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L")
    return str(imagehash.phash(img8))


def thumbnail(image: np.ndarray, side: int = 32) -> np.ndarray:
    """Zero-mean, unit-norm ``side x side`` box-filtered thumbnail (float32, flattened)."""
    small = Image.fromarray(image.astype(np.float32), mode="F").resize(
        (side, side), Image.Resampling.BOX
    )
    t = np.asarray(small, dtype=np.float32).ravel()
    t = t - t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-12)


def _popcount64(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)


def duplicate_clusters(
    sha256s: Sequence[str],
    phashes: Sequence[str],
    thumbs: np.ndarray | None,
    near_distance: int,
    min_correlation: float = 0.99,
    groups: Sequence[str] | None = None,
    block: int = 1024,
) -> tuple[list[int], list[str]]:
    """Cluster records that are exact or near duplicates of each other.

    Args:
        sha256s: Content hash per record.
        phashes: Perceptual hash (hex) per record.
        thumbs: ``(n, d)`` thumbnails from :func:`thumbnail`, or None for hash-only matching.
        near_distance: Max Hamming distance for a near duplicate; 0 for exact only.
        min_correlation: Thumbnail correlation that confirms a near-duplicate candidate.
        groups: Patient group per record; near (not exact) matches inside one group are
            ignored, since neighbouring slices of one scan are expected to look alike.
        block: Rows compared at once (bounds memory to block x n bytes).

    Returns:
        ``cluster[i]``: the index of the first record of i's cluster (i itself if unique), and
        ``kind[i]``: ``""``, ``"exact"`` or ``"near"`` (how i joined an earlier record).
    """
    n = len(sha256s)
    parent = list(range(n))
    kind = [""] * n

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int, how: str) -> None:
        ri, rj = find(i), find(j)
        if ri == rj:
            return
        lo, hi = min(ri, rj), max(ri, rj)
        parent[hi] = lo
        if not kind[max(i, j)]:
            kind[max(i, j)] = how

    first: dict[str, int] = {}
    for i, digest in enumerate(sha256s):
        if digest in first:
            union(first[digest], i, "exact")
        else:
            first[digest] = i
    if near_distance > 0 and n > 1:
        codes = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
        for start in range(0, n, block):
            rows = codes[start : start + block]
            near = _popcount64(rows[:, None] ^ codes[None, :]) <= near_distance
            if thumbs is not None:
                near &= (thumbs[start : start + block] @ thumbs.T) >= min_correlation
            ii, jj = np.nonzero(near)
            for i, j in zip(ii.tolist(), jj.tolist()):
                i += start
                if i < j and (groups is None or groups[i] != groups[j]):
                    union(i, j, "near")
    return [find(i) for i in range(n)], kind
