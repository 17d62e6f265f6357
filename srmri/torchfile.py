"""The one way srmri reads torch files: ``torch.load(..., weights_only=True)`` with clear errors.

Checkpoints, exported weights and user-given pretrained files all come through here, so no
pickled object from a file ever runs code, and a missing or corrupt file is an error that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["load_state_dict_file", "load_torch_file"]


def load_torch_file(path: str | Path, map_location: torch.device | str = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``.

    Args:
        path: The file to read.
        map_location: Device the tensors are loaded onto.

    Returns:
        The loaded object (tensors, containers and primitives only).

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is corrupt or holds anything but weights-only data.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file is missing")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{p}: corrupt or unsafe torch file ({type(exc).__name__}: {exc})"
        ) from exc


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from ``.safetensors`` or a torch file.

    A torch file may wrap the state dict under ``state_dict`` or ``model`` (common in published
    checkpoints); the wrapper is removed.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it cannot be read as a state dict of tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: weights file does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(p))
        except Exception as exc:
            raise ValueError(f"{p}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    else:
        state = load_torch_file(p)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{p}: not a state dict of tensors")
    return state
