"""Collating samples into a batch, with stored intensities (uint16) turned into float32 once.

A uint16 tensor in a sample is a stored image (intensity = value / 65535); the batch the
loader delivers holds it as float32 in [0, 1]. :class:`Collator` writes each tensor entry into
memory an ``alloc`` function provides: float32 memory for uint16 entries (the conversion is
then part of the copy), or uint16 memory in a worker's shared ring, converted by
:func:`to_float` in the main process. Converting row by row (a copy, then a scale in place,
each over 200 KB that stays in cache) measured 2-3x faster than one pass over a whole 12.8 MB
batch and than numpy's or torch's mixed-dtype multiply (not vectorised for uint16). The result
is bit-identical to ``np.float32(value) * np.float32(1 / 65535)``, the loader's conversion
since issue 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

__all__ = ["Alloc", "Collator", "collate", "fresh_alloc", "to_float"]

INV_U16 = 1.0 / 65535.0
# (shape, dtype) -> uninitialised tensor the stacked values are written into.
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def fresh_alloc(convert: bool, pin: bool = False) -> Alloc:
    """An ``Alloc`` of new tensors; with ``convert``, uint16 entries get float32 memory."""

    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if convert and dtype == torch.uint16:
            dtype = torch.float32
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    return alloc


def _copy_row(row: torch.Tensor, value: torch.Tensor) -> None:
    """``row[...] = value``; a uint16 value into a float32 row is scaled into [0, 1]."""
    row.copy_(value)
    if value.dtype != row.dtype:
        if value.dtype != torch.uint16 or row.dtype != torch.float32:
            raise TypeError(f"cannot collate {value.dtype} into {row.dtype}")
        row.mul_(INV_U16)


def to_float(batch: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """A new float32 copy of a uint16 batch ``[B,...]``, scaled into [0, 1] row by row."""
    out = torch.empty(batch.shape, dtype=torch.float32, pin_memory=pin)
    for row, value in zip(out, batch):
        _copy_row(row, value)
    return out


class Collator:
    """Collates ``size`` samples one at a time, each tensor written into its batch row at once.

    Writing a sample's tensors while it is still in the CPU caches (right after its transform)
    measured 5x cheaper than stacking the whole batch afterwards (133 us against 7 us per
    224x224 image for the uint16-to-float32 copy), since by then the batch's 8 MB of images
    have left the caches.

    Args:
        size: Samples in the batch.
        alloc: Provides the memory of each stacked tensor (see :data:`Alloc`).
    """

    def __init__(self, size: int, alloc: Alloc) -> None:
        self.size, self.alloc = size, alloc
        self.n = 0
        self.columns: dict[str, Any] = {}

    def add(self, sample: dict[str, Any]) -> None:
        """Write one sample (with the same keys as the first) into the next row."""
        if self.n == 0:
            self.columns = {k: self._column(v) for k, v in sample.items()}
        elif sample.keys() != self.columns.keys():
            raise ValueError(f"sample keys {sorted(sample)} differ from {sorted(self.columns)}")
        for key, value in sample.items():
            _put(self.columns[key], self.n, value, key)
        self.n += 1

    def _column(self, first: Any) -> Any:
        if isinstance(first, torch.Tensor):
            return self.alloc((self.size, *first.shape), first.dtype)
        if isinstance(first, list) and first and all(isinstance(v, torch.Tensor) for v in first):
            return [self._column(v) for v in first]
        return []  # values kept as they are, collated at the end

    def finish(self) -> dict[str, Any]:
        """The batch: tensors ``[B,...]``, lists of tensors as lists of stacked tensors, bools
        and ints as tensors, strings as lists; anything else as ``default_collate`` makes it."""
        if self.n != self.size:
            raise ValueError(f"collated {self.n} samples of {self.size}")
        return {key: self._finish(column) for key, column in self.columns.items()}

    def _finish(self, column: Any) -> Any:
        if isinstance(column, torch.Tensor):
            return column
        if column and all(isinstance(c, torch.Tensor) for c in column):
            return column  # a list of stacked tensors (aligned images)
        first = column[0]
        if isinstance(first, str):
            return column
        if isinstance(first, (bool, int)):
            dtype = torch.bool if isinstance(first, bool) else torch.int64
            return self.alloc((len(column),), dtype).copy_(torch.tensor(column, dtype=dtype))
        return default_collate(column)


def _put(column: Any, row: int, value: Any, key: str) -> None:
    if isinstance(column, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != column.shape[1:]:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"sample {key!r} is {got}, the batch's first is {column.shape[1:]}")
        _copy_row(column[row], value)
    elif column and isinstance(column[0], torch.Tensor) and isinstance(value, list):
        for sub, v in zip(column, value, strict=True):
            _put(sub, row, v, key)
    else:
        column.append(value)


def collate(samples: Sequence[dict[str, Any]], alloc: Alloc) -> dict[str, Any]:
    """Collate samples like ``default_collate``, tensors stacked into ``alloc``'s memory.

    Args:
        samples: Samples with the same keys.
        alloc: Provides the memory of each stacked tensor (see :data:`Alloc`).

    Returns:
        The batch (see :meth:`Collator.finish`).
    """
    collator = Collator(len(samples), alloc)
    for sample in samples:
        collator.add(sample)
    return collator.finish()
