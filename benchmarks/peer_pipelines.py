"""The peers of ``benchmarks/loader_peers.py``: how each stores the samples and reads them back.

Runs in the peers' virtual environment (``benchmarks/requirements-peers.txt``); at module level
it imports numpy only, so the project's benchmark can import it too. Every peer gets the same
per-sample work, in the form its documentation shows: decode to a uint16 ``[H,W]`` array, then
:func:`crop_flip` (random crop, random horizontal flip, float32 ``[1,C,C]`` in [0, 1]) in its
dataset's transform, batches collated by its own loader.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PEERS", "crop_flip", "run_peer", "write_peer_stores"]

PEERS = ("litdata", "mosaic", "webdataset", "imagefolder")
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
_SCALE = np.float32(1.0 / 65535.0)
_DATA: dict[str, Any] = {}


def crop_flip(image: np.ndarray, crop: int) -> Any:
    """Random ``crop`` x ``crop`` crop and horizontal flip of a uint16 image -> float32 [1,C,C].

    The fastest of the variants measured for this (crop the uint16 view first, flip as a
    negative-stride view, convert and scale in one numpy pass into the output).
    """
    import torch

    y = random.randrange(image.shape[-2] - crop + 1)
    x = random.randrange(image.shape[-1] - crop + 1)
    view = image[y : y + crop, x : x + crop]
    if random.random() < 0.5:
        view = view[:, ::-1]
    out = np.empty((1, crop, crop), np.float32)
    np.multiply(view, _SCALE, out=out[0], casting="unsafe")
    return torch.from_numpy(out)


def _item(i: int) -> dict[str, Any]:
    """Sample ``i`` of the shared inputs (for ``litdata.optimize``'s worker processes)."""
    return {"image": np.array(_DATA["images"][i]), "label": int(_DATA["labels"][i])}


def write_peer_stores(root: Path, shard_size: int) -> None:
    """Write ``images.npy``/``labels.npy`` of ``root`` in every peer's own format."""
    import litdata
    import webdataset as wds
    from PIL import Image
    from streaming import MDSWriter

    images, labels = np.load(root / "images.npy", mmap_mode="r"), np.load(root / "labels.npy")
    _DATA.update(images=images, labels=labels)
    n, size = images.shape[0], images.shape[1]
    litdata.optimize(
        _item, list(range(n)), str(root / "litdata"), chunk_size=shard_size, num_workers=1,
        start_method="fork", verbose=False,
    )  # fmt: skip
    columns = {"image": f"ndarray:uint16:{size},{size}", "label": "int"}
    with MDSWriter(out=str(root / "mosaic"), columns=columns, size_limit=shard_size * 132_000) as w:
        for i in range(n):
            w.write(_item(i))
    (root / "wds").mkdir()
    for start in range(0, n, shard_size):
        with wds.TarWriter(str(root / "wds" / f"train-{start // shard_size:06d}.tar")) as sink:
            for i in range(start, min(n, start + shard_size)):
                sink.write({"__key__": f"img_{i:07d}", "npy": images[i], "cls": int(labels[i])})
    for name in CLASSES:
        (root / "png" / name).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.array(images[i])).save(root / "png" / CLASSES[labels[i]] / f"{i}.png")


def _litdata(root: Path, workers: int, batch: int, crop: int) -> Any:
    from litdata import StreamingDataLoader, StreamingDataset

    def transform(item: dict[str, Any]) -> dict[str, Any]:
        return {"image": crop_flip(item["image"], crop), "label": item["label"]}

    dataset = StreamingDataset(
        str(root / "litdata"), shuffle=True, drop_last=True, batch_decode=1, transform=transform
    )
    return StreamingDataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True)


def _mosaic(root: Path, workers: int, batch: int, crop: int) -> Any:
    import torch
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()

    class Cropped(StreamingDataset):
        def __getitem__(self, index: int) -> dict[str, Any]:
            item = super().__getitem__(index)
            return {"image": crop_flip(item["image"], crop), "label": item["label"]}

    dataset = Cropped(local=str(root / "mosaic"), shuffle=True, batch_size=batch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=workers, drop_last=True
    )


def _webdataset(root: Path, workers: int, batch: int, crop: int) -> Any:
    import webdataset as wds

    def sample(item: dict[str, Any]) -> dict[str, Any]:
        return {"image": crop_flip(item["npy"], crop), "label": int(item["cls"])}

    urls = sorted(str(p) for p in (root / "wds").glob("*.tar"))
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(256)
        .decode()
        .map(sample)
        .batched(batch, partial=False)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def _imagefolder(root: Path, workers: int, batch: int, crop: int) -> Any:
    import torch
    from PIL import Image
    from torchvision import datasets

    def load(path: str) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im, dtype=np.uint16)

    dataset = datasets.ImageFolder(
        str(root / "png"), loader=load, transform=lambda a: crop_flip(a, crop)
    )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )


def run_peer(name: str, root: Path, workers: int, batch: int, crop: int) -> Iterator[Any]:
    """The loader of peer ``name`` over its store in ``root`` (iterate it for one epoch)."""
    import torch

    torch.set_num_threads(1)
    make = {"litdata": _litdata, "mosaic": _mosaic, "webdataset": _webdataset}
    return make.get(name, _imagefolder)(root, workers, batch, crop)
