"""What counts as the greyscale MRI slice a classifier expects, checked before it is classified.

MRI is one channel. An image file stored as RGB is accepted when its channels agree (how grey
scans are often saved, JPEG chroma noise included); a colour picture is refused: more than
:data:`MAX_COLOUR_FRACTION` of its pixels have channels more than :data:`COLOUR_SPREAD` (of 255)
apart. NIfTI and DICOM inputs are one channel by construction; their modality (CT vs MR) is not
checked here. An unusable size (a side under the preprocessing's ``min_size``, or a head region
too small to crop) is refused by :func:`shards.preprocess.preprocess`, naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from shards.sources import QuarantineError

__all__ = ["COLOUR_SPREAD", "MAX_COLOUR_FRACTION", "check_greyscale"]

COLOUR_SPREAD = 32
MAX_COLOUR_FRACTION = 0.01
_ONE_CHANNEL = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def check_greyscale(path: Path) -> None:
    """Refuse an image file whose pixels are in colour.

    Args:
        path: An image file (PNG, JPEG, TIFF).

    Raises:
        QuarantineError: ``colour_image``, naming the file and the share of colour pixels.
            Unreadable files pass here: the reader then says why it cannot read them.
    """
    try:
        with Image.open(path) as img:
            if img.mode in _ONE_CHANNEL:
                return
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    except (OSError, SyntaxError, ValueError, EOFError):
        return
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    share = float(np.mean(spread > COLOUR_SPREAD))
    if share > MAX_COLOUR_FRACTION:
        raise QuarantineError(
            f"colour_image: {Path(path).name} is a colour picture ({share:.0%} of its pixels "
            "in colour); the model expects a greyscale MRI slice"
        )
