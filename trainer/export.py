"""``trainer export``: a checkpoint as a self-describing model folder that needs nothing else.

The folder (see :mod:`trainer.model_folder`) holds ``model.safetensors``, a plain fp32 state dict
that bare timm loads (``timm.create_model(name, in_chans=C_in, num_classes=C)`` then
``load_state_dict``; ``C_in`` is 2 for ``lr|sr``, else 1), the formats asked for (ONNX,
TorchScript: :mod:`trainer.onnx_export`), the SR model an ``sr``/``lr+sr``/``lr|sr`` classifier
needs (:mod:`trainer.sr_bundle`), ``model_card.md`` (:mod:`trainer.model_card`) and
``model.json``: architecture, classes in output order, input size, kind and channels (the image
of each, in order), the training set's preprocessing, the LR degradation (``lr``, ``lr|sr``),
the SR model, fingerprints of the training config and data set, and the sha256 of every file.
``trainer predict --model DIR`` classifies files with that folder alone.

Weights are read by :func:`trainer.weights.load_fp32_weights` (EMA first, then DeepSpeed's
fp32 masters, then ``module.pt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shards.format import DatasetIndex, read_index
from shards.preprocess import PreprocessConfig
from shards.writer import file_sha256
from srmri.atomic import write_text
from srmri.config import config_from_dict
from srmri.fingerprint import config_fingerprint
from trainer.checkpoint import CheckpointInfo, resolve_checkpoint
from trainer.config import RESULT_NEUTRAL_KEYS, TrainConfig
from trainer.factories import create_classifier
from trainer.input_kind import input_channels, needs_sr, refuse_trained_sr
from trainer.model_card import render_card, test_results
from trainer.model_folder import (
    CARD_FILE,
    FOLDER_FORMAT,
    WEIGHTS_FILE,
    check_target,
    publish,
    staging,
    write_model_json,
)
from trainer.onnx_export import ONNX_FILE, TORCHSCRIPT_FILE, export_onnx, export_torchscript
from trainer.sr_bundle import SRModel, find_sr_model
from trainer.weights import checkpoint_config, has_ema, load_fp32_weights

__all__ = [
    "FORMATS",
    "SR_WEIGHTS_FILE",
    "export_checkpoint",
]

FORMATS = ("safetensors", "onnx", "torchscript")
SR_WEIGHTS_FILE = "sr_model.safetensors"


def _training_index(cfg: TrainConfig, ckpt: CheckpointInfo) -> DatasetIndex:
    """The index of the set the checkpoint was trained on, checked to be that set.

    Raises:
        FileNotFoundError: If ``data.root`` has no index (export needs its preprocessing).
        ValueError: If the set there is another one, or lists other classes.
    """
    from trainer.predict import check_class_order  # the file readers load only when used

    try:
        index = read_index(cfg.data.root)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{cfg.data.root}: the training set's index.json is needed to record its "
            f"preprocessing and class counts ({exc})"
        ) from exc
    if ckpt.dataset_id and index.dataset_id != ckpt.dataset_id:
        raise ValueError(
            f"{cfg.data.root}: holds data set {index.dataset_id}, but {ckpt.path.name} was "
            f"trained on {ckpt.dataset_id}; its preprocessing and counts would be of another set"
        )
    check_class_order(ckpt.classes, index.classes, f"the data set at {cfg.data.root}")
    return index


def _describe(
    cfg: TrainConfig,
    ckpt: CheckpointInfo,
    index: DatasetIndex,
    sr: SRModel | None,
    weights: dict[str, str],
) -> dict[str, Any]:
    """``model.json``'s description of the model (no path, patient id or header value)."""
    prep = index.config.get("preprocess") if isinstance(index.config, dict) else None
    pre = config_from_dict(PreprocessConfig, prep or {"size": index.image_size})
    n = len(ckpt.classes)
    source = index.config.get("source") if isinstance(index.config, dict) else None
    counts = index.counts.get("samples") if isinstance(index.counts, dict) else None
    d = cfg.data
    channels = input_channels(d.inputs)
    return {
        "format": FOLDER_FORMAT,
        "model": cfg.model.name,
        "architecture": {
            "library": "timm",
            "name": cfg.model.name,
            "in_chans": len(channels),
            "num_classes": n,
            "drop_rate": cfg.model.drop_rate,
        },
        "classes": list(ckpt.classes),
        "num_classes": n,
        "in_chans": len(channels),
        "inputs": d.inputs,
        "input": {
            "name": "image",
            "kind": d.inputs,
            "size": pre.size,
            "channels": len(channels),
            "channel_images": list(channels),
            "layout": "NCHW",
            "dtype": "float32",
            "range": [0.0, 1.0],
            "modality": "greyscale MRI slice",
        },
        "preprocess": asdict(pre),
        "lr": {"degrade": asdict(d.degrade), "upsample": d.upsample, "seed": cfg.train.seed}
        if "lr" in channels
        else None,
        "sr": None
        if sr is None
        else {
            "model_id": sr.model_id,
            "weights": SR_WEIGHTS_FILE,
            "arch": asdict(sr.sr),
            "degrade": asdict(sr.degrade),
            "seed": sr.seed,
        },
        "data": {
            "dataset_id": index.dataset_id,
            "fingerprint": index.fingerprint,
            "source": str(source) if source else None,
            "class_counts": counts,
            "sr_dataset": ckpt.sr_dataset or None,
        },
        "training": {
            "config_fingerprint": ckpt.config_fingerprint
            or config_fingerprint(cfg, RESULT_NEUTRAL_KEYS),
            "step": ckpt.step,
            "epoch": ckpt.epoch,
            "weights": weights["kind"],
            "sample_draws": ckpt.sample_draws,
        },
        "weights_sha256": weights["sha256"],
        "formats": weights["formats"],
        "load_with": f"timm.create_model({cfg.model.name!r}, in_chans={len(channels)}, "
        f"num_classes={n})"
        f".load_state_dict(safetensors.torch.load_file('{WEIGHTS_FILE}'))",
    }


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    use_ema: bool = True,
    formats: Sequence[str] = ("safetensors",),
    sr_checkpoint: str | Path | None = None,
) -> Path:
    """Write the model folder ``out`` of a classifier checkpoint (see :mod:`trainer.model_folder`).

    Args:
        checkpoint: A checkpoint directory, a run's ``checkpoints/`` folder or a run directory
            (best checkpoint, else newest).
        out: The folder to write; replaced only when it holds a folder of the same weights.
        use_ema: Export the EMA weights when present.
        formats: Any of :data:`FORMATS`; the fp32 safetensors are always written.
        sr_checkpoint: For ``sr``/``lr+sr``/``lr|sr`` models, the SR run that enhanced the
            training set (else SR runs beside the classifier's run are searched).

    Returns:
        ``out``.

    Raises:
        FileNotFoundError: Naming a missing checkpoint, index or SR model.
        ValueError: Naming a corrupt file, a changed data set, an unknown format, or an
            ``out`` holding another model.
    """
    from safetensors.torch import save_file

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"--format: unknown {unknown}; choose from {list(FORMATS)}")
    ckpt = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt)
    if cfg.task != "classify":
        raise ValueError(f"{ckpt.path}: a {cfg.task!r} checkpoint; export takes a classifier")
    refuse_trained_sr(cfg.data.inputs, ckpt.path, "trainer export")
    index = _training_index(cfg, ckpt)
    state = load_fp32_weights(ckpt, use_ema)
    model = create_classifier(cfg, len(ckpt.classes), pretrained=False)
    model.load_state_dict(state)
    in_chans = len(input_channels(cfg.data.inputs))
    sr = find_sr_model(cfg, ckpt, sr_checkpoint)[0] if needs_sr(cfg.data.inputs) else None
    out = Path(out)
    size = index.image_size
    with staging(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"model": cfg.model.name})
        sha = file_sha256(tmp / WEIGHTS_FILE)
        check_target(out, sha)  # before the slow parts: refuse another model's folder now
        written = {"safetensors": WEIGHTS_FILE}
        if sr is not None:
            sr_state = sr.model.state_dict()
            sr_fp32 = {k: v.detach().float().contiguous() for k, v in sr_state.items()}
            save_file(sr_fp32, str(tmp / SR_WEIGHTS_FILE))
        if "onnx" in formats:
            written["onnx"] = export_onnx(model, tmp / ONNX_FILE, size, in_chans).name
        if "torchscript" in formats:
            ts = export_torchscript(model, tmp / TORCHSCRIPT_FILE, size, in_chans)
            written["torchscript"] = ts.name
        kind = "ema" if use_ema and has_ema(ckpt) else "raw"
        spec = _describe(cfg, ckpt, index, sr, {"sha256": sha, "kind": kind, "formats": written})
        spec["test"] = test_results(ckpt.path.parent.parent, ckpt, list(ckpt.classes))
        write_text(tmp / CARD_FILE, render_card(spec, ckpt.path.parent.parent, ckpt))
        write_model_json(tmp, spec)
        publish(tmp, out, sha)
    return out
