"""Reader for DICOM series (one folder per series, read with pydicom) with a labels table.

The table (CSV, default ``root/labels.csv``) has ``series`` (the folder relative to root) and
``label`` (class name), optionally ``patient`` and ``slices`` as for NIfTI. Instances are sorted
along the slice normal (ImagePositionPatient), else by InstanceNumber; RescaleSlope/Intercept
are applied and MONOCHROME1 is inverted. The PatientID header goes only into
``Slice.patient``, which the caller hashes at once: no header value is kept anywhere else.

Every file of a series folder is accounted for: a file that is not DICOM (scanner notes) is
passed over as ``skipped``, one that should be but cannot be read (a zero-byte or garbled
``.dcm``) as ``quarantined``; the rest of the series is still read (:func:`load_series`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from shards.sources.base import PassedOver, QuarantineError, Slice, SourceError, SourceItem
from shards.sources.images import luminance
from shards.sources.nifti import (
    DEFAULT_MAX_SLICES,
    VolumeItem,
    check_rows_match,
    read_labels_table,
    volume_slices,
)
from shards.sources.walk import Tree, walk_tree

__all__ = [
    "LAYOUT",
    "SUFFIXES",
    "Series",
    "list_items",
    "load_item",
    "load_series",
    "read_dicom_series",
    "read_series",
]

SOURCE = "dicom"
SUFFIXES = None  # any file in a series folder is read (DICOM files often have no suffix)
LAYOUT = "one folder per series, listed in the labels table"
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# A file named like this is meant to be DICOM: unreadable, it is quarantined, not skipped.
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


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


@dataclass
class Series:
    """A series read from its folder.

    Attributes:
        volume: float32 volume in rescaled units, ``volume[:, :, k]`` the k-th slice along the
            normal (or by InstanceNumber).
        patient: The PatientID header, or None; the caller must hash it and never store it.
        passed_over: The folder's files that were not used, each with its status and reason.
    """

    volume: np.ndarray
    patient: str | None
    passed_over: list[PassedOver] = field(default_factory=list)


def _passed_over(path: Path) -> PassedOver:
    """Why a file of a series folder that is no DICOM image is not used."""
    try:
        empty = path.stat().st_size == 0
    except OSError as exc:
        return PassedOver(path.name, "quarantined", f"unreadable: {path.name}: {exc.strerror}")
    if empty:
        return PassedOver(path.name, "quarantined", f"empty_file: {path.name} has zero bytes")
    if path.name.lower().endswith(_DICOM_SUFFIXES):
        reason = f"unreadable: {path.name} is not a readable DICOM file"
        return PassedOver(path.name, "quarantined", reason)
    return PassedOver(path.name, "skipped", f"not_dicom: {path.name} is not a DICOM file")


def _stack(frames: list[_Frame], name: str) -> np.ndarray:
    shapes = sorted({f.image.shape for f in frames})
    if len(shapes) > 1:
        raise QuarantineError(f"inconsistent_shape: series {name} mixes shapes {shapes}")
    frames.sort(key=lambda f: f.order)
    volume = np.stack([f.image for f in frames], axis=-1).astype(np.float32)
    flipped = [k for k, f in enumerate(frames) if f.inverted]
    if flipped:
        # MONOCHROME1: low values are bright. Invert over the series' range so slices keep
        # their relative intensities.
        part = volume[:, :, flipped]
        volume[:, :, flipped] = part.max() + part.min() - part
    return volume


def read_series(folder: Path, names: Sequence[str] | None = None) -> Series:
    """Read one DICOM series folder as a volume, slices stacked on the last axis.

    Sub-folders are not read (they are other series); files that are no DICOM image are
    passed over (see the module docstring).

    Args:
        folder: The series folder.
        names: The files to read (as the listing found them); None: every visible file.

    Returns:
        The :class:`Series`.

    Raises:
        QuarantineError: ``unreadable`` (no DICOM file, undecodable pixels), ``no_pixel_data``
            (an instance without pixels), ``inconsistent_shape``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise QuarantineError(f"unreadable: series folder {folder.name} does not exist")
    if names is None:
        names = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    frames: list[_Frame] = []
    patient: str | None = None
    passed: list[PassedOver] = []
    for path in (folder / name for name in sorted(names)):
        ds = _read_dataset(path)
        if ds is None:
            passed.append(_passed_over(path))
            continue  # the series may still be whole
        frames.extend(_frames_of(ds, path.name))
        if patient is None and str(ds.get("PatientID", "") or "").strip():
            patient = str(ds.PatientID).strip()
    if not frames:
        raise QuarantineError(f"unreadable: series {folder.name} holds no readable DICOM image")
    return Series(_stack(frames, folder.name), patient, passed)


def read_dicom_series(folder: Path) -> tuple[np.ndarray, str | None]:
    """Read one DICOM series folder: ``(volume, patient_id)`` of :func:`read_series`.

    The patient id must be hashed by the caller and never stored.

    Raises:
        QuarantineError: As :func:`read_series`.
    """
    series = read_series(folder)
    return series.volume, series.patient


def _series_folders(tree: Tree, csv_path: Path) -> dict[str, list[Path]]:
    """Folders under the root (not the root itself) that directly hold a visible file.

    Returns:
        Relative folder path -> the files in it (the labels table excluded).
    """
    found: dict[str, list[Path]] = {}
    for folder in sorted(tree.dirs):
        files = [
            p for p in tree.files_in(folder) if p.name != csv_path.name or p.resolve() != csv_path
        ]
        if files:
            found[tree.rel(folder)] = files
    return found


def list_items(
    root: Path,
    classes: Sequence[str],
    *,
    labels_csv: Path | None = None,
    class_map: Mapping[str, str] | None = None,
    max_slices_per_volume: int = DEFAULT_MAX_SLICES,
    tree: Tree | None = None,
) -> list[VolumeItem]:
    """List the labelled DICOM series under ``root``, sorted by relative path.

    Args:
        root: Folder holding one sub-folder per series (nested folders allowed).
        classes: Known class names in label order.
        labels_csv: The labels table (``series,label``); default ``root/labels.csv``.
        class_map: Table label to known class name.
        max_slices_per_volume: Most slices per series when none are listed (0: all with brain).
        tree: The walk of ``root`` (:func:`~shards.sources.walk.walk_tree`), if already made.

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
    series = _series_folders(tree or walk_tree(root), csv_path.resolve())
    check_rows_match(rows, list(series), csv_path, "series folder")
    items = [
        VolumeItem(
            SOURCE,
            str(root / row.key),
            row.key,
            row.label,
            slices=row.slices,
            patient=row.patient,
            max_slices=max_slices_per_volume,
            files=tuple(p.name for p in series[row.key]),
        )
        for row in rows
    ]
    return sorted(items, key=lambda item: item.rel_path)


def load_series(item: SourceItem) -> tuple[list[Slice], list[PassedOver]]:
    """Read one series: its chosen slices (patient id from table or header) and the files of
    its folder that were passed over.

    Raises:
        QuarantineError: As :func:`read_series` and :func:`volume_slices`.
    """
    series = read_series(Path(item.path), getattr(item, "files", None))
    patient = getattr(item, "patient", None) or series.patient
    max_slices = getattr(item, "max_slices", DEFAULT_MAX_SLICES)
    slices = volume_slices(series.volume, item.rel_path, item.slices, max_slices, patient)
    return slices, series.passed_over


def load_item(item: SourceItem) -> list[Slice]:
    """Read one series and return its chosen slices (patient id from table or header)."""
    return load_series(item)[0]
