"""A trained classifier ready to predict: its weights, its classes and the input it expects.

:class:`Classifier` is what ``trainer predict`` runs, whether it was loaded from a checkpoint
(with the training set's index for the preprocessing) or from an exported model folder (which
records all of it). Both build the same thing from the same facts, so both give the same
probabilities for the same file.

The model's input is made from a preprocessed slice the way evaluation made it from a stored
sample: the slice is put on the uint16 grid the shard set stores, then for ``lr`` degraded and
upsampled back, for ``sr`` and ``lr+sr`` (evaluation scores the SR image of an ``lr+sr`` run)
degraded and super-resolved by the bundled SR model exactly as ``shards enhance`` did. Every
draw is seeded from the image's payload digest at ``EVAL_EPOCH``, so an image equal to a stored
sample gets the LR input the run was evaluated on, whatever batch it is in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shards.degrade import DegradeConfig, upsample_to
from shards.preprocess import PreprocessConfig
from trainer.input_kind import InputKind, check_input_kind, needs_sr
from trainer.sr_bundle import SRModel, enhance_batch, image_digests, lr_images, quantise

__all__ = ["Classifier", "classifier_from_checkpoint", "classifier_from_folder"]


@dataclass
class Classifier:
    """A classifier and everything that makes its input from a preprocessed slice.

    Attributes:
        model: The timm network (eval mode), ``[B, 1, H, W] -> logits [B, classes]``.
        classes: Class names in output order.
        preprocess: The ingest preprocessing of the training set.
        inputs: The input kind it was trained on.
        degrade: The degradation of its ``lr`` input.
        upsample: How the ``lr`` input returns to the stored size.
        seed: The run seed (the ``lr`` input's draws).
        sr: The SR model of ``sr`` and ``lr+sr`` inputs, else None.
    """

    model: nn.Module
    classes: list[str]
    preprocess: PreprocessConfig
    inputs: InputKind
    degrade: DegradeConfig
    upsample: str
    seed: int
    sr: SRModel | None = None

    def to(self, device: torch.device | str) -> Classifier:
        """Move the networks to ``device``; returns self."""
        self.model.to(device)
        if self.sr is not None:
            self.sr.model.to(device)
        return self

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """The network's input for a batch of preprocessed slices.

        Args:
            batch: FloatTensor[B, 1, H, W] from :func:`shards.preprocess.preprocess`.

        Returns:
            FloatTensor[B, 1, H, W] as evaluation fed the network (see the module docstring).
        """
        hr = quantise(batch.float())
        if self.inputs == "hr":
            return hr
        digests = image_digests(hr)
        if needs_sr(self.inputs):
            if self.sr is None:
                raise ValueError(f"inputs={self.inputs} needs the SR model, and none is loaded")
            return enhance_batch(self.sr, hr.cpu(), digests).to(batch.device)
        size = (hr.shape[-2], hr.shape[-1])
        small = lr_images(hr.cpu(), self.degrade, self.seed, digests)
        mode = "zero_fill" if self.upsample == "zero_fill" else "bicubic"
        return torch.stack([upsample_to(s, size, mode) for s in small]).to(batch.device)


def classifier_from_checkpoint(
    checkpoint: str | Path, sr_checkpoint: str | Path | None = None
) -> Classifier:
    """The classifier of a checkpoint, on the CPU, with its training set's preprocessing.

    Args:
        checkpoint: A checkpoint, a run's ``checkpoints/`` folder or a run directory.
        sr_checkpoint: For ``sr``/``lr+sr`` models, the SR run to take the SR model from
            (else it is searched for beside the run, see :func:`trainer.sr_bundle.find_sr_model`).

    Returns:
        The classifier in eval mode.

    Raises:
        FileNotFoundError: If the checkpoint, its training set's index or the SR model is
            missing.
        ValueError: If the training set's classes are not the checkpoint's.
    """
    from trainer.checkpoint import resolve_checkpoint
    from trainer.factories import create_model
    from trainer.predict import dataset_preprocess
    from trainer.sr_bundle import find_sr_model
    from trainer.weights import checkpoint_config, load_fp32_weights

    ckpt = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    if cfg.task != "classify":
        raise ValueError(f"{ckpt.path}: a {cfg.task!r} checkpoint, not a classifier")
    pre_cfg = dataset_preprocess(cfg.data.root, ckpt.classes)
    # The weights come from the checkpoint: no pretrained file is read (it may be gone).
    model = create_model(dataclasses.replace(cfg.model, pretrained_path=None), len(ckpt.classes))
    model.load_state_dict(load_fp32_weights(ckpt))
    sr = find_sr_model(cfg, ckpt, sr_checkpoint)[0] if needs_sr(cfg.data.inputs) else None
    return Classifier(
        model=model.eval(),
        classes=list(ckpt.classes),
        preprocess=pre_cfg,
        inputs=check_input_kind(cfg.data.inputs),
        degrade=cfg.data.degrade,
        upsample=cfg.data.upsample,
        seed=cfg.train.seed,
        sr=sr,
    )


def classifier_from_folder(folder: str | Path) -> Classifier:
    """The classifier of an exported model folder, on the CPU, after checking every file.

    Args:
        folder: A folder written by ``trainer export``.

    Returns:
        The classifier in eval mode (its SR model too, for ``sr``/``lr+sr``).

    Raises:
        trainer.model_folder.ModelFolderError: If the folder is not a model folder, or a file
            is missing or differs from its recorded sha256.
    """
    from safetensors.torch import load_file

    from srmri.config import config_from_dict
    from trainer.config import ModelConfig
    from trainer.factories import create_model
    from trainer.model_folder import WEIGHTS_FILE, read_model_folder
    from trainer.srnet import SRConfig, create_sr_model

    folder = Path(folder)
    spec = read_model_folder(folder)
    arch = spec["architecture"]
    model = create_model(
        ModelConfig(name=arch["name"], drop_rate=arch["drop_rate"]), int(arch["num_classes"])
    )
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    sr = None
    if spec.get("sr"):
        s = spec["sr"]
        arch_cfg = config_from_dict(SRConfig, s["arch"])
        net = create_sr_model(arch_cfg)
        net.load_state_dict(load_file(str(folder / s["weights"])))
        sr = SRModel(
            net.eval(),
            arch_cfg,
            s["model_id"],
            config_from_dict(DegradeConfig, s["degrade"]),
            int(s["seed"]),
        )
    lr = spec.get("lr") or {}
    return Classifier(
        model=model.eval(),
        classes=list(spec["classes"]),
        preprocess=config_from_dict(PreprocessConfig, spec["preprocess"]),
        inputs=check_input_kind(spec["inputs"]),
        degrade=config_from_dict(DegradeConfig, lr["degrade"]) if lr else DegradeConfig(),
        upsample=str(lr.get("upsample", "bicubic")),
        seed=int(lr.get("seed", 0)),
        sr=sr,
    )
