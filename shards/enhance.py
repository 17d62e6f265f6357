"""``shards enhance``: super-resolve every sample of a shard set into a key-aligned SR set.

Each HR image is degraded with the same deterministic per-sample degradation the classifier's
``lr`` input uses in evaluation (``sample_generator(seed, EVAL_EPOCH, digest)``), then passed
through the SR model. The output has the same shard names, sample order and keys as the input, so
the loader can read it as an aligned root. Under torchrun each rank takes a disjoint set of shards.
A finished shard gets a ``.done`` record (count, sha256 and the fingerprint of what made it);
a re-run skips shards whose record matches, and ``index.json`` is written last, by rank 0, once
every shard is done.

What makes an SR set (the SR model's id, the source set's ``dataset_id`` and shards, the
degradation and seed) is its fingerprint, recorded in its index and in every ``.done`` record.
An OUT holding anything made under another fingerprint (another model, another source set, a
version that recorded none) is moved aside whole to ``OUT.replaced-<fingerprint>`` before any
shard is written, so nothing another model made survives under the new index, and nothing is
deleted either.
"""

from __future__ import annotations

import hashlib
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

from shards.checksum import SAMPLE_CHECKSUM, payload_digest
from shards.degrade import (
    EVAL_EPOCH,
    SAMPLE_DRAWS,
    DegradeConfig,
    degrade,
    sample_generator,
)
from shards.format import (
    MANIFEST_NAME,
    DatasetIndex,
    ShardInfo,
    decode_image,
    encode_sample,
    from_uint16,
    is_url,
    join_url,
    read_index,
    to_uint16,
    write_index,
)
from shards.shard_reader import Checksums, iter_shard
from shards.writer import (
    ManifestRow,
    content_id,
    file_sha256,
    legacy_group_kind,
    write_manifest,
)
from srmri.atomic import atomic_path, write_json
from srmri.fingerprint import fingerprint

__all__ = ["EnhanceSpec", "enhance", "made_from"]

SRModel = Callable[[torch.Tensor], torch.Tensor]
# A sample as a shard stores it: its key and the bytes of its members (npy, cls, json).
RawSample = tuple[str, dict[str, bytes]]


@dataclass(frozen=True)
class EnhanceSpec:
    """How LR inputs are made and which model made the output (recorded in the index)."""

    degrade: DegradeConfig
    seed: int
    model_id: str  # identifies the weights (e.g. a hash of them and the step), not a path
    batch_size: int = 16


def made_from(index: DatasetIndex, spec: EnhanceSpec) -> dict[str, str]:
    """What an SR set of source ``index`` made under ``spec`` is made from, part by part.

    Args:
        index: The source set's index.
        spec: The degradation, seed and SR model.

    Returns:
        ``model``, ``source`` (its dataset id), ``source_shards``, ``degrade``, ``seed``,
        ``sample_checksum`` (so an SR set written before samples carried checksums is made
        again) and ``sample_draws`` (so is one whose LR inputs were seeded from keys); the
        set's fingerprint is :func:`srmri.fingerprint.fingerprint` of this.
    """
    return {
        "model": spec.model_id,
        "source": index.dataset_id,
        "source_shards": fingerprint([[i.name, i.sha256] for i in index.shards])[:32],
        "degrade": fingerprint(asdict(spec.degrade))[:32],
        "seed": str(spec.seed),
        "sample_checksum": SAMPLE_CHECKSUM,
        "sample_draws": SAMPLE_DRAWS,
    }


def _done_path(out: Path, name: str) -> Path:
    return out / ".done" / f"{name}.json"


def _is_done(out: Path, info: ShardInfo, fp: str) -> bool:
    record, shard = _done_path(out, info.name), out / info.name
    if not (record.is_file() and shard.is_file()):
        return False
    done = json.loads(record.read_text())
    if done.get("fingerprint") != fp:  # made by another model or from another source
        return False
    return done.get("count") == info.count and done.get("sha256") == file_sha256(shard)


def _fingerprints_in(out: Path) -> tuple[set[str], dict[str, str]]:
    """The fingerprints OUT's index and ``.done`` records name ("" for none), its index's parts."""
    found: set[str] = set()
    parts: dict[str, str] = {}
    if (out / "index.json").is_file():
        try:
            old = read_index(out)
            found.add(old.fingerprint)
            parts = old.made_from
        except (ValueError, TypeError):  # not an index of this format: not ours
            found.add("")
    for record in sorted((out / ".done").glob("*.json")):
        try:
            found.add(str(json.loads(record.read_text()).get("fingerprint", "")))
        except ValueError:
            found.add("")
    return found, parts


def _set_aside_other(out: Path, parts: dict[str, str]) -> Path | None:
    """Move OUT aside if it holds SR work made under another fingerprint; returns where to.

    Args:
        out: The output folder.
        parts: What the new set is made from (see :func:`made_from`).

    Returns:
        The folder OUT was renamed to, or None if OUT holds nothing of another fingerprint.
    """
    if not out.is_dir():
        return None
    fp = fingerprint(parts)[:32]
    found, old_parts = _fingerprints_in(out)
    others = sorted(found - {fp})
    if not others:
        return None
    tag = others[0][:12] or "unrecorded"
    target = out.with_name(f"{out.name}.replaced-{tag}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.replaced-{tag}-{n}")
    out.rename(target)
    changed = [k for k in parts if old_parts.get(k) != parts[k]] if old_parts else []
    what = f" ({', '.join(changed)} changed)" if changed else ""
    print(f"enhance: {out} held SR shards made otherwise{what}; moved aside to {target}")
    return target


