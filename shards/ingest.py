"""Ingest: scans of any supported source into a finished, verified-on-write shard set.

Work happens in ``OUT/.staging``: each input is read, checked and preprocessed in parallel
(processes, or Ray tasks with ``ray_address``); its result is appended to a journal and its
pixels staged, so an interrupted run resumes where it stopped. Then duplicates are clustered,
splits assigned, shards written and moved into place, and ``index.json`` written last.

Every file or link under INPUT is accounted for (:mod:`shards.inventory`): it has a manifest
row, as an input or a file of one, or ``skipped`` with why; the counts in and out are logged at
the end. No usable input, or no train or test split, is an error (:mod:`shards.assemble`).

Privacy: the set and the log name inputs by keyed ids only (:mod:`shards.privacy`); the
mapping back to real paths goes to a private local file (:mod:`shards.locate`). Real paths
reach the console only in an error that stops the run (a malformed labels table line).

A finished set records a fingerprint of what made it (:mod:`shards.ingest_fingerprint`). A
re-run is "nothing to do" only under the same fingerprint; after an input was edited the same
command rebuilds the set (see :func:`_prepare_out`).
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards.assemble import Listing, UnusableSetError, assemble
from shards.checksum import SAMPLE_CHECKSUM
from shards.format import INDEX_NAME, DatasetIndex, read_index, write_index
from shards.ingest_config import IngestConfig, shareable_config
from shards.ingest_fingerprint import SetFingerprint, item_digests, set_fingerprint
from shards.inventory import Inventory, ids_of, take_inventory, tally
from shards.locate import mapping_path, write_mapping
from shards.privacy import input_id, load_secret
from shards.process_input import Context, load, process
from shards.sources.base import SourceItem
from shards.writer import ManifestRow, read_manifest_rows
from srmri.atomic import write_bytes, write_json
from srmri.config import ConfigError, require, save_config

__all__ = ["IngestResult", "ingest"]

STAGING = ".staging"
STAGED_FINGERPRINT = "fingerprint.json"  # in STAGING: what the staged work is for


@dataclass
class IngestResult:
    """What an ingest produced: the index and the manifest rows."""

    out: Path
    index: DatasetIndex
    rows: list[ManifestRow]
    resumed_items: int = 0
    skipped: bool = False  # the set was already complete


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


def _read_staged(stage: Path) -> dict[str, str] | None:
    """The fingerprint parts the staged work in ``stage`` is for, or None if unrecorded."""
    try:
        parts = json.loads((stage / STAGED_FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None
    return parts if isinstance(parts, dict) else None


def _prepare_out(
    out: Path, fp: SetFingerprint, overwrite: bool, log: Callable[[str], None] = print
) -> bool:
    """Make OUT ready for the set ``fp`` describes; returns True if it already holds it finished.

    What OUT may hold, and what happens:

    * nothing, or only staged work of this config: build, resuming from the staging journal;
      a journaled input whose bytes or listing changed since is processed again.
    * the finished set of this config and these inputs: nothing to do (unless it was written
      before samples carried checksums: then it is rebuilt, as below).
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
        if index.sample_checksum == SAMPLE_CHECKSUM:
            shutil.rmtree(stage, ignore_errors=True)  # a run that stopped just after its index
            return True
        # The same command's set, but from before samples carried checksums: the loader
        # refuses to serve it unchecked, so "nothing to do" would leave it unusable.
        log(f"{out}: its set was written before samples carried checksums; rebuilding the set")
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
    """Journaled inputs: input id -> (the input's digest when processed, its records)."""
    done: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    if not path.is_file():
        return done
    with open(path) as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from an interrupted run: redo that item
            # An entry of an older version (keyed by path, or without a digest) is redone.
            done[entry["item"]] = (entry.get("digest", ""), entry["records"])
    return done


