"""``shards enhance``: super-resolve every sample of a shard set into a key-aligned SR set.

Each HR image is degraded with the same deterministic per-key degradation the classifier's
``lr`` input uses in evaluation (``sample_generator(seed, EVAL_EPOCH, key)``), then passed through
the SR model. The output has the same shard names, sample order and keys as the input, so the
loader can read it as an aligned root. Under torchrun each rank takes a disjoint set of shards.
A finished shard gets a ``.done`` record (count and sha256); a re-run skips shards whose record
matches, and ``index.json`` is written last, by rank 0, once every shard is done.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from tqdm import tqdm

from shards.degrade import EVAL_EPOCH, DegradeConfig, degrade, sample_generator
from shards.format import (
    MANIFEST_NAME,
    DatasetIndex,
    ShardInfo,
    decode_image,
    encode_sample,
    from_uint16,
    join_url,
    read_index,
    to_uint16,
    write_index,
)
from shards.loader import iter_shard
from shards.writer import ManifestRow, file_sha256, legacy_group_kind, write_manifest
from srmri.atomic import atomic_path, write_json

__all__ = ["EnhanceSpec", "enhance"]

SRModel = Callable[[torch.Tensor], torch.Tensor]
# A sample as a shard stores it: its key and the bytes of its members (npy, cls, json).
RawSample = tuple[str, dict[str, bytes]]


@dataclass(frozen=True)
class EnhanceSpec:
    """How LR inputs are made and which model made the output (recorded in the index)."""

    degrade: DegradeConfig
    seed: int
    model_id: str  # e.g. the checkpoint path and its step
    batch_size: int = 16


def _done_path(out: Path, name: str) -> Path:
    return out / ".done" / f"{name}.json"


def _is_done(out: Path, info: ShardInfo) -> bool:
    record, shard = _done_path(out, info.name), out / info.name
    if not (record.is_file() and shard.is_file()):
        return False
    done = json.loads(record.read_text())
    return done.get("count") == info.count and done.get("sha256") == file_sha256(shard)


def _batches(url: str, size: int) -> Iterator[list[RawSample]]:
    """The raw samples of one shard, in order, in lists of ``size`` (the last may be short)."""
    batch: list[RawSample] = []
    for sample in iter_shard(url, 0, frozenset({"npy", "cls", "json"})):
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _enhance_shard(
    src: str, out: Path, info: ShardInfo, model: SRModel, spec: EnhanceSpec, device: torch.device
) -> list[ManifestRow]:
    """Write the SR copy of one shard into ``out``, then its ``.done`` record; returns its rows.

    The shard is written to a temp file and renamed into place only once it is complete and
    holds the count the index says (a failure leaves no shard), and its ``.done`` record comes
    after the rename, so a shard that has a record is always whole.
    """
    rows: list[ManifestRow] = []
    with atomic_path(out / info.name) as tmp:
        with wds.TarWriter(str(tmp), mtime=0.0) as sink:
            for batch in _batches(join_url(src, info.name), spec.batch_size):
                for key, u16, label, meta in _enhance_batch(batch, model, spec, device):
                    sink.write(encode_sample(key, u16, label, meta))
                    rows.append(_row(key, label, meta, info))
        if len(rows) != info.count:
            raise ValueError(
                f"{src}/{info.name}: read {len(rows)} samples, index says {info.count}"
            )
    payload = {"count": len(rows), "sha256": file_sha256(out / info.name)}
    payload["rows"] = [asdict(r) for r in rows]
    write_json(_done_path(out, info.name), payload, indent=None)
    return rows


@torch.no_grad()
def _enhance_batch(
    batch: list[RawSample], model: SRModel, spec: EnhanceSpec, device: torch.device
) -> Iterator[tuple[str, np.ndarray, int, dict[str, Any]]]:
    """Degrade and super-resolve a batch; yields ``(key, uint16 SR image, label, meta)``."""
    hr = [torch.from_numpy(from_uint16(decode_image(p["npy"])))[None] for _, p in batch]
    lr = []
    for (key, _), image in zip(batch, hr):
        gen = sample_generator(spec.seed, EVAL_EPOCH, key)
        lr.append(degrade(image, spec.degrade, gen)[0])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        sr = model(torch.stack(lr).to(device)).float().clamp(0, 1).cpu()
    for (key, parts), image in zip(batch, sr):
        meta = json.loads(parts["json"])
        meta.update(kind="sr", enhanced_by=spec.model_id)
        yield key, to_uint16(image[0].numpy()), int(parts["cls"]), meta


def _row(key: str, label: int, meta: dict[str, Any], info: ShardInfo) -> ManifestRow:
    """The SR set's manifest row of one sample, from the sample's metadata."""
    group = str(meta.get("group", ""))
    return ManifestRow(
        key=key,
        source=str(meta.get("source", "")),
        source_path="",
        slice=meta.get("slice"),
        label=label,
        class_name=str(meta.get("class_name", "")),
        status="ok",
        split=info.split,
        shard=info.name,
        group=group,
        # Shards written before the kind was stored carry only the group.
        group_kind=str(meta.get("group_kind") or legacy_group_kind(group)),
    )


def enhance(
    src: str | Path,
    out: str | Path,
    model: SRModel,
    spec: EnhanceSpec,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> DatasetIndex | None:
    """Write the SR-enhanced, key-aligned copy of shard set ``src`` into ``out`` (collective).

    Args:
        src: Input shard set (path or URL).
        out: Output folder.
        model: LR batch ``[B,1,h,w]`` -> SR batch ``[B,1,H,W]`` (in eval mode, on ``device``).
        spec: Degradation, seed and model id.
        device: Where the model runs.
        rank: This process's rank; it handles shards ``rank::world_size``.
        world_size: Number of processes.

    Returns:
        The written index on rank 0, None on other ranks.
    """
    index = read_index(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = index.shards[rank::world_size]
    todo = [info for info in mine if not _is_done(out, info)]
    if rank == 0 and len(todo) < len(mine):
        print(f"enhance: {len(mine) - len(todo)} finished shards kept, {len(todo)} to do")
    total = sum(i.count for i in todo)
    bar = tqdm(total=total, desc=f"enhance[{rank}]", unit="slice", disable=rank != 0 or None)
    for info in todo:
        _enhance_shard(str(src), out, info, model, spec, device)
        bar.update(info.count)
    bar.close()
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    rows: list[ManifestRow] = []
    for info in index.shards:
        done = json.loads(_done_path(out, info.name).read_text())
        rows += [ManifestRow(**r) for r in done["rows"]]
    shards = [
        ShardInfo(
            i.name, i.split, i.count, file_sha256(out / i.name), (out / i.name).stat().st_size
        )
        for i in index.shards
    ]
    write_manifest(out / MANIFEST_NAME, rows, {"dataset_id": index.dataset_id, "kind": "sr"})
    result = DatasetIndex(
        dataset_id=f"{index.dataset_id}-sr",
        classes=index.classes,
        image_size=index.image_size,
        shards=shards,
        test_keys_sha256=index.test_keys_sha256,
        kind="sr",
        source_dataset_id=index.dataset_id,
        counts=index.counts,
        config={"degrade": asdict(spec.degrade), "seed": spec.seed, "model": spec.model_id},
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    write_index(out, result)
    return result
