"""The classifier task: cross-entropy over a timm model's logits, metrics per split.

Split out of :mod:`trainer.task` so that :mod:`trainer.tsr_task` can build on it while
:func:`trainer.task.create_task` picks between them without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from srmri.distributed import all_gather_objects
from trainer.augment import create_augmentation
from trainer.backend import Backend
from trainer.batch import Prepare, TaskBatch, Transform
from trainer.config import TrainConfig
from trainer.criterion import TrainLoss
from trainer.factories import create_classifier
from trainer.inputs import InputTransform, aligned_roots_for
from trainer.metrics import ClassificationMetrics

__all__ = ["ClassificationTask"]


class ClassificationTask:
    """Cross-entropy classification of slices with a timm model.

    The network has one input channel per image of ``data.inputs`` (two for ``lr|sr``: LR and
    SR stacked, see :mod:`trainer.inputs`), taken from the config so evaluation rebuilds it.

    Args:
        cfg: The run config.
        classes: Class names of the shard set (the model gets one output per class).
        train_counts: The training split's samples per class, which ``class_weights: auto``
            needs to train (:func:`trainer.criterion.train_class_counts`); evaluation needs
            none.

    Raises:
        ConfigError: If ``train.class_weights`` does not fit the classes.
    """

    best_metric = "balanced_accuracy"
    best_mode: Literal["max", "min"] = "max"

    def __init__(
        self, cfg: TrainConfig, classes: list[str], train_counts: Sequence[int] | None = None
    ) -> None:
        if len(classes) < 2:
            raise ValueError(f"{cfg.data.root}: classification needs >= 2 classes, has {classes}")
        self.cfg = cfg
        self.classes = list(classes)
        # Evaluation builds the task without the training split's counts; it never trains.
        auto = cfg.train.class_weights == "auto"
        self.loss = (
            None if auto and train_counts is None else TrainLoss(cfg.train, classes, train_counts)
        )
        self.metrics = ClassificationMetrics(len(classes), self.classes)
        self._rows: list[tuple[str, int, list[float]]] = []
        self._loss = torch.zeros(2, dtype=torch.float64)
        self.predictions: list[tuple[str, int, list[float]]] = []

    def build_model(self, pretrained: bool = True) -> nn.Module:
        return create_classifier(self.cfg, len(self.classes), pretrained)

    def transform(self, train: bool) -> Transform | None:
        d = self.cfg.data
        augmentation = create_augmentation(self.cfg.augment) if train else None
        return InputTransform(
            d.inputs, d.degrade, d.upsample, self.cfg.train.seed, train, augmentation
        )

    def aligned_roots(self) -> list[str]:
        return aligned_roots_for(self.cfg.data.inputs, self.cfg.data.sr_root)

    def train_loss(self, backend: Backend, batch: TaskBatch) -> tuple[torch.Tensor, int]:
        images, labels = batch["image"], batch["label"]
        if "image2" in batch:  # lr+sr: the second view is another sample with the same label
            images = torch.cat([images, batch["image2"]])
            labels = torch.cat([labels, labels])
        logits = backend.model(backend.to_input(images))
        target = labels.to(backend.device, non_blocking=True)
        loss = self.loss or TrainLoss(self.cfg.train, self.classes, None)  # None: raises
        return loss(logits.float(), target), int(labels.shape[0])

    def eval_reset(self, device: torch.device) -> None:
        self.metrics.to(device)
        self.metrics.reset()
        self._rows = []
        self._loss = torch.zeros(2, dtype=torch.float64, device=device)

    def eval_update(self, model: nn.Module, batch: TaskBatch, prepare: Prepare) -> None:
        self.score(model(prepare(batch["image"])).float(), batch)

    def score(self, logits: torch.Tensor, batch: TaskBatch) -> None:
        """Add one batch's logits to the validation metrics, loss and prediction rows.

        Args:
            logits: FloatTensor[B, classes] of the batch's images.
            batch: The batch (its ``label``, ``valid`` and ``key`` are read).
        """
        target = batch["label"].to(logits.device)
        valid = batch["valid"].to(logits.device).bool()
        self.metrics.update(logits, target, valid)
        # Unweighted and unsmoothed whatever the training loss is (see trainer.criterion).
        losses = F.cross_entropy(logits, target, reduction="none")[valid]
        self._loss[0] += losses.sum().double()
        self._loss[1] += losses.numel()
        probs = logits.softmax(dim=1)[valid].cpu().tolist()
        keys = [k for k, v in zip(batch["key"], valid.tolist()) if v]
        labels = target[valid].cpu().tolist()
        self._rows.extend(zip(keys, labels, probs))

    def eval_compute(self) -> dict[str, Any]:
        results = self.metrics.compute()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self._loss)
        total, count = self._loss.tolist()
        results["loss"] = total / count if count else float("nan")
        self.predictions = [row for rows in all_gather_objects(self._rows) for row in rows]
        return results

    def write_reports(self, run_dir: Path, split: str, results: dict[str, Any]) -> None:
        from trainer.plots import plot_confusion
        from trainer.rundir import predictions_path, write_predictions

        path = predictions_path(run_dir, split, is_val=split == self.cfg.data.val_split)
        write_predictions(path, self.predictions, self.classes)
        if results.get("confusion_matrix") is not None:
            plot_confusion(
                results["confusion_matrix"], self.classes, run_dir / f"confusion_{split}.png"
            )
