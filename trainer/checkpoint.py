"""Checkpoints: collective, atomic, self-describing directories with keep-last and keep-best.

Layout of ``RUN/checkpoints/step-00001234/``::

    module.pt        fp32 weights of the unwrapped model (rank 0)
    optim.pt         DDP: optimizer, grad scaler, micro-step counter (rank 0)
    deepspeed/       DeepSpeed: its own sharded model/optimizer state (every rank)
    trainer.pt       epoch/step position, LR schedule, EMA, best and early-stop state (rank 0)
    rank-00000.pt    per rank: RNG states and the loader position
    config.yaml      the run's resolved config (export and evaluate need nothing else)
    complete.json    written last; a directory without it is ignored

Every rank writes into ``.tmp-step-.../``; after a barrier rank 0 writes ``complete.json`` and
renames the directory into place, so a kill at any moment leaves either a whole checkpoint or
an ignored temp directory. Everything is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srmri.config import save_config
from srmri.distributed import barrier
from trainer.backend import Backend

__all__ = [
    "COMPLETE",
    "CheckpointInfo",
    "find_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_torch_file",
    "prune_checkpoints",
    "read_info",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

COMPLETE = "complete.json"
TRAINER_FILE = "trainer.pt"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``complete.json`` records about a checkpoint."""

    path: Path
    step: int
    epoch: int
    epoch_end: bool
    metric: float | None
    world_size: int
    backend: str
    classes: list[str]


