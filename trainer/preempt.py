"""Pre-emption: turn SIGUSR1/SIGTERM into a flag the training loop checks between steps.

A cluster warns a job before it takes its nodes away: Slurm sends the signal named by
``--signal=B:USR1@90`` (forwarded to every rank by the batch script ``python -m launch slurm``
renders) and SIGTERM before SIGKILL. The handler only sets :attr:`Preemption.requested`; the loop
then saves a checkpoint at the next step boundary on every rank and exits with
:data:`srmri.exitcodes.REQUEUE`, and the requeued job resumes from that checkpoint.

Ranks may receive the signal at slightly different steps, and a checkpoint is collective, so the
loop must act on :func:`any_rank_requested` (one tiny all-reduce), not on its own flag alone.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

__all__ = [
    "Preemption",
    "any_rank_requested",
    "install_preemption_handler",
]

_Handler = Callable[[int, FrameType | None], Any] | int | None


@dataclass
class Preemption:
    """The state the signal handler sets.

    Attributes:
        signals: Signals that request a pre-emption stop.
        requested: True once any of them arrived.
        received: The last signal number received, or None.
    """

    signals: tuple[signal.Signals, ...]
    requested: bool = False
    received: int | None = None
    _previous: dict[signal.Signals, _Handler] = field(default_factory=dict, repr=False)

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """Signal handler: record the request (nothing else is safe inside a handler)."""
        self.requested = True
        self.received = signum

    def restore(self) -> None:
        """Put back the handlers that were installed before this one."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def install_preemption_handler(
    signals: Sequence[signal.Signals | int] = (signal.SIGUSR1, signal.SIGTERM),
) -> Preemption:
    """Install a handler that sets ``.requested`` when one of ``signals`` arrives.

    Args:
        signals: The signals meaning "save and stop"; SIGUSR1 (Slurm's warning) and SIGTERM.

    Returns:
        The :class:`Preemption` whose ``requested`` flag the loop polls.

    Raises:
        RuntimeError: When called outside the main thread (Python delivers signals only there).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_preemption_handler must be called from the main thread")
    state = Preemption(tuple(signal.Signals(s) for s in signals))
    for sig in state.signals:
        state._previous[sig] = signal.signal(sig, state.handle)
    return state


def any_rank_requested(preemption: Preemption) -> bool:
    """True on every rank when any rank has received a pre-emption signal (collective).

    Without an initialised process group this is just ``preemption.requested``.

    Args:
        preemption: This rank's state.

    Returns:
        Whether the job should save and stop now.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return preemption.requested
    # nccl reduces CUDA tensors only; gloo CPU ones.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1.0 if preemption.requested else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
