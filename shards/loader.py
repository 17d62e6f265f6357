"""Stream a shard set into a torch DataLoader: equal steps on every rank, exact mid-epoch resume.

Every epoch is planned from ``index.json`` alone (per-shard sample counts; :mod:`shards.plan`),
so start-up costs the same for a thousand samples or a million. The plan, for ``N`` samples:

* train: the shard order is permuted from ``(seed, epoch)``; the concatenated sample stream is
  cut into ``world_size`` contiguous ranges of ``N // world_size`` samples (the remainder is
  dropped, and it differs per epoch), each range into whole batches (the last partial one is
  dropped) and those batches into ``num_workers`` contiguous blocks. A worker opens the shard
  where its block starts, skips to the offset, shuffles within chunks of ``shuffle_chunk``
  samples (permutation from ``(seed, epoch, rank, block, chunk)``) and batches itself, so every
  rank runs exactly the same number of steps whatever the shard sizes.
* train with ``sampler="balanced"``: the ``N`` samples of the stream are replaced by ``N``
  draws, each class equally often, with replacement, from ``(seed, epoch)`` (the labels are
  read once, when the loader is made: :mod:`shards.labels`); everything else is cut from the
  draws as above. A sample drawn twice is the same sample of the same epoch, so it gets the
  same per-sample seed and draws (degradation, augmentation): its copies weigh it more, like a
  class weight, and never make a new image. Eval has no sampler.
* eval: no shuffle; each rank takes ``ceil(N / world_size)`` samples, the tail padded by
  repeating samples marked ``valid=False``, so each sample is seen exactly once across ranks.

The DataLoader takes batches from its workers round-robin (an exhausted worker is skipped), so
the batch sequence is a pure function of the plan. The position (epoch, batches done) is
therefore the whole resume state: each block skips the batches it already produced, and the
blocks are rotated onto workers so the round-robin continues where it stopped.

Every sample is checked against its recorded checksum as it is read (:mod:`shards.checksum`);
a set written before checksums existed is refused. Workers hand batches over through reused
shared memory (:mod:`shards.batch_ring`), stored images still as uint16, and the main process
turns them into float32. Delivered batches live in memory that is reused once nothing refers to
a batch any more (:class:`shards.collate.ReusedMemory`; up to four batches' worth, kept for the
loader's life): a batch the caller still holds, or any view of it, is never written again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.utils.data import DataLoader

from shards.batch_ring import RING_SLOTS, RingReader
from shards.collate import ReusedMemory
from shards.format import DatasetIndex, read_index
from shards.http_stream import HttpSettings
from shards.labels import read_split_labels
from shards.plan import batches_per_epoch, plan_epoch
from shards.plan_dataset import PlanDataset, ReadSettings, Transform
from shards.sample import Batch
from shards.shard_reader import iter_shard

__all__ = ["ShardLoader", "Transform", "create_loader", "iter_shard"]

_STATE_CHECKS = ("seed", "world_size", "num_workers", "batch_size", "mode", "split", "sampler")
# Checked keys a state saved before they existed lacks, and the value it was saved under.
_STATE_DEFAULTS = {"sampler": "shuffle"}
Sampler = Literal["shuffle", "balanced"]


class ShardLoader:
    """An iterable over batches of one split of a shard set; see :func:`create_loader`.

    Attributes:
        index: The shard set's index.
        classes: Class names (index of a label -> name).
        num_samples: Samples of the split, over all ranks.
        sampler: ``shuffle`` (each sample once an epoch) or ``balanced``.
        labels: Each shard's labels (the balanced sampler's), else None.
    """

    def __init__(self, root: str | Path, split: str, settings: ReadSettings, **kw: Any) -> None:
        self.root = str(root)
        self.split = split
        self.batch_size: int = kw["batch_size"]
        self.mode: Literal["train", "eval"] = kw["mode"]
        self.seed: int = kw["seed"]
        self.num_workers: int = kw["num_workers"]
        self.rank: int = kw["rank"]
        self.world_size: int = kw["world_size"]
        self.index: DatasetIndex = kw["index"]
        self.sampler: Sampler = kw.get("sampler", "shuffle")
        self.labels: tuple[np.ndarray, ...] | None = kw.get("labels")
        self.classes: list[str] = list(self.index.classes)
        self.settings = settings
        self.num_samples = sum(s.count for s in settings.shards)
        self._epoch = 0
        self._batches_done = 0
        self._resume = False
        # Kept across epochs: the delivered batches' memory, reused once the caller drops them.
        self._memory = ReusedMemory()

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        train = self.mode == "train"
        return batches_per_epoch(self.num_samples, train, self.world_size, self.batch_size)

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
        state = {**_STATE_DEFAULTS, **state}
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
                "with the same world size, workers, batch size, seed, mode, split and sampler"
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
        plan = plan_epoch(
            self.settings.shards,
            train=self.mode == "train",
            seed=self.seed,
            epoch=self._epoch,
            rank=self.rank,
            world=self.world_size,
            batch=self.batch_size,
            workers=self.num_workers,
            done=start,
            labels=self.labels,
        )
        ctx = torch_mp.get_context()
        free = [ctx.Semaphore(RING_SLOTS) for _ in range(self.num_workers)]
        own = self._memory if self.num_workers == 0 else None  # workers get no copy of it
        dataset = PlanDataset(self.settings, plan, free, RING_SLOTS, own)
        reader = RingReader(free, self.settings.pin_memory, self._memory)
        # batch_size=None: the dataset batches itself; pinning happens in RingReader, which
        # writes each delivered batch straight into page-locked memory.
        batches = DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
        for item in batches:
            batch = reader.unpack(item) if self.num_workers else item
            self._batches_done += 1
            yield batch  # type: ignore[misc]
        if self._batches_done != len(self):
            raise RuntimeError(
                f"{self.root}: split {self.split!r} rank {self.rank} produced "
                f"{self._batches_done} batches, planned {len(self)}"
            )


def _check_aligned(
    index: DatasetIndex,
    root: str,
    split: str,
    others: Sequence[str],
    verify: bool,
    http: HttpSettings,
) -> None:
    """Refuse aligned sets made from another data set, laid out differently or unchecked."""
    layout = [(s.name, s.count) for s in index.split_shards(split)]
    for other in others:
        aligned = read_index(other, http)
        made_for = aligned.source_dataset_id
        # A derived set (SR) made from another version of this data set would pair each key
        # with the enhancement of other pixels or labels: refuse it rather than serve it.
        if made_for and index.dataset_id and made_for != index.dataset_id:
            raise ValueError(
                f"aligned shard set {other} was made from data set {made_for}, but "
                f"{root} is data set {index.dataset_id}; re-run enhance on it"
            )
        theirs = [(s.name, s.count) for s in aligned.split_shards(split)]
        if theirs != layout:
            diff = next(p for p in itertools.zip_longest(layout, theirs) if p[0] != p[1])
            raise ValueError(
                f"aligned shard set {other}: split {split!r} differs from {root} "
                f"(first difference: {diff[1]} vs {diff[0]}); aligned sets need identical "
                "shard names, counts and key order"
            )
        if verify:
            _check_checksums(aligned, other)


def _check_checksums(index: DatasetIndex, root: str) -> None:
    if not index.sample_checksum:
        raise ValueError(
            f"{root}: this shard set was written before samples carried checksums, so what "
            "it serves cannot be checked; write it again (re-run `python -m shards ingest` "
            "into a new or emptied folder, or `enhance` for an SR set). `python -m shards "
            "verify` still checks its shards against their sha256"
        )


def _check_settings(
    mode: str, image_dtype: str, batch_size: int, num_workers: int, shuffle_chunk: int, sampler: str
) -> None:
    """Raise ValueError naming the first loader setting that is out of range."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', not {mode!r}")
    if sampler not in ("shuffle", "balanced") or (sampler == "balanced" and mode != "train"):
        raise ValueError(
            f"sampler must be 'shuffle' or, in train mode, 'balanced', not {sampler!r} in "
            f"{mode} mode (evaluation reads each sample exactly once)"
        )
    if image_dtype not in ("float32", "uint16"):
        raise ValueError(f"image_dtype must be 'float32' or 'uint16', not {image_dtype!r}")
    if batch_size < 1 or num_workers < 0 or shuffle_chunk < 1:
        raise ValueError(
            f"batch_size ({batch_size}) and shuffle_chunk ({shuffle_chunk}) must be >= 1 and "
            f"num_workers ({num_workers}) >= 0"
        )


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given rank and world size, else torch.distributed's, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    return rank, world_size


