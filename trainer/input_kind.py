"""The classifier's input kinds: one spelling of ``hr|lr|sr|lr+sr|lr|sr|tsr`` and their tests.

``data.inputs`` of a trainer run, the pipeline's ``arms`` and the loader transform all name an
input kind; this module is the only place that lists them, decides which of them read the
enhanced (SR) shard set, which carry the SR stage's network inside the classifier, and which
images the network gets as its input channels, so adding a kind cannot leave one of those behind.

``lr+sr`` and ``lr|sr`` both use the LR image and its SR image: ``lr+sr`` trains on them as two
separate one-channel samples (and scores the SR image), ``lr|sr`` stacks them as the two
channels of one sample (channel 0 LR, channel 1 SR), so its network has two input channels.

``tsr`` (task-driven SR) reads no enhanced shard set: its model is the SR stage's network
(initialised from that run, ``model.sr_init``) followed by the classifier, fed the LR image at
its small size and fine-tuned jointly (:mod:`trainer.tsr_task`). It needs the SR *stage* but not
``enhance``: :func:`needs_sr` is false for it, :func:`trains_sr` and :func:`needs_sr_stage` true.
"""

from __future__ import annotations

from typing import Literal, cast, get_args

__all__ = [
    "INPUT_KINDS",
    "InputKind",
    "check_input_kind",
    "input_channels",
    "needs_sr",
    "needs_sr_stage",
    "path_safe",
    "refuse_trained_sr",
    "trains_sr",
]

InputKind = Literal["hr", "lr", "sr", "lr+sr", "lr|sr", "tsr"]
INPUT_KINDS: tuple[InputKind, ...] = get_args(InputKind)
_NEEDS_SR: frozenset[str] = frozenset({"sr", "lr+sr", "lr|sr"})
# Kinds whose model contains the SR stage's network and trains it on (no enhanced set read).
_TRAINS_SR: frozenset[str] = frozenset({"tsr"})
# The images evaluation and inference feed the network, one per input channel, in order.
# lr+sr trains on both images but scores the SR one (see trainer.inputs), so it has one channel.
_CHANNELS: dict[str, tuple[str, ...]] = {
    "hr": ("hr",),
    "lr": ("lr",),
    "sr": ("sr",),
    "lr+sr": ("sr",),
    "lr|sr": ("lr", "sr"),
    # tsr: the LR image at its small size (the SR network inside the model upsamples it).
    "tsr": ("lr",),
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


def trains_sr(kind: str) -> bool:
    """Whether input kind ``kind``'s model holds an SR network trained with the classifier.

    Args:
        kind: An input kind.

    Returns:
        True for ``tsr``: the run starts from the SR run ``model.sr_init`` names, feeds the
        model LR images at their small size and adds ``train.recon_weight`` x L1 to its loss.
    """
    return kind in _TRAINS_SR


def needs_sr_stage(kind: str) -> bool:
    """Whether a pipeline arm of input kind ``kind`` needs the SR stage's trained network.

    Args:
        kind: An input kind.

    Returns:
        True for the kinds reading the enhanced set (they need ``enhance`` too, see
        :func:`needs_sr`) and for the kinds that fine-tune the SR network (:func:`trains_sr`).
    """
    return needs_sr(kind) or trains_sr(kind)


def refuse_trained_sr(kind: str, where: object, action: str) -> None:
    """Refuse to serve a model whose input kind carries a fine-tuned SR network (``tsr``).

    ``trainer predict``, ``trainer export`` and model folders preprocess images to the
    stored size and bundle an SR model as enhance ran it; a tsr model takes the LR image at its
    small size instead, through its own SR part, which none of them can feed yet.

    Args:
        kind: The checkpoint's input kind.
        where: What is refused (a checkpoint path), named in the message.
        action: The command refusing it, e.g. ``trainer export``.

    Raises:
        ValueError: For a kind that :func:`trains_sr`, naming it; ``trainer evaluate`` scores it.
    """
    if trains_sr(kind):
        raise ValueError(
            f"{where}: {action} does not take inputs={kind} models (an SR network fine-tuned "
            "with the classifier, fed LR images at their small size); score it with "
            "trainer evaluate"
        )


def input_channels(kind: str) -> tuple[str, ...]:
    """The images the network gets at evaluation and inference, one per input channel.

    Args:
        kind: An input kind.

    Returns:
        Image names in channel order, each ``hr``, ``lr`` or ``sr``: ``("lr", "sr")`` for
        ``lr|sr``, one name for every other kind (``lr`` for ``tsr``, there the LR image at
        its small size, which the model's own SR network upsamples). Its length is the
        classifier's ``in_chans``.

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
