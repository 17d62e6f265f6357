"""Checkpoints: collective, atomic, self-describing directories with keep-last and keep-best.

Layout of ``RUN/checkpoints/step-00001234/``::

    module.pt        fp32 weights of the unwrapped model (rank 0)
    optim.pt         DDP: optimizer, grad scaler, micro-step counter (rank 0)
    deepspeed/       DeepSpeed: its own sharded model/optimizer state (every rank)
    trainer.pt       the shared components' states (rank 0): train state (epoch/step position,
                     best and early-stop state, history), LR schedule, EMA, optimizer hparams
    rank-00000.pt    per rank: that rank's components' states (RNG, loader position)
    config.yaml      the run's resolved config (export and evaluate need nothing else)
    complete.json    written last; a directory without it is ignored

Every rank writes into ``.tmp-step-.../``; after a barrier rank 0 writes ``complete.json`` and
renames the directory into place, so a kill at any moment leaves either a whole checkpoint or
an ignored temp directory. Everything is loaded with ``torch.load(weights_only=True)``.

What goes into ``trainer.pt`` and ``rank-*.pt`` is given as mappings of *stateful components*
(anything with ``state_dict()`` / ``load_state_dict()``, as in torchtitan): each file is
``{name: component.state_dict()}``, and loading restores each named component in place.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from srmri.atomic import write_json
from srmri.config import save_config
from srmri.distributed import barrier
from srmri.torchfile import load_torch_file
from trainer.backend import Backend

__all__ = [
    "COMPLETE",
    "TRAINER_FILE",
    "CheckpointInfo",
    "CheckpointMarker",
    "ProcessRNG",
    "Stateful",
    "find_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_info",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

COMPLETE = "complete.json"
TRAINER_FILE = "trainer.pt"  # the shared components, written by rank 0
_NAME = re.compile(r"^step-(\d{8})$")


class Stateful(Protocol):
    """A checkpointed component: its state as tensors and primitives, and back."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class CheckpointMarker:
    """What ``complete.json`` records about a checkpoint.

    Attributes:
        step: Optimizer steps done.
        epoch: Epoch in progress (or just finished, when ``epoch_end``).
        epoch_end: Whether the epoch is complete (resume starts the next one).
        metric: Validation metric at an epoch end (for keep-best), else None.
        world_size: Ranks that wrote it.
        backend: ddp or deepspeed (resume must use the same).
        classes: Class names, in the order of the model's outputs.
        config_fingerprint: :func:`srmri.fingerprint.config_fingerprint` of the run's config
            without :data:`trainer.config.RESULT_NEUTRAL_KEYS` ("" in older checkpoints).
        dataset_id: ``dataset_id`` of the shard set trained on ("" when not recorded).
        sr_dataset: For SR inputs (``sr``, ``lr+sr``, ``lr|sr``), the SR shard set's id and
            the model and settings that made it; "" otherwise.
        threads: Torch CPU threads the run computed with (0 when not recorded).
        sample_draws: :data:`shards.degrade.SAMPLE_DRAWS` of the run ("" in checkpoints made
            when per-sample draws were seeded from keys).
        early_stopped: Whether early stopping ended the run at this (epoch-end) checkpoint.
    """

    step: int
    epoch: int
    epoch_end: bool
    metric: float | None
    world_size: int
    backend: str
    classes: list[str]
    config_fingerprint: str = ""
    dataset_id: str = ""
    sr_dataset: str = ""
    threads: int = 0
    sample_draws: str = ""
    early_stopped: bool = False


@dataclass(frozen=True)
class CheckpointInfo(CheckpointMarker):
    """A complete checkpoint on disk: its directory and its marker."""

    path: Path = field(kw_only=True)


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
            # Recorded since resumes are checked; older markers lack them.
            config_fingerprint=str(data.get("config_fingerprint", "")),
            dataset_id=str(data.get("dataset_id", "")),
            sr_dataset=str(data.get("sr_dataset", "")),
            threads=int(data.get("threads", 0)),
            sample_draws=str(data.get("sample_draws", "")),
            early_stopped=bool(data.get("early_stopped", False)),
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


