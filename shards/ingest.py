"""Ingest: scans of any supported source into a finished, verified-on-write shard set.

Work happens in ``OUT/.staging``: each input is read, checked and preprocessed in parallel
(processes, or Ray tasks with ``ray_address``); its result is appended to a journal and its
pixels staged, so an interrupted run resumes where it stopped. Then duplicates are clustered,
splits assigned, shards written and moved into place, and ``index.json`` written last.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shards import dedup
from shards.assemble import assemble
from shards.format import INDEX_NAME, DatasetIndex, read_index, write_index
from shards.ingest_config import IngestConfig
from shards.preprocess import PreprocessConfig, preprocess
from shards.privacy import load_secret, pseudonymize
from shards.sources import reader_for
from shards.sources.base import QuarantineError, Slice, SourceItem, make_key
from shards.synth import SynthConfig, load_synth_item, synth_items
from shards.writer import GROUP_PATIENT, GROUP_SAMPLE, ManifestRow, read_manifest_rows
from srmri.atomic import write_bytes, write_text
from srmri.config import ConfigError, config_hash, require, save_config

__all__ = ["IngestResult", "ingest"]

STAGING = ".staging"


@dataclass
class IngestResult:
    """What an ingest produced: the index and the manifest rows."""

    out: Path
    index: DatasetIndex
    rows: list[ManifestRow]
    resumed_items: int = 0
    skipped: bool = False  # the set was already complete


@dataclass(frozen=True)
class _Context:
    """What a worker needs to process an item (picklable, small)."""

    preprocess: PreprocessConfig
    synth: SynthConfig
    secret: bytes


def _list_items(cfg: IngestConfig) -> list[SourceItem]:
    if cfg.source == "synth":
        return synth_items(cfg.synth)
    root = Path(cfg.input)
    if not root.is_dir():
        raise ConfigError(f"input: {root} is not a folder")
    reader = reader_for(cfg.source)
    class_map = cfg.class_map or None
    if cfg.source in ("kaggle", "folder", "figshare"):
        return reader.list_items(root, cfg.classes, class_map=class_map)
    return reader.list_items(
        root,
        cfg.classes,
        labels_csv=Path(cfg.labels_csv) if cfg.labels_csv else None,
        class_map=class_map,
        max_slices_per_volume=cfg.max_slices_per_volume,
    )


def _load(item: SourceItem, ctx: _Context) -> list[Slice]:
    if item.source == "synth":
        return load_synth_item(item, ctx.synth)
    return reader_for(item.source).load_item(item)


def _process(item: SourceItem, ctx: _Context) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Read, check and preprocess one input; returns result records and staged pixels."""
    base = {"item": item.rel_path, "split_hint": item.split_hint}
    try:
        slices = _load(item, ctx)
        if not slices:
            raise QuarantineError("no_slices: no usable slice found in the input")
    except QuarantineError as exc:
        key = make_key(item.source, item.rel_path)
        label = -1 if item.label is None else item.label
        quarantined = {**base, "key": key, "slice": None, "label": label, "status": "quarantined"}
        return [{**quarantined, "reason": exc.reason}], []
    except Exception as exc:  # a reader bug or exotic file must not stop the whole ingest
        key = make_key(item.source, item.rel_path)
        reason = f"unreadable: {type(exc).__name__}: {exc}"
        quarantined = {**base, "key": key, "slice": None, "label": -1, "status": "quarantined"}
        return [{**quarantined, "reason": reason}], []
    records, pixels = [], []
    for sl in slices:
        key = make_key(item.source, item.rel_path, sl.index)
        label = item.label if item.label is not None else sl.label
        rec = {**base, "key": key, "slice": sl.index, "label": -1 if label is None else label}
        if sl.patient:
            rec.update(group=pseudonymize(sl.patient, ctx.secret), group_kind=GROUP_PATIENT)
        else:  # no patient id: the slice is its own group
            rec.update(group=f"k{key}", group_kind=GROUP_SAMPLE)
        try:
            if label is None:
                raise QuarantineError("no_label: the input carries no class label")
            img, steps = preprocess(sl.image, ctx.preprocess)
        except QuarantineError as exc:
            records.append({**rec, "status": "quarantined", "reason": exc.reason})
            continue
        u16 = np.round(img * 65535.0).astype(np.uint16)
        raw = u16.tobytes()
        rec.update(
            status="ok",
            reason="",
            sha256=hashlib.sha256(raw).hexdigest(),
            phash=dedup.phash(img),
            steps=steps,
            shape=list(u16.shape),
        )
        records.append(rec)
        pixels.append(raw)
    return records, pixels


def _apply(fn: Callable[[SourceItem], Any], item: SourceItem) -> Any:
    return fn(item)


