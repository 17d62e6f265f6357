"""Whether a checkpoint may continue a run, and the settings that make a run's numbers repeat.

A checkpoint records what made it (:class:`RunIdentity`, in ``complete.json``): the config's
fingerprint without :data:`trainer.config.RESULT_NEUTRAL_KEYS`, the shard set's id and class
order, and for SR inputs (``sr``, ``lr+sr``, ``lr|sr``) the SR shard set's id and the model that
made it. A run resumes from a checkpoint only when its config differs from the checkpoint's in
nothing but :data:`trainer.config.RESUME_MAY_CHANGE` (``optim.lr`` / ``optim.weight_decay``
while the run is unfinished, a longer ``train.epochs``) and its data are the same; anything else
is refused before the run writes a file, naming each differing key (:class:`ResumeRefused`).

The same command gives the same numbers: torch's CPU thread count, which changes how reductions
are split, comes from ``train.threads`` (:func:`apply_threads`), not from ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shards.degrade import SAMPLE_DRAWS
from shards.format import DatasetIndex, read_index
from srmri.config import ConfigError
from srmri.fingerprint import Difference, config_fingerprint, describe, differences, fingerprint
from trainer.checkpoint import CheckpointInfo, latest_checkpoint, resolve_checkpoint
from trainer.config import RESULT_NEUTRAL_KEYS, TrainConfig
from trainer.input_kind import needs_sr
from trainer.weights import checkpoint_config

__all__ = [
    "ClassMismatch",
    "ResumePoint",
    "ResumeRefused",
    "RunIdentity",
    "apply_threads",
    "check_classes",
    "finishes_run",
    "resume_point",
    "run_identity",
]

_WHILE_UNFINISHED = ("optim.lr", "optim.weight_decay")


class ResumeRefused(ConfigError):
    """A checkpoint was made under other settings or data than the run asks for."""


class ClassMismatch(ValueError):
    """A shard set's classes are not a checkpoint's, in the same order."""


@dataclass(frozen=True)
class RunIdentity:
    """What a run's numbers depend on besides its weights, as a checkpoint records it.

    Attributes:
        config_fingerprint: The config's fingerprint without the result-neutral keys.
        dataset_id: ``dataset_id`` of ``data.root``.
        classes: Its class names, in order.
        sr_dataset: For SR inputs (``sr``, ``lr+sr``, ``lr|sr``), the SR set's id, the model
            that made it and a fingerprint of its settings; "" otherwise.
    """

    config_fingerprint: str
    dataset_id: str
    classes: list[str]
    sr_dataset: str = ""


def run_identity(cfg: TrainConfig, index: DatasetIndex) -> RunIdentity:
    """The identity of a run of ``cfg`` on the shard set whose index is ``index``.

    Raises:
        FileNotFoundError: If an SR input run's ``data.sr_root`` has no index.
    """
    sr = ""
    if needs_sr(cfg.data.inputs):
        sr_index = read_index(cfg.data.sr_root)
        made = sr_index.config if isinstance(sr_index.config, dict) else {}
        # The id alone names the HR set it was derived from, not which SR model enhanced it.
        sr = (
            f"{sr_index.dataset_id} (model {made.get('model', '?')}, "
            f"settings {fingerprint(made)[:12]})"
        )
    return RunIdentity(
        config_fingerprint=config_fingerprint(cfg, RESULT_NEUTRAL_KEYS),
        dataset_id=index.dataset_id,
        classes=list(index.classes),
        sr_dataset=sr,
    )


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint a run may resume from, with the config it was made with.

    Attributes:
        checkpoint: The checkpoint.
        saved: Its saved config (``config.yaml`` inside it).
    """

    checkpoint: CheckpointInfo
    saved: TrainConfig

    def lengthened(self, cfg: TrainConfig) -> bool:
        """Whether ``cfg`` asks for more epochs than the checkpoint's run had."""
        return cfg.train.epochs > self.saved.train.epochs


def finishes_run(found: CheckpointInfo, cfg: TrainConfig) -> bool:
    """Whether the checkpoint ends the run ``cfg`` asks for (all its epochs, or early-stopped)."""
    return found.epoch_end and (found.early_stopped or found.epoch + 1 >= cfg.train.epochs)


