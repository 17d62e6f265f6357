"""The per-worker reader of a plan: read, check, decode, transform and batch one block.

Each DataLoader worker (or the main process, with no workers) runs :class:`PlanDataset` over
the block of the epoch's batches the plan gives it (:mod:`shards.plan`). Samples are read
(:mod:`shards.shard_reader`) and checked against their checksums (:mod:`shards.checksum`): the
small members as they are read, many samples together, and each image when it is hashed for
its digest anyway; then decoded, passed through the transform and collated. In a worker the
batch goes into the worker's shared-memory ring (:mod:`shards.batch_ring`); in the main
process into memory reused once the caller lets go of a batch (:mod:`shards.collate`).
A balanced plan's draws are read the same way, front to back (:meth:`PlanDataset._read_picked`).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards.batch_ring import Packed, RingWriter, finish
from shards.checksum import CHECKSUM_SUFFIX, check_digest, check_samples, payload_digest
from shards.collate import Alloc, Collator, ReusedMemory, fresh_alloc
from shards.degrade import EVAL_EPOCH
from shards.format import ShardInfo, decode_image, join_url
from shards.http_stream import HttpSettings
from shards.plan import Plan, rng
from shards.sample import Batch, Sample
from shards.shard_reader import Checksums, iter_shard

__all__ = ["PlanDataset", "ReadSettings", "Transform"]

# Runs in the workers on every sample; see shards.sample for the keys it receives.
Transform = Callable[[Sample], Sample]
_INV_U16 = np.float32(1.0 / 65535.0)
_WANTED = frozenset({"npy", "cls"})
_SEED_MASK = (1 << 63) - 1
_CHECKED_TOGETHER = 256  # samples read ahead of their use and checked as one group
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


@dataclass(frozen=True)
class ReadSettings:
    """What every worker of a loader shares: where, how checked, how decoded and batched."""

    roots: tuple[str, ...]  # the shard set, then its aligned sets
    shards: tuple[ShardInfo, ...]
    seed: int
    rank: int
    batch_size: int
    train: bool
    shuffle_chunk: int
    transform: Transform | None
    image_dtype: Literal["float32", "uint16"]
    checksums: Checksums
    http: HttpSettings
    pin_memory: bool


class PlanDataset(IterableDataset):
    """Yields one worker's batches of ``plan`` (see the module docstring).

    Args:
        settings: The loader's settings.
        plan: This epoch's plan.
        free_slots: One semaphore per worker (its ring's free slots); empty without workers.
        slots: Slots per worker ring.
        memory: Where batches made in the main process go (without workers; new memory when
            None or pinned).
    """

    def __init__(
        self,
        settings: ReadSettings,
        plan: Plan,
        free_slots: list[Any],
        slots: int,
        memory: ReusedMemory | None = None,
    ) -> None:
        self.s = settings
        self.plan = plan
        self.free_slots = free_slots
        self.slots = slots
        self.memory = memory
        self.sample_epoch = plan.epoch if settings.train else EVAL_EPOCH
        # Without a transform nothing looks at the pixels before collation, so they stay
        # uint16 until then whatever the image dtype: the same values, converted once.
        self.raw = settings.image_dtype == "uint16" or settings.transform is None

    def __iter__(self) -> Iterator[Batch | Packed]:
        info = get_worker_info()
        plan, bs = self.plan, self.s.batch_size
        block = ((info.id if info else 0) + plan.rotation) % len(plan.blocks)
        first, stop = plan.blocks[block]
        lo, hi = first * bs, min(stop * bs, plan.n_samples)
        raws = self._block_raws(block, lo, hi, plan.skips[block] * bs)
        ring = RingWriter(info.id, self.free_slots[info.id], self.slots) if info else None
        pin = self.s.pin_memory
        while batch := list(itertools.islice(raws, bs)):
            collator = ring.collator(len(batch)) if ring else Collator(len(batch), self._alloc())
            for raw in batch:  # each sample goes into the batch while it is in the caches
                self._add(collator, raw)
            if ring is not None:
                yield ring.pack(collator)  # type: ignore[misc]
            else:
                yield finish(collator.finish(), pin) if pin else collator.finish()  # type: ignore[misc]
            del collator  # so that a batch the caller dropped is seen as free (ReusedMemory)

    def _alloc(self) -> Alloc:
        """The memory of the next batch delivered from this process (uint16 as float32)."""
        if self.memory is None or self.s.pin_memory:
            return fresh_alloc(convert=True, pin=self.s.pin_memory)
        return self.memory.alloc(convert=True)

    def _block_raws(self, block: int, lo: int, hi: int, skip: int) -> Iterator[tuple]:
        """Raw samples of rank-local ``[lo, hi)`` in yield order, after the first ``skip``."""
        if not self.s.train:
            yield from self._read_local(lo + skip, hi)
            return
        # Chunks are aligned to the block start, so a resume re-reads only the chunk it
        # stopped in and drops the samples of that chunk's permutation already yielded.
        chunk_id, drop = divmod(skip, self.s.shuffle_chunk)
        raws = self._read_local(lo + chunk_id * self.s.shuffle_chunk, hi)
        while chunk := list(itertools.islice(raws, self.s.shuffle_chunk)):
            perm = rng(self.s.seed, self.plan.epoch, self.s.rank, block, chunk_id)
            for j in perm.permutation(len(chunk))[drop:]:
                yield chunk[j]
            chunk_id, drop = chunk_id + 1, 0

    def _read_local(self, lo: int, hi: int) -> Iterator[tuple]:
        """Raw samples at rank-local positions ``[lo, hi)``, in stream order."""
        if self.plan.picks:
            yield from self._read_picked(lo, hi)
            return
        for seg in self.plan.segments:
            a = max(lo, seg.local)
            b = min(hi, seg.local + seg.stop - seg.start)
            if a < b:
                offset = seg.start - seg.local
                for raw in self._read_global(a + offset, b + offset):
                    yield (*raw, seg.valid)

    def _read_picked(self, lo: int, hi: int) -> Iterator[tuple]:
        """Raw samples at rank-local ``[lo, hi)`` of a balanced plan (:mod:`shards.plan`).

        The picked stream span is read front to back once: samples no draw picked are read
        past, a sample picked ``m`` times is yielded ``m`` times. Each repeat gets its own copy
        of the members as read (taken before the first is yielded), so that a transform that
        changes an image in place (a view of the mapped shard) cannot alter, or fail the
        checksum of, another copy.
        """
        picks = self.plan.picks[lo:hi]
        if not picks:
            return
        raws = self._read_global(picks[0], picks[-1] + 1)
        pos, pristine = picks[0] - 1, None
        for i, p in enumerate(picks):
            if p == pos:  # a repeat: a copy of the members as read, whatever became of them
                yield (*_own(pristine), True)
                continue
            while pos < p:
                raw, pos = next(raws), pos + 1
            # Copied before the first copy is yielded: the chunk shuffle may transform it
            # before the repeat is even read.
            pristine = _own(raw) if i + 1 < len(picks) and picks[i + 1] == p else None
            yield (*raw, True)

    def _read_global(self, lo: int, hi: int) -> Iterator[tuple]:
        """``(key, [parts of each root], [shard url of each root], [image digest each root
        records] or None)`` at global ``[lo, hi)``, all members but the images checked."""
        plan = self.plan
        i = bisect.bisect_right(plan.starts, lo) - 1
        pos = lo
        while pos < hi:
            shard = self.s.shards[plan.order[i]]
            skip = pos - plan.starts[i]
            take = min(hi, plan.starts[i] + shard.count) - pos
            yield from self._read_shard(shard, skip, take)
            pos += take
            i += 1

    def _read_shard(self, shard: ShardInfo, skip: int, take: int) -> Iterator[tuple]:
        urls = [join_url(root, shard.name) for root in self.s.roots]
        wanted = _WANTED if self.s.checksums == "off" else _WANTED | {CHECKSUM_SUFFIX}
        streams = [iter_shard(u, skip, wanted, checksums="off", http=self.s.http) for u in urls]
        try:
            for start in range(0, take, _CHECKED_TOGETHER):
                stop = min(take, start + _CHECKED_TOGETHER)
                group = [self._next(streams, urls, shard, skip + n) for n in range(start, stop)]
                recorded = self._check_members(urls, group)
                for (key, parts), digests in zip(group, recorded):
                    yield key, parts, urls, digests
        finally:
            for s in streams:
                s.close()

    def _next(self, streams: list[Iterator], urls: list[str], shard: ShardInfo, n: int) -> tuple:
        """``(key, [members of each root])`` of the shard's ``n``-th sample."""
        got = [next(s, None) for s in streams]
        if any(g is None for g in got):
            raise ValueError(
                f"{urls[got.index(None)]}: ends after {n} samples but index.json says "
                f"{shard.count}; the shard set is damaged (run `python -m shards verify`)"
            )
        key = got[0][0]
        for url, (other, _) in zip(urls[1:], got[1:]):
            if other != key:
                raise ValueError(
                    f"{url}: sample {n} has key {other!r} but {urls[0]} has {key!r}; aligned "
                    "shard sets must hold the same keys in the same order"
                )
        return key, [parts for _, parts in got]

    def _check_members(self, urls: list[str], group: list[tuple]) -> Iterator:
        """Check all members but the images of a group of samples as they are read; yields
        each sample's image digests as its roots record them (None: no check).

        Checked together, by :func:`shards.checksum.check_samples`; the images' digests are
        compared in :meth:`_add`, once the images are hashed anyway.
        """
        if self.s.checksums == "off":
            return itertools.repeat(None)
        required = self.s.checksums == "require"
        by_root = [
            check_samples(url, [(key, parts[r]) for key, parts in group], required, "npy")
            for r, url in enumerate(urls)
        ]
        return zip(*by_root)

    def _add(self, collator: Collator, raw: tuple) -> None:
        """Decode and transform one sample into the batch, then check its images' digests.

        The image payload is hashed once, before the transform (its digest seeds the draws),
        and that digest is what the check compares with the recorded one; an aligned root's
        image is hashed after the copy into the batch, from the CPU caches (hashing a payload
        from memory cost 54 us a sample, from the caches ~5 us). A damaged sample still never
        leaves: the batch is given out only once all its samples passed. If decoding or the
        transform fails, the check runs first, so damage is reported as damage.
        """
        key, parts, urls, recorded, valid = raw
        digest = None
        try:
            digest, sample = self._sample(key, parts, valid)
            collator.add(sample)
        except Exception:
            self._check_images(key, parts, urls, recorded, digest)
            raise
        # The common case inline: one root, whose recorded digest is the one just made.
        if recorded is not None and (len(recorded) > 1 or recorded[0] != digest):
            self._check_images(key, parts, urls, recorded, digest)

    def _check_images(
        self,
        key: str,
        parts: list[dict[str, bytes]],
        urls: list[str],
        recorded: Sequence[str | None] | None,
        digest: str | None,
    ) -> None:
        """Compare each root's image digest (the first root's: ``digest``, if made) with the
        recorded one."""
        for i, (url, members, want) in enumerate(zip(urls, parts, recorded or ())):
            if want is not None and "npy" in members:
                got = digest if i == 0 and digest is not None else payload_digest(members["npy"])
                check_digest(url, key, "npy", got, want)

    def _sample(self, key: str, parts: list[dict[str, bytes]], valid: bool) -> tuple[str, Sample]:
        """The digest of the image payload, and the sample (with its aligned images) decoded
        and transformed."""
        if "cls" not in parts[0]:
            raise ValueError(f"sample {key!r} has no .cls (has {sorted(parts[0])})")
        images = [self._image(p, key) for p in parts]
        digest = payload_digest(parts[0]["npy"])
        sample: Sample = {
            "key": key,
            "image": images[0],
            "label": int(parts[0]["cls"]),
            "valid": valid,
            "digest": digest,
            "seed": self._seed_of(digest),
            "epoch": self.sample_epoch,
            "aligned": images[1:],
        }
        return digest, self.s.transform(sample) if self.s.transform is not None else sample

    def _seed_of(self, name: str) -> int:
        """:func:`shards.degrade.sample_seed` of ``name`` (tests check they agree), without
        ``json.dumps`` of a list per sample: only the name is encoded, as ``json`` would."""
        text = f"[{self.s.seed}, {self.sample_epoch}, {encode_basestring_ascii(name)}]"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & _SEED_MASK

    def _image(self, parts: dict[str, bytes], key: str) -> torch.Tensor:
        if "npy" not in parts:
            raise ValueError(f"sample {key!r} has no .npy image (has {sorted(parts)})")
        arr = _decode_npy(parts["npy"])
        if arr.ndim != 3:
            raise ValueError(f"sample {key!r}: image has shape {arr.shape[1:]}, expected 2-D")
        if self.raw and arr.dtype == np.uint16:
            # A view of the payload (no copy); payloads read over http are immutable bytes.
            return torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        out = arr.astype(np.float32)
        out *= _INV_U16
        return torch.from_numpy(out)


def _own(raw: Any) -> tuple:
    """A raw sample whose writable payloads (views of a mapped shard, earlier copies) are
    copies of their own; ``bytes`` payloads (immutable) are shared."""
    key, parts, urls, digests = raw
    owned = [
        {
            s: bytearray(d) if isinstance(d, memoryview | bytearray) else d
            for s, d in members.items()
        }
        for members in parts
    ]
    return key, owned, urls, digests


def _decode_npy(data: bytes) -> np.ndarray:
    """Decode ``.npy`` bytes as ``[1, *shape]``; the header of each shape is parsed once.

    The array is a view of ``data`` (no copy), writable when ``data`` is writable.
    """
    if data[6:8] == b"\x01\x00":
        offset = 10 + int.from_bytes(data[8:10], "little")
        head = bytes(data[:offset])  # payloads may be memoryviews (unhashable)
        info = _NPY_HEADERS.get(head)
        if info is not None:
            dtype, shape, count = info
            return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape)
        arr = decode_image(data)
        if arr.flags.c_contiguous and len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[head] = (arr.dtype, (1, *arr.shape), arr.size)
        return arr[None]
    return decode_image(data)[None]