def _check_split(
    index: DatasetIndex, root: str, split: str, ranks_x_batch: tuple[int, int] | None
) -> None:
    """Raise ValueError when ``split`` has no shards or, in train mode (``ranks_x_batch`` is
    ``(world_size, batch_size)``), fewer samples than one batch per rank."""
    shards = index.split_shards(split)
    if not shards:
        known = sorted({s.split for s in index.shards})
        raise ValueError(f"{root}: no shards for split {split!r} (has {known})")
    n = sum(s.count for s in shards)
    world, batch = ranks_x_batch or (0, 0)
    if n < world * batch:
        raise ValueError(
            f"{root}: split {split!r} has {n} samples, fewer than world_size {world} x "
            f"batch_size {batch} = {world * batch}, so some rank would get no batch; use "
            "fewer ranks or a smaller batch"
        )


def _checked_index(
    roots: list[str],
    split: str,
    ranks_x_batch: tuple[int, int] | None,
    verify_checksums: bool,
    http: HttpSettings,
) -> DatasetIndex:
    """The index of ``roots[0]``, its split, aligned sets and checksums checked."""
    index = read_index(roots[0], http)
    _check_split(index, roots[0], split, ranks_x_batch)
    _check_aligned(index, roots[0], split, roots[1:], verify_checksums, http)
    if verify_checksums:
        _check_checksums(index, roots[0])
    return index


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
    image_dtype: Literal["float32", "uint16"] = "float32",
    verify_checksums: bool = True,
    http: HttpSettings | None = None,
    sampler: Sampler = "shuffle",
) -> ShardLoader:
    """Stream one split of a shard set as batches, split over ranks and DataLoader workers.

    Args:
        root: Shard set folder, or an http(s):// URL prefix.
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
        pin_memory: Deliver batches in page-locked memory (for CUDA training).
        image_dtype: What the transform gets as ``image``/``aligned``: ``float32`` in [0, 1]
            or the stored ``uint16`` (then converted once per batch); batches are float32.
        verify_checksums: Check every sample's checksum (off only to measure its cost).
        http: Timeouts and retries of http(s) shard sets (default :class:`HttpSettings`).
        sampler: ``shuffle`` (each sample once an epoch) or, in train mode only, ``balanced``
            (each class drawn equally often, with replacement, as many draws as samples).

    Returns:
        The loader; iterate it for one epoch's batches, each a :class:`shards.sample.Batch`
        (plus whatever keys the transform added).

    Raises:
        FileNotFoundError: If ``root`` or an aligned root has no ``index.json``.
        ValueError: On an unknown split, bad settings (a balanced sampler in eval mode), a
            train split smaller than ``world_size * batch_size``, aligned sets of another
            layout, a set without checksums, or labels that disagree with the index.
    """
    _check_settings(mode, image_dtype, batch_size, num_workers, shuffle_chunk, sampler)
    rank, world_size = _rank_and_world(rank, world_size)
    http = http or HttpSettings()
    roots = [str(root), *(str(r) for r in aligned_roots)]
    ranks_x_batch = (world_size, batch_size) if mode == "train" else None
    index = _checked_index(roots, split, ranks_x_batch, verify_checksums, http)
    settings = ReadSettings(
        roots=tuple(roots), shards=tuple(index.split_shards(split)), seed=seed, rank=rank,
        batch_size=batch_size, train=mode == "train", shuffle_chunk=shuffle_chunk,
        transform=transform, image_dtype=image_dtype, http=http, pin_memory=pin_memory,
        checksums="require" if verify_checksums else "off",
    )  # fmt: skip
    labels = None
    if sampler == "balanced":  # the split's labels, read once here
        labels = read_split_labels(roots[0], index, split, http, settings.checksums)
    return ShardLoader(
        root, split, settings, batch_size=batch_size, mode=mode, seed=seed,
        num_workers=num_workers, rank=rank, world_size=world_size, index=index,
        sampler=sampler, labels=labels,
    )  # fmt: skip
