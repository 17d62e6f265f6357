"""Exact and near-duplicate detection over processed slices.

Exact duplicates share the sha256 of their processed pixels. Near duplicates (a re-encoded,
rescaled, cropped, shifted, gamma- or contrast-changed copy) are found in a *canonical frame*
of each processed slice: the slice is resampled about its intensity centroid at a scale set
by its radius of gyration. Preprocessing crops every slice to its head's bounding box, and that
box moves with any change to the file (a JPEG re-encode moves it by 2-4 px, a crop that cuts
the head by up to 10%); the box moved, the thumbnails no longer lined up, and the old
comparison of thumbnails of the processed slice missed such copies (correlation 0.94-0.985
against a 0.99 threshold). Hashing the processed slice does not help either: on the dev part
of ``benchmarks/dedup.py``, at about 1e-4 false pairs, ``imagehash``'s phash (64 or 256 bits)
and dhash kept at most 86% of the copies of the weakest family. Image moments move far less
than the box: the centroid and radius come from every pixel of the head, not from its
outermost ones.

Two slices are near duplicates when, in their canonical frames, their 32x32 thumbnails
correlate above a threshold *and* their 256-bit perceptual hashes (``imagehash.phash``, 16x16
DCT) are within a Hamming distance. The thumbnail is what tells subjects apart: the synthetic
subjects are warps of one brain template, and the hash alone flags many of their pairs; the
hash is a second, independent test that a pair must also pass. Both thresholds were chosen on
the dev part of ``benchmarks/dedup.py`` and then measured on its held-out part (BENCHMARKS.md,
issue 13). The search still compares every pair, in blocks, but as a matrix product of
thumbnails; only the pairs that correlate have their hashes compared.

Duplicates are clustered, so the splitter keeps a cluster in one split, and any cluster that
still crosses splits is reported as leakage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from srmri.config import require

__all__ = [
    "DedupConfig",
    "canonical_frame",
    "duplicate_clusters",
    "near_pairs",
    "phash",
    "thumbnail",
]

# Slices are compared at 64 px whatever ``preprocess.size`` is, so one pair of thresholds holds
# for every size (the benchmark measures 64 and 256).
_WORK_SIDE = 64
# The radius of gyration fills this fraction of the canonical frame's side: a head (a disc of
# radius R has a radius of gyration of 0.71 R) then spans about 85% of the frame.
_GYRATION_FRACTION = 0.3
# Intensities below this (of the normalised [0, 1] slice) do not count towards the moments:
# background noise, present in one copy and cleaned in another, would otherwise pull the
# centroid towards the middle of the frame and stretch the radius.
_MOMENT_FLOOR = 0.1
_HASH_SIZE = 16  # 16 x 16 DCT coefficients: 256 bits
_THUMB_SIDE = 32


@dataclass
class DedupConfig:
    """Duplicate handling.

    Attributes:
        near_distance: Max Hamming distance between the 256-bit perceptual hashes of two
            slices' canonical frames for a near duplicate (0 disables near-duplicate search).
        min_correlation: Min correlation of the canonical 32x32 thumbnails that confirms a
            near duplicate.
        remove: Drop the later copy of each duplicate (``--dedup``); it stays in the manifest.
    """

    near_distance: int = 32
    min_correlation: float = 0.99
    remove: bool = False

    def check(self) -> None:
        require(0 <= self.near_distance <= 128, "dedup.near_distance", "must be in 0..128")
        require(0 < self.min_correlation <= 1, "dedup.min_correlation", "must be in (0, 1]")


def _as_staged(image: np.ndarray) -> np.ndarray:
    """The slice as the ingest stages it (16-bit), as float32 in [0, 1].

    The ingest hashes the float slice and assemble reads the 16-bit staged one back; going
    through 16 bits here makes both give the same hash, bit for bit.
    """
    if image.dtype != np.uint16:
        image = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    return image.astype(np.float32) / 65535.0


def _work_image(image: np.ndarray) -> np.ndarray:
    img = _as_staged(image)
    if img.shape != (_WORK_SIDE, _WORK_SIDE):
        small = Image.fromarray(img).resize((_WORK_SIDE, _WORK_SIDE), Image.Resampling.BOX)
        img = np.asarray(small, dtype=np.float32)
    return img


def _moments(img: np.ndarray) -> tuple[float, float, float]:
    """Intensity centroid (row, column) and radius of gyration of the head, in pixels."""
    weight = np.clip(img - _MOMENT_FLOOR, 0.0, None)
    rows, cols = weight.sum(axis=1, dtype=np.float64), weight.sum(axis=0, dtype=np.float64)
    total = float(rows.sum())
    if total <= 1e-6:  # nothing above the floor: the whole frame
        side = img.shape[0]
        return side / 2, side / 2, side * _GYRATION_FRACTION
    y, x = np.arange(len(rows)) + 0.5, np.arange(len(cols)) + 0.5  # pixel centres
    cy, cx = float(rows @ y) / total, float(cols @ x) / total
    spread = float(rows @ (y - cy) ** 2 + cols @ (x - cx) ** 2) / total
    return cy, cx, max(float(np.sqrt(spread)), 1.0)


def _resample(img: np.ndarray, moments: tuple[float, float, float], side: int) -> np.ndarray:
    """The square of half-side ``radius / (2 * fraction)`` about the centroid, at ``side`` px."""
    cy, cx, radius = moments
    half = radius / (2 * _GYRATION_FRACTION)
    # PIL's box must lie inside the image: pad with background (0) by the largest overhang.
    h, w = img.shape
    pad = int(np.ceil(max(half - cy, half - cx, cy + half - h, cx + half - w, 0.0)))
    if pad:
        src = np.zeros((h + 2 * pad, w + 2 * pad), dtype=np.float32)
        src[pad : pad + h, pad : pad + w] = img
    else:
        src = img
    box = (cx - half + pad, cy - half + pad, cx + half + pad, cy + half + pad)
    # Bilinear with PIL's support widened when shrinking, so the frame is anti-aliased.
    out = Image.fromarray(src).resize((side, side), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.float32)


def canonical_frame(image: np.ndarray, side: int = _WORK_SIDE) -> np.ndarray:
    """A processed slice resampled about its centroid, scaled by its radius of gyration.

    Args:
        image: Processed slice: float in [0, 1], or the 16-bit staged pixels.
        side: Output side in pixels.

    Returns:
        ``side x side`` float32 image in [0, 1]; outside the slice is 0.
    """
    img = _work_image(image)
    return _resample(img, _moments(img), side).astype(np.float32)


def phash(image: np.ndarray) -> str:
    """256-bit perceptual hash (64 hex digits) of a processed slice's canonical frame.

    Args:
        image: Processed slice: float in [0, 1], or the 16-bit staged pixels (same hash).

    Returns:
        ``imagehash.phash`` with ``hash_size=16`` of the 64 px canonical frame, as hex.
    """
    frame = canonical_frame(image, _WORK_SIDE)
    img8 = Image.fromarray(np.round(np.clip(frame, 0, 1) * 255).astype(np.uint8))
    bits = imagehash.phash(img8, hash_size=_HASH_SIZE).hash
    return np.packbits(bits.ravel()).tobytes().hex()  # = str(ImageHash), 20x faster


def thumbnail(image: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm 32x32 thumbnail of a slice's canonical frame (float32, flat).

    Args:
        image: Processed slice: float in [0, 1], or the 16-bit staged pixels.

    Returns:
        ``(1024,)`` float32; the dot product of two is their correlation.
    """
    t = canonical_frame(image, _THUMB_SIDE).ravel()
    t = t - t.mean()
    return (t / max(float(np.linalg.norm(t)), 1e-12)).astype(np.float32)


