"""Process-group setup from the launcher's environment, and rank-0-only printing.

torchrun and the ``deepspeed`` launcher both export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. A plain ``python -m trainer`` run has none of them and gets a
one-process group (and ``LOCAL_RANK=0``, which DeepSpeed asserts), so the rest of the trainer
(metric sync, gathers, DeepSpeed) never has to ask whether it is distributed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_floats",
    "all_gather_objects",
    "barrier",
    "broadcast_buffers",
    "cleanup",
    "init_distributed",
    "is_main",
    "print0",
]


# Whether init_distributed put LOCAL_RANK into os.environ itself (cleanup() takes it back out).
_SET_LOCAL_RANK = False


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that prints and writes logs)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the process group and pick this process's device.

    gloo on CPU, nccl on CUDA. Calling it again returns the current group's info.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        timeout_s: Collective timeout.

    Returns:
        Rank, world size, local rank and device of this process.

    Raises:
        RuntimeError: If ``cuda`` is asked for and none is available.
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        store = None
        if world == 1 and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
            # A plain single process: a private in-memory one-member group. No port, and no
            # MASTER_* written to os.environ where child processes would inherit a live port.
            store = dist.HashStore()
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    _export_local_rank(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def _export_local_rank(local_rank: int) -> None:
    """Put ``LOCAL_RANK`` into the environment when no launcher did.

    ``deepspeed.initialize`` asserts the variable is set, so a plain one-process
    ``python -m trainer fit backend.name=deepspeed`` (and a Ray Tune trial, which removes the
    launcher's variables for its private group) would fail without it.
    """
    global _SET_LOCAL_RANK
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
        _SET_LOCAL_RANK = True


def is_main() -> bool:
    """Whether this process is rank 0 (true when no group exists)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed, so launcher logs interleave sensibly)."""
    if is_main():
        kwargs.setdefault("file", sys.stdout)
        print(*args, flush=True, **kwargs)


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_floats(value: torch.Tensor) -> list[float]:
    """Every rank's value of a one-element tensor, in rank order (collective; one host sync).

    Args:
        value: This rank's value, on this rank's device (CUDA under nccl, CPU under gloo).

    Returns:
        The values of all ranks (``[value]`` without a group).
    """
    flat = value.detach().reshape(1).float()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flat.tolist()
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return torch.cat(out).tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank, in rank order ([obj] without a group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's floating-point buffers (BatchNorm statistics) to every rank (collective).

    Each rank updates its BatchNorm running statistics from its own batches; DDP overwrites them
    from rank 0 only at the start of the next forward. Validation and the EMA must see rank 0's
    values on every rank, or ranks score with different models and a resumed run (which loads
    rank 0's buffers everywhere) validates differently from an uninterrupted one.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
    dist.broadcast(flat, src=0)
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b))
        offset += n


# deepspeed.utils.groups' caches of process groups (the world group's clone above all); all of
# them die with the world group.
_DS_GROUPS = (
    "_WORLD_GROUP",
    "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
    "_TENSOR_MODEL_PARALLEL_GROUP",
    "_MODEL_PARALLEL_GROUP",
    "_DATA_PARALLEL_GROUP",
)
_DS_GROUP_MAPS = (
    "_EXPERT_PARALLEL_GROUP",
    "_EXPERT_PARALLEL_GROUP_RANKS",
    "_EXPERT_DATA_PARALLEL_GROUP",
    "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
    "_ALL_TO_ALL_GROUP",
)


def _forget_deepspeed_groups(ds_groups: Any) -> None:
    for name in _DS_GROUPS:
        if hasattr(ds_groups, name):
            setattr(ds_groups, name, None)
    for name in _DS_GROUP_MAPS:
        cache = getattr(ds_groups, name, None)
        if isinstance(cache, dict):
            cache.clear()


def cleanup() -> None:
    """Leave the process group if one exists, so a later run in this process starts afresh.

    DeepSpeed caches a clone of the world group (``deepspeed.utils.groups._WORLD_GROUP``) that
    dies with the group; left behind, the next ``deepspeed.initialize`` in this process fails
    with "Group ... is not registered". It is reset only when DeepSpeed is already imported
    (importing it here would cost seconds for DDP runs).
    """
    global _SET_LOCAL_RANK
    if dist.is_initialized():
        dist.destroy_process_group()
    ds_groups = sys.modules.get("deepspeed.utils.groups")
    if ds_groups is not None:
        _forget_deepspeed_groups(ds_groups)
    if _SET_LOCAL_RANK:
        os.environ.pop("LOCAL_RANK", None)
        _SET_LOCAL_RANK = False