def read_info(path: Path) -> CheckpointInfo:
    """Read and check a checkpoint directory's ``complete.json``.

    Raises:
        FileNotFoundError: If ``path`` is not a directory or has no ``complete.json``.
        ValueError: If ``complete.json`` is unreadable.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    marker = path / COMPLETE
    if not marker.is_file():
        raise FileNotFoundError(
            f"{path}: not a complete checkpoint (no {COMPLETE}; it was interrupted while saving)"
        )
    try:
        data = json.loads(marker.read_text())
        return CheckpointInfo(
            path=path,
            step=int(data["step"]),
            epoch=int(data["epoch"]),
            epoch_end=bool(data["epoch_end"]),
            metric=None if data.get("metric") is None else float(data["metric"]),
            world_size=int(data["world_size"]),
            backend=str(data["backend"]),
            classes=[str(c) for c in data["classes"]],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{marker}: corrupt checkpoint marker ({exc})") from exc


def find_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``directory``, oldest first (temp and partial ones skipped)."""
    if not directory.is_dir():
        return []
    found = []
    for child in sorted(directory.iterdir()):
        if _NAME.match(child.name) and (child / COMPLETE).is_file():
            found.append(read_info(child))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(directory: Path) -> CheckpointInfo | None:
    """The newest complete checkpoint under ``directory``, or None."""
    found = find_checkpoints(directory)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> CheckpointInfo:
    """A checkpoint given as its directory, a ``checkpoints/`` folder or a run directory.

    For a folder of checkpoints, the best one (``best.json``) if recorded, else the newest.

    Raises:
        FileNotFoundError: Naming ``path`` when it holds no complete checkpoint.
        ValueError: If its marker is corrupt.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: checkpoint does not exist")
    if (p / COMPLETE).is_file() or _NAME.match(p.name):
        return read_info(p)
    folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    best = folder / "best.json"
    if best.is_file():
        try:
            name = json.loads(best.read_text())["best"][0]["name"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{best}: corrupt ({exc})") from exc
        if (folder / name / COMPLETE).is_file():
            return read_info(folder / name)
    latest = latest_checkpoint(folder)
    if latest is None:
        raise FileNotFoundError(f"{p}: holds no complete checkpoint")
    return latest


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and primitives (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_torch_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; clear errors naming a missing or corrupt file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: corrupt checkpoint file ({type(exc).__name__}: {exc})") from exc


def save_checkpoint(
    directory: Path,
    step: int,
    epoch: int,
    epoch_end: bool,
    backend: Backend,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    config: Any,
    backend_name: str,
    classes: list[str],
    metric: float | None,
    rank: int,
    world_size: int,
) -> Path:
    """Write one checkpoint (collective: every rank must call it with the same step).

    Args:
        directory: The run's ``checkpoints/`` folder.
        step: Optimizer steps done.
        epoch: Epoch in progress (or just finished, when ``epoch_end``).
        epoch_end: Whether the epoch is complete (resume starts the next one).
        backend: Writes model and optimizer state.
        trainer_state: Rank 0's position, schedule, EMA, best state (tensors/primitives).
        rank_state: This rank's RNG and loader state (tensors/primitives).
        config: The run config (saved as config.yaml beside the weights).
        backend_name: ddp or deepspeed (recorded; resume must use the same).
        classes: Class names.
        metric: Validation metric at an epoch end (for keep-best), else None.
        rank: This rank.
        world_size: Ranks in the job.

    Returns:
        The final checkpoint directory.
    """
    name = f"step-{step:08d}"
    final = directory / name
    tmp = directory / f".tmp-{name}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    backend.save(tmp)
    torch.save(rank_state, tmp / f"rank-{rank:05d}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / TRAINER_FILE)
        save_config(config, tmp / "config.yaml")
    barrier()
    if rank == 0:
        marker = {
            "step": step,
            "epoch": epoch,
            "epoch_end": epoch_end,
            "metric": metric,
            "world_size": world_size,
            "backend": backend_name,
            "classes": list(classes),
        }
        (tmp / COMPLETE).write_text(json.dumps(marker, indent=1))
        if final.exists():  # re-saving the same step (e.g. a re-run); replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
    barrier()
    return final


def load_checkpoint(
    path: Path, backend: Backend, rank: int
) -> tuple[CheckpointInfo, dict[str, Any], dict[str, Any] | None]:
    """Restore model and optimizer into ``backend`` and return the saved trainer state.

    Collective. Each rank reads its own ``rank-*.pt``; a rank without one (a job resumed with
    more ranks) gets None and starts from rank 0's position only in the epoch count.

    Returns:
        The checkpoint's info, rank 0's trainer state, and this rank's state (or None).

    Raises:
        FileNotFoundError: Naming the checkpoint or the missing file.
        ValueError: Naming the corrupt file.
    """
    info = read_info(path)
    trainer_state = load_torch_file(path / TRAINER_FILE)
    rank_file = path / f"rank-{rank:05d}.pt"
    rank_state = load_torch_file(rank_file) if rank_file.is_file() else None
    backend.load(path)
    return info, trainer_state, rank_state


def prune_checkpoints(directory: Path, keep_last: int, keep_best: int, mode: str) -> None:
    """Delete checkpoints that are neither among the newest ``keep_last`` nor the best
    ``keep_best`` epoch-end ones, and record the best in ``best.json`` (call on rank 0).

    Args:
        directory: The ``checkpoints/`` folder.
        keep_last: Newest checkpoints to keep.
        keep_best: Best epoch-end checkpoints (by their metric) to keep.
        mode: ``max`` or ``min``: which direction of the metric is better.
    """
    found = find_checkpoints(directory)
    scored = [c for c in found if c.epoch_end and c.metric is not None]
    scored.sort(key=lambda c: (-c.metric if mode == "max" else c.metric, -c.step))  # type: ignore[operator]
    best = scored[:keep_best]
    keep = {c.path for c in found[-keep_last:]} | {c.path for c in best}
    for c in found:
        if c.path not in keep:
            shutil.rmtree(c.path, ignore_errors=True)
    if best:
        record = {
            "best": [{"name": c.path.name, "metric": c.metric, "epoch": c.epoch} for c in best]
        }
        tmp = directory / ".best.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(directory / "best.json")
    for stale in directory.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
