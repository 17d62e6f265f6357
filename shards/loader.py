"""Stream a shard set into a torch DataLoader: equal steps on every rank, exact mid-epoch resume.

Every epoch is planned from ``index.json`` alone (per-shard sample counts), so start-up costs
the same for a thousand samples or a million. The plan, for ``N`` samples of a split:

* train: the shard order is permuted from ``(seed, epoch)``; the concatenated sample stream is
  cut into ``world_size`` contiguous ranges of ``N // world_size`` samples (the remainder is
  dropped, and it differs per epoch), each range into whole batches (the last partial one is
  dropped) and those batches into ``num_workers`` contiguous blocks. A worker opens the shard
  where its block starts, skips to the offset, shuffles within chunks of ``shuffle_chunk``
  samples (permutation from ``(seed, epoch, rank, block, chunk)``) and batches itself, so every
  rank runs exactly the same number of steps whatever the shard sizes.
* eval: no shuffle; each rank takes ``ceil(N / world_size)`` samples, the tail padded by
  repeating samples marked ``valid=False``, so each sample is seen exactly once across ranks.

The DataLoader takes batches from its workers round-robin (an exhausted worker is skipped), so
the batch sequence is a pure function of the plan. The position (epoch, batches done) is
therefore the whole resume state: each block skips the batches it already produced, and the
blocks are rotated onto workers so the round-robin continues where it stopped.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import base_plus_ext

from shards.degrade import sample_seed
from shards.format import DatasetIndex, ShardInfo, decode_image, join_url, read_index
from shards.sample import Batch, Sample

__all__ = ["ShardLoader", "create_loader", "iter_shard"]

# Runs in the workers on every sample; see shards.sample for the keys it receives.
Transform = Callable[[Sample], Sample]
_STATE_CHECKS = ("seed", "world_size", "num_workers", "batch_size", "mode", "split")
_WANTED = frozenset({"npy", "cls"})
_INV_U16 = np.float32(1.0 / 65535.0)
_ZERO_BLOCK = bytes(512)


def _rng(*parts: int) -> np.random.Generator:
    """A generator seeded from integer parts (negative ones allowed) via a stable hash."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def _decode_npy(data: bytes) -> np.ndarray:
    """Decode ``.npy`` bytes; the header of each distinct shape is parsed only once."""
    if data[6:8] == b"\x01\x00":
        offset = 10 + int.from_bytes(data[8:10], "little")
        head = data[:offset]
        info = _NPY_HEADERS.get(head)
        if info is not None:
            dtype, shape, count = info
            return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape)
        arr = decode_image(data)
        if arr.flags.c_contiguous and len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[head] = (arr.dtype, arr.shape, arr.size)
        return arr
    return decode_image(data)


