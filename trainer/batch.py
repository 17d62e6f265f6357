"""What a task's transform adds to the loader's records: :class:`TaskSample` and :class:`TaskBatch`.

The loader's own keys are documented in :mod:`shards.sample`; the classify and SR transforms
(:mod:`trainer.inputs`, :mod:`trainer.sr_task`) replace ``image`` with the run's input and may
add the keys below. A training step and the evaluation read only keys listed here or there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shards.sample import Batch, Sample

__all__ = ["Prepare", "TaskBatch", "TaskSample", "Transform"]


class TaskSample(Sample, total=False):
    """A sample after the task's transform.

    Keys (besides :class:`shards.sample.Sample`'s):
        image: The model's input: the HR, LR (degraded and upsampled back), or SR image of
            the run's ``data.inputs``, ``[1,H,W]``; for ``lr|sr`` the LR and SR images as
            channels 0 and 1, ``[2,H,W]``; for the SR task, the LR input at its small size.
        image2: ``lr+sr`` in training only: the key's second view (SR), a separate training
            sample with the same label.
        target: SR task only: the HR image (or patch) the network must reproduce.
    """

    image2: torch.Tensor
    target: torch.Tensor


class TaskBatch(Batch, total=False):
    """A collated batch of :class:`TaskSample`: ``image2`` and ``target`` are ``[B,1,H,W]``."""

    image2: torch.Tensor
    target: torch.Tensor


# A task's per-sample loader transform (run in the loader's workers).
Transform = Callable[[Sample], TaskSample]
# Moves an evaluation batch's images to the model's device and memory format.
Prepare = Callable[[torch.Tensor], torch.Tensor]
