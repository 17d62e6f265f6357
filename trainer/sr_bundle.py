"""The SR model an ``sr``, ``lr+sr`` or ``lr|sr`` classifier needs, found and run as enhance did.

A classifier trained on an enhanced shard set saw images that an SR checkpoint made. That set's
``index.json`` names the model by what it computes (:func:`weights_id`: a hash of its fp32
weights and step), never by where it lay, and records the degradation and seed of its LR inputs.
:func:`find_sr_model` finds the checkpoint behind that id (a given one, else any SR run beside
the classifier's run, as the pipeline lays them out in ``OUT/runs/``) and refuses any other, so
an exported model folder can only bundle the SR model its classifier was trained behind.

:func:`enhance_batch` is the enhance stage applied to a batch: the per-sample degradation of
``shards.enhance`` (seeded from each image's payload digest at ``EVAL_EPOCH``), the SR model,
then the clamp and the uint16 quantisation the SR shard set stores, so a prediction sees what
evaluation saw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shards.checksum import payload_digest
from shards.degrade import EVAL_EPOCH, DegradeConfig, degrade, sample_generator
from shards.format import encode_image, read_index, to_uint16
from srmri.config import config_from_dict
from trainer.checkpoint import CheckpointInfo, find_checkpoints, resolve_checkpoint
from trainer.config import TrainConfig
from trainer.srnet import SRConfig

__all__ = [
    "SRModel",
    "enhance_batch",
    "find_sr_model",
    "image_digests",
    "quantise",
    "weights_id",
]


def weights_id(model: nn.Module, step: int) -> str:
    """An id of a model's weights: a hash of its fp32 state dict and the step that made it.

    Args:
        model: The loaded model (any device).
        step: The training step of its checkpoint.

    Returns:
        ``sr-<16 hex> (step N)``; free of any path.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}\t{tuple(value.shape)}\n".encode())
        h.update(value.numpy().tobytes())
    return f"sr-{h.hexdigest()[:16]} (step {step})"


@dataclass
class SRModel:
    """An SR network with what enhance recorded about the inputs it was applied to.

    Attributes:
        model: The network in eval mode, ``[B, 1, h, w] -> [B, 1, h*s, w*s]``.
        sr: Its architecture section.
        model_id: :func:`weights_id` of it, as the SR shard set records it.
        degrade: The degradation that made its LR inputs.
        seed: The seed of that degradation's per-sample draws.
    """

    model: nn.Module
    sr: SRConfig
    model_id: str
    degrade: DegradeConfig
    seed: int


def _recorded(cfg: TrainConfig, ckpt: CheckpointInfo) -> tuple[str, DegradeConfig, int]:
    """The SR model id, degradation and seed the classifier's SR set records.

    Raises:
        FileNotFoundError: If ``data.sr_root`` has no index.
        ValueError: If the set there is not the one the checkpoint was trained on.
    """
    index = read_index(cfg.data.sr_root)
    # The checkpoint records "<sr dataset_id> (model ..., settings ...)": the set now at
    # sr_root must be that one, or the bundled SR model would not be what made its inputs.
    if ckpt.sr_dataset and not ckpt.sr_dataset.startswith(f"{index.dataset_id} "):
        raise ValueError(
            f"{cfg.data.sr_root}: holds SR set {index.dataset_id}, but {ckpt.path.name} was "
            f"trained on {ckpt.sr_dataset.split(' ')[0]}; the SR model that made its inputs "
            "cannot be identified"
        )
    made = index.config if isinstance(index.config, dict) else {}
    if "model" not in made or "degrade" not in made:
        raise ValueError(f"{cfg.data.sr_root}: index.json records no SR model or degradation")
    return str(made["model"]), config_from_dict(DegradeConfig, made["degrade"]), int(made["seed"])


