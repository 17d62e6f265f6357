"""The ``local`` target: torchrun on this machine, one process per GPU (or ``--nproc``).

The command it runs, for ``python -m launch local --nproc 2 -- fit --config C``::

    torchrun --nnodes=1 --nproc-per-node=2 --rdzv-backend=c10d \\
        --rdzv-endpoint=127.0.0.1:PORT --rdzv-id=local-PORT -m trainer fit --config C

PORT is a free port unless ``--port`` names one. Programs that are not spread over ranks
(``tune``, ``pipeline``, raw ``python ...``) run once, as they are.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from launch.program import Program, free_port, quote
from srmri.config import require

__all__ = [
    "LocalOptions",
    "gpu_count",
    "local_command",
    "run_local",
    "torchrun_command",
]


@dataclass
class LocalOptions:
    """Options of ``python -m launch local``.

    Attributes:
        nproc: Processes (ranks); 0 means one per visible GPU, at least one.
        port: Rendezvous port on 127.0.0.1; 0 picks a free one.
    """

    nproc: int = 0
    port: int = 0

    def check(self) -> None:
        require(self.nproc >= 0, "--nproc", f"must be >= 0 (0: one per GPU), got {self.nproc}")
        require(0 <= self.port < 65536, "--port", f"must be a TCP port or 0, got {self.port}")


def gpu_count() -> int:
    """CUDA devices visible to this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_command(
    program: Program,
    nproc: int,
    endpoint: str,
    rdzv_id: str,
    nnodes: int | str = 1,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The torchrun command line that starts ``nproc`` ranks of ``program`` on this node.

    Args:
        program: A distributed program (trainer fit/evaluate).
        nproc: Ranks on this node.
        endpoint: ``HOST:PORT`` of the c10d rendezvous store.
        rdzv_id: Rendezvous id shared by all nodes of the run.
        nnodes: Number of nodes (an int, or a shell expression in a rendered script).
        extra: More torchrun options, placed before the program.

    Returns:
        The argument list.
    """
    return [
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
        *extra,
        *program.module_argv(),
    ]


def local_command(options: LocalOptions, program: Program) -> list[str]:
    """The command ``launch local`` runs for ``program`` (torchrun, or the program itself)."""
    if not program.distributed:
        return program.python_argv(sys.executable)
    nproc = options.nproc or max(gpu_count(), 1)
    port = options.port or free_port()
    return torchrun_command(program, nproc, f"127.0.0.1:{port}", f"local-{port}")


def run_local(options: LocalOptions, program: Program, dry_run: bool = False) -> int:
    """Run ``program`` with torchrun in the foreground.

    Args:
        options: The target's options.
        program: What to run.
        dry_run: Print the command and run nothing.

    Returns:
        The exit status of the command (0 for a dry run).
    """
    cmd = local_command(options, program)
    print(quote(cmd), flush=True)
    if dry_run:
        return 0
    # One BLAS thread per rank unless the user chose: ranks * cores threads oversubscribe.
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    return subprocess.run(cmd, env=env, check=False).returncode