class ProcessRNG:
    """This process's RNGs (torch, CUDA, numpy, Python) as a stateful component."""

    def state_dict(self) -> dict[str, Any]:
        """:func:`rng_state`."""
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """:func:`set_rng_state`."""
        set_rng_state(state)


def _states(components: Mapping[str, Stateful | None]) -> dict[str, Any]:
    return {k: None if c is None else c.state_dict() for k, c in components.items()}


def _restore(components: Mapping[str, Stateful | None], states: Any, path: Path) -> None:
    """Load each component from its entry, in mapping order; absent or None entries are skipped."""
    if not isinstance(states, dict):
        raise ValueError(f"{path}: corrupt checkpoint file (not a mapping of component states)")
    for name, component in components.items():
        if component is not None and states.get(name) is not None:
            component.load_state_dict(states[name])


def save_checkpoint(
    directory: Path,
    backend: Backend,
    marker: CheckpointMarker,
    *,
    shared: Mapping[str, Stateful | None],
    per_rank: Mapping[str, Stateful],
    config: Any,
    rank: int,
) -> Path:
    """Write one checkpoint (collective: every rank must call it with the same step).

    Args:
        directory: The run's ``checkpoints/`` folder.
        backend: Writes model and optimizer state.
        marker: What ``complete.json`` records (step, epoch, metric, ...).
        shared: Components whose state is the same on every rank (train state, schedule,
            EMA, ...); rank 0 writes them to ``trainer.pt``. A None component is saved as None.
        per_rank: This rank's own components (RNG, loader position), to ``rank-NNNNN.pt``.
        config: The run config (saved as config.yaml beside the weights).
        rank: This rank.

    Returns:
        The final checkpoint directory.
    """
    # Taken before any file is written, so the states are those of the step being saved.
    shared_states, rank_states = _states(shared), _states(per_rank)
    name = f"step-{marker.step:08d}"
    final = directory / name
    tmp = directory / f".tmp-{name}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    # Files go straight into the temp directory: the directory as a whole is renamed below.
    backend.save(tmp)
    torch.save(rank_states, tmp / f"rank-{rank:05d}.pt")
    if rank == 0:
        torch.save(shared_states, tmp / TRAINER_FILE)
        save_config(config, tmp / "config.yaml")
    barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text(json.dumps(asdict(marker), indent=1))
        if final.exists():  # re-saving the same step (e.g. a re-run); replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
    barrier()
    return final


def load_checkpoint(
    path: Path,
    backend: Backend,
    *,
    shared: Mapping[str, Stateful | None],
    per_rank: Mapping[str, Stateful],
    rank: int,
) -> tuple[CheckpointInfo, bool]:
    """Restore model and optimizer into ``backend`` and the components in place (collective).

    The backend loads first, then ``shared`` from ``trainer.pt``, then ``per_rank`` from this
    rank's ``rank-*.pt``, each mapping in its order. A rank without a file of its own (a job
    resumed with more ranks) restores no per-rank component. A component whose entry is absent
    or None (a run without EMA) keeps its state.

    Args:
        path: The checkpoint directory.
        backend: Receives model and optimizer state.
        shared: Components saved by rank 0 (as given to :func:`save_checkpoint`).
        per_rank: This rank's components to restore.
        rank: This rank.

    Returns:
        The checkpoint's info, and whether this rank's own file was there (and restored).

    Raises:
        FileNotFoundError: Naming the checkpoint or the missing file.
        ValueError: Naming the corrupt file.
    """
    info = read_info(path)
    shared_file = path / TRAINER_FILE
    shared_states = load_torch_file(shared_file)
    rank_file = path / f"rank-{rank:05d}.pt"
    rank_states = load_torch_file(rank_file) if rank_file.is_file() else None
    backend.load(path)
    _restore(shared, shared_states, shared_file)
    if rank_states is not None:
        _restore(per_rank, rank_states, rank_file)
    return info, rank_states is not None


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
        write_json(directory / "best.json", record)
    for stale in directory.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
