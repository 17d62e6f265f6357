"""Task-driven SR (input kind ``tsr``): the SR stage's network fine-tuned with the classifier.

The model (:class:`TSRModel`) is the SR network followed by the timm classifier: it takes the
LR image at its small size, exactly as the SR task gets it, and returns logits. Training adds
a reconstruction term to the classifier's loss, ``loss = CE(logits, label) + train.recon_weight
x L1(SR(lr), hr)``, so the SR part learns what helps classification without forgetting how to
reconstruct (RESULTS.md pre-registers the weight 0.1).

The SR part starts from the SR run ``model.sr_init`` names (the checkpoint ``enhance`` would
use: its best, else its newest; the EMA when it kept one), read with ``weights_only=True``. The
architecture is this run's own ``sr`` section, which must equal that run's (the fields that
only shape SR training are exempt), so a tsr checkpoint's saved config alone rebuilds its
network: evaluation needs no SR run. The LR images come from the SR stage's degradation
(:meth:`TrainConfig.sr_degradation`, checked equal to the SR run's), drawn per sample from
``(train.seed, epoch, digest)`` like the ``lr`` arm's: at evaluation (``EVAL_EPOCH``) a tsr and
an lr classifier of one seed see the same LR images, one through bicubic upsampling, the other
through its SR network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from shards.degrade import EVAL_EPOCH, DegradeConfig, degrade, sample_generator
from shards.sample import Sample
from trainer.augment import create_augmentation
from trainer.backend import Backend
from trainer.batch import Prepare, TaskBatch, TaskSample
from trainer.classify_task import ClassificationTask
from trainer.config import TrainConfig
from trainer.criterion import TrainLoss
from trainer.factories import create_classifier
from trainer.srnet import create_sr_model

__all__ = ["SR_TRAINING_ONLY", "TSRModel", "TSRTask", "TSRTransform", "sr_init_weights"]

# ``sr`` fields that shape how the SR stage trained (its patches, its loss, its figure), not the
# network: a tsr run may differ from its SR run in these.
SR_TRAINING_ONLY: tuple[str, ...] = ("patch_size", "ssim_weight", "examples")

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class TSRModel(nn.Module):
    """The SR network followed by the classifier: ``[B, 1, h, w]`` LR -> ``[B, classes]``.

    Args:
        sr: The SR network, ``[B, 1, h, w] -> [B, 1, h*s, w*s]``.
        classifier: The timm classifier (one input channel).
    """

    def __init__(self, sr: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.sr = sr
        self.classifier = classifier

    def forward(
        self, lr: torch.Tensor, return_sr: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Classify LR images through the SR network.

        A flag rather than a second method: under DDP and DeepSpeed only the wrapped module's
        ``forward`` is hooked for gradient synchronisation.

        Args:
            lr: FloatTensor[B, 1, h, w], the LR images.
            return_sr: Also return the SR images (training's reconstruction term needs them).

        Returns:
            The logits, or ``(logits, sr)`` with ``sr`` the unclamped SR output.
        """
        sr = self.sr(lr)
        # The classifier sees SR images in the stored range, as the sr arm's enhanced images
        # are; the reconstruction term takes the raw output, as the SR task's loss does.
        logits = self.classifier(sr.clamp(0, 1))
        return (logits, sr) if return_sr else logits


class TSRTransform:
    """Picklable per-sample transform: HR slice -> LR ``image`` at its small size and ``target``.

    Training augments the HR slice first, then degrades it, so that the LR input and the HR
    target stay one aligned pair (augmenting the LR image alone would change it without its
    target). Evaluation neither augments nor varies: its draws are ``EVAL_EPOCH``'s.

    Args:
        degrade_cfg: The SR stage's degradation (:meth:`TrainConfig.sr_degradation`).
        seed: The run seed; draws come from ``(seed, epoch, digest)``.
        train: Training (per-epoch draws, augmentation) or evaluation.
        augmentation: ``(image, generator) -> image`` or None (used in training only).
    """

    def __init__(
        self,
        degrade_cfg: DegradeConfig,
        seed: int,
        train: bool,
        augmentation: Augmentation | None = None,
    ) -> None:
        self.degrade_cfg = degrade_cfg
        self.seed = seed
        self.train = train
        self.augmentation = augmentation if train else None

    def __call__(self, loaded: Sample) -> TaskSample:
        """Replace ``image`` by the LR input and add the HR ``target`` (in place).

        Args:
            loaded: The loader's sample.

        Returns:
            The same record as a :class:`trainer.batch.TaskSample`: ``image`` ``[1, h, w]``,
            ``target`` ``[1, h*s, w*s]`` (the HR slice cut to a multiple of the scale).
        """
        sample = cast(TaskSample, loaded)
        name = sample["digest"]  # seeds from content, never the key (see shards.Sample)
        epoch = int(sample["epoch"]) if self.train else EVAL_EPOCH
        hr = sample["image"]
        if self.augmentation is not None:
            # The generator name of trainer.inputs' augmentation: its draws, not the lr arm's.
            hr = self.augmentation(hr, sample_generator(self.seed, epoch, f"{name}#augment"))
        lr, s = degrade(hr, self.degrade_cfg, sample_generator(self.seed, epoch, name))
        h, w = lr.shape[-2:]
        sample["image"] = lr.contiguous()
        sample["target"] = hr[..., : h * s, : w * s].contiguous()
        sample.pop("aligned", None)
        return sample


