"""How batches cross from workers to the trainer: uint16 images, the shared ring, exact values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_shard_set

from shards.degrade import sample_seed
from shards.format import decode_image
from shards.loader import create_loader
from shards.plan_dataset import PlanDataset
from shards.shard_reader import iter_shard


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("set")
    make_shard_set(path, {"train": [9, 4, 11], "val": [6, 5]}, size=16)
    return path


class Crop:
    """A crop and flip that work on either dtype (what a uint16 transform may do), plus an
    entry the loader collates the default way."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image, seed = sample["image"], sample["seed"]
        assert image.dtype == self.dtype
        image = image[:, seed % 5 : seed % 5 + 10, 2:12]
        if seed & 1 and image.dtype == torch.uint16:  # flipped as int16: the same bits
            image = image.view(torch.int16).flip(-1).view(torch.uint16)
        elif seed & 1:
            image = image.flip(-1)
        sample["image"] = image
        sample["odd"] = {"n": np.arange(3) + seed % 7}
        return sample


def epoch(root: Path, split: str, workers: int, dtype: str, transform: Any = None) -> list:
    mode = "train" if split == "train" else "eval"
    loader = create_loader(
        root, split, 4, mode=mode, seed=3, num_workers=workers, transform=transform,
        image_dtype=dtype,  # type: ignore[arg-type]
    )  # fmt: skip
    loader.set_epoch(1)
    return list(loader)


@pytest.mark.parametrize(("split", "workers"), [("train", 0), ("train", 2), ("val", 1), ("val", 2)])
def test_uint16_images_give_the_same_float_batches(root: Path, split: str, workers: int) -> None:
    as_float = epoch(root, split, workers, "float32", Crop(torch.float32))
    as_u16 = epoch(root, split, workers, "uint16", Crop(torch.uint16))
    plain = epoch(root, split, workers, "float32")
    assert len(as_float) == len(as_u16) == len(plain) > 2
    for a, b, c in zip(as_float, as_u16, plain):
        assert a["key"] == b["key"] == c["key"]
        assert b["image"].dtype == torch.float32 and b["image"].shape[-2:] == (10, 10)
        assert torch.equal(a["image"], b["image"])  # bit-identical, however converted
        assert torch.equal(a["odd"]["n"], b["odd"]["n"]) and a["odd"]["n"].shape[-1] == 3
        for name in ("label", "valid", "seed", "epoch"):
            assert torch.equal(a[name], c[name]) and a[name].dtype == c[name].dtype


@pytest.mark.parametrize("workers", [0, 2])
def test_values_are_exactly_the_stored_ones_scaled(root: Path, workers: int) -> None:
    stored = {
        key: decode_image(parts["npy"])
        for path in sorted(root.glob("val-*.tar"))
        for key, parts in iter_shard(str(path))
    }
    batches = epoch(root, "val", workers, "float32")
    seen = [k for b in batches for k, v in zip(b["key"], b["valid"]) if v]
    assert sorted(seen) == sorted(stored)
    for batch in batches:
        for key, image in zip(batch["key"], batch["image"]):
            want = stored[key].astype(np.float32) * np.float32(1.0 / 65535.0)
            np.testing.assert_array_equal(image[0].numpy(), want)  # exact, not approximate


def test_epochs_through_the_ring_replay_identically_and_stop_early(root: Path) -> None:
    loader = create_loader(root, "train", 2, mode="train", num_workers=2, image_dtype="uint16")
    first = None
    for e in range(3):
        loader.set_epoch(e)
        batches = list(loader)
        assert len(batches) == len(loader) == 12
        if first is None:
            first = [b["image"].clone() for b in batches]
    loader.set_epoch(0)
    again = list(loader)  # a later pass over epoch 0: the same values, slots reused
    assert all(torch.equal(a, b["image"]) for a, b in zip(first, again))
    it = iter(loader)  # stopped early: the workers and their rings go away cleanly
    next(it)
    del it


def test_the_fast_per_sample_seed_is_sample_seed() -> None:
    dataset = PlanDataset.__new__(PlanDataset)
    for seed, epoch_, key in [
        (0, -1, "toy_000001"),
        (7, 3, 'a"b\\c'),
        (2**40, 0, "ünï ✓"),
        (1, 1, ""),
    ]:
        dataset.s = type("S", (), {"seed": seed})()
        dataset.sample_epoch = epoch_
        assert dataset._seed_of(key) == sample_seed(seed, epoch_, key)