def _process_all(
    cfg: IngestConfig,
    items: list[SourceItem],
    ids: dict[str, str],
    digests: dict[str, str],
    secret: bytes,
    log: Callable[[str], None],
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Process every input not yet journaled under its current digest, staging its pixels.

    The journal (inside OUT) names inputs by id only, like everything else in OUT.

    Returns:
        Per input id, its records; and how many inputs were reused from the journal.
    """
    stage = Path(cfg.out) / STAGING
    (stage / "items").mkdir(parents=True, exist_ok=True)
    journal_path = stage / "journal.jsonl"
    journaled = _read_journal(journal_path)
    done = {i: records for i, (digest, records) in journaled.items() if digests.get(i) == digest}
    todo = [it for it in items if ids[it.rel_path] not in done]
    if journaled:
        log(f"resuming: {len(done)} of {len(items)} inputs already processed")
    if len(done) < len(journaled):
        log(f"{len(journaled) - len(done)} journaled inputs changed since: processing them again")
    ctx = Context(cfg.preprocess, cfg.synth, secret)
    fn = functools.partial(process, ctx=ctx)
    if cfg.source == "synth" and todo and (cfg.workers or os.cpu_count() or 1) > 1:
        load(todo[0], ctx)  # load the template once here, before the workers fork
    with open(journal_path, "a") as journal:
        results = _parallel_map(fn, todo, cfg.workers, cfg.ray_address)
        for item, (records, pixels) in tqdm(
            zip(todo, results), total=len(todo), desc="ingest", unit="input", disable=None
        ):
            ok = [r for r in records if r["status"] == "ok"]
            for rec, raw in zip(ok, pixels):
                write_bytes(stage / "items" / f"{rec['key']}.u16", raw)
            own = ids[item.rel_path]
            entry = {"item": own, "digest": digests[own], "records": records}
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
            done[own] = records
    return done, len(items) - len(todo)


def _accounting(
    cfg: IngestConfig, inv: Inventory, ids: dict[str, str], rows: list[ManifestRow]
) -> str:
    """The closing line: entries found under INPUT, and what became of them (no name)."""
    counts = tally(inv, ids, rows)
    found = counts.pop("in")
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)
    what = "synthetic inputs" if cfg.source == "synth" else "files and links under the input"
    stored = sum(r.status == "ok" for r in rows)
    return (
        f"in: {found} {what}; out: {sum(counts.values())} accounted for "
        f"({outcomes or 'none'}), each in a manifest row; {stored} samples stored"
        + ("" if cfg.source == "synth" else f" (python -m shards locate {cfg.out} KEY: its file)")
    )


def ingest(cfg: IngestConfig, log: Callable[[str], None] = print) -> IngestResult:
    """Run the whole ingest for a checked config; see the module docstring.

    Args:
        cfg: The ingest configuration.
        log: Where progress lines go (rank-0 console by default); they name no input path.

    Returns:
        The finished set's index and manifest rows.

    Raises:
        ConfigError: If OUT holds another data set (see :func:`_prepare_out`), or the inputs
            make no usable set (:class:`~shards.assemble.UnusableSetError`).
    """
    require(bool(cfg.out), "out", "an output folder is required (--out)")
    out = Path(cfg.out)
    inv = take_inventory(cfg)
    secret = load_secret(cfg.secret_file or None)
    ids = ids_of(inv, cfg.source, functools.partial(input_id, secret=secret))
    digests = item_digests(inv.items, ids, secret)
    shared = shareable_config(cfg, secret)
    fp = set_fingerprint(
        cfg, shared, inv.items, ids=ids, digests=digests, skipped=inv.skipped, secret=secret
    )
    if cfg.source != "synth":  # first, so that even a failed run's rows can be located
        paths = {ids[rel]: rel for rel in inv.paths()}
        write_mapping(mapping_path(fp.value, cfg.secret_file or None), cfg.input, paths)
    if _prepare_out(out, fp, cfg.overwrite, log):
        index = read_index(out)
        rows = read_manifest_rows(out)
        log(f"{out} already holds this finished data set ({index.dataset_id}); nothing to do")
        log(_accounting(cfg, inv, ids, rows))
        return IngestResult(out, index, rows, skipped=True)
    done, resumed = _process_all(cfg, inv.items, ids, digests, secret, log)
    listing = Listing(inv.items, ids, inv.skipped)
    try:
        rows, index = assemble(
            cfg,
            listing,
            done,
            out / STAGING,
            made_from=fp.parts,
            fingerprint=fp.value,
            config=shared,
            log=log,
        )
    except UnusableSetError as exc:
        log(_accounting(cfg, inv, ids, exc.rows))
        where = f" in {cfg.input}" if cfg.input else ""
        raise UnusableSetError(
            f"{exc}{where}; every row is in {out / 'manifest.parquet'}; "
            f"python -m shards locate {out} lists their files",
            exc.rows,
        ) from None
    save_config(shared, out / "config.yaml")  # as the index records it: no local path
    write_index(out, index)
    shutil.rmtree(out / STAGING, ignore_errors=True)
    log(_accounting(cfg, inv, ids, rows))
    return IngestResult(out, index, rows, resumed_items=resumed)
