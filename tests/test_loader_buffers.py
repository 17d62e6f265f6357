"""Reused batch memory: a batch (or any view of it) the caller still holds is never written."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_shard_set

from shards.collate import ReusedMemory, fresh_alloc, to_float
from shards.loader import ShardLoader, create_loader


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("set")
    # 8 images of 64x64 float32 are 128 KB: large enough to be pooled (ReusedMemory.min_bytes)
    make_shard_set(path, {"train": [30, 25, 29], "val": [27, 21]}, size=64)
    return path


def loader(root: Path, workers: int, split: str = "train") -> ShardLoader:
    mode = "train" if split == "train" else "eval"
    return create_loader(root, split, 8, mode=mode, seed=1, num_workers=workers)


def test_the_memory_of_a_dropped_batch_is_reused_and_a_held_one_is_not() -> None:
    memory = ReusedMemory(buffers=2, min_bytes=1024)
    first = memory.alloc(convert=True)((8, 1, 16, 16), torch.uint16)  # uint16 -> float32 memory
    assert first.dtype == torch.float32 and first.shape == (8, 1, 16, 16)
    second = memory.alloc(convert=True)((8, 1, 16, 16), torch.uint16)
    assert second.data_ptr() != first.data_ptr()
    third = memory.alloc(convert=True)((8, 1, 16, 16), torch.uint16)  # both held: new memory
    assert third.data_ptr() not in (first.data_ptr(), second.data_ptr())
    address, view = first.data_ptr(), first[3]  # a view alone holds the batch
    del first, third
    gc.collect()
    again = memory.alloc(convert=True)((8, 1, 16, 16), torch.uint16)
    assert again.data_ptr() != address
    del again, view
    assert memory.alloc(convert=True)((8, 1, 16, 16), torch.uint16).data_ptr() == address


def test_small_tensors_are_never_pooled_and_a_larger_batch_gets_room() -> None:
    memory = ReusedMemory(buffers=1, min_bytes=1024)
    alloc = memory.alloc(convert=False)
    labels = alloc((8,), torch.int64)  # kept for metrics: must not pin any batch memory
    images = alloc((8, 64), torch.float32)
    address = images.data_ptr()
    del images, alloc
    bigger = memory.alloc(convert=False)((16, 64), torch.float32)
    assert bigger.data_ptr() != address and labels.shape == (8,)
    del bigger
    smaller = memory.alloc(convert=False)((4, 64), torch.float32)
    assert smaller.shape == (4, 64)  # fits in the grown buffer


def test_numpy_arrays_and_storages_of_a_batch_hold_it_too() -> None:
    memory = ReusedMemory(buffers=1, min_bytes=16)
    batch = memory.alloc(convert=False)((4, 8), torch.float32)
    address = batch.data_ptr()
    array, storage = batch.numpy(), batch.untyped_storage()
    del batch
    assert memory.alloc(convert=False)((4, 8), torch.float32).data_ptr() != address
    del array
    assert memory.alloc(convert=False)((4, 8), torch.float32).data_ptr() != address
    del storage
    assert memory.alloc(convert=False)((4, 8), torch.float32).data_ptr() == address


@pytest.mark.parametrize("workers", [0, 2])
def test_held_batches_keep_their_values(root: Path, workers: int) -> None:
    copies = [
        {k: v.clone() for k, v in b.items() if torch.is_tensor(v)} for b in loader(root, workers)
    ]
    held = list(loader(root, workers))  # every batch held at once
    views = [b["image"][1:3] for b in loader(root, workers)]  # only a view of each held
    assert len(held) == len(views) == len(copies) > 4
    for batch, view, want in zip(held, views, copies):
        for name, value in want.items():
            assert torch.equal(batch[name], value), name
        assert torch.equal(view, want["image"][1:3])


@pytest.mark.parametrize(("workers", "split"), [(0, "train"), (2, "train"), (0, "val")])
def test_a_loop_that_drops_each_batch_reuses_a_few_buffers(
    root: Path, workers: int, split: str
) -> None:
    addresses, labels, batches = set(), [], loader(root, workers, split)
    for batch in batches:
        addresses.add(batch["image"].data_ptr())
        labels.append(batch["label"])  # small tensors kept: the images are still reused
    pooled = {array.ctypes.data for entry in batches._memory.entries for array in entry}
    # the batch in the caller's hands and the one being made (a spare for safety)
    assert len(labels) > 4 and addresses <= pooled and len(pooled) <= 3


def test_uint16_to_float32_is_exact_for_every_value() -> None:
    values = torch.from_numpy(np.arange(65536, dtype=np.uint16))
    want = np.arange(65536, dtype=np.uint16).astype(np.float32) * np.float32(1.0 / 65535.0)
    for start, n in [(0, 65536), (1, 65535), (3, 17), (5, 8)]:  # vector and scalar tails
        got = to_float(values[start : start + n].reshape(1, n), fresh_alloc(convert=False))
        np.testing.assert_array_equal(got[0].numpy(), want[start : start + n])
