"""Reader for NIfTI volumes (``.nii``, ``.nii.gz``, BraTS style) with a labels table.

The table (CSV, default ``root/labels.csv``) has a row per volume: ``file`` (path relative to
root), ``label`` (class name), optional ``patient`` and optional ``slices`` (semicolon-separated
axial slice indices). Each volume yields its listed axial slices, else up to
``max_slices_per_volume`` evenly spaced slices among those that contain brain.

Volumes are turned to the closest canonical (RAS+) orientation with nibabel, then each axial
slice is laid out as a radiologist views it: anterior up, the patient's right on the left,
which is how DICOM axial images are stored too.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from shards.sources.base import QuarantineError, Slice, SourceError, SourceItem
from shards.sources.folder import class_index, resolve_class_map
from shards.sources.images import axial_slice, select_slices
from shards.sources.walk import Tree, walk_tree

__all__ = [
    "DEFAULT_MAX_SLICES",
    "LAYOUT",
    "SUFFIXES",
    "LabelRow",
    "VolumeItem",
    "check_rows_match",
    "list_items",
    "load_item",
    "read_labels_table",
    "read_nifti_volume",
    "volume_slices",
]

SOURCE = "nifti"
SUFFIXES = (".nii", ".nii.gz")
LAYOUT = "volumes listed in the labels table"
DEFAULT_MAX_SLICES = 16
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


@dataclass(frozen=True)
class VolumeItem(SourceItem):
    """A volume (NIfTI file or DICOM series folder) plus what loading it needs.

    Attributes:
        patient: Patient id from the labels table (or the file stem), None to read it from the
            file. Never stored or logged: it is kept out of ``repr``.
        max_slices: Most slices taken when no slices are listed (0: all with brain).
        files: For a DICOM series, the names of the files in its folder that the listing
            found (links outside the input tree excluded); None: every file in the folder.
    """

    patient: str | None = field(default=None, repr=False)
    max_slices: int = DEFAULT_MAX_SLICES
    files: tuple[str, ...] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LabelRow:
    """One row of a labels table: the volume it names, its class index and options."""

    key: str
    label: int
    patient: str | None
    slices: tuple[int, ...] | None


def _parse_slices(text: str, where: str) -> tuple[int, ...] | None:
    text = text.strip()
    if not text:
        return None
    try:
        return tuple(int(part) for part in text.split(";") if part.strip())
    except ValueError as exc:
        raise SourceError(f"{where}: slices {text!r} are not semicolon-separated integers") from exc


def _cells(raw: dict, width: int, where: str) -> dict[str, str]:
    """A table row's cells by lower-cased column name; a row of another width is an error.

    ``csv.DictReader`` files extra cells under the key None and fills missing ones with None:
    either would silently cut or invent a value, so both stop the ingest here.
    """
    extra = raw.get(None)
    if extra:
        raise SourceError(
            f"{where}: {width + len(extra)} cells but the header names {width} columns "
            "(a comma inside a value needs quotes)"
        )
    missing = [k for k, v in raw.items() if k is not None and v is None]
    if missing:
        raise SourceError(
            f"{where}: {width - len(missing)} cells but the header names {width} columns "
            "(leave a cell empty rather than out)"
        )
    return {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}


def read_labels_table(
    csv_path: Path,
    key_column: str,
    classes: Sequence[str],
    class_map: Mapping[str, str] | None = None,
) -> list[LabelRow]:
    """Read a labels CSV (``key_column,label[,patient][,slices]``).

    Args:
        csv_path: The CSV file (UTF-8, header row; column names are case-insensitive).
        key_column: Column naming the input (``file`` for NIfTI, ``series`` for DICOM).
        classes: Known class names in label order.
        class_map: Table label to known class name.

    Returns:
        One row per input, keys normalised to forward slashes.

    Raises:
        SourceError: Missing file or columns, a row with more or fewer cells than the header,
            an empty or duplicate key, an unknown label or bad slice list, each naming the
            file and line.
    """
    csv_path = Path(csv_path)
    if not classes:
        raise SourceError(f"{csv_path}: class names are needed to read a labels table")
    if not csv_path.is_file():
        raise SourceError(f"{csv_path}: labels table not found (columns {key_column},label)")
    mapping = resolve_class_map(classes, class_map, csv_path)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            return _read_rows(csv.DictReader(fh), csv_path, key_column, classes, mapping)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise SourceError(f"{csv_path}: not a readable CSV table ({exc})") from exc


def _read_rows(
    reader: csv.DictReader,
    csv_path: Path,
    key_column: str,
    classes: Sequence[str],
    mapping: Mapping[str, str],
) -> list[LabelRow]:
    fields = [name.strip().lower() for name in reader.fieldnames or []]
    missing = [col for col in (key_column, "label") if col not in fields]
    if missing:
        raise SourceError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; found {', '.join(fields)}"
        )
    rows: list[LabelRow] = []
    seen: set[str] = set()
    for raw in reader:
        where = f"{csv_path} line {reader.line_num}"
        cells = _cells(raw, len(fields), where)
        key = cells[key_column].replace("\\", "/").strip("/")
        if not key:
            raise SourceError(f"{where}: empty {key_column}")
        if key in seen:
            raise SourceError(f"{where}: {key_column} {key!r} is listed twice")
        seen.add(key)
        label = class_index(cells["label"], classes, mapping, "label", where)
        patient = cells.get("patient") or None
        rows.append(LabelRow(key, label, patient, _parse_slices(cells.get("slices", ""), where)))
    return rows


def check_rows_match(
    rows: Sequence[LabelRow], found: Sequence[str], csv_path: Path, what: str
) -> None:
    """Raise SourceError if table rows and inputs on disk do not match one to one."""
    keys = {row.key for row in rows}
    on_disk = set(found)
    no_input = sorted(keys - on_disk)
    no_row = sorted(on_disk - keys)
    problems = []
    if no_input:
        problems.append(f"rows without a {what}: {', '.join(no_input[:10])}")
    if no_row:
        problems.append(f"{what}s without a row: {', '.join(no_row[:10])}")
    if problems:
        raise SourceError(f"{csv_path}: " + "; ".join(problems))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def list_items(
    root: Path,
    classes: Sequence[str],
    *,
    labels_csv: Path | None = None,
    class_map: Mapping[str, str] | None = None,
    max_slices_per_volume: int = DEFAULT_MAX_SLICES,
    tree: Tree | None = None,
) -> list[VolumeItem]:
    """List the labelled NIfTI volumes under ``root``, sorted by relative path.

    Args:
        root: Folder holding the volumes (nested folders allowed).
        classes: Known class names in label order.
        labels_csv: The labels table; default ``root/labels.csv``.
        class_map: Table label to known class name.
        max_slices_per_volume: Most slices per volume when none are listed (0: all with brain).
        tree: The walk of ``root`` (:func:`~shards.sources.walk.walk_tree`), if already made.

    Returns:
        One item per volume; ``patient`` from the table, else the file name without suffix.

    Raises:
        SourceError: If the table is bad, or table rows and volume files do not match.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: input folder does not exist")
    csv_path = Path(labels_csv) if labels_csv is not None else root / "labels.csv"
    rows = read_labels_table(csv_path, "file", classes, class_map)
    tree = tree or walk_tree(root)
    files = {tree.rel(p): p for p in tree.files_under(root, SUFFIXES)}
    check_rows_match(rows, list(files), csv_path, "volume file")
    items = [
        VolumeItem(
            SOURCE,
            str(files[row.key]),
            row.key,
            row.label,
            slices=row.slices,
            patient=row.patient or _stem(files[row.key]),
            max_slices=max_slices_per_volume,
        )
        for row in rows
    ]
    return sorted(items, key=lambda item: item.rel_path)