def _differences(own: Any, other: Any, prefix: str, skip: Sequence[str] = ()) -> list[str]:
    """``prefix.field: this run X, the SR run Y`` for each field of two dataclasses that differs."""
    out = []
    for f in dataclasses.fields(own):
        mine, theirs = getattr(own, f.name), getattr(other, f.name)
        if f.name not in skip and mine != theirs:
            out.append(f"{prefix}.{f.name}: this run {mine!r}, the SR run {theirs!r}")
    return out


def sr_init_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The fp32 weights of the SR run ``model.sr_init`` names, checked to fit this run.

    Args:
        cfg: The tsr run's config.

    Returns:
        The SR network's state dict (CPU, fp32), loadable into ``create_sr_model(cfg.sr)``.

    Raises:
        FileNotFoundError: If the folder holds no checkpoint (the message names
            ``model.sr_init`` and the folder).
        ValueError: If it is not an SR run, or its network or degradation is not this run's.
    """
    from trainer.checkpoint import resolve_checkpoint
    from trainer.weights import checkpoint_config, load_fp32_weights

    folder = Path(cfg.model.sr_init)
    where = f"model.sr_init: {folder}"
    try:
        ckpt = resolve_checkpoint(folder)
        sr_cfg = checkpoint_config(ckpt)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{where}: not a trained SR run ({exc})") from exc
    except ValueError as exc:
        raise ValueError(f"{where}: unreadable SR run ({exc})") from exc
    if sr_cfg.task != "sr":
        raise ValueError(f"{where}: a {sr_cfg.task!r} run, not an SR one (task: sr)")
    diffs = _differences(cfg.sr, sr_cfg.sr, "sr", SR_TRAINING_ONLY)
    diffs += _differences(cfg.sr_degradation(), sr_cfg.sr_degradation(), "data.degrade")
    if diffs:
        raise ValueError(
            f"{where}: its SR network or degradation is not this run's ({'; '.join(diffs)}); "
            f"set them as in {ckpt.path / 'config.yaml'}"
        )
    try:
        state = load_fp32_weights(ckpt)  # weights_only=True (srmri.torchfile)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"{where}: unreadable SR weights ({exc})") from exc
    try:
        create_sr_model(cfg.sr).load_state_dict(state)
    except RuntimeError as exc:  # e.g. an SR run saved by an older version of the network
        raise ValueError(f"{where}: its weights do not fit the sr section ({exc})") from exc
    return state


class TSRTask(ClassificationTask):
    """Classification through a jointly fine-tuned SR network (see the module docstring).

    Validation and test reports are the classifier's (``balanced_accuracy`` is "best"),
    plus ``sr_l1``: the mean L1 error of the SR part against the HR slices.

    Args:
        cfg: The run config (``data.inputs: tsr``, ``model.sr_init``, ``train.recon_weight``).
        classes: Class names of the shard set.
        train_counts: The training split's samples per class (``class_weights: auto``).
    """

    def __init__(
        self, cfg: TrainConfig, classes: list[str], train_counts: Sequence[int] | None = None
    ) -> None:
        super().__init__(cfg, classes, train_counts)
        self._l1 = torch.zeros(2, dtype=torch.float64)

    def build_model(self, pretrained: bool = True) -> nn.Module:
        """The SR network and the classifier, the SR part initialised from ``model.sr_init``.

        Args:
            pretrained: Initialise from ``model.sr_init`` (and ``model.pretrained_path``);
                False where trained weights are loaded next (evaluation: the SR run may be
                gone by then).

        Returns:
            A :class:`TSRModel` in train mode on the CPU.

        Raises:
            FileNotFoundError: If the SR run is missing (see :func:`sr_init_weights`).
            ValueError: If it does not fit this run.
        """
        sr = create_sr_model(self.cfg.sr)
        if pretrained:
            sr.load_state_dict(sr_init_weights(self.cfg))
        return TSRModel(sr, create_classifier(self.cfg, len(self.classes), pretrained))

    def transform(self, train: bool) -> TSRTransform:
        augmentation = create_augmentation(self.cfg.augment) if train else None
        return TSRTransform(self.cfg.sr_degradation(), self.cfg.train.seed, train, augmentation)

    def aligned_roots(self) -> list[str]:
        return []  # no enhanced shard set: the model makes its own SR images

    def train_loss(self, backend: Backend, batch: TaskBatch) -> tuple[torch.Tensor, int]:
        logits, sr = backend.model(backend.to_input(batch["image"]), return_sr=True)
        labels = batch["label"].to(backend.device, non_blocking=True)
        hr = batch["target"].to(backend.device, non_blocking=True)
        loss = self.loss or TrainLoss(self.cfg.train, self.classes, None)  # None: raises
        recon = F.l1_loss(sr.float(), hr.float())
        return loss(logits.float(), labels) + self.cfg.train.recon_weight * recon, len(labels)

    def eval_reset(self, device: torch.device) -> None:
        super().eval_reset(device)
        self._l1 = torch.zeros(2, dtype=torch.float64, device=device)

    def eval_update(self, model: nn.Module, batch: TaskBatch, prepare: Prepare) -> None:
        logits, sr = model(prepare(batch["image"]), return_sr=True)
        self.score(logits.float(), batch)
        hr = batch["target"].to(sr.device).float()
        valid = batch["valid"].to(sr.device).bool()
        err = (sr.float().clamp(0, 1) - hr).abs().flatten(1).mean(1)[valid]
        self._l1[0] += err.sum().double()
        self._l1[1] += err.numel()

    def eval_compute(self) -> dict[str, Any]:
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(self._l1)
        results = super().eval_compute()
        total, count = self._l1.tolist()
        results["sr_l1"] = total / count if count else float("nan")
        return results