def _parallel_map(
    fn: Callable[[SourceItem], Any], items: list[SourceItem], workers: int, ray_address: str
) -> Iterator[Any]:
    """Apply ``fn`` to every item, yielding results in item order."""
    if ray_address:
        import ray

        ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)
        remote = ray.remote(_apply)
        fn_ref = ray.put(fn)  # the context (secret included) travels once, not per task
        window = 256  # bounded in-flight tasks keep the driver's memory flat
        pending = [remote.remote(fn_ref, it) for it in items[:window]]
        for i in range(len(items)):
            result = ray.get(pending[i])
            pending[i] = None
            if i + window < len(items):
                pending.append(remote.remote(fn_ref, items[i + window]))
            yield result
        return
    n = workers or os.cpu_count() or 1
    if n <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    # fork: the parent has no torch threads yet, and workers skip re-importing everything.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(n) as pool:
        yield from pool.imap(fn, items, chunksize=4)


def _fingerprint(cfg: IngestConfig, items: Iterable[SourceItem]) -> str:
    h = hashlib.sha256()
    h.update(config_hash(cfg, exclude=("out", "workers", "ray_address", "overwrite")).encode())
    root = Path(cfg.input)
    for it in items:
        size = (root / it.rel_path).stat().st_size if it.path and os.path.isfile(it.path) else 0
        h.update(f"{it.rel_path}\t{size}\n".encode())
    return h.hexdigest()[:32]


def _prepare_out(out: Path, dataset_id: str, overwrite: bool) -> bool:
    """Make OUT ready; returns True if it already holds this finished data set."""
    out.mkdir(parents=True, exist_ok=True)
    stage_id = out / STAGING / "dataset_id"
    existing = None
    if (out / INDEX_NAME).is_file():
        existing = read_index(out).dataset_id
    elif stage_id.is_file():
        existing = stage_id.read_text().strip()
    if existing == dataset_id and (out / INDEX_NAME).is_file():
        return True
    leftovers = [p.name for p in out.iterdir() if p.name != STAGING]
    different = existing not in (None, dataset_id) or (existing is None and leftovers)
    if different and not overwrite:
        raise ConfigError(
            f"out: {out} already holds a different data set or other files "
            f"({', '.join(sorted(leftovers)[:5]) or 'staging'}); pass --overwrite to replace it"
        )
    if different:
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return False


def _read_journal(path: Path) -> dict[str, list[dict[str, Any]]]:
    done: dict[str, list[dict[str, Any]]] = {}
    if not path.is_file():
        return done
    with open(path) as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from an interrupted run: redo that item
            done[entry["item"]] = entry["records"]
    return done


def ingest(cfg: IngestConfig, log: Callable[[str], None] = print) -> IngestResult:
    """Run the whole ingest for a checked config; see the module docstring.

    Args:
        cfg: The ingest configuration.
        log: Where progress lines go (rank-0 console by default).

    Returns:
        The finished set's index and manifest rows.
    """
    require(bool(cfg.out), "out", "an output folder is required (--out)")
    out = Path(cfg.out)
    items = _list_items(cfg)
    if not items:
        raise ConfigError(f"input: no {cfg.source} inputs found under {cfg.input}")
    dataset_id = _fingerprint(cfg, items)
    if _prepare_out(out, dataset_id, cfg.overwrite):
        log(f"{out} already holds this finished data set ({dataset_id}); nothing to do")
        return IngestResult(out, read_index(out), read_manifest_rows(out), skipped=True)
    stage = out / STAGING
    (stage / "items").mkdir(parents=True, exist_ok=True)
    write_text(stage / "dataset_id", dataset_id)
    journal_path = stage / "journal.jsonl"
    done = _read_journal(journal_path)
    todo = [it for it in items if it.rel_path not in done]
    if done:
        log(f"resuming: {len(done)} of {len(items)} inputs already processed")
    ctx = _Context(cfg.preprocess, cfg.synth, load_secret(cfg.secret_file or None))
    fn = functools.partial(_process, ctx=ctx)
    if cfg.source == "synth" and todo and (cfg.workers or os.cpu_count() or 1) > 1:
        _load(todo[0], ctx)  # load the template once here, before the workers fork
    with open(journal_path, "a") as journal:
        results = _parallel_map(fn, todo, cfg.workers, cfg.ray_address)
        for item, (records, pixels) in tqdm(
            zip(todo, results), total=len(todo), desc="ingest", unit="input", disable=None
        ):
            ok = [r for r in records if r["status"] == "ok"]
            for rec, raw in zip(ok, pixels):
                write_bytes(stage / "items" / f"{rec['key']}.u16", raw)
            journal.write(json.dumps({"item": item.rel_path, "records": records}) + "\n")
            journal.flush()
            done[item.rel_path] = records
    rows, index = assemble(cfg, items, done, stage, dataset_id)
    save_config(cfg, out / "config.yaml")
    write_index(out, index)
    shutil.rmtree(stage, ignore_errors=True)
    return IngestResult(out, index, rows, resumed_items=len(items) - len(todo))
