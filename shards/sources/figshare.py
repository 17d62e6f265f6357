"""Reader for Cheng et al.'s Figshare brain tumour data set: MATLAB v7.3 ``.mat`` files.

A v7.3 file is HDF5 (read with h5py) holding a ``cjdata`` group: ``image`` (2-D int16/uint16 or
float), ``label`` (1 meningioma, 2 glioma, 3 pituitary), ``PID`` (the patient id as MATLAB char,
i.e. uint16 character codes) and ``tumorMask`` (ignored here). MATLAB writes arrays
column-major, so HDF5 holds every matrix transposed; the image is transposed back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from shards.sources.base import QuarantineError, Slice, SourceError, SourceItem
from shards.sources.folder import resolve_class_map
from shards.sources.walk import Tree, walk_tree

__all__ = [
    "FIGSHARE_LABELS",
    "LAYOUT",
    "SUFFIXES",
    "FigshareItem",
    "decode_matlab_string",
    "list_items",
    "load_item",
]

SOURCE = "figshare"
SUFFIXES = (".mat",)
LAYOUT = ".mat files anywhere under the input folder"
# cjdata.label code -> class name, as documented with the data set.
FIGSHARE_LABELS: dict[int, str] = {1: "meningioma", 2: "glioma", 3: "pituitary"}


@dataclass(frozen=True)
class FigshareItem(SourceItem):
    """A .mat file; ``label_indices[code - 1]`` is the class index of label code 1, 2, 3."""

    label_indices: tuple[int, ...] = ()


def decode_matlab_string(data: np.ndarray | bytes | str) -> str | None:
    """Decode a MATLAB v7.3 char array (uint16 character codes) to ``str``; empty -> None."""
    if isinstance(data, bytes):
        text = data.decode("utf-8", errors="replace")
    elif isinstance(data, str):
        text = data
    else:
        arr = np.asarray(data)
        if arr.dtype.kind in ("S", "O", "U"):
            text = "".join(
                v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                for v in arr.ravel()
            )
        else:
            # MATLAB stores an empty char array as the two dims [0 0] (uint64) plus an
            # attribute; real characters are UTF-16 code units.
            codes = arr.astype(np.int64).ravel()
            text = "".join(chr(int(c)) for c in codes if 0 < c < 0x110000)
    text = text.strip("\x00").strip()
    return text or None


def list_items(
    root: Path,
    classes: Sequence[str],
    *,
    class_map: Mapping[str, str] | None = None,
    tree: Tree | None = None,
) -> list[FigshareItem]:
    """List every ``.mat`` file under ``root`` (nested folders too), sorted by relative path.

    Args:
        root: Folder holding the ``.mat`` files.
        classes: Known class names in label order; must include meningioma, glioma and
            pituitary (directly or through ``class_map``).
        class_map: Figshare class name to known class name.
        tree: The walk of ``root`` (:func:`~shards.sources.walk.walk_tree`), if already made.

    Returns:
        Items with ``label=None``: the label is read from each file on load.

    Raises:
        SourceError: If ``root`` is missing, holds no .mat file, or a Figshare class is unknown.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: input folder does not exist")
    names = list(classes) or sorted(FIGSHARE_LABELS.values())
    mapping = resolve_class_map(names, class_map, root)
    indices: list[int] = []
    missing: list[str] = []
    for code in sorted(FIGSHARE_LABELS):
        target = mapping.get(FIGSHARE_LABELS[code], FIGSHARE_LABELS[code])
        if target in names:
            indices.append(names.index(target))
        else:
            missing.append(FIGSHARE_LABELS[code])
    if missing:
        raise SourceError(
            f"{root}: Figshare classes {', '.join(missing)} are not known classes "
            f"(known: {', '.join(names)}); map them with --classes NAME=KNOWN_CLASS"
        )
    tree = tree or walk_tree(root)
    paths = tree.files_under(root, SUFFIXES)
    if not paths:
        raise SourceError(f"{root}: no .mat files found")
    items = [
        FigshareItem(SOURCE, str(p), tree.rel(p), None, label_indices=tuple(indices)) for p in paths
    ]
    return sorted(items, key=lambda item: item.rel_path)


def _read_cjdata(path: Path) -> tuple[np.ndarray, int, str | None]:
    with h5py.File(path, "r") as f:
        group = f.get("cjdata")
        if not isinstance(group, h5py.Group) or "image" not in group or "label" not in group:
            raise QuarantineError(f"unreadable: {path.name} has no cjdata/image and cjdata/label")
        image = np.asarray(group["image"])
        label_values = np.asarray(group["label"]).ravel()
        pid = decode_matlab_string(np.asarray(group["PID"])) if "PID" in group else None
    if image.ndim != 2:
        raise QuarantineError(f"bad_shape: {path.name}: cjdata/image has shape {image.shape}")
    if label_values.size != 1 or not np.isfinite(label_values[0]):
        raise QuarantineError(f"bad_label: {path.name}: cjdata/label is {label_values.tolist()}")
    return image.T, int(label_values[0]), pid


def load_item(item: SourceItem) -> list[Slice]:
    """Read one .mat file: its image (transposed back), label and patient id.

    Returns:
        One slice with ``label`` set and ``patient`` the decoded PID (never store it).

    Raises:
        QuarantineError: ``empty_file``, ``unreadable`` (not HDF5, e.g. a pre-v7.3 .mat, or no
            cjdata), ``bad_shape`` or ``bad_label``.
    """
    path = Path(item.path)
    try:
        if path.stat().st_size == 0:
            raise QuarantineError(f"empty_file: {path.name} has zero bytes")
        image, code, pid = _read_cjdata(path)
    except QuarantineError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise QuarantineError(
            f"unreadable: {path.name} is not a readable MATLAB v7.3 (HDF5) file: {exc}"
        ) from exc
    # A plain SourceItem (no label_indices) is labelled like a listing with no class names.
    default = sorted(FIGSHARE_LABELS.values())
    indices = getattr(item, "label_indices", ()) or tuple(
        default.index(FIGSHARE_LABELS[c]) for c in sorted(FIGSHARE_LABELS)
    )
    if code not in FIGSHARE_LABELS:
        raise QuarantineError(f"bad_label: {path.name}: label code {code} is not 1, 2 or 3")
    return [
        Slice(
            np.ascontiguousarray(image, dtype=np.float32),
            patient=pid,
            label=indices[code - 1],
        )
    ]
