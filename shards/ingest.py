"""Ingest: scans of any supported source into a finished, verified-on-write shard set.

Work happens in ``OUT/.staging``: each input is read, checked and preprocessed in parallel
(processes, or Ray tasks with ``ray_address``); its result is appended to a journal and its
pixels staged, so an interrupted run resumes where it stopped. Then duplicates are clustered,
splits assigned, shards written and moved into place, and ``index.json`` written last.

A finished set records a fingerprint of what made it: the config, and the bytes of every input
(each file; every file of a DICOM series folder; the labels table) with what the listing says
of it (label, slices, patient). A re-run is "nothing to do" only under the same fingerprint;
after an input was edited the same command rebuilds the set (see :func:`_prepare_out`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from shards.writer import (
    GROUP_PATIENT,
    GROUP_SAMPLE,
    ManifestRow,
    file_sha256,
    read_manifest_rows,
)
from srmri.atomic import write_bytes, write_json
from srmri.config import ConfigError, config_hash, require, save_config
from srmri.fingerprint import fingerprint

__all__ = ["IngestResult", "ingest"]

STAGING = ".staging"
STAGED_FINGERPRINT = "fingerprint.json"  # in STAGING: what the staged work is for
# Config keys that cannot change the set's content (where it goes, how fast it is made).
_RUNTIME_KEYS = ("out", "workers", "ray_address", "overwrite")


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


@dataclass(frozen=True)
class _Fingerprint:
    """What a set is made from: its config and its inputs, each as a hash."""

    config: str
    inputs: str

    @property
    def parts(self) -> dict[str, str]:
        """The parts as recorded in ``index.json``'s ``made_from``."""
        return {"config": self.config, "inputs": self.inputs}

    @property
    def value(self) -> str:
        """The one fingerprint of config and inputs together."""
        return fingerprint(self.parts)[:32]


def _bytes_digest(path: str) -> str:
    """sha256 of an input's bytes; for a series folder, of each file the reader would read."""
    if not path:
        return ""  # synth: the config alone decides the sample
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():  # as read_dicom_series: visible plain files directly inside, by name
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        return fingerprint([[f.name, file_sha256(f)] for f in files])
    return "missing"


def _item_digest(item: SourceItem, secret: bytes) -> str:
    """A hash of one input: its bytes and what the listing says of it (label, slices, ...)."""
    fields = dataclasses.asdict(item)
    fields.pop("path")  # where the input tree lies does not change the input
    if fields.get("patient"):  # a raw identifier: only its keyed hash goes into any digest
        fields["patient"] = pseudonymize(fields["patient"], secret)
    return fingerprint({"item": fields, "bytes": _bytes_digest(item.path)})


