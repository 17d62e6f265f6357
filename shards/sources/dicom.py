"""Reader for DICOM series (one folder per series, read with pydicom) with a labels table.

The table (CSV, default ``root/labels.csv``) has ``series`` (the folder relative to root) and
``label`` (class name), optionally ``patient`` and ``slices`` as for NIfTI. Instances are sorted
along the slice normal (ImagePositionPatient), else by InstanceNumber; RescaleSlope/Intercept
are applied and MONOCHROME1 is inverted. The PatientID header goes only into
``Slice.patient``, which the caller hashes at once: no header value is kept anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from shards.sources.base import QuarantineError, Slice, SourceError, SourceItem
from shards.sources.images import luminance
from shards.sources.nifti import (
    DEFAULT_MAX_SLICES,
    VolumeItem,
    check_rows_match,
    read_labels_table,
    volume_slices,
)

__all__ = ["list_items", "load_item", "read_dicom_series"]

SOURCE = "dicom"
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class _Frame:
    image: np.ndarray
    order: tuple[float, float, str, int]  # (position, instance number, file name, frame)
    inverted: bool


def _read_dataset(path: Path) -> Dataset | None:
    """The dataset in ``path``, or None if the file is not DICOM."""
    try:
        return dcmread(path)
    except InvalidDicomError:
        pass
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        return None
    # No 128-byte preamble: some writers omit it. Accept a forced read only if it looks like
    # an image instance, so stray text files are not mistaken for DICOM.
    try:
        ds = dcmread(path, force=True)
        return ds if ("SOPClassUID" in ds or "PixelData" in ds) else None
    except Exception:  # a forced parse of arbitrary bytes can fail in any way
        return None


def _position(ds: Dataset) -> float | None:
    """Distance of the slice along its normal, or None without geometry headers."""
    try:
        orient = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    if orient.size != 6 or pos.size != 3:
        return None
    return float(np.dot(np.cross(orient[:3], orient[3:]), pos))


def _frames_of(ds: Dataset, name: str) -> list[_Frame]:
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise QuarantineError(f"no_pixel_data: {name} has no pixel data")
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types (missing codec, bad length, ...)
        raise QuarantineError(f"unreadable: {name}: cannot decode pixel data: {exc}") from exc
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    stack = pixels if frames > 1 else pixels[None]
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    inverted = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    position = _position(ds) if frames == 1 else None
    number = ds.get("InstanceNumber")
    instance = float(number) if number not in (None, "") else float("inf")
    out = []
    for f, frame in enumerate(stack):
        image = luminance(frame) if samples > 1 else frame.astype(np.float32)
        image = image * np.float32(slope) + np.float32(intercept)
        pos = position if position is not None else float("inf")
        out.append(_Frame(image, (pos, instance, name, f), inverted))
    return out


def read_dicom_series(folder: Path) -> tuple[np.ndarray, str | None]:
    """Read one DICOM series folder as a volume, slices stacked on the last axis.

    Files that are not DICOM are skipped; sub-folders are not read (they are other series).

    Args:
        folder: The series folder.

    Returns:
        ``(volume, patient_id)``: float32 volume in rescaled units, ``volume[:, :, k]`` the
        k-th slice along the normal (or by InstanceNumber), and the PatientID header (or None).
        The patient id must be hashed by the caller and never stored.

    Raises:
        QuarantineError: ``unreadable`` (no DICOM file, undecodable pixels), ``no_pixel_data``
            (an instance without pixels), ``inconsistent_shape``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise QuarantineError(f"unreadable: series folder {folder.name} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    frames: list[_Frame] = []
    patient: str | None = None
    for path in files:
        ds = _read_dataset(path)
        if ds is None:
            continue  # not DICOM (notes, DICOMDIR leftovers): the series may still be whole
        frames.extend(_frames_of(ds, path.name))
        if patient is None and str(ds.get("PatientID", "") or "").strip():
            patient = str(ds.PatientID).strip()
    if not frames:
        raise QuarantineError(f"unreadable: series {folder.name} holds no readable DICOM image")
    shapes = sorted({f.image.shape for f in frames})
    if len(shapes) > 1:
        raise QuarantineError(f"inconsistent_shape: series {folder.name} mixes shapes {shapes}")
    frames.sort(key=lambda f: f.order)
    volume = np.stack([f.image for f in frames], axis=-1).astype(np.float32)
    flipped = [k for k, f in enumerate(frames) if f.inverted]
    if flipped:
        # MONOCHROME1: low values are bright. Invert over the series' range so slices keep
        # their relative intensities.
        part = volume[:, :, flipped]
        volume[:, :, flipped] = part.max() + part.min() - part
    return volume, patient


def _series_folders(root: Path, csv_path: Path) -> list[str]:
    """Folders under ``root`` (not root itself) that directly hold a visible file."""
    found = []
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        rel = folder.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        if any(p.resolve() != csv_path for p in files):
            found.append(rel.as_posix())
    return found


def list_items(
    root: Path,
    classes: Sequence[str],
    *,
    labels_csv: Path | None = None,
    class_map: Mapping[str, str] | None = None,
    max_slices_per_volume: int = DEFAULT_MAX_SLICES,
) -> list[VolumeItem]:
    """List the labelled DICOM series under ``root``, sorted by relative path.

    Args:
        root: Folder holding one sub-folder per series (nested folders allowed).
        classes: Known class names in label order.
        labels_csv: The labels table (``series,label``); default ``root/labels.csv``.
        class_map: Table label to known class name.
        max_slices_per_volume: Most slices per series when none are listed (0: all with brain).

    Returns:
        One item per series folder (``patient`` from the table if it has that column, else
        read from the headers on load).

    Raises:
        SourceError: If the table is bad, or table rows and series folders do not match.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: input folder does not exist")
    csv_path = Path(labels_csv) if labels_csv is not None else root / "labels.csv"
    rows = read_labels_table(csv_path, "series", classes, class_map)
    check_rows_match(rows, _series_folders(root, csv_path.resolve()), csv_path, "series folder")
    items = [
        VolumeItem(
            SOURCE,
            str(root / row.key),
            row.key,
            row.label,
            slices=row.slices,
            patient=row.patient,
            max_slices=max_slices_per_volume,
        )
        for row in rows
    ]
    return sorted(items, key=lambda item: item.rel_path)


def load_item(item: SourceItem) -> list[Slice]:
    """Read one series and return its chosen slices (patient id from table or header)."""
    folder = Path(item.path)
    volume, header_patient = read_dicom_series(folder)
    patient = getattr(item, "patient", None) or header_patient
    max_slices = getattr(item, "max_slices", DEFAULT_MAX_SLICES)
    return volume_slices(volume, item.rel_path, item.slices, max_slices, patient)
