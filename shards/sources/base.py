"""What every source reader shares: the unit of work, the loaded slice and the quarantine error.

A source reader is a module with two functions:

``list_items(root: Path, classes: Sequence[str], **options) -> list[SourceItem]``
    Enumerate the inputs cheaply (no pixel data read). Raises :class:`SourceError` for a
    layout problem the user must fix (e.g. an unknown class folder).
``load_item(item: SourceItem) -> list[Slice]``
    Read the pixels of one input as 2-D float32 slices. Raises :class:`QuarantineError` with a
    short reason when the input cannot be used; the caller quarantines it and keeps going.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PassedOver",
    "QuarantineError",
    "Slice",
    "SourceError",
    "SourceItem",
    "make_key",
    "public_id",
]


class SourceError(ValueError):
    """The input tree as a whole is wrong (layout, labels table); the message names the path."""


class QuarantineError(Exception):
    """One input cannot be used. ``reason`` is a short machine-friendly slug plus detail."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SourceItem:
    """One input to load: an image file, a .mat file, a NIfTI volume or a DICOM series folder.

    Attributes:
        source: Reader name (kaggle, folder, figshare, nifti, dicom, synth).
        path: Absolute path of the file or series folder.
        rel_path: Path relative to the input root. Never stored: the manifest holds its keyed
            hash (:func:`shards.privacy.input_id`).
        label: Class index, or None where the label is only known after loading (figshare).
        split_hint: ``"test"`` where the layout fixes the split (Kaggle ``Testing/``), else None.
        slices: For volumes, the slice indices asked for (None: choose those with brain).
        synth_index: For the synthetic source only: which generated sample this is.
    """

    source: str
    path: str
    rel_path: str
    label: int | None
    split_hint: str | None = None
    slices: tuple[int, ...] | None = None
    synth_index: int | None = None


@dataclass
class Slice:
    """One 2-D image read from an input.

    Attributes:
        image: 2-D float32 array in the scanner's units (not yet normalised).
        index: Slice index within a volume, None for 2-D inputs.
        patient: Raw patient identifier, or None. Never stored: the caller turns it into a
            keyed hash at once.
        label: Class index read from the file itself (figshare), else None.
    """

    image: np.ndarray
    index: int | None = None
    patient: str | None = None
    label: int | None = None


@dataclass(frozen=True)
class PassedOver:
    """A file inside an input (a series folder) that the reader did not use, and why.

    Attributes:
        name: The file's name inside the input's folder.
        status: ``skipped`` (not an image of this kind: a text file) or ``quarantined``
            (meant to be one but unusable: a zero-byte ``.dcm``).
        reason: ``slug: detail``, as for a quarantined input.
    """

    name: str
    status: str
    reason: str


def public_id(rel_path: str) -> str:
    """An unkeyed id (16 hex digits) of a path; only for the synthetic source's own names."""
    return hashlib.sha1(os.fsencode(rel_path)).hexdigest()[:16]


def make_key(source: str, input_id: str, index: int | None = None) -> str:
    """A sample key: the source, the input's id and the slice (no identifier, no dots).

    Args:
        source: Reader name.
        input_id: The input's keyed id (:func:`shards.privacy.input_id`; the synthetic source
            uses :func:`public_id`, its names being its own).
        index: Slice index within a volume, None for 2-D inputs.

    WebDataset splits file names at the first dot, so keys use only ``[a-z0-9_]``.
    """
    key = f"{source}_{input_id}"
    return key if index is None else f"{key}_s{index:04d}"