def _item_digests(items: Sequence[SourceItem], secret: bytes) -> dict[str, str]:
    """Per input (rel_path), its :func:`_item_digest`.

    Threads: sha256 releases the GIL, so reading and hashing overlap across files.
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(functools.partial(_item_digest, secret=secret), items)
        return {it.rel_path: d for it, d in zip(items, digests)}


def _fingerprint(
    cfg: IngestConfig, items: Sequence[SourceItem], digests: dict[str, str], secret: bytes
) -> _Fingerprint:
    """The fingerprint of the set ``cfg`` would make from ``items`` now."""
    table = ""
    if cfg.source in ("nifti", "dicom"):
        csv_path = Path(cfg.labels_csv) if cfg.labels_csv else Path(cfg.input) / "labels.csv"
        table = file_sha256(csv_path) if csv_path.is_file() else "missing"
    inputs = {
        "items": [[it.rel_path, digests[it.rel_path]] for it in items],
        "labels_table": table,
        # The key decides the patient groups and so the splits: another key, another set.
        "secret": pseudonymize("srmri-ingest-fingerprint", secret),
    }
    return _Fingerprint(config_hash(cfg, exclude=_RUNTIME_KEYS)[:32], fingerprint(inputs)[:32])


def _read_staged(stage: Path) -> dict[str, str] | None:
    """The fingerprint parts the staged work in ``stage`` is for, or None if unrecorded."""
    try:
        parts = json.loads((stage / STAGED_FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None
    return parts if isinstance(parts, dict) else None


def _prepare_out(
    out: Path, fp: _Fingerprint, overwrite: bool, log: Callable[[str], None] = print
) -> bool:
    """Make OUT ready for the set ``fp`` describes; returns True if it already holds it finished.

    What OUT may hold, and what happens:

    * nothing, or only staged work of this config: build, resuming from the staging journal;
      a journaled input whose bytes or listing changed since is processed again.
    * the finished set of this config and these inputs: nothing to do.
    * the finished set of this config (the same command: same settings, same input folder)
      made from inputs that changed since (a corrected ``labels.csv``, instances deleted from
      a series, a replaced file): rebuilt without ``--overwrite``, since the set in OUT is
      this command's own output and serving it would serve the old inputs. Its ``index.json``
      goes first, so OUT never looks finished while it mixes old and new shards; the staged
      new shards and manifest then replace the old ones; other files in OUT stay.
    * anything else: a set made with another config or from another input folder, a set of
      an older version that recorded no fingerprint, files srmri did not write, staged work
      of another config. Refused unless ``overwrite``, which empties OUT first.

    Raises:
        ConfigError: If OUT holds something else and ``overwrite`` is off.
    """
    out.mkdir(parents=True, exist_ok=True)
    stage = out / STAGING
    index = read_index(out) if (out / INDEX_NAME).is_file() else None
    if index is not None and index.fingerprint == fp.value:
        shutil.rmtree(stage, ignore_errors=True)  # a run that stopped just after its index
        return True
    existing = (index.made_from if index is not None else _read_staged(stage)) or None
    leftovers = [p.name for p in out.iterdir() if p.name != STAGING]
    same_command = existing is not None and existing.get("config") == fp.config
    if not same_command and (existing is not None or leftovers):
        if not overwrite:
            raise ConfigError(
                f"out: {out} already holds a different data set or other files "
                f"({', '.join(sorted(leftovers)[:5]) or 'staging'}); made with other settings, "
                "another input folder or an older version; pass --overwrite to replace it"
            )
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    stage.mkdir(parents=True, exist_ok=True)
    # Recorded before the old index goes: OUT always says what it is for.
    write_json(stage / STAGED_FINGERPRINT, fp.parts)
    if index is not None and same_command:
        log(f"{out}: its inputs changed since its set was made; rebuilding the set")
        (out / INDEX_NAME).unlink()
    return False


def _read_journal(path: Path) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Journaled inputs: rel_path -> (the input's digest when processed, its records)."""
    done: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    if not path.is_file():
        return done
    with open(path) as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from an interrupted run: redo that item
            # An entry of an older version has no digest: it is redone.
            done[entry["item"]] = (entry.get("digest", ""), entry["records"])
    return done


def _process_all(
    cfg: IngestConfig,
    items: list[SourceItem],
    digests: dict[str, str],
    secret: bytes,
    log: Callable[[str], None],
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Process every input not yet journaled under its current digest, staging its pixels.

    Returns:
        Per input (rel_path), its records; and how many inputs were reused from the journal.
    """
    stage = Path(cfg.out) / STAGING
    (stage / "items").mkdir(parents=True, exist_ok=True)
    journal_path = stage / "journal.jsonl"
    journaled = _read_journal(journal_path)
    done = {
        rel: records for rel, (digest, records) in journaled.items() if digests.get(rel) == digest
    }
    todo = [it for it in items if it.rel_path not in done]
    if journaled:
        log(f"resuming: {len(done)} of {len(items)} inputs already processed")
    if len(done) < len(journaled):
        log(f"{len(journaled) - len(done)} journaled inputs changed since: processing them again")
    ctx = _Context(cfg.preprocess, cfg.synth, secret)
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
            entry = {"item": item.rel_path, "digest": digests[item.rel_path], "records": records}
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            done[item.rel_path] = records
    return done, len(items) - len(todo)


def ingest(cfg: IngestConfig, log: Callable[[str], None] = print) -> IngestResult:
    """Run the whole ingest for a checked config; see the module docstring.

    Args:
        cfg: The ingest configuration.
        log: Where progress lines go (rank-0 console by default).

    Returns:
        The finished set's index and manifest rows.

    Raises:
        ConfigError: If OUT holds another data set (see :func:`_prepare_out`) or no input.
    """
    require(bool(cfg.out), "out", "an output folder is required (--out)")
    out = Path(cfg.out)
    items = _list_items(cfg)
    if not items:
        raise ConfigError(f"input: no {cfg.source} inputs found under {cfg.input}")
    secret = load_secret(cfg.secret_file or None)
    digests = _item_digests(items, secret)
    fp = _fingerprint(cfg, items, digests, secret)
    if _prepare_out(out, fp, cfg.overwrite, log):
        index = read_index(out)
        log(f"{out} already holds this finished data set ({index.dataset_id}); nothing to do")
        return IngestResult(out, index, read_manifest_rows(out), skipped=True)
    done, resumed = _process_all(cfg, items, digests, secret, log)
    stage = out / STAGING
    rows, index = assemble(cfg, items, done, stage, made_from=fp.parts, fingerprint=fp.value)
    save_config(cfg, out / "config.yaml")
    write_index(out, index)
    shutil.rmtree(stage, ignore_errors=True)
    return IngestResult(out, index, rows, resumed_items=resumed)