def read_nifti_volume(path: Path) -> np.ndarray:
    """Read a 3-D NIfTI volume as float32, axial slices on the last axis, anterior up.

    ``volume[:, :, k]`` is axial slice ``k`` (inferior to superior) with rows running anterior
    to posterior and columns from the patient's right to left.

    Raises:
        QuarantineError: ``empty_file``, ``unreadable``, ``not_3d`` (trailing length-1 axes are
            dropped first) or ``non_finite``.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise QuarantineError(f"empty_file: {path.name} has zero bytes")
        img = nib.load(str(path))
        shape = tuple(img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise QuarantineError(f"not_3d: {path.name} has shape {tuple(img.shape)}")
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.get_fdata(dtype=np.float32)).reshape(shape)
    except QuarantineError:
        raise
    except _READ_ERRORS as exc:
        raise QuarantineError(f"unreadable: {path.name}: {exc}") from exc
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise QuarantineError(f"non_finite: {path.name} has {bad} NaN or infinite voxels")
    # RAS+ (x: right, y: anterior, z: superior) -> rows anterior->posterior, columns right->left.
    return np.ascontiguousarray(data[::-1, ::-1, :].transpose(1, 0, 2))


def volume_slices(
    volume: np.ndarray,
    name: str,
    listed: Sequence[int] | None,
    max_slices: int,
    patient: str | None,
) -> list[Slice]:
    """Cut the chosen axial slices of a volume (see :func:`select_slices`).

    Raises:
        QuarantineError: ``no_foreground`` when no slice has brain, ``bad_slice_index``.
    """
    chosen = select_slices(volume, max_slices, listed)
    if not chosen:
        raise QuarantineError(f"no_foreground: {name}: no axial slice contains brain")
    return [Slice(axial_slice(volume, k), index=k, patient=patient) for k in chosen]


def load_item(item: SourceItem) -> list[Slice]:
    """Read one NIfTI volume and return its chosen axial slices (patient id set)."""
    path = Path(item.path)
    volume = read_nifti_volume(path)
    patient = getattr(item, "patient", None) or _stem(path)
    max_slices = getattr(item, "max_slices", DEFAULT_MAX_SLICES)
    return volume_slices(volume, path.name, item.slices, max_slices, patient)
