"""The plan of one epoch on one rank: which samples each DataLoader worker reads, in what order.

Planned from ``index.json`` alone (per-shard sample counts), so start-up costs the same for a
thousand samples or a million; see :mod:`shards.loader` for the rules the plan implements.

The balanced sampler (train mode) also needs each sample's label (:mod:`shards.labels`, read
once per loader). Its epoch is ``N`` draws (``N`` the split's samples): each class present gets
``N // K`` of them (``K`` classes; the remainder goes one each to classes picked at random),
drawn with replacement among that class's samples, all from ``(seed, epoch)`` only. The draws
are the stream positions of the epoch's shard order, sorted, so a worker still reads its
shards front to back (samples drawn by no one are read past, a sample drawn twice is yielded
twice in a row); then ranks, batches, blocks and chunks are cut from the ``N`` draws exactly
as from the ``N`` samples of a plain epoch: the same step counts and the same resume.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.random  # loaded lazily by numpy otherwise: 15 ms inside the first epoch

from shards.format import ShardInfo

__all__ = ["Plan", "Segment", "balanced_draws", "plan_epoch", "rng"]

_BALANCED = 0xBA1A  # third part of the balanced draw's generator (shard order uses two parts)


def rng(*parts: int) -> np.random.Generator:
    """A generator seeded from integer parts (negative ones allowed) via a stable hash."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@dataclass(frozen=True)
class Segment:
    """Rank-local positions ``[local, local + stop - start)`` are global ``[start, stop)``."""

    local: int
    start: int
    stop: int
    valid: bool


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs to produce its batches of one epoch on one rank."""

    epoch: int
    order: tuple[int, ...]  # shard indices in stream order
    starts: tuple[int, ...]  # global start position of each shard in stream order
    segments: tuple[Segment, ...]
    n_samples: int  # rank-local samples this epoch
    blocks: tuple[tuple[int, int], ...]  # rank-local batch ranges per block
    skips: tuple[int, ...]  # batches each block already produced (resume)
    rotation: int  # worker i serves block (i + rotation) % len(blocks)
    # Balanced sampler: the stream position each rank-local position reads (non-decreasing);
    # empty: the segments say (each sample once).
    picks: tuple[int, ...] = ()


def batches_per_epoch(n_total: int, train: bool, world: int, batch: int) -> int:
    """Batches per epoch on each rank (the same on every rank)."""
    if train:
        return n_total // world // batch
    return math.ceil(math.ceil(n_total / world) / batch)


def balanced_draws(
    labels: Sequence[np.ndarray], order: Sequence[int], seed: int, epoch: int
) -> np.ndarray:
    """The balanced sampler's epoch: sorted stream positions, as many as there are samples.

    Args:
        labels: Each shard's labels (index order), as :func:`shards.labels.read_split_labels`.
        order: The epoch's shard order.
        seed: The loader's seed.
        epoch: The epoch.

    Returns:
        ``int64[N]``: the stream position (in ``order``) of each draw, non-decreasing; each
        class present is drawn ``N // K`` or ``N // K + 1`` times.
    """
    stream = np.concatenate([labels[i] for i in order]) if order else np.zeros(0, np.int64)
    n, present = len(stream), np.unique(stream)
    if not n:
        return stream
    gen = rng(seed, epoch, _BALANCED)
    quota = np.full(len(present), n // len(present))
    quota[gen.choice(len(present), n % len(present), replace=False)] += 1
    members = [np.flatnonzero(stream == c) for c in present]
    draws = [m[gen.integers(0, len(m), q)] for m, q in zip(members, quota)]
    return np.sort(np.concatenate(draws))


def plan_epoch(
    shards: Sequence[ShardInfo],
    *,
    train: bool,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    batch: int,
    workers: int,
    done: int,
    labels: Sequence[np.ndarray] | None = None,
) -> Plan:
    """Plan a rank's epoch, ``done`` batches of which were already yielded.

    Args:
        shards: The split's shards, in index order.
        train: Train mode (shuffled shard order, whole batches) or eval (in order, padded).
        seed: The loader's seed.
        epoch: The epoch.
        rank: This rank.
        world: Number of ranks.
        batch: Samples per batch.
        workers: DataLoader workers (0 plans one block read in the main process).
        done: Batches of this epoch already yielded (resume).
        labels: Each shard's labels for the balanced sampler (train mode only); None: each
            sample once.

    Returns:
        The plan.
    """
    n_total = sum(s.count for s in shards)
    picks: tuple[int, ...] = ()
    if labels is not None and not train:
        raise ValueError("the balanced sampler is for train mode: eval reads each sample once")
    if train:
        order = tuple(int(i) for i in rng(seed, epoch).permutation(len(shards)))
        n_rank = n_total // world // batch * batch
        first = rank * (n_total // world)
        segments = [Segment(0, first, first + n_rank, True)]
        if labels is not None:
            drawn = balanced_draws(labels, order, seed, epoch)[first : first + n_rank]
            picks = tuple(drawn.tolist())
    else:
        order = tuple(range(len(shards)))
        n_rank = math.ceil(n_total / world)
        segments = []
        # Positions past the end wrap around (several times if the split is tiny) as padding.
        pos, stop = rank * n_rank, (rank + 1) * n_rank
        while pos < stop:
            start = pos % n_total
            size = min(stop - pos, n_total - start)
            segments.append(Segment(pos - rank * n_rank, start, start + size, pos < n_total))
            pos += size
    starts = tuple(itertools.accumulate((shards[i].count for i in order), initial=0))
    n_blocks = max(1, workers)
    n_batches = batches_per_epoch(n_total, train, world, batch)
    sizes = [n_batches // n_blocks + (b < n_batches % n_blocks) for b in range(n_blocks)]
    ends = tuple(itertools.accumulate(sizes, initial=0))
    return Plan(
        epoch=epoch,
        order=order,
        starts=starts[:-1],
        segments=tuple(segments),
        n_samples=n_rank,
        blocks=tuple(itertools.pairwise(ends)),
        # Round-robin: after `done` batches, block b produced done // W + (b < done % W).
        skips=tuple(done // n_blocks + (b < done % n_blocks) for b in range(n_blocks)),
        rotation=done % n_blocks,
        picks=picks,
    )
