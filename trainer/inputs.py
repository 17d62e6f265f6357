"""Input selection: which image the model sees, as a per-sample transform run in loader workers.

* ``hr``: the stored image.
* ``lr``: the stored image degraded (:func:`shards.degrade.degrade`) and brought back to the
  stored size (:func:`shards.degrade.upsample_to`). Training draws a new degradation per epoch
  from ``(seed, epoch, digest)`` (the sample's payload digest, never its key, which depends on
  the ingest secret); evaluation uses ``epoch = EVAL_EPOCH``, so a sample always gets the same
  LR image (the same one ``shards enhance`` starts from when it uses the run's seed).
* ``sr``: the key-aligned image of the enhanced shard set (``aligned_roots=[sr_root]``).
* ``lr+sr``: training emits both, ``image`` (LR) and ``image2`` (SR); the task concatenates
  them along the batch so each step trains on both as separate samples (the paper's setting)
  while loader step counts stay exact. Evaluation scores the SR image alone: it is the input
  the deployed pipeline classifies, and keeping one image per key keeps "each validation
  sample counted once" literally true.
* ``lr|sr``: one sample of two channels, ``[2, H, W]``: channel 0 the LR image (drawn as for
  ``lr``, per epoch in training), channel 1 the key's SR image, in training and evaluation
  alike; the network is built with two input channels
  (:func:`trainer.input_kind.input_channels`).

Augmentation (train only) runs after input selection, with its own generator from
``(seed, epoch, digest + "#augment")`` so it never shares draws with the degradation. The two
channels of ``lr|sr`` are augmented one at a time, each with a fresh generator of that same
seed: the augmentation's draws never depend on the pixels, so both get the same flips, the same
rotation, zoom and shift and the same noise field, and the LR channel gets exactly the
augmentation the ``lr`` arm's image gets. Adding an input kind means changing this file and
:mod:`trainer.input_kind` (which lists the kinds, says which read the SR shard set and which
images are the network's input channels); the loop never sees which one is in use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import torch

from shards.degrade import EVAL_EPOCH, DegradeConfig, degrade, sample_generator, upsample_to
from shards.sample import Sample
from trainer.batch import TaskSample
from trainer.input_kind import InputKind, check_input_kind, needs_sr, trains_sr

__all__ = ["InputKind", "InputTransform", "aligned_roots_for"]

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def aligned_roots_for(inputs: InputKind, sr_root: str) -> list[str]:
    """The aligned shard sets the loader must read for ``inputs``.

    Args:
        inputs: The input kind.
        sr_root: The enhanced shard set (used by ``sr``, ``lr+sr`` and ``lr|sr``).

    Returns:
        ``[sr_root]`` for inputs that need the SR images, else ``[]``.
    """
    return [sr_root] if needs_sr(inputs) else []


class InputTransform:
    """Picklable per-sample transform: select the input image(s), then augment (train only).

    Args:
        inputs: hr, lr, sr, lr+sr or lr|sr.
        degrade_cfg: The degradation for ``lr``.
        upsample: How the LR image returns to the stored size (bicubic or zero_fill).
        seed: The run seed (degradation and augmentation generators derive from it).
        train: Training mode (random per epoch, augmentation on) or evaluation.
        augmentation: ``(image, generator) -> image`` or None.
    """

    def __init__(
        self,
        inputs: InputKind,
        degrade_cfg: DegradeConfig,
        upsample: Literal["bicubic", "zero_fill"],
        seed: int,
        train: bool,
        augmentation: Augmentation | None = None,
    ) -> None:
        self.inputs = check_input_kind(inputs)
        if trains_sr(inputs):  # its model takes the LR image at its small size, with its target
            raise ValueError(f"inputs={inputs}: its transform is trainer.tsr_task.TSRTransform")
        self.degrade_cfg = degrade_cfg
        self.upsample = upsample
        self.seed = seed
        self.train = train
        self.augmentation = augmentation if train else None

    def _epoch(self, sample: Sample) -> int:
        return int(sample["epoch"]) if self.train else EVAL_EPOCH

    def _lr(self, image: torch.Tensor, name: str, epoch: int) -> torch.Tensor:
        generator = sample_generator(self.seed, epoch, name)
        small, _ = degrade(image, self.degrade_cfg, generator)
        return upsample_to(small, (image.shape[-2], image.shape[-1]), self.upsample)

    def _sr(self, sample: Sample) -> torch.Tensor:
        aligned = sample.get("aligned") or []
        if not aligned:
            raise ValueError(
                f"sample {sample['key']!r}: inputs={self.inputs} needs the SR image but the "
                "loader gave no aligned image (is data.sr_root set?)"
            )
        return aligned[0]

    def _augment(self, image: torch.Tensor, name: str, epoch: int, tag: str) -> torch.Tensor:
        if self.augmentation is None:
            return image
        return self.augmentation(image, sample_generator(self.seed, epoch, f"{name}#augment{tag}"))

    def _stacked(self, sample: Sample, name: str, epoch: int) -> torch.Tensor:
        """``lr|sr``: the LR and SR images as channels 0 and 1, augmented alike.

        Each channel is augmented with its own generator from the same seed (the augmentation
        takes one-channel images), so the draws, and hence the flips, the affine transform and
        the noise field, are the same for both: a geometric augmentation moves them together.
        """
        channels = (self._lr(sample["image"], name, epoch), self._sr(sample))
        return torch.cat([self._augment(c, name, epoch, "") for c in channels])

    def __call__(self, loaded: Sample) -> TaskSample:
        """Replace ``image`` by the selected input (and add ``image2`` for lr+sr in training).

        Args:
            loaded: The loader's sample; it is updated in place.

        Returns:
            The same record as a :class:`trainer.batch.TaskSample`; its ``image`` is
            ``[2, H, W]`` for ``lr|sr``, ``[1, H, W]`` otherwise.
        """
        sample = cast(TaskSample, loaded)
        name = sample["digest"]  # seeds from content, never the key (see shards.Sample)
        epoch = self._epoch(sample)
        hr = sample["image"]
        if self.inputs == "lr|sr":
            sample["image"] = self._stacked(sample, name, epoch).contiguous()
            sample.pop("aligned", None)
            return sample
        if self.inputs == "hr":
            image = hr
        elif self.inputs == "lr":
            image = self._lr(hr, name, epoch)
        elif self.inputs == "sr" or not self.train:
            image = self._sr(sample)
        else:  # lr+sr in training: two samples per key
            image = self._lr(hr, name, epoch)
            sample["image2"] = self._augment(self._sr(sample), name, epoch, "2").contiguous()
        sample["image"] = self._augment(image, name, epoch, "").contiguous()
        sample.pop("aligned", None)  # consumed; no need to collate it
        return sample
