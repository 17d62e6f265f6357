"""One input in: result records and staged pixels out (what an ingest worker runs).

Records name the input by its id only (keyed, :func:`shards.privacy.input_id`) and their
reasons are redacted (:func:`shards.privacy.redact`): the journal they go into lies in OUT.
A DICOM series' files that the reader passed over get records of their own.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards import dedup
from shards.preprocess import PreprocessConfig, preprocess
from shards.privacy import input_id, pseudonymize, redact
from shards.sources import load_input
from shards.sources.base import PassedOver, QuarantineError, Slice, SourceItem, make_key, public_id
from shards.synth import SynthConfig, load_synth_item
from shards.writer import GROUP_PATIENT, GROUP_SAMPLE

__all__ = ["Context", "load", "process"]


@dataclass(frozen=True)
class Context:
    """What a worker needs to process an item (picklable, small)."""

    preprocess: PreprocessConfig
    synth: SynthConfig
    secret: bytes


def load(item: SourceItem, ctx: Context) -> tuple[list[Slice], list[PassedOver]]:
    """Read one input: its slices and the files inside it that the reader passed over.

    Raises:
        QuarantineError: When the input cannot be used.
    """
    if item.source == "synth":
        return load_synth_item(item, ctx.synth), []
    return load_input(item)


def _id(item: SourceItem, rel: str, secret: bytes) -> str:
    """The id of a path of the tree (keyed; the synthetic source's names are its own)."""
    return public_id(rel) if item.source == "synth" else input_id(rel, secret)


def _redactor(item: SourceItem) -> Callable[[str], str]:
    """Removes every path and name of ``item`` from a reason (see :func:`redact`)."""
    if item.source == "synth":
        return lambda reason: reason
    parts = item.rel_path.split("/")
    root = Path(item.path)
    for _ in parts:
        root = root.parent
    paths = [item.path, os.path.realpath(item.path), item.rel_path, str(root)]
    names = [*parts, root.name, *(getattr(item, "files", None) or ())]
    return functools.partial(redact, paths=paths, names=names)


def _quarantined(item: SourceItem, ctx: Context, reason: str) -> dict[str, Any]:
    own = _id(item, item.rel_path, ctx.secret)
    label = -1 if item.label is None else item.label
    return {
        "key": make_key(item.source, own),
        "input_id": own,
        "split_hint": item.split_hint,
        "slice": None,
        "label": label,
        "status": "quarantined",
        "reason": _redactor(item)(reason),
    }


def _passed_over_records(
    item: SourceItem, passed: list[PassedOver], ctx: Context
) -> list[dict[str, Any]]:
    """A record of its own for each file of an input that the reader did not use."""
    clean = _redactor(item)
    records = []
    for p in passed:
        fid = _id(item, f"{item.rel_path}/{p.name}", ctx.secret)
        records.append(
            {
                "key": make_key(item.source, fid),
                "input_id": fid,
                "split_hint": None,
                "slice": None,
                "label": -1,
                "status": p.status,
                "reason": clean(p.reason),
            }
        )
    return records


def process(item: SourceItem, ctx: Context) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Read, check and preprocess one input (never raises: a failure is a quarantine record).

    Args:
        item: The input.
        ctx: Preprocessing, synth settings and the key.

    Returns:
        One record per slice (``ok`` or ``quarantined``), or one ``quarantined`` record for the
        whole input, plus one per file passed over; and the uint16 pixels of the ``ok``
        records, in order. Records name inputs by id only; reasons are redacted.
    """
    try:
        slices, passed = load(item, ctx)
        if not slices:
            raise QuarantineError("no_slices: no usable slice found in the input")
    except QuarantineError as exc:
        return [_quarantined(item, ctx, exc.reason)], []
    except Exception as exc:  # a reader bug or exotic file must not stop the whole ingest
        rec = _quarantined(item, ctx, f"unreadable: {type(exc).__name__}: {exc}")
        return [{**rec, "label": -1}], []
    own = _id(item, item.rel_path, ctx.secret)
    base = {"input_id": own, "split_hint": item.split_hint}
    records, pixels = _passed_over_records(item, passed, ctx), []
    for sl in slices:
        key = make_key(item.source, own, sl.index)
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
            records.append({**rec, "status": "quarantined", "reason": _redactor(item)(exc.reason)})
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
