"""The per-worker reader of a plan: read, check, decode, transform and batch one block.

Each DataLoader worker (or the main process, with no workers) runs :class:`PlanDataset` over
the block of the epoch's batches the plan gives it (:mod:`shards.plan`). Samples are read with
their checksums verified (:mod:`shards.shard_reader`), decoded, passed through the transform
and collated; in a worker the batch goes into the worker's shared-memory ring
(:mod:`shards.batch_ring`).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards.batch_ring import Packed, RingWriter, finish
from shards.checksum import CHECKSUM_SUFFIX, check_sample, payload_digest
from shards.collate import Collator, fresh_alloc
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
    """

    def __init__(self, settings: ReadSettings, plan: Plan, free_slots: list[Any], slots: int):
        self.s = settings
        self.plan = plan
        self.free_slots = free_slots
        self.slots = slots
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
        alloc = fresh_alloc(convert=True, pin=pin)  # in the main process: the delivered batch
        while batch := list(itertools.islice(raws, bs)):
            collator = ring.collator(len(batch)) if ring else Collator(len(batch), alloc)
            for raw in batch:  # each sample goes into the batch while it is in the caches
                self._add(collator, raw)
            if ring is not None:
                yield ring.pack(collator)  # type: ignore[misc]
            else:
                yield finish(collator.finish(), pin) if pin else collator.finish()  # type: ignore[misc]

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
        for seg in self.plan.segments:
            a = max(lo, seg.local)
            b = min(hi, seg.local + seg.stop - seg.start)
            if a < b:
                offset = seg.start - seg.local
                for raw in self._read_global(a + offset, b + offset):
                    yield (*raw, seg.valid)

    def _read_global(self, lo: int, hi: int) -> Iterator[tuple]:
        """``(key, [parts of each root], [shard url of each root])`` at global ``[lo, hi)``."""
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
        s = self.s
        # The checksum member is read here but checked in _add, when the sample is used: by
        # then a payload hashed at read time has left the CPU caches (see _add).
        wanted = _WANTED if s.checksums == "off" else _WANTED | {CHECKSUM_SUFFIX}
        streams = [iter_shard(u, skip, wanted, checksums="off", http=s.http) for u in urls]
        try:
            for n in range(take):
                got = [next(s, None) for s in streams]
                if any(g is None for g in got):
                    short = urls[got.index(None)]
                    raise ValueError(
                        f"{short}: ends after {skip + n} samples but index.json says "
                        f"{shard.count}; the shard set is damaged (run `python -m shards verify`)"
                    )
                key = got[0][0]
                for url, (other, _) in zip(urls[1:], got[1:]):
                    if other != key:
                        raise ValueError(
                            f"{url}: sample {skip + n} has key {other!r} but {urls[0]} has "
                            f"{key!r}; aligned shard sets must hold the same keys in the same order"
                        )
                yield key, [parts for _, parts in got], urls
        finally:
            for s in streams:
                s.close()

    def _add(self, collator: Collator, raw: tuple) -> None:
        """Decode and transform one sample into the batch, then check it against its checksum.

        The check comes after the copy into the batch, which has pulled the payload into the
        CPU caches: hashing it first cost a read from memory, 54 us a sample (15% of the
        loader's throughput), hashing it after costs ~5 us. A damaged sample still never
        leaves: the batch is given out only once all its samples passed. If decoding or the
        transform fails, the check runs first, so damage is reported as damage.
        """
        try:
            collator.add(self._sample(*raw))
        except Exception:
            self._check(*raw)
            raise
        self._check(*raw)

    def _check(self, key: str, parts: list[dict[str, bytes]], urls: list[str], *_: Any) -> None:
        if self.s.checksums != "off":
            for url, members in zip(urls, parts):
                check_sample(url, key, members, required=self.s.checksums == "require")

    def _sample(
        self, key: str, parts: list[dict[str, bytes]], urls: list[str], valid: bool
    ) -> Sample:
        """Decode one sample (and its aligned images) and apply the transform."""
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
        return self.s.transform(sample) if self.s.transform is not None else sample

    def _seed_of(self, name: str) -> int:
        """:func:`shards.degrade.sample_seed` of ``name`` (tests check they agree), without
        ``json.dumps`` of a list per sample: only the name is encoded, as ``json`` would."""
        text = f"[{self.s.seed}, {self.sample_epoch}, {encode_basestring_ascii(name)}]"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & _SEED_MASK

    def _image(self, parts: dict[str, bytes], key: str) -> torch.Tensor:
        if "npy" not in parts:
            raise ValueError(f"sample {key!r} has no .npy image (has {sorted(parts)})")
        arr = _decode_npy(parts["npy"])
        if arr.ndim != 2:
            raise ValueError(f"sample {key!r}: image has shape {arr.shape}, expected 2-D")
        if self.raw and arr.dtype == np.uint16:
            # A view of the payload (no copy); payloads read over http are immutable bytes.
            return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).unsqueeze(0)
        out = arr.astype(np.float32)
        out *= _INV_U16
        return torch.from_numpy(out).unsqueeze(0)


def _decode_npy(data: bytes) -> np.ndarray:
    """Decode ``.npy`` bytes; the header of each distinct shape is parsed only once.

    The array is a view of ``data`` (no copy), writable when ``data`` is a ``bytearray``.
    """
    if data[6:8] == b"\x01\x00":
        offset = 10 + int.from_bytes(data[8:10], "little")
        head = bytes(data[:offset])  # payloads may be bytearrays (unhashable)
        info = _NPY_HEADERS.get(head)
        if info is not None:
            dtype, shape, count = info
            return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape)
        arr = decode_image(data)
        if arr.flags.c_contiguous and len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[head] = (arr.dtype, arr.shape, arr.size)
        return arr
    return decode_image(data)
