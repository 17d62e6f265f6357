"""Training precision: the one ``Precision`` literal and the autocast dtype each value means.

``fp32`` runs without autocast; ``bf16`` and ``fp16`` autocast to that dtype (fp16 training adds
a grad scaler, which is the backend's business). The config, the backends and evaluation all
read precision through here, so the names and their dtypes cannot drift apart.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

__all__ = ["Precision", "autocast", "autocast_dtype"]

Precision = Literal["fp32", "bf16", "fp16"]

_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of ``precision``.

    Args:
        precision: fp32, bf16 or fp16.

    Returns:
        ``torch.bfloat16`` or ``torch.float16``; None for fp32 (no autocast).
    """
    return _DTYPES.get(precision)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[None]:
    """An autocast context on ``device`` for ``precision`` (disabled for fp32).

    Args:
        device: Where the forward runs (its type picks the autocast backend).
        precision: fp32, bf16 or fp16.

    Returns:
        The context manager.
    """
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
