"""Moving batches out of DataLoader workers through a ring of reused shared-memory slots.

By default torch puts every tensor a worker sends into a fresh shared-memory segment, which
both processes then fault in page by page and unmap again: measured 24 ms per 12.8 MB batch on
the development machine, against 4 ms to make the batch, which is why a loader with one worker
ran at half the rate of none. Here each worker, after collating its first batch, allocates a
ring of slots of that batch's size in shared memory, copies the batch into the first slot and
sends the ring to the main process once; every later batch is collated straight into the next
free slot and travels as a small :class:`Packed` record. The main process copies each batch
out (converting uint16 to float32, which it must do anyway) into memory of its own, reused
once the caller lets go of a batch (:class:`shards.collate.ReusedMemory`), and frees the slot.

Flow control: a worker takes a slot from its semaphore before writing it and the main process
gives it back after copying out (see :data:`RING_SLOTS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from shards.collate import Alloc, Collator, ReusedMemory, fresh_alloc, to_float

__all__ = ["RING_SLOTS", "Packed", "RingReader", "RingWriter", "finish"]

_ALIGN = 64


# Slots per worker ring. Any number is deadlock-free: when the main process waits for a
# worker's batch, it has consumed (and freed the slots of) all that worker's earlier batches.
# Two let a worker fill one slot while the main process copies out the other; a third absorbs
# jitter. Each slot is faulted in once per epoch, so more would cost without helping.
RING_SLOTS = 3


@dataclass
class _InRing:
    """A tensor stored in a ring slot at byte ``offset``."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Packed:
    """A batch in slot ``slot`` of worker ``worker``'s ring (the ring itself the first time)."""

    worker: int
    slot: int
    tree: dict[str, Any]
    ring: torch.Tensor | None = None


class RingWriter:
    """The worker side: collates batches into ring slots (see the module docstring).

    Args:
        worker: This worker's id.
        free: This worker's semaphore of free slots (created by the main process).
        slots: Slots in the ring.
    """

    def __init__(self, worker: int, free: Any, slots: int) -> None:
        self.worker, self.free, self.slots = worker, free, slots
        self.ring: torch.Tensor | None = None
        self.sent_ring = False
        self.next_slot = 0
        self.slot: int | None = None

    def collator(self, size: int) -> Collator:
        """A collator of the next batch, writing into the next free slot (once there is a ring)."""
        if self.ring is None:
            self.slot = None
            return Collator(size, fresh_alloc(convert=False))
        self.free.acquire()
        self.slot, self.next_slot = self.next_slot, (self.next_slot + 1) % self.slots
        return Collator(size, _slot_alloc(self.ring[self.slot]))

    def pack(self, collator: Collator) -> Packed | dict[str, Any]:
        """What to send for the batch ``collator`` holds; the first batch makes the ring."""
        batch = collator.finish()
        if self.slot is None:  # the first batch sizes the ring, then goes into its first slot
            nbytes = sum(_padded(t) for t in _tensors(batch))
            self.ring = torch.empty((self.slots, max(nbytes, _ALIGN)), dtype=torch.uint8)
            self.ring.share_memory_()
            self.free.acquire()
            self.slot, self.next_slot = 0, 1 % self.slots
            batch = _copy_into(batch, _slot_alloc(self.ring[0]))
        ring = None if self.sent_ring else self.ring
        self.sent_ring = True
        return Packed(self.worker, self.slot, _to_markers(batch, self.ring[self.slot]), ring)


