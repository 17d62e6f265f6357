"""The ``deepspeed`` target: the DeepSpeed launcher over a hostfile, ``--module trainer``.

Hosts come from ``--hosts h1:4,h2:4`` or, inside a Slurm allocation, from
``scontrol show hostnames $SLURM_JOB_NODELIST`` (slots: ``--slots`` or ``$SLURM_GPUS_ON_NODE``).
The hostfile (``h1 slots=4`` per line) is written to ``--hostfile``, and the launcher reaches the
other hosts over ssh/pdsh as DeepSpeed does. A trainer ``fit`` gets ``backend.name=deepspeed``
unless it sets a backend itself. On a machine without GPUs and without remote hosts it falls
back to torchrun with the DeepSpeed backend (gloo on CPU) and says so.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.local import LocalOptions, gpu_count, local_command
from launch.program import Program, free_port, quote
from srmri.config import require

__all__ = [
    "DeepSpeedOptions",
    "deepspeed_command",
    "hostfile_text",
    "parse_hosts",
    "resolve_hosts",
    "run_deepspeed",
    "slurm_hosts",
]

_LOCAL_NAMES = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}


@dataclass
class DeepSpeedOptions:
    """Options of ``python -m launch deepspeed``.

    Attributes:
        hosts: ``host:slots,host:slots``; empty: the Slurm allocation, else this machine.
        slots: Slots (GPUs) per Slurm host; 0 means ``$SLURM_GPUS_ON_NODE`` or this machine's.
        hostfile: Where the hostfile is written.
        nproc: Processes on this machine when no host list applies; 0 means one per GPU.
        port: Master port; 0 picks a free one.
    """

    hosts: str = ""
    slots: int = 0
    hostfile: str = "runs/deepspeed/hostfile"
    nproc: int = 0
    port: int = 0

    def check(self) -> None:
        require(self.slots >= 0, "--slots", "must be >= 0")
        require(self.nproc >= 0, "--nproc", "must be >= 0 (0: one per GPU)")
        require(0 <= self.port < 65536, "--port", f"must be a TCP port or 0, got {self.port}")
        require(bool(self.hostfile), "--hostfile", "must be a file path")
        if self.hosts:
            parse_hosts(self.hosts)


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """Read ``h1:4,h2:4`` into ``[("h1", 4), ("h2", 4)]``.

    Raises:
        srmri.config.ConfigError: On an entry without ``:SLOTS`` or with a bad slot count.
    """
    hosts = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, slots = entry.rpartition(":")
        require(
            bool(sep and name) and slots.isdigit() and int(slots) > 0,
            "--hosts",
            f"{entry!r} must look like HOST:SLOTS (e.g. gpu01:4)",
        )
        hosts.append((name, int(slots)))
    require(bool(hosts), "--hosts", f"no HOST:SLOTS entries in {text!r}")
    return hosts


def slurm_hosts(slots: int) -> list[tuple[str, int]]:
    """The hosts of the current Slurm allocation, ``slots`` each ([] outside an allocation)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return []
    names = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    per_node = slots or int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0) or max(gpu_count(), 1)
    return [(n, per_node) for n in names]


def resolve_hosts(options: DeepSpeedOptions) -> list[tuple[str, int]]:
    """``--hosts`` if given, else the Slurm allocation, else [] (this machine only)."""
    return parse_hosts(options.hosts) if options.hosts else slurm_hosts(options.slots)


def hostfile_text(hosts: list[tuple[str, int]]) -> str:
    """DeepSpeed's hostfile: one ``HOST slots=N`` line per host."""
    return "".join(f"{name} slots={slots}\n" for name, slots in hosts)


def _with_deepspeed_backend(program: Program) -> Program:
    if program.is_fit and not program.has_override("backend.name"):
        return program.with_args("backend.name=deepspeed")
    return program


def deepspeed_command(
    options: DeepSpeedOptions, program: Program, hosts: list[tuple[str, int]], port: int
) -> list[str]:
    """The ``deepspeed`` launcher command for ``program`` on ``hosts`` (or this machine).

    Args:
        options: The target's options.
        program: What to run (``--module`` for a package, a script for a raw command).
        hosts: The host list; [] runs on this machine with ``--num_gpus``.
        port: The master port.

    Returns:
        The argument list.
    """
    program = _with_deepspeed_backend(program)
    cmd = ["deepspeed"]
    if hosts:
        cmd += [f"--hostfile={options.hostfile}", f"--master_addr={hosts[0][0]}"]
    else:
        cmd += [f"--num_gpus={options.nproc or max(gpu_count(), 1)}"]
    cmd += [f"--master_port={port}", "--no_local_rank"]
    if program.module:
        cmd += ["--module", program.module, *program.args]
    else:
        cmd += list(program.args)
    return cmd


def run_deepspeed(options: DeepSpeedOptions, program: Program, dry_run: bool = False) -> int:
    """Write the hostfile and run the DeepSpeed launcher (or the torchrun fallback).

    Args:
        options: The target's options.
        program: What to run.
        dry_run: Print the hostfile and command; write and run nothing.

    Returns:
        The launcher's exit status (0 for a dry run).
    """
    hosts = resolve_hosts(options)
    remote = any(name not in _LOCAL_NAMES for name, _ in hosts)
    if not remote and gpu_count() == 0:
        print(
            "deepspeed: no GPU on this machine; falling back to torchrun with the DeepSpeed "
            "backend (backend.name=deepspeed, gloo on CPU)",
            file=sys.stderr,
            flush=True,
        )
        fallback = LocalOptions(nproc=options.nproc, port=options.port)
        cmd = local_command(fallback, _with_deepspeed_backend(program))
    else:
        cmd = deepspeed_command(options, program, hosts, options.port or free_port())
        if hosts:
            text = hostfile_text(hosts)
            print(f"# hostfile {options.hostfile}\n{text}", end="", flush=True)
            if not dry_run:
                path = Path(options.hostfile)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    print(quote(cmd), flush=True)
    if dry_run:
        return 0
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    return subprocess.run(cmd, env=env, check=False).returncode
