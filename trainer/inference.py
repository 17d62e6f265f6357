"""A trained classifier ready to predict: its weights, its classes and the input it expects.

:class:`Classifier` is what ``trainer predict`` runs, whether it was loaded from a checkpoint
(with the training set's index for the preprocessing) or from an exported model folder (which
records all of it). Both build the same thing from the same facts, so both give the same
probabilities for the same file.

The model's input is made from a preprocessed slice the way evaluation made it from a stored
sample: the slice is put on the uint16 grid the shard set stores, then for ``lr`` degraded and
upsampled back, for ``sr`` and ``lr+sr`` (evaluation scores the SR image of an ``lr+sr`` run)
degraded and super-resolved by the bundled SR model exactly as ``shards enhance`` did, and for
``lr|sr`` both, stacked as channels 0 (LR) and 1 (SR) as the loader stacks them. Every draw is
seeded from the image's payload digest at ``EVAL_EPOCH``, so an image equal to a stored sample
gets the LR input the run was evaluated on, whatever batch it is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shards.degrade import DegradeConfig, upsample_to
from shards.preprocess import PreprocessConfig
from trainer.input_kind import (
    InputKind,
    check_input_kind,
    input_channels,
    needs_sr,
    refuse_trained_sr,
)
from trainer.sr_bundle import SRModel, enhance_batch, image_digests, lr_images, quantise

__all__ = ["Classifier", "classifier_from_checkpoint", "classifier_from_folder"]


@dataclass
class Classifier:
    """A classifier and everything that makes its input from a preprocessed slice.

    Attributes:
        model: The timm network (eval mode), ``[B, C, H, W] -> logits [B, classes]``, ``C``
            the images of its input kind (:func:`trainer.input_kind.input_channels`).
        classes: Class names in output order.
        preprocess: The ingest preprocessing of the training set.
        inputs: The input kind it was trained on.
        degrade: The degradation of its LR input (``lr``, ``lr|sr``).
        upsample: How the LR input returns to the stored size.
        seed: The run seed (the LR input's draws).
        sr: The SR model of ``sr``, ``lr+sr`` and ``lr|sr`` inputs, else None.
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
            FloatTensor[B, C, H, W] as evaluation fed the network (see the module docstring):
            one channel per image of :func:`trainer.input_kind.input_channels`.
        """
        hr = quantise(batch.float())
        names = input_channels(self.inputs)
        if names == ("hr",):
            return hr
        cpu = hr.cpu()
        digests = image_digests(cpu)  # what seeds every draw, as the loader seeds them
        parts = [self._channel(name, cpu, digests) for name in names]
        return torch.cat(parts, dim=1).to(batch.device)

    def _channel(self, name: str, hr: torch.Tensor, digests: list[str]) -> torch.Tensor:
        """One input channel (``hr``, ``lr`` or ``sr``) of a CPU batch ``[B, 1, H, W]``."""
        if name == "lr":
            return self._lr(hr, digests)
        if name == "sr":
            return self._sr(hr, digests)
        return hr

    def _lr(self, hr: torch.Tensor, digests: list[str]) -> torch.Tensor:
        """The LR images of ``hr`` (CPU), upsampled back as the loader's ``lr`` input is."""
        size = (hr.shape[-2], hr.shape[-1])
        small = lr_images(hr, self.degrade, self.seed, digests)
        mode = "zero_fill" if self.upsample == "zero_fill" else "bicubic"
        return torch.stack([upsample_to(s, size, mode) for s in small])

    def _sr(self, hr: torch.Tensor, digests: list[str]) -> torch.Tensor:
        """What the SR shard set holds for ``hr`` (CPU): the bundled SR model's output."""
        if self.sr is None:
            raise ValueError(f"inputs={self.inputs} needs the SR model, and none is loaded")
        return enhance_batch(self.sr, hr, digests)


def classifier_from_checkpoint(
    checkpoint: str | Path, sr_checkpoint: str | Path | None = None
) -> Classifier:
    """The classifier of a checkpoint, on the CPU, with its training set's preprocessing.

    Args:
        checkpoint: A checkpoint, a run's ``checkpoints/`` folder or a run directory.
        sr_checkpoint: For ``sr``/``lr+sr``/``lr|sr`` models, the SR run to take the SR model from
            (else it is searched for beside the run, see :func:`trainer.sr_bundle.find_sr_model`).

    Returns:
        The classifier in eval mode.

    Raises:
        FileNotFoundError: If the checkpoint, its training set's index or the SR model is
            missing.
        ValueError: If the training set's classes are not the checkpoint's.
    """
    from trainer.checkpoint import resolve_checkpoint
    from trainer.factories import create_classifier
    from trainer.predict import dataset_preprocess
    from trainer.sr_bundle import find_sr_model
    from trainer.weights import checkpoint_config, load_fp32_weights

    ckpt = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    if cfg.task != "classify":
        raise ValueError(f"{ckpt.path}: a {cfg.task!r} checkpoint, not a classifier")
    refuse_trained_sr(cfg.data.inputs, ckpt.path, "trainer predict")
    pre_cfg = dataset_preprocess(cfg.data.root, ckpt.classes)
    # The weights come from the checkpoint: no pretrained file is read (it may be gone).
    model = create_classifier(cfg, len(ckpt.classes), pretrained=False)
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


def _folder_channels(folder: Path, spec: dict) -> int:
    """The input channels a model folder records, checked against its input kind.

    Raises:
        trainer.model_folder.ModelFolderError: If they differ (the model input would not fit).
    """
    from trainer.model_folder import ModelFolderError

    # Folders written before two-channel inputs existed record in_chans 1 (or nothing).
    recorded = int(spec["architecture"].get("in_chans", 1))
    wanted = len(input_channels(spec["inputs"]))
    if recorded != wanted:
        raise ModelFolderError(
            f"{folder}: model.json records {recorded} input channel(s), but inputs="
            f"{spec['inputs']} makes {wanted}; not a folder trainer export wrote"
        )
    return recorded


def classifier_from_folder(folder: str | Path) -> Classifier:
    """The classifier of an exported model folder, on the CPU, after checking every file.

    Args:
        folder: A folder written by ``trainer export``.

    Returns:
        The classifier in eval mode (its SR model too, for ``sr``/``lr+sr``/``lr|sr``).

    Raises:
        trainer.model_folder.ModelFolderError: If the folder is not a model folder, a file
            is missing or differs from its recorded sha256, or its input channels do not fit
            its input kind.
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
        ModelConfig(name=arch["name"], drop_rate=arch["drop_rate"]),
        int(arch["num_classes"]),
        in_chans=_folder_channels(folder, spec),
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
