"""Source readers: each turns one input layout into :class:`SourceItem` s and 2-D slices.

Reader modules (``kaggle``, ``folder``, ``figshare``, ``nifti``, ``dicom``) each expose
``list_items(root, classes, **options)`` and ``load_item(item)``; pick one with
:func:`reader_for`. The pixel readers below are public so that ``trainer predict`` reads a
file exactly as ingest does.
"""

from __future__ import annotations

from types import ModuleType

from shards.sources import dicom, figshare, folder, kaggle, nifti
from shards.sources.base import QuarantineError, Slice, SourceError, SourceItem, make_key
from shards.sources.dicom import read_dicom_series
from shards.sources.figshare import FigshareItem
from shards.sources.images import (
    IMAGE_SUFFIXES,
    axial_slice,
    read_image_file,
    select_slices,
)
from shards.sources.nifti import VolumeItem, read_nifti_volume, volume_slices

__all__ = [
    "IMAGE_SUFFIXES",
    "READERS",
    "FigshareItem",
    "QuarantineError",
    "Slice",
    "SourceError",
    "SourceItem",
    "VolumeItem",
    "axial_slice",
    "make_key",
    "read_dicom_series",
    "read_image_file",
    "read_nifti_volume",
    "reader_for",
    "select_slices",
    "volume_slices",
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
