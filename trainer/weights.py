"""A checkpoint's saved config and its model weights as one fp32 state dict.

Weights come from, in order of preference: the EMA (when the run kept one, since that is
what was validated), DeepSpeed's fp32 master weights consolidated with ``zero_to_fp32`` (exact
under bf16/fp16 and ZeRO 1/2), or the checkpoint's ``module.pt`` (DDP, and DeepSpeed ZeRO
stage 0, whose checkpoints ``zero_to_fp32`` cannot read). Export, resume, evaluation and the
report all read weights here, so that none of them imports another to do it.
"""

from __future__ import annotations

import contextlib
import io

import torch
import yaml

from srmri.config import config_from_dict
from srmri.torchfile import load_torch_file
from trainer.backend import MODULE_FILE
from trainer.checkpoint import TRAINER_FILE, CheckpointInfo
from trainer.config import TrainConfig

__all__ = ["checkpoint_config", "has_ema", "load_fp32_weights"]


def checkpoint_config(ckpt: CheckpointInfo) -> TrainConfig:
    """The run config saved inside a checkpoint directory.

    Raises:
        FileNotFoundError: If the checkpoint has no config.yaml.
        srmri.config.ConfigError: If it is invalid.
    """
    path = ckpt.path / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint has no config.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    return config_from_dict(TrainConfig, data)


def _from_deepspeed(ckpt: CheckpointInfo) -> dict[str, torch.Tensor] | None:
    """fp32 master weights of a DeepSpeed ZeRO checkpoint, or None when there are none."""
    if not (ckpt.path / "deepspeed").is_dir():
        return None
    if checkpoint_config(ckpt).backend.zero_stage == 0:
        # Stage 0 records no ZeRO partitions (zero_to_fp32 fails on its missing param_shapes):
        # module.pt holds the module's own weights, exact in fp32 and under CPU autocast.
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints per-tensor progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.path), tag="deepspeed")
    except (FileNotFoundError, ValueError, KeyError):
        return None  # no consolidated masters to read: module.pt is the module's weights
    return {k: v.float().contiguous() for k, v in state.items()}


def load_fp32_weights(ckpt: CheckpointInfo, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict from a checkpoint (see the module docstring for the source).

    Args:
        ckpt: The checkpoint.
        use_ema: Prefer the EMA weights when the run kept an EMA.

    Returns:
        A state dict of contiguous fp32 CPU tensors, keys as in the bare timm model.

    Raises:
        FileNotFoundError: Naming the missing file.
        ValueError: Naming the corrupt file.
    """
    if use_ema:
        shared = load_torch_file(ckpt.path / TRAINER_FILE)
        ema = shared.get("ema") if isinstance(shared, dict) else None
        if ema:
            return {k.removeprefix("module."): v.float().contiguous() for k, v in ema.items()}
    state = _from_deepspeed(ckpt)
    if state is not None:
        # zero_to_fp32 keeps parameters and buffers; take anything else from module.pt.
        module = load_torch_file(ckpt.path / MODULE_FILE)
        return {k: state.get(k, v).float().contiguous() for k, v in module.items()}
    module = load_torch_file(ckpt.path / MODULE_FILE)
    return {k: v.float().contiguous() for k, v in module.items()}


def has_ema(ckpt: CheckpointInfo) -> bool:
    """Whether the checkpoint kept an EMA of the weights."""
    shared = load_torch_file(ckpt.path / TRAINER_FILE)
    return bool(isinstance(shared, dict) and shared.get("ema"))
