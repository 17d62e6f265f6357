"""Shared test helpers: a tiny real shard set on disk and a runner for 2-process gloo jobs."""

from __future__ import annotations

import hashlib
import os
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from shards.format import DatasetIndex, ShardInfo, encode_sample, shard_name, to_uint16, write_index
from srmri.ports import free_port

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def toy_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable toy image: a bright square whose position encodes the class, plus noise."""
    img = rng.random((size, size), dtype=np.float32) * 0.2
    q = size // 4
    y, x = divmod(label % 4, 2)
    img[
        y * 2 * q + q // 2 : y * 2 * q + q // 2 + q, x * 2 * q + q // 2 : x * 2 * q + q // 2 + q
    ] += 0.7
    return np.clip(img, 0, 1)


def make_shard_set(
    root: Path,
    shard_counts: dict[str, Sequence[int]],
    size: int = 32,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
) -> DatasetIndex:
    """Write a real shard set with the given per-split shard sample counts.

    Args:
        root: Output folder.
        shard_counts: e.g. ``{"train": [5, 3, 8], "val": [4, 3], "test": [4]}``.
        size: Image side.
        seed: Seed of the toy images.
        classes: Class names.

    Returns:
        The written index.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    infos: list[ShardInfo] = []
    test_keys: list[str] = []
    n = 0
    for split, counts in shard_counts.items():
        for i, count in enumerate(counts):
            name = shard_name(split, i)
            with wds.TarWriter(str(root / name)) as sink:
                for _ in range(count):
                    label = n % len(classes)
                    key = f"toy_{n:06d}"
                    meta = {"key": key, "label": label, "split": split, "group": f"g{n // 2}"}
                    sink.write(
                        encode_sample(key, to_uint16(toy_image(label, size, rng)), label, meta)
                    )
                    if split == "test":
                        test_keys.append(key)
                    n += 1
            data = (root / name).read_bytes()
            infos.append(ShardInfo(name, split, count, hashlib.sha256(data).hexdigest(), len(data)))
    index = DatasetIndex(
        dataset_id=f"toy-{seed}-{n}",
        classes=list(classes),
        image_size=size,
        shards=infos,
        test_keys_sha256=hashlib.sha256("\n".join(sorted(test_keys)).encode()).hexdigest(),
    )
    write_index(root, index)
    return index


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, errq: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., None], world_size: int = 2, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` real gloo processes.

    ``fn`` must be importable (module level). Any failure in any rank fails the caller with
    that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errq))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    for p in procs:
        if p.is_alive():
            p.kill()
            errors.append((-1, "a rank timed out"))
    if errors or any(p.exitcode != 0 for p in procs):
        detail = "\n".join(f"rank {r}:\n{tb}" for r, tb in errors)
        raise AssertionError(
            f"distributed run failed (exit codes {[p.exitcode for p in procs]})\n{detail}"
        )


# Overrides of configs/debug.yaml for the smallest real run a test can compare against: a
# timm test_resnet, 3 SGD steps at a constant LR, fp32, one process, no augmentation.
TINY_SGD_RUN = (
    "model.name=test_resnet",
    "data.batch_size=8",
    "data.num_workers=0",
    "train.epochs=1",
    "train.max_steps_per_epoch=3",
    "train.device=cpu",
    "optim.name=sgd",
    "optim.lr=0.05",
    "optim.weight_decay=0",
    "sched.name=constant",
    "sched.warmup_epochs=0",
    "augment.enabled=false",
    "checkpoint.keep_last=1",
    "checkpoint.keep_best=0",
)