def _hash_words(phashes: Sequence[str]) -> np.ndarray:
    """Hex hashes as rows of uint64 words (all must have the same length)."""
    lengths = {len(h) for h in phashes}
    if len(lengths) != 1 or 0 in lengths or next(iter(lengths)) % 16:
        raise ValueError(f"phashes must be equal-length hex of 64-bit words, got {lengths}")
    raw = b"".join(bytes.fromhex(h) for h in phashes)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(phashes), -1)


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between rows of uint64 words (broadcasting)."""
    x = a ^ b
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).sum(axis=-1, dtype=np.int32)
    return np.unpackbits(x.view(np.uint8), axis=-1).sum(axis=-1, dtype=np.int32)


def near_pairs(
    phashes: Sequence[str],
    thumbs: np.ndarray | None,
    near_distance: int,
    min_correlation: float = 0.99,
    groups: Sequence[str] | None = None,
    block: int = 1024,
) -> list[tuple[int, int]]:
    """Pairs of records that are near duplicates of each other.

    The search compares each record with every later one, ``block`` rows at a time: one
    matrix product of thumbnails finds the pairs that correlate, and only those have their
    hashes compared (without thumbnails, every pair's hashes are).

    Args:
        phashes: Perceptual hash (hex, from :func:`phash`) per record.
        thumbs: ``(n, d)`` thumbnails from :func:`thumbnail`, or None for hash-only matching.
        near_distance: Max Hamming distance for a near duplicate; 0 for none.
        min_correlation: Thumbnail correlation that confirms a near duplicate.
        groups: Patient group per record; pairs inside one group are left out, since
            neighbouring slices of one scan are expected to look alike.
        block: Rows compared at once (bounds memory to about 4 x block x n bytes).

    Returns:
        ``(i, j)`` with ``i < j``, in increasing order.
    """
    n = len(phashes)
    if near_distance <= 0 or n < 2:
        return []
    words = _hash_words(phashes)
    exact = None if thumbs is None else np.asarray(thumbs, dtype=np.float64)
    fast = None if thumbs is None else np.asarray(thumbs, dtype=np.float32)
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        if fast is None or exact is None:
            close = _hamming(words[start:stop, None], words[None, start:]) <= near_distance
            ii, jj = np.nonzero(close)
        else:
            # float32 finds candidates with some slack; their correlation is then recomputed
            # in float64 without BLAS, so the decision does not depend on its thread count.
            sim = fast[start:stop] @ fast[start:].T
            ii, jj = np.nonzero(sim >= min_correlation - 1e-3)
        ii, jj = ii + start, jj + start
        keep = jj > ii
        ii, jj = ii[keep], jj[keep]
        if exact is not None:
            corr = np.sum(exact[ii] * exact[jj], axis=1)
            close_hash = _hamming(words[ii], words[jj]) <= near_distance
            keep = (corr >= min_correlation) & close_hash
            ii, jj = ii[keep], jj[keep]
        for i, j in zip(ii.tolist(), jj.tolist()):
            if groups is None or groups[i] != groups[j]:
                pairs.append((i, j))
    return pairs


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
        phashes: Perceptual hash (hex, from :func:`phash`) per record.
        thumbs: ``(n, d)`` thumbnails from :func:`thumbnail`, or None for hash-only matching.
        near_distance: Max Hamming distance for a near duplicate; 0 for exact only.
        min_correlation: Thumbnail correlation that confirms a near-duplicate candidate.
        groups: Patient group per record; near (not exact) matches inside one group are
            ignored, since neighbouring slices of one scan are expected to look alike.
        block: Rows compared at once (see :func:`near_pairs`).

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
    for i, j in near_pairs(phashes, thumbs, near_distance, min_correlation, groups, block):
        union(i, j, "near")
    return [find(i) for i in range(n)], kind
