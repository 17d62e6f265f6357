"""Process-group setup from the launcher's environment, and rank-0-only printing.

torchrun and the ``deepspeed`` launcher both export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. A plain ``python -m trainer`` run has none of them and gets a
one-process group on a free loopback port, so the rest of the trainer (metric sync, gathers,
DeepSpeed) never has to ask whether it is distributed.
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
    "all_gather_objects",
    "barrier",
    "broadcast_buffers",
    "cleanup",
    "init_distributed",
    "is_main",
    "print0",
]


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
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


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


def cleanup() -> None:
    """Leave the process group if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()