def _candidates(run_dir: Path, given: Path | None) -> list[CheckpointInfo]:
    """Checkpoints that may hold the SR model: those of ``given``, else of SR runs beside."""
    if given is not None:
        found = find_checkpoints(given / "checkpoints") or find_checkpoints(given)
        return found or [resolve_checkpoint(given)]
    out: list[CheckpointInfo] = []
    for sibling in sorted(run_dir.parent.iterdir()) if run_dir.parent.is_dir() else []:
        if sibling != run_dir and (sibling / "checkpoints").is_dir():
            out += find_checkpoints(sibling / "checkpoints")
    return out


def find_sr_model(
    cfg: TrainConfig, ckpt: CheckpointInfo, given: str | Path | None = None
) -> tuple[SRModel, CheckpointInfo]:
    """The SR model that made the inputs of an ``sr``/``lr+sr``/``lr|sr`` classifier checkpoint.

    Args:
        cfg: The classifier's config (its ``data.sr_root`` is read).
        ckpt: The classifier's checkpoint.
        given: An SR run directory or checkpoint to take it from (else SR runs beside the
            classifier's run directory are searched).

    Returns:
        The SR model (on the CPU) and the checkpoint it came from.

    Raises:
        FileNotFoundError: If no checkpoint holds the recorded SR model, naming its id.
        ValueError: If the SR set is not the one trained on.
    """
    from trainer.sr_task import load_sr_checkpoint
    from trainer.weights import checkpoint_config

    model_id, degrade_cfg, seed = _recorded(cfg, ckpt)
    run_dir = ckpt.path.parent.parent
    for candidate in _candidates(run_dir, Path(given) if given is not None else None):
        if checkpoint_config(candidate).task != "sr":
            continue
        model, sr_cfg, _ = load_sr_checkpoint(candidate.path, torch.device("cpu"))
        if weights_id(model, candidate.step) == model_id:
            return SRModel(model, sr_cfg.sr, model_id, degrade_cfg, seed), candidate
    where = str(given) if given is not None else f"the runs beside {run_dir.name}"
    raise FileNotFoundError(
        f"{where}: no SR checkpoint holds {model_id}, the model that enhanced the training "
        "set; pass its SR run with --sr-checkpoint"
    )


def quantise(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the uint16 grid shard sets store images on (values clipped to [0, 1])."""
    return torch.round(x.clamp(0, 1) * 65535.0) * (1.0 / 65535.0)


def image_digests(batch: torch.Tensor) -> list[str]:
    """The payload digest each image of ``[B, 1, H, W]`` would have as a stored sample.

    The per-sample draws of the loader and of enhance are seeded from this digest (see
    :mod:`shards.degrade`), so an image equal to a stored one gets the same LR input.
    """
    images = batch.detach().to("cpu", torch.float32).numpy()
    return [payload_digest(encode_image(to_uint16(image[0]))) for image in images]


def lr_images(
    batch: torch.Tensor, cfg: DegradeConfig, seed: int, digests: Sequence[str]
) -> list[torch.Tensor]:
    """Each image's evaluation degradation (one generator per image, as the loader draws)."""
    return [
        degrade(image, cfg, sample_generator(seed, EVAL_EPOCH, digest))[0]
        for image, digest in zip(batch, digests)
    ]


@torch.no_grad()
def enhance_batch(sr: SRModel, batch: torch.Tensor, digests: Sequence[str]) -> torch.Tensor:
    """What the SR shard set holds for each image of ``batch``, as ``shards.enhance`` makes it.

    Args:
        sr: The SR model and its degradation.
        batch: FloatTensor[B, 1, H, W] on the uint16 grid, in [0, 1].
        digests: :func:`image_digests` of ``batch``.

    Returns:
        FloatTensor[B, 1, H, W]: the SR images, clamped and quantised as stored.
    """
    param = next(sr.model.parameters())
    lr = torch.stack(lr_images(batch, sr.degrade, sr.seed, digests)).to(param.device)
    return quantise(sr.model(lr.to(param.dtype)).float())