class RingReader:
    """The main-process side: turns what the workers send into delivered batches.

    Args:
        free: The semaphores of free slots, one per worker.
        pin: Put delivered tensors in page-locked memory (for CUDA training).
        memory: Where delivered batches go when not pinned (new memory when None).
    """

    def __init__(self, free: list[Any], pin: bool, memory: ReusedMemory | None = None) -> None:
        self.free, self.pin, self.memory = free, pin, memory
        self.rings: dict[int, torch.Tensor] = {}

    def unpack(self, item: Packed | dict[str, Any]) -> dict[str, Any]:
        """The delivered batch: its own tensors, uint16 ones converted to float32 in [0, 1]."""
        if self.memory is None or self.pin:
            alloc = fresh_alloc(convert=False, pin=self.pin)
        else:
            alloc = self.memory.alloc(convert=False)
        if not isinstance(item, Packed):
            return finish(item, self.pin, alloc)
        if item.ring is not None:
            self.rings[item.worker] = item.ring
        base = self.rings[item.worker][item.slot]
        try:
            return _from_markers(item.tree, base, self.pin, alloc)
        finally:
            self.free[item.worker].release()


def _padded(t: torch.Tensor) -> int:
    return -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, list):
        return [t for v in tree for t in _tensors(v)]
    return []


def _slot_alloc(base: torch.Tensor) -> Alloc:
    """Bump allocation inside one slot (a uint8 tensor); plain memory once it is full."""
    used = [0]

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape) * dtype.itemsize
        start = used[0]
        if start + size > base.numel():  # a batch larger than the first: sent the plain way
            return torch.empty(shape, dtype=dtype)
        used[0] = start + -(-size // _ALIGN) * _ALIGN
        return base[start : start + size].view(dtype).view(shape)

    return alloc


def _copy_into(tree: Any, alloc: Alloc) -> Any:
    if isinstance(tree, torch.Tensor):
        return alloc(tuple(tree.shape), tree.dtype).copy_(tree)
    if isinstance(tree, dict):
        return {k: _copy_into(v, alloc) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy_into(v, alloc) for v in tree]
    return tree


def _to_markers(tree: Any, base: torch.Tensor) -> Any:
    """``tree`` with each tensor inside slot ``base`` replaced by its :class:`_InRing`.

    Tensors elsewhere (what ``default_collate`` made of unusual entries) travel as they are.
    """
    if isinstance(tree, torch.Tensor):
        offset = tree.data_ptr() - base.data_ptr()
        if tree.is_contiguous() and 0 <= offset < base.numel():
            return _InRing(offset, tuple(tree.shape), tree.dtype)
        return tree
    if isinstance(tree, dict):
        return {k: _to_markers(v, base) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_markers(v, base) for v in tree]
    return tree


def _from_markers(tree: Any, base: torch.Tensor, pin: bool, alloc: Alloc) -> Any:
    if isinstance(tree, torch.Tensor):  # one that travelled outside the ring
        return finish(tree, pin, alloc)
    if isinstance(tree, _InRing):
        size = math.prod(tree.shape) * tree.dtype.itemsize
        src = base[tree.offset : tree.offset + size].view(tree.dtype).view(tree.shape)
        if tree.dtype == torch.uint16:
            return to_float(src, alloc)
        return alloc(tree.shape, tree.dtype).copy_(src)
    if isinstance(tree, dict):
        return {k: _from_markers(v, base, pin, alloc) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_from_markers(v, base, pin, alloc) for v in tree]
    return tree


def finish(tree: Any, pin: bool, alloc: Alloc | None = None) -> Any:
    """A batch collated the plain way: uint16 tensors converted, the rest (pinned) as is.

    Args:
        tree: The batch.
        pin: Whether delivered tensors must be in page-locked memory.
        alloc: Memory of the converted tensors (default: new, pinned with ``pin``).

    Returns:
        The delivered batch.
    """
    alloc = alloc or fresh_alloc(convert=False, pin=pin)
    if isinstance(tree, torch.Tensor):
        if tree.dtype == torch.uint16:
            return to_float(tree, alloc)
        return tree.pin_memory() if pin else tree
    if isinstance(tree, dict):
        return {k: finish(v, pin, alloc) for k, v in tree.items()}
    if isinstance(tree, list):
        return [finish(v, pin, alloc) for v in tree]
    return tree
