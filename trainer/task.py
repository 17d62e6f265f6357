"""What a training task supplies to the one training loop: model, inputs, loss, validation.

The loop (``trainer.loop``) knows nothing about classes, logits or images; it asks the task. A
task is built from the run config and the training split's class names and provides:

* ``build_model(pretrained)``: the unwrapped network (``pretrained=False`` where trained
  weights are loaded next, so no initialisation file is read);
* ``transform(train)`` and ``aligned_roots()``: the per-sample loader transform and any
  key-aligned shard sets it reads;
* ``train_loss(backend, batch)``: the loss of one micro-batch (called inside the backend's
  ``micro_step`` context), and how many samples it covered;
* ``eval_reset`` / ``eval_update`` / ``eval_compute``: a validation pass whose compute is
  synchronised over ranks;
* ``best_metric`` / ``best_mode``: what "best" means for checkpoints and early stopping;
* ``write_reports(run_dir, split, results)``: rank 0's per-split files (predictions, figures).

:class:`ClassificationTask` is the classifier; its training loss honours ``train.class_weights``
and ``train.label_smoothing`` (:mod:`trainer.criterion`), its validation loss is the plain
cross-entropy. The SR task (:mod:`trainer.sr_task`) and the task-driven SR classifier of input
kind ``tsr`` (:mod:`trainer.tsr_task`) implement the same protocol; :func:`create_task` picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from trainer.backend import Backend
from trainer.batch import Prepare, TaskBatch, Transform
from trainer.classify_task import ClassificationTask
from trainer.config import TrainConfig
from trainer.input_kind import trains_sr
from trainer.sr_task import SRTask
from trainer.tsr_task import TSRTask

__all__ = ["ClassificationTask", "Prepare", "Task", "Transform", "create_task"]


class Task(Protocol):
    """The task-specific half of a training run (see the module docstring)."""

    best_metric: str
    best_mode: Literal["max", "min"]

    def build_model(self, pretrained: bool = True) -> nn.Module: ...

    def transform(self, train: bool) -> Transform | None: ...

    def aligned_roots(self) -> list[str]: ...

    def train_loss(self, backend: Backend, batch: TaskBatch) -> tuple[torch.Tensor, int]: ...

    def eval_reset(self, device: torch.device) -> None: ...

    def eval_update(self, model: nn.Module, batch: TaskBatch, prepare: Prepare) -> None: ...

    def eval_compute(self) -> dict[str, Any]: ...

    def write_reports(self, run_dir: Path, split: str, results: dict[str, Any]) -> None: ...


def create_task(
    cfg: TrainConfig, classes: list[str], train_counts: Sequence[int] | None = None
) -> Task:
    """The task the config names.

    Args:
        cfg: The run config.
        classes: The shard set's classes.
        train_counts: The training split's samples per class (a classifier trained with
            ``class_weights: auto`` needs them; see :class:`ClassificationTask`).

    Returns:
        The task.

    Raises:
        ValueError: If the task is not available.
    """
    if cfg.task == "classify" and trains_sr(cfg.data.inputs):
        return TSRTask(cfg, classes, train_counts)
    if cfg.task == "classify":
        return ClassificationTask(cfg, classes, train_counts)
    if cfg.task == "sr":
        return SRTask(cfg, classes)
    raise ValueError(f"task={cfg.task!r} is not available (classify or sr)")
