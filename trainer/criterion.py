"""The classifier's training loss: cross-entropy with class weights and label smoothing.

``train.class_weights`` and ``train.label_smoothing`` go to :func:`torch.nn.functional.
cross_entropy`'s own ``weight`` and ``label_smoothing`` arguments, so the loss is torch's
(a weighted batch mean divides by the summed weights of the batch's targets):

* ``none``: no weights;
* ``auto``: the inverse class frequency of the training split, normalised to mean 1 over the
  classes; the counts are those ``index.json`` records (:func:`shards.labels.split_class_counts`
  reads the shards' labels when it records none);
* a list: one positive weight per class, in the order of the shard set's classes.

Only the training loss is weighted and smoothed. The validation loss stays the plain mean
cross-entropy of the validation samples: a measure of the model that does not change with the
training objective, so runs (and tuning trials) with other weights or smoothing compare on it;
accuracy, balanced accuracy and the other metrics are not losses and never change with either.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from shards.format import DatasetIndex
from shards.labels import split_class_counts
from srmri.config import ConfigError
from trainer.config import TrainConfig, TrainSection

__all__ = ["TrainLoss", "class_weights", "train_class_counts"]


def train_class_counts(cfg: TrainConfig, index: DatasetIndex) -> list[int] | None:
    """The training split's samples per class when the run's loss needs them, else None.

    Args:
        cfg: The run's config.
        index: ``data.root``'s index.

    Returns:
        One count per class of ``index.classes`` for a classifier with ``class_weights: auto``;
        None otherwise (nothing is read).
    """
    if cfg.task != "classify" or cfg.train.class_weights != "auto":
        return None
    return split_class_counts(cfg.data.root, index, cfg.data.train_split)


def class_weights(
    setting: str | Sequence[float], classes: Sequence[str], counts: Sequence[int] | None
) -> torch.Tensor | None:
    """The cross-entropy class weights ``train.class_weights`` asks for.

    Args:
        setting: ``none``, ``auto`` or one weight per class.
        classes: The shard set's classes, in order.
        counts: The training split's samples per class (needed for ``auto``).

    Returns:
        float32 weights, one per class, or None for ``none``.

    Raises:
        ConfigError: Naming ``train.class_weights``, for a list of the wrong length, or
            ``auto`` when a class has no training sample (its inverse frequency is infinite).
        ValueError: For ``auto`` without counts.
    """
    if setting == "none":
        return None
    if setting == "auto":
        if counts is None:
            raise ValueError("train.class_weights=auto needs the training split's class counts")
        empty = [c for c, n in zip(classes, counts, strict=True) if n <= 0]
        if empty:
            raise ConfigError(
                f"train.class_weights: auto weighs each class by its inverse frequency, but "
                f"the training split has no sample of {empty}; give one weight per class "
                f"({', '.join(classes)}) as a list"
            )
        inverse = 1.0 / torch.tensor(counts, dtype=torch.float64)
        return (inverse / inverse.mean()).float()
    weights = list(setting)
    if len(weights) != len(classes):
        raise ConfigError(
            f"train.class_weights: {len(weights)} weights given, but the shard set has "
            f"{len(classes)} classes ({', '.join(classes)}); give one weight per class, in "
            "that order"
        )
    return torch.tensor(weights, dtype=torch.float32)


class TrainLoss:
    """Cross-entropy with the run's class weights and label smoothing (see the module).

    Args:
        train: The run's ``train`` section.
        classes: The shard set's classes, in order.
        counts: The training split's samples per class (for ``class_weights: auto``).
    """

    def __init__(
        self, train: TrainSection, classes: Sequence[str], counts: Sequence[int] | None
    ) -> None:
        self.weight = class_weights(train.class_weights, classes, counts)
        self.label_smoothing = train.label_smoothing

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch of ``logits`` ``[B, C]`` against class indices ``target``."""
        weight = self.weight
        if weight is not None and weight.device != logits.device:
            weight = self.weight = weight.to(logits.device)  # moved once, not every step
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=self.label_smoothing)
