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
from dataclasses import dataclass

import numpy as np

__all__ = ["QuarantineError", "Slice", "SourceError", "SourceItem", "make_key"]


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
        rel_path: Path relative to the input root; recorded in the manifest.
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


def make_key(source: str, rel_path: str, index: int | None = None) -> str:
    """A sample key derived from the input's relative path (no identifiers, no dots).

    WebDataset splits file names at the first dot, so keys use only ``[a-z0-9_]``.
    """
    digest = hashlib.sha1(rel_path.encode()).hexdigest()[:16]
    key = f"{source}_{digest}"
    return key if index is None else f"{key}_s{index:04d}"