def _batches(url: str, size: int, checksums: Checksums) -> Iterator[list[RawSample]]:
    """The raw samples of one shard, checked, in lists of ``size`` (the last may be short)."""
    batch: list[RawSample] = []
    for sample in iter_shard(url, 0, frozenset({"npy", "cls", "json"}), checksums=checksums):
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _enhance_shard(
    src: str,
    out: Path,
    info: ShardInfo,
    model: SRModel,
    spec: EnhanceSpec,
    *,
    device: torch.device,
    fp: str,
    checksums: Checksums,
) -> list[ManifestRow]:
    """Write the SR copy of one shard into ``out``, then its ``.done`` record; returns its rows.

    The shard is written to a temp file and renamed into place only once it is complete and
    holds the count the index says (a failure leaves no shard), and its ``.done`` record comes
    after the rename, so a shard that has a record is always whole.
    """
    rows: list[ManifestRow] = []
    with atomic_path(out / info.name) as tmp:
        with wds.TarWriter(str(tmp), mtime=0) as sink:
            for batch in _batches(join_url(src, info.name), spec.batch_size, checksums):
                for key, u16, label, meta in _enhance_batch(batch, model, spec, device):
                    sink.write(encode_sample(key, u16, label, meta))
                    rows.append(_row(key, label, meta, info, u16))
        if len(rows) != info.count:
            raise ValueError(
                f"{src}/{info.name}: read {len(rows)} samples, index says {info.count}"
            )
    payload = {"count": len(rows), "sha256": file_sha256(out / info.name), "fingerprint": fp}
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
    for (_, parts), image in zip(batch, hr):
        # Seeded from the payload's digest, as the loader seeds a sample's draws.
        gen = sample_generator(spec.seed, EVAL_EPOCH, payload_digest(parts["npy"]))
        lr.append(degrade(image, spec.degrade, gen)[0])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        sr = model(torch.stack(lr).to(device)).float().clamp(0, 1).cpu()
    for (key, parts), image in zip(batch, sr):
        meta = json.loads(parts["json"])
        meta.update(kind="sr", enhanced_by=spec.model_id)
        yield key, to_uint16(image[0].numpy()), int(parts["cls"]), meta


def _row(
    key: str, label: int, meta: dict[str, Any], info: ShardInfo, u16: np.ndarray
) -> ManifestRow:
    """The SR set's manifest row of one sample, from the sample's metadata and SR pixels."""
    group = str(meta.get("group", ""))
    return ManifestRow(
        key=key,
        source=str(meta.get("source", "")),
        input_id="",
        slice=meta.get("slice"),
        label=label,
        class_name=str(meta.get("class_name", "")),
        status="ok",
        split=info.split,
        shard=info.name,
        group=group,
        # Shards written before the kind was stored carry only the group.
        group_kind=str(meta.get("group_kind") or legacy_group_kind(group)),
        sha256=hashlib.sha256(np.ascontiguousarray(u16).tobytes()).hexdigest(),
    )


def _barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier()


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

    Finished shards made under the same fingerprint (see the module docstring) are kept; an
    OUT holding anything made under another one is first moved aside to
    ``OUT.replaced-<fingerprint>`` (by rank 0, before any rank writes).

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

    Raises:
        ValueError: If ``out`` is ``src`` itself.
    """
    index = read_index(src)
    out = Path(out)
    if not is_url(src) and out.resolve() == Path(src).resolve():
        raise ValueError(f"out: {out} is the input set itself; enhance writes a separate set")
    parts = made_from(index, spec)
    fp = fingerprint(parts)[:32]
    if rank == 0:
        _set_aside_other(out, parts)
        out.mkdir(parents=True, exist_ok=True)
    _barrier(world_size)
    mine = index.shards[rank::world_size]
    todo = [info for info in mine if not _is_done(out, info, fp)]
    if rank == 0 and len(todo) < len(mine):
        print(f"enhance: {len(mine) - len(todo)} finished shards kept, {len(todo)} to do")
    total = sum(i.count for i in todo)
    bar = tqdm(total=total, desc=f"enhance[{rank}]", unit="slice", disable=rank != 0 or None)
    # The source's samples are checked as they are read (required where its index says so).
    checksums: Checksums = "require" if index.sample_checksum else "if-present"
    for info in todo:
        _enhance_shard(str(src), out, info, model, spec, device=device, fp=fp, checksums=checksums)
        bar.update(info.count)
    bar.close()
    _barrier(world_size)
    if rank != 0:
        return None
    return _write_sr_index(out, index, spec, parts)


def _write_sr_index(
    out: Path, index: DatasetIndex, spec: EnhanceSpec, parts: dict[str, str]
) -> DatasetIndex:
    """Write the finished SR set's manifest, then its index (last); returns the index."""
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
    fp = fingerprint(parts)[:32]
    dataset_id = content_id(rows, index.classes)
    meta = {
        "dataset_id": dataset_id,
        "source_dataset_id": index.dataset_id,
        "kind": "sr",
        "fingerprint": fp,
    }
    write_manifest(out / MANIFEST_NAME, rows, meta)
    result = DatasetIndex(
        dataset_id=dataset_id,
        classes=index.classes,
        image_size=index.image_size,
        shards=shards,
        test_keys_sha256=index.test_keys_sha256,
        kind="sr",
        source_dataset_id=index.dataset_id,
        fingerprint=fp,
        made_from=parts,
        counts=index.counts,
        config={"degrade": asdict(spec.degrade), "seed": spec.seed, "model": spec.model_id},
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    write_index(out, result)
    return result
