"""The classifier's input kinds: one spelling of ``hr|lr|sr|lr+sr|lr|sr`` and the tests on them.

``data.inputs`` of a trainer run, the pipeline's ``arms`` and the loader transform all name an
input kind; this module is the only place that lists them, decides which of them read the
enhanced (SR) shard set and which images the network gets as its input channels, so adding a
kind cannot leave one of those behind.

``lr+sr`` and ``lr|sr`` both use the LR image and its SR image: ``lr+sr`` trains on them as two
separate one-channel samples (and scores the SR image), ``lr|sr`` stacks them as the two
channels of one sample (channel 0 LR, channel 1 SR), so its network has two input channels.
"""

from __future__ import annotations

from typing import Literal, cast, get_args

__all__ = [
    "INPUT_KINDS",
    "InputKind",
    "check_input_kind",
    "input_channels",
    "needs_sr",
    "path_safe",
]

InputKind = Literal["hr", "lr", "sr", "lr+sr", "lr|sr"]
INPUT_KINDS: tuple[InputKind, ...] = get_args(InputKind)
_NEEDS_SR: frozenset[str] = frozenset({"sr", "lr+sr", "lr|sr"})
# The images evaluation and inference feed the network, one per input channel, in order.
# lr+sr trains on both images but scores the SR one (see trainer.inputs), so it has one channel.
_CHANNELS: dict[str, tuple[str, ...]] = {
    "hr": ("hr",),
    "lr": ("lr",),
    "sr": ("sr",),
    "lr+sr": ("sr",),
    "lr|sr": ("lr", "sr"),
}
# Run directory names: "+" and "|" are awkward in paths and shells ("|" is a pipe).
_PATH_NAMES: dict[str, str] = {"lr+sr": "lr-sr", "lr|sr": "lr-sr-2ch"}


def needs_sr(kind: str) -> bool:
    """Whether input kind ``kind`` reads the enhanced shard set (``sr``, ``lr+sr``, ``lr|sr``).

    Args:
        kind: An input kind.

    Returns:
        True when the run needs ``data.sr_root`` (and the pipeline an SR stage).
    """
    return kind in _NEEDS_SR


def input_channels(kind: str) -> tuple[str, ...]:
    """The images the network gets at evaluation and inference, one per input channel.

    Args:
        kind: An input kind.

    Returns:
        Image names in channel order, each ``hr``, ``lr`` or ``sr``: ``("lr", "sr")`` for
        ``lr|sr``, one name for every other kind. Its length is the model's ``in_chans``.

    Raises:
        ValueError: If ``kind`` is not an input kind.
    """
    return _CHANNELS[check_input_kind(kind)]


def path_safe(kind: str) -> str:
    """The spelling of ``kind`` used in run directory names.

    Args:
        kind: An input kind.

    Returns:
        ``lr-sr`` for ``lr+sr``, ``lr-sr-2ch`` for ``lr|sr``, any other kind unchanged.
    """
    return _PATH_NAMES.get(kind, kind)


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
