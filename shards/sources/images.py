"""Low-level pixel reading shared by the readers and by ``trainer predict``.

Everything here turns a file (or a volume already read) into float32 pixels exactly as ingest
sees them, and raises :class:`~shards.sources.base.QuarantineError` with a reason slug
(``empty_file``, ``truncated``, ``not_an_image``, ``unreadable``, ``absurd_size``) when it cannot.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from shards.sources.base import QuarantineError

__all__ = [
    "IMAGE_SUFFIXES",
    "axial_slice",
    "foreground_fractions",
    "is_image_file",
    "luminance",
    "read_image_file",
    "select_slices",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

# Modes whose pixels are already one luminance channel that numpy reads directly.
_GRAY_MODES = {"L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def luminance(pixels: np.ndarray) -> np.ndarray:
    """A 2-D float32 image from 2-D or HxWxC pixels (RGB/RGBA: ITU-R 601 luma, LA: L).

    Same weights as ``shards.preprocess.to_gray_float``, which cannot be imported here:
    ``shards.preprocess`` imports ``shards.sources.base`` and so this package.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):
        arr = arr[..., 0]
    return arr.astype(np.float32)


def is_image_file(path: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> bool:
    """Whether ``path`` is a visible file whose suffix (any case) is one of ``suffixes``."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in suffixes


def _pixels_of(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in _GRAY_MODES:
        return np.asarray(img).astype(np.float32)
    if mode == "1":
        return np.asarray(img.convert("L")).astype(np.float32)
    if mode in ("LA", "La"):
        return np.asarray(img.getchannel(0)).astype(np.float32)
    # P, RGB, RGBA, CMYK, YCbCr, LAB, HSV ...: through RGB to luminance.
    return luminance(np.asarray(img.convert("RGB")))


def read_image_file(path: Path) -> np.ndarray:
    """Read a PNG/JPEG/TIFF (or any PIL-readable) file as 2-D float32 luminance.

    The whole file is decoded (a truncated file fails here, not later). 16-bit grayscale keeps
    its 16-bit values; colour images become luminance (ITU-R 601 weights); only the first frame
    of a multi-frame file is read; EXIF orientation is ignored.

    Args:
        path: The image file.

    Returns:
        A 2-D float32 array in the file's own intensity units.

    Raises:
        QuarantineError: ``empty_file``, ``truncated``, ``not_an_image``, ``absurd_size`` or
            ``unreadable``, each followed by ``": "`` and detail naming the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise QuarantineError(f"unreadable: {path.name}: {exc.strerror or exc}") from exc
    if size == 0:
        raise QuarantineError(f"empty_file: {path.name} has zero bytes")
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning becomes the error below instead of a log line.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # force the full decode so truncation shows up now
                return _pixels_of(img)
    except UnidentifiedImageError as exc:
        raise QuarantineError(f"not_an_image: {path.name} is not a readable image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise QuarantineError(f"absurd_size: {path.name}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports a cut-off JPEG/PNG as OSError("image file is truncated ...") and some
        # broken PNG chunks as SyntaxError; everything else is plainly unreadable.
        text = str(exc)
        slug = "truncated" if "truncated" in text.lower() else "unreadable"
        raise QuarantineError(f"{slug}: {path.name}: {text}") from exc


def axial_slice(volume: np.ndarray, index: int) -> np.ndarray:
    """The 2-D slice ``index`` along the last axis of a volume from the volume readers."""
    return np.ascontiguousarray(volume[:, :, index], dtype=np.float32)


def foreground_fractions(volume: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Per slice (last axis), the fraction of pixels above ``threshold`` of the volume's range.

    The range runs from the volume minimum to its 99th percentile, so a few hot voxels do not
    hide the brain. Non-finite voxels count as background.

    Args:
        volume: 3-D array, slices on the last axis.
        threshold: Foreground level as a fraction of the robust intensity range.

    Returns:
        float64 array with one fraction per slice.
    """
    finite = np.isfinite(volume)
    if not finite.any():
        return np.zeros(volume.shape[-1])
    values = volume[finite]
    low = float(values.min())
    high = float(np.percentile(values, 99))
    if high - low <= 0:
        return np.zeros(volume.shape[-1])
    with np.errstate(invalid="ignore"):
        mask = finite & ((volume - low) > threshold * (high - low))
    return mask.mean(axis=(0, 1))


def select_slices(
    volume: np.ndarray,
    max_slices: int | None = 16,
    listed: Sequence[int] | None = None,
    min_fraction: float = 0.05,
    threshold: float = 0.1,
) -> list[int]:
    """Choose the slice indices (last axis) of a volume that become samples.

    Args:
        volume: 3-D array, slices on the last axis.
        max_slices: At most this many slices, evenly spaced among those with brain; ``None`` or
            0 keeps them all. Ignored when ``listed`` is given.
        listed: Explicit slice indices (from a labels table); used as given (sorted, unique).
        min_fraction: A slice has brain when at least this fraction of it is foreground.
        threshold: Foreground level (see :func:`foreground_fractions`).

    Returns:
        Sorted slice indices; empty when no slice has brain.

    Raises:
        QuarantineError: ``bad_slice_index`` when a listed index is outside the volume.
    """
    depth = volume.shape[-1]
    if listed is not None:
        chosen = sorted({int(i) for i in listed})
        outside = [i for i in chosen if not 0 <= i < depth]
        if outside:
            raise QuarantineError(
                f"bad_slice_index: slices {outside} are outside the volume's {depth} slices"
            )
        return chosen
    candidates = np.flatnonzero(foreground_fractions(volume, threshold) >= min_fraction)
    if max_slices and len(candidates) > max_slices:
        # Evenly spaced positions across the brain, ends included.
        picks = np.linspace(0, len(candidates) - 1, max_slices).round().astype(int)
        candidates = candidates[np.unique(picks)]
    return [int(i) for i in candidates]
