"""The classifier's input kinds: one spelling of ``hr|lr|sr|lr+sr`` and the tests on them.

``data.inputs`` of a trainer run, the pipeline's ``arms`` and the loader transform all name an
input kind; this module is the only place that lists them or decides which of them read the
enhanced (SR) shard set, so adding a kind cannot leave one of those behind.
"""

from __future__ import annotations

from typing import Literal, cast, get_args

__all__ = ["INPUT_KINDS", "InputKind", "check_input_kind", "needs_sr", "path_safe"]

InputKind = Literal["hr", "lr", "sr", "lr+sr"]
INPUT_KINDS: tuple[InputKind, ...] = get_args(InputKind)
_NEEDS_SR: frozenset[str] = frozenset({"sr", "lr+sr"})


def needs_sr(kind: str) -> bool:
    """Whether input kind ``kind`` reads the enhanced shard set (``sr`` and ``lr+sr``).

    Args:
        kind: An input kind.

    Returns:
        True when the run needs ``data.sr_root`` (and the pipeline an SR stage).
    """
    return kind in _NEEDS_SR


def path_safe(kind: str) -> str:
    """The spelling of ``kind`` used in run directory names (``lr+sr`` becomes ``lr-sr``).

    Args:
        kind: An input kind.

    Returns:
        ``kind`` with ``+`` replaced by ``-``.
    """
    return kind.replace("+", "-")


def check_input_kind(kind: str) -> InputKind:
    """Return ``kind`` if it is an input kind.

    Args:
        kind: The value to check.

    Returns:
        ``kind``, typed as an :data:`InputKind`.

    Raises:
        ValueError: If it is not one of :data:`INPUT_KINDS`.
    """
    if kind not in INPUT_KINDS:
        listed = ", ".join(INPUT_KINDS[:-1]) + f" or {INPUT_KINDS[-1]}"
        raise ValueError(f"inputs must be {listed}, got {kind!r}")
    return cast(InputKind, kind)
