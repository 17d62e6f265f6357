"""trainer.preempt: real signals set the flag; ranks agree on a stop when one rank is signalled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import torch.distributed as dist
from helpers import run_distributed

from srmri.exitcodes import REQUEUE
from trainer.preempt import (
    Preemption,
    any_rank_requested,
    install_preemption_handler,
)


def test_signal_sets_requested_and_restore_puts_back_the_old_handler() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    state = install_preemption_handler()
    try:
        assert isinstance(state, Preemption) and not state.requested
        assert not any_rank_requested(state)  # no process group: the local flag
        os.kill(os.getpid(), signal.SIGUSR1)
        assert state.requested and state.received == signal.SIGUSR1
        assert any_rank_requested(state)
    finally:
        state.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
    assert REQUEUE == 3


def test_sigterm_does_not_kill_a_process_that_installed_the_handler() -> None:
    # A child process: SIGTERM's default action would end the test runner itself.
    code = textwrap.dedent(
        """
        import os, signal, sys
        from srmri.exitcodes import REQUEUE
        from trainer.preempt import install_preemption_handler
        state = install_preemption_handler()
        os.kill(os.getpid(), signal.SIGTERM)
        sys.exit(REQUEUE if state.received == signal.SIGTERM else 1)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == REQUEUE, done.stderr


def test_installing_outside_the_main_thread_is_refused() -> None:
    import threading

    errors: list[BaseException] = []

    def body() -> None:
        try:
            install_preemption_handler()
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert errors and "main thread" in str(errors[0])


def _agree(rank: int, world_size: int) -> None:
    state = install_preemption_handler()
    try:
        assert not any_rank_requested(state)
        if rank == 1:  # only one rank gets the signal; all must decide to stop
            os.kill(os.getpid(), signal.SIGUSR1)
        dist.barrier()
        assert state.requested == (rank == 1)
        assert any_rank_requested(state)
    finally:
        state.restore()


def test_one_signalled_rank_stops_every_rank() -> None:
    run_distributed(_agree, 2)