def _refused(
    found: CheckpointInfo, saved: TrainConfig, cfg: TrainConfig, identity: RunIdentity
) -> list[Difference]:
    """Every difference between the checkpoint's run and ``cfg``'s that a resume may not make."""
    recorded = bool(found.dataset_id)
    # Shard-set paths are neutral because the sets are compared by id; a checkpoint from before
    # the ids were recorded has only the paths to go by.
    ignore = (
        RESULT_NEUTRAL_KEYS
        if recorded
        else tuple(k for k in RESULT_NEUTRAL_KEYS if not k.startswith("data."))
    )
    finished = finishes_run(found, cfg)
    out = []
    for d in differences(saved, cfg, ignore):
        if d.key == "train.epochs" and d.new > d.old:
            continue
        if d.key in _WHILE_UNFINISHED and not finished:
            continue
        out.append(d)
    if list(found.classes) != identity.classes:
        out.append(Difference("classes (in order)", list(found.classes), identity.classes))
    if recorded and found.dataset_id != identity.dataset_id:
        out.append(Difference("data set id (data.root)", found.dataset_id, identity.dataset_id))
    if recorded and found.sr_dataset != identity.sr_dataset:
        out.append(Difference("SR set (data.sr_root)", found.sr_dataset, identity.sr_dataset))
    if found.sample_draws != SAMPLE_DRAWS:  # its augmentation and LR draws were other ones
        was = found.sample_draws or "seeded from sample keys"
        out.append(Difference("per-sample draws", was, SAMPLE_DRAWS))
    return out


def _message(found: CheckpointInfo, refused: list[Difference], cfg: TrainConfig) -> str:
    keys = {d.key for d in refused}
    notes = []
    if keys & set(_WHILE_UNFINISHED):
        notes.append(
            "  (the run is finished: optim.lr and optim.weight_decay may change only while it "
            "is unfinished)"
        )
    if "train.epochs" in keys:
        notes.append("  (train.epochs may only grow)")
    return "\n".join(
        [
            f"cannot resume from {found.path}: it was made with other settings or data "
            f"(name=NEW starts a new run; train.resume=never starts {cfg.name or 'this run'} "
            "over):",
            describe(refused),
            *notes,
        ]
    )


def resume_point(cfg: TrainConfig, checkpoints: Path, identity: RunIdentity) -> ResumePoint | None:
    """The checkpoint ``train.resume`` picks, once it is known to fit this run (writes nothing).

    Args:
        cfg: The run's config (threads resolved).
        checkpoints: The run directory's ``checkpoints/`` folder (for ``resume: auto``).
        identity: The run's identity (:func:`run_identity`).

    Returns:
        The checkpoint and its config, or None when the run starts afresh.

    Raises:
        ResumeRefused: Naming each key (old and new value) the checkpoint differs in, beyond
            what a resume may change, and how to go on.
        FileNotFoundError, ValueError: If a ``train.resume`` path holds no usable checkpoint.
    """
    how = cfg.train.resume
    if how == "never":
        return None
    found = latest_checkpoint(checkpoints) if how == "auto" else resolve_checkpoint(how)
    if found is None:
        return None
    saved = checkpoint_config(found)
    refused = _refused(found, saved, cfg, identity)
    if refused:
        raise ResumeRefused(_message(found, refused, cfg))
    return ResumePoint(found, saved)


def check_classes(found: CheckpointInfo, root: str, classes: Sequence[str]) -> None:
    """Refuse a shard set whose classes are not the checkpoint's, in the same order.

    Args:
        found: The checkpoint.
        root: The shard set (for the message).
        classes: Its classes, in order.

    Raises:
        ClassMismatch: Naming both lists.
    """
    if list(classes) != list(found.classes):
        raise ClassMismatch(
            f"{root}: its classes {list(classes)} are not those of {found.path} "
            f"{list(found.classes)} in the same order; the model's outputs would be scored "
            "against the wrong labels (use a shard set ingested with the checkpoint's classes)"
        )


def apply_threads(cfg: TrainConfig) -> TrainConfig:
    """Set torch's CPU thread count from ``train.threads``; returns ``cfg`` with it resolved.

    ``0`` becomes this machine's usable cores divided among its ranks (``LOCAL_WORLD_SIZE``).
    Only the intra-op pool is set: ``torch.set_num_interop_threads`` may be called once per
    process before any parallel work (a second run in a process, as under Ray Tune, would
    fail), and the inter-op pool only runs independent ops side by side, which does not change
    any op's result.

    Args:
        cfg: The run's config.

    Returns:
        The config with ``train.threads`` the count in use.
    """
    n = cfg.train.threads
    if n == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n = max(1, (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    torch.set_num_threads(n)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=n))