def _tar_members(stream: Any, url: str, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(name, data)`` of the regular files of a tar stream that ``want`` selects.

    A minimal ustar/pax/GNU reader: ``tarfile`` spends ~1 ms per sample parsing the pax
    headers ``webdataset.TarWriter`` puts before every member, more than the whole per-sample
    budget, while the member names and sizes are all a shard reader needs. Members not wanted
    are skipped (seeked over on local files) without being read into memory.
    """
    seekable = getattr(stream, "seekable", lambda: False)()
    pax: dict[bytes, bytes] = {}
    while len(header := stream.read(512)) == 512 and header != _ZERO_BLOCK:
        if sum(header[:148]) + sum(header[156:]) + 256 != _octal(header[148:156], url):
            raise ValueError(f"{url}: bad tar header checksum; the shard is damaged")
        kind = header[156:157]
        if kind in (b"x", b"L"):  # pax extended header / GNU long name: about the next member
            size = _size(header, url)
            data = stream.read((size + 511) & ~511)[:size]
            pax = _pax_records(data) if kind == b"x" else {b"path": data.rstrip(b"\0")}
            continue
        size = int(pax[b"size"]) if b"size" in pax else _size(header, url)
        name = pax.get(b"path") or header[:100].rstrip(b"\0")
        if b"path" not in pax and header[257:262] == b"ustar" and header[345]:
            name = header[345:500].rstrip(b"\0") + b"/" + name
        pax = {}
        fname = name.decode()
        padded = (size + 511) & ~511
        if kind in (b"0", b"\0", b"7") and want(fname):
            data = stream.read(size)  # exactly the payload: no copy to strip the padding
            if len(data) < size:
                raise ValueError(f"{url}: truncated in {fname}; the shard is damaged")
            stream.read(padded - size)
            yield fname, data
        elif seekable:
            stream.seek(padded, 1)
        else:
            while padded > 0 and (got := len(stream.read(min(padded, 1 << 20)))):
                padded -= got
    if 0 < len(header) < 512:
        raise ValueError(f"{url}: truncated tar header; the shard is damaged")


def _octal(field: bytes, url: str) -> int:
    try:
        return int(field.strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise ValueError(f"{url}: bad tar header field {field!r}; not a tar shard") from None


def _size(header: bytes, url: str) -> int:
    if header[124] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(header[125:136], "big")
    return _octal(header[124:136], url)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """Parse pax extended-header records ``"<len> <key>=<value>\\n"``."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        end = pos + int(data[pos:space])
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        out[key] = value
        pos = end
    return out


def iter_shard(
    url: str, skip: int = 0, suffixes: frozenset[str] = _WANTED
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {suffix: bytes})`` of one shard's samples after the first ``skip``.

    Args:
        url: Local path or http(s) URL of a tar shard.
        skip: Samples to pass over without reading their data.
        suffixes: Which members of each sample to return (default ``npy`` and ``cls``).

    Skipped samples are never read into memory: the selection predicate counts keys as the
    tar stream passes and rejects their members before their data is read.
    """
    seen: list[Any] = [0, None]  # samples started so far, current key

    def want(fname: str) -> bool:
        key, suffix = base_plus_ext(fname)
        if key != seen[1]:
            seen[0] += 1
            seen[1] = key
        return seen[0] > skip and suffix in suffixes

    try:
        stream = wds.gopen(url, "rb")
    except OSError as exc:
        raise OSError(f"{url}: cannot open shard ({exc})") from exc
    try:
        key: str | None = None
        parts: dict[str, bytes] = {}
        for fname, data in _tar_members(stream, url, want):
            mkey, suffix = base_plus_ext(fname)
            if mkey != key:
                if key is not None:
                    yield key, parts
                key, parts = mkey, {}
            parts[suffix] = data
        if key is not None:
            yield key, parts
    except OSError as exc:  # e.g. curl's exit status for an http shard that is missing
        raise OSError(f"{url}: cannot read shard ({exc})") from exc
    finally:
        stream.close()


@dataclass(frozen=True)
class _Segment:
    """Rank-local positions ``[local, local + stop - start)`` are global ``[start, stop)``."""

    local: int
    start: int
    stop: int
    valid: bool


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to produce its batches of one epoch on one rank."""

    epoch: int
    order: tuple[int, ...]  # shard indices in stream order
    starts: tuple[int, ...]  # global start position of each shard in stream order
    segments: tuple[_Segment, ...]
    n_samples: int  # rank-local samples this epoch
    blocks: tuple[tuple[int, int], ...]  # rank-local batch ranges per block
    skips: tuple[int, ...]  # batches each block already produced (resume)
    rotation: int  # worker i serves block (i + rotation) % len(blocks)


class _PlanDataset(IterableDataset):
    """The per-worker reader: decode, transform and batch the samples of one block."""

    def __init__(self, loader: ShardLoader, plan: _Plan) -> None:
        self.roots = [loader.root, *loader.aligned_roots]
        self.shards: list[ShardInfo] = loader._shards
        self.plan = plan
        self.seed = loader.seed
        self.rank = loader.rank
        self.batch_size = loader.batch_size
        self.shuffle = loader.mode == "train"
        self.chunk = loader.shuffle_chunk
        self.transform = loader.transform
        self.sample_epoch = plan.epoch if self.shuffle else -1

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        plan = self.plan
        block = ((info.id if info else 0) + plan.rotation) % len(plan.blocks)
        first, stop = plan.blocks[block]
        lo = first * self.batch_size
        hi = min(stop * self.batch_size, plan.n_samples)
        raws = self._block_raws(block, lo, hi, plan.skips[block] * self.batch_size)
        while batch := list(itertools.islice(raws, self.batch_size)):
            yield default_collate([self._sample(*raw) for raw in batch])

    def _block_raws(self, block: int, lo: int, hi: int, skip: int) -> Iterator[tuple]:
        """Raw samples of rank-local ``[lo, hi)`` in yield order, after the first ``skip``."""
        if not self.shuffle:
            yield from self._read_local(lo + skip, hi)
            return
        # Chunks are aligned to the block start, so a resume re-reads only the chunk it
        # stopped in and drops the samples of that chunk's permutation already yielded.
        chunk_id, drop = divmod(skip, self.chunk)
        raws = self._read_local(lo + chunk_id * self.chunk, hi)
        while chunk := list(itertools.islice(raws, self.chunk)):
            perm = _rng(self.seed, self.plan.epoch, self.rank, block, chunk_id)
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

    def _read_global(self, lo: int, hi: int) -> Iterator[tuple[str, list[dict[str, bytes]]]]:
        """``(key, [parts of each root])`` at global stream positions ``[lo, hi)``."""
        plan = self.plan
        i = bisect.bisect_right(plan.starts, lo) - 1
        pos = lo
        while pos < hi:
            shard = self.shards[plan.order[i]]
            skip = pos - plan.starts[i]
            take = min(hi, plan.starts[i] + shard.count) - pos
            yield from self._read_shard(shard, skip, take)
            pos += take
            i += 1

    def _read_shard(self, shard: ShardInfo, skip: int, take: int) -> Iterator[tuple]:
        urls = [join_url(root, shard.name) for root in self.roots]
        streams = [iter_shard(url, skip) for url in urls]
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
                yield key, [parts for _, parts in got]
        finally:
            for s in streams:
                s.close()

    def _sample(self, key: str, parts: list[dict[str, bytes]], valid: bool) -> Sample:
        """Decode one sample (and its aligned images) and apply the transform."""
        if "cls" not in parts[0]:
            raise ValueError(f"sample {key!r} has no .cls (has {sorted(parts[0])})")
        images = [self._image(p, key) for p in parts]
        sample: Sample = {
            "key": key,
            "image": images[0],
            "label": int(parts[0]["cls"]),
            "valid": valid,
            "seed": sample_seed(self.seed, self.sample_epoch, key),
            "epoch": self.sample_epoch,
            "aligned": images[1:],
        }
        return self.transform(sample) if self.transform is not None else sample

    @staticmethod
    def _image(parts: dict[str, bytes], key: str) -> torch.Tensor:
        if "npy" not in parts:
            raise ValueError(f"sample {key!r} has no .npy image (has {sorted(parts)})")
        arr = _decode_npy(parts["npy"])
        if arr.ndim != 2:
            raise ValueError(f"sample {key!r}: image has shape {arr.shape}, expected 2-D")
        out = arr.astype(np.float32)
        out *= _INV_U16
        return torch.from_numpy(out).unsqueeze(0)


class ShardLoader:
    """An iterable over batches of one split of a shard set; see :func:`create_loader`.

    Attributes:
        index: The shard set's index.
        classes: Class names (index of a label -> name).
        num_samples: Samples of the split, over all ranks.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        batch_size: int,
        *,
        mode: Literal["train", "eval"],
        seed: int,
        num_workers: int,
        rank: int,
        world_size: int,
        transform: Transform | None,
        shuffle_chunk: int,
        aligned_roots: Sequence[str | Path],
        pin_memory: bool,
    ) -> None:
        self.root = str(root)
        self.split = split
        self.batch_size = batch_size
        self.mode = mode
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self.shuffle_chunk = shuffle_chunk
        self.aligned_roots = [str(r) for r in aligned_roots]
        self.pin_memory = pin_memory
        self.index: DatasetIndex = read_index(self.root)
        self.classes: list[str] = list(self.index.classes)
        self._shards = self.index.split_shards(split)
        self.num_samples = sum(s.count for s in self._shards)
        self._check()
        self._epoch = 0
        self._batches_done = 0
        self._resume = False

    def _check(self) -> None:
        if not self._shards:
            known = sorted({s.split for s in self.index.shards})
            raise ValueError(f"{self.root}: no shards for split {self.split!r} (has {known})")
        layout = [(s.name, s.count) for s in self._shards]
        for other in self.aligned_roots:
            aligned = read_index(other)
            made_for = aligned.source_dataset_id
            # A derived set (SR) made from another version of this data set would pair each key
            # with the enhancement of other pixels or labels: refuse it rather than serve it.
            if made_for and self.index.dataset_id and made_for != self.index.dataset_id:
                raise ValueError(
                    f"aligned shard set {other} was made from data set {made_for}, but "
                    f"{self.root} is data set {self.index.dataset_id}; re-run enhance on it"
                )
            theirs = [(s.name, s.count) for s in aligned.split_shards(self.split)]
            if theirs != layout:
                diff = next(p for p in itertools.zip_longest(layout, theirs) if p[0] != p[1])
                raise ValueError(
                    f"aligned shard set {other}: split {self.split!r} differs from {self.root} "
                    f"(first difference: {diff[1]} vs {diff[0]}); aligned sets need identical "
                    "shard names, counts and key order"
                )
        if self.mode == "train" and self.num_samples < self.world_size * self.batch_size:
            raise ValueError(
                f"{self.root}: split {self.split!r} has {self.num_samples} samples, fewer than "
                f"world_size {self.world_size} x batch_size {self.batch_size} = "
                f"{self.world_size * self.batch_size}, so some rank would get no batch; use "
                "fewer ranks or a smaller batch"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        if self.mode == "train":
            return self.num_samples // self.world_size // self.batch_size
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration plays; keeps a restored position of that epoch."""
        if epoch != self._epoch:
            self._epoch, self._batches_done, self._resume = epoch, 0, False

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and batches yielded so far, plus settings checked on load."""
        return {
            "epoch": self._epoch,
            "batches_done": self._batches_done,
            **{name: getattr(self, name) for name in _STATE_CHECKS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position: the next iteration yields exactly the batches not yet yielded.

        Raises:
            ValueError: If the state is from a loader with other settings, or out of range.
        """
        missing = [k for k in ("epoch", "batches_done", *_STATE_CHECKS) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}: not a ShardLoader.state_dict()")
        wrong = [
            f"{k}={state[k]!r} (this loader: {getattr(self, k)!r})"
            for k in _STATE_CHECKS
            if state[k] != getattr(self, k)
        ]
        if wrong:
            raise ValueError(
                "loader state was saved with other settings: " + ", ".join(wrong) + "; resume "
                "with the same world size, workers, batch size, seed, mode and split"
            )
        done = int(state["batches_done"])
        if not 0 <= done <= len(self):
            raise ValueError(f"loader state batches_done={done} is outside 0..{len(self)}")
        self._epoch, self._batches_done, self._resume = int(state["epoch"]), done, True

    def __iter__(self) -> Iterator[Batch]:
        start = self._batches_done if self._resume else 0
        self._batches_done, self._resume = start, False
        if start >= len(self):
            return
        dataset = _PlanDataset(self, self._plan(start))
        batches = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for batch in batches:
            self._batches_done += 1
            yield batch
        if self._batches_done != len(self):
            raise RuntimeError(
                f"{self.root}: split {self.split!r} rank {self.rank} produced "
                f"{self._batches_done} batches, planned {len(self)}"
            )

    def _plan(self, done: int) -> _Plan:
        """Plan this rank's epoch, ``done`` batches of which were already yielded."""
        n_total, world, bs = self.num_samples, self.world_size, self.batch_size
        if self.mode == "train":
            order = tuple(
                int(i) for i in _rng(self.seed, self._epoch).permutation(len(self._shards))
            )
            n_rank = n_total // world // bs * bs
            first = self.rank * (n_total // world)
            segments = [_Segment(0, first, first + n_rank, True)]
        else:
            order = tuple(range(len(self._shards)))
            n_rank = math.ceil(n_total / world)
            segments = []
            # Positions past the end wrap around (several times if the split is tiny) as padding.
            pos, stop = self.rank * n_rank, (self.rank + 1) * n_rank
            while pos < stop:
                start = pos % n_total
                size = min(stop - pos, n_total - start)
                segments.append(
                    _Segment(pos - self.rank * n_rank, start, start + size, pos < n_total)
                )
                pos += size
        starts = tuple(itertools.accumulate((self._shards[i].count for i in order), initial=0))
        n_blocks = max(1, self.num_workers)
        n_batches = len(self)
        sizes = [n_batches // n_blocks + (b < n_batches % n_blocks) for b in range(n_blocks)]
        ends = tuple(itertools.accumulate(sizes, initial=0))
        return _Plan(
            epoch=self._epoch,
            order=order,
            starts=starts[:-1],
            segments=tuple(segments),
            n_samples=n_rank,
            blocks=tuple(itertools.pairwise(ends)),
            # Round-robin: after `done` batches, block b produced done // W + (b < done % W).
            skips=tuple(done // n_blocks + (b < done % n_blocks) for b in range(n_blocks)),
            rotation=done % n_blocks,
        )


def create_loader(
    root: str | Path,
    split: str,
    batch_size: int,
    *,
    mode: Literal["train", "eval"],
    seed: int = 0,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    transform: Transform | None = None,
    shuffle_chunk: int = 256,
    aligned_roots: Sequence[str | Path] = (),
    pin_memory: bool = False,
) -> ShardLoader:
    """Stream one split of a shard set as batches, split over ranks and DataLoader workers.

    Args:
        root: Shard set folder, or an http(s):// URL prefix (opened with webdataset's gopen).
        split: "train", "val" or "test".
        batch_size: Samples per batch on this rank.
        mode: "train" (shuffled, equal whole batches per rank, remainder dropped) or "eval"
            (in order, each sample once across ranks, padding marked ``valid=False``).
        seed: Seed of the shuffle and of the per-sample seeds.
        num_workers: DataLoader worker processes (0: read in this process).
        rank: This rank; default from torch.distributed if initialized, else 0.
        world_size: Number of ranks; default from torch.distributed if initialized, else 1.
        transform: Per-sample function run inside the workers; it receives a
            :class:`shards.sample.Sample` and returns it (it may add or replace tensor entries).
        shuffle_chunk: Samples shuffled together within a worker (train mode).
        aligned_roots: Other shard sets with the identical layout (e.g. SR-enhanced); their
            images arrive as the sample's ``aligned``.
        pin_memory: Pin batches in page-locked memory (for CUDA training).

    Returns:
        The loader; iterate it for one epoch's batches, each a :class:`shards.sample.Batch`
        (plus whatever keys the transform added).

    Raises:
        FileNotFoundError: If ``root`` or an aligned root has no ``index.json``.
        ValueError: On an unknown split, bad settings, a train split smaller than
            ``world_size * batch_size``, or aligned sets whose layout differs.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', not {mode!r}")
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    if batch_size < 1 or num_workers < 0 or shuffle_chunk < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and shuffle_chunk ({shuffle_chunk}) must be >= 1 and "
            f"num_workers ({num_workers}) >= 0"
        )
    return ShardLoader(
        root,
        split,
        batch_size,
        mode=mode,
        seed=seed,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        transform=transform,
        shuffle_chunk=shuffle_chunk,
        aligned_roots=aligned_roots,
        pin_memory=pin_memory,
    )
