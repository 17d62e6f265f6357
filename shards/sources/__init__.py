"""Source readers: each turns one input layout into :class:`SourceItem` s and 2-D slices.

Reader modules (``kaggle``, ``folder``, ``figshare``, ``nifti``, ``dicom``) each expose
``list_items(root, classes, *, tree=None, **options)`` and ``load_item(item)``, plus
``SUFFIXES`` (the file names they read; None: any) and ``LAYOUT`` (where they look), with which
the files they leave get their ``skipped`` reason; pick one with :func:`reader_for`. All list
from one :func:`~shards.sources.walk.walk_tree` of the input folder. The pixel readers below
are public so that ``trainer predict`` reads a file exactly as ingest does.
"""

from __future__ import annotations

from types import ModuleType

from shards.sources import dicom, figshare, folder, kaggle, nifti
from shards.sources.base import (
    PassedOver,
    QuarantineError,
    Slice,
    SourceError,
    SourceItem,
    make_key,
    public_id,
)
from shards.sources.dicom import read_dicom_series, read_series
from shards.sources.figshare import FigshareItem
from shards.sources.images import (
    IMAGE_SUFFIXES,
    axial_slice,
    read_image_file,
    select_slices,
)
from shards.sources.nifti import VolumeItem, read_nifti_volume, volume_slices
from shards.sources.walk import Tree, walk_tree

__all__ = [
    "IMAGE_SUFFIXES",
    "READERS",
    "FigshareItem",
    "PassedOver",
    "QuarantineError",
    "Slice",
    "SourceError",
    "SourceItem",
    "Tree",
    "VolumeItem",
    "axial_slice",
    "load_input",
    "make_key",
    "public_id",
    "read_dicom_series",
    "read_image_file",
    "read_nifti_volume",
    "read_series",
    "reader_for",
    "select_slices",
    "volume_slices",
    "walk_tree",
]

# Source name -> reader module; an explicit table, filled here and nowhere else.
READERS: dict[str, ModuleType] = {
    "kaggle": kaggle,
    "folder": folder,
    "figshare": figshare,
    "nifti": nifti,
    "dicom": dicom,
}


def reader_for(source: str) -> ModuleType:
    """The reader module for a source name.

    Raises:
        SourceError: For an unknown name, listing the known ones.
    """
    try:
        return READERS[source]
    except KeyError:
        raise SourceError(
            f"unknown source {source!r}; known sources: {', '.join(READERS)}"
        ) from None


def load_input(item: SourceItem) -> tuple[list[Slice], list[PassedOver]]:
    """Read one listed input: its slices, and the files inside it that were passed over.

    Only a DICOM series folder holds files of its own; other inputs pass over nothing.

    Raises:
        QuarantineError: When the input cannot be used.
    """
    if item.source == "dicom":
        return dicom.load_series(item)
    return reader_for(item.source).load_item(item), []
