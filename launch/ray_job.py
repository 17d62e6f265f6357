"""The ``ray`` target: ``ray job submit`` of a trainer run or a tune search to a Ray cluster.

The project directory travels as the job's working directory (files that git ignores stay
behind: ``.venv``, ``data/``, ``runs/``). A trainer run becomes the entrypoint
``python -m launch local --nproc N -- trainer ...``: torchrun with N ranks on the node the job
lands on (a Ray Train ``TorchTrainer`` spreading ranks over nodes is tune's business). Relative
``out_dir`` and ``data.root`` of a ``fit`` would point into Ray's temporary copy of the working
directory, so they are made absolute here, and the run directory is printed: on a real cluster
they must be on a file system that every node shares. A pipeline's relative ``out_dir`` is made
absolute the same way; ``-- pipeline ... --executor ray`` runs its stages as Ray tasks on the
job's own cluster (Ray sets ``RAY_ADDRESS`` for the entrypoint). ``status``, ``logs`` and
``cancel`` wrap ``ray job status|logs|stop --address``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launch.program import Program, quote
from srmri.config import require

__all__ = [
    "RayOptions",
    "anchor_fit_paths",
    "anchor_pipeline_out_dir",
    "ray_address",
    "ray_entrypoint",
    "ray_job_command",
    "ray_submit_command",
    "run_ray",
]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PIPELINE_OUT_DIR = "runs/pipeline"  # PipelineConfig.out_dir's default (read without importing it)


@dataclass
class RayOptions:
    """Options of ``python -m launch ray``.

    Attributes:
        address: Ray dashboard address; empty: ``$RAY_ADDRESS``, else ``http://127.0.0.1:8265``.
        working_dir: Directory shipped as the job's working directory (the project).
        nproc: Ranks of a trainer run (torchrun on one node of the cluster).
        cpus: CPUs reserved for the entrypoint (``--entrypoint-num-cpus``; 0: none).
        gpus: GPUs reserved for the entrypoint (``--entrypoint-num-gpus``; 0: none).
        submission_id: Job id to use; empty: ``srmri-<program>-<time>-<random>``.
        anchor_paths: Make a fit's relative ``out_dir``/``data.root`` absolute (see module doc).
    """

    address: str = ""
    working_dir: str = "."
    nproc: int = 1
    cpus: float = 0.0
    gpus: float = 0.0
    submission_id: str = ""
    anchor_paths: bool = True

    def check(self) -> None:
        require(self.nproc >= 1, "--nproc", f"must be >= 1, got {self.nproc}")
        require(self.cpus >= 0 and self.gpus >= 0, "--cpus/--gpus", "must be >= 0")
        require(
            Path(self.working_dir).is_dir(), "--working-dir", f"{self.working_dir} is no folder"
        )


def ray_address(address: str = "") -> str:
    """The address to use: ``address``, else ``$RAY_ADDRESS``, else the local dashboard."""
    return address or os.environ.get("RAY_ADDRESS", "") or DEFAULT_ADDRESS


def _yaml_and_overrides(program: Program) -> tuple[dict[str, Any], list[str]]:
    """The program's ``--config`` YAML (``{}`` without one) and its ``key=value`` words.

    Read here with yaml alone: importing the trainer's config tree (torch, MONAI) would cost the
    launcher seconds. The program checks the whole config when the job starts.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    args, rest = parser.parse_known_args(list(program.args[1:]))
    data: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping of settings")
    return data, [w for w in rest if "=" in w and not w.startswith("-")]


def _fit_settings(program: Program) -> tuple[str, str, str]:
    """``out_dir``, ``name`` and ``data.root`` of a fit, read from its YAML and overrides."""
    data, overrides = _yaml_and_overrides(program)
    section = data.get("data")
    settings = {
        "out_dir": str(data.get("out_dir", "runs")),
        "name": str(data.get("name") or ""),
        "data.root": str(section.get("root", "")) if isinstance(section, dict) else "",
    }
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in settings:
            settings[key] = value
    return settings["out_dir"], settings["name"], settings["data.root"]


def anchor_fit_paths(program: Program, base: Path) -> tuple[Program, str | None]:
    """Make a ``fit``'s relative ``out_dir`` and local ``data.root`` absolute against ``base``.

    Args:
        program: The program; anything but ``trainer fit`` is returned as it is.
        base: The directory relative paths mean (where the user typed the command).

    Returns:
        The program with ``out_dir=/abs``/``data.root=/abs`` overrides appended where needed,
        and where the run directory will be (None for other programs).
    """
    if not program.is_fit:
        return program, None
    out_dir, name, root = _fit_settings(program)
    extra = []
    if not Path(out_dir).is_absolute():
        out_dir = str((base / out_dir).resolve())
        extra.append(f"out_dir={out_dir}")
    if root and "://" not in root and not Path(root).is_absolute() and (base / root).exists():
        extra.append(f"data.root={(base / root).resolve()}")
    where = f"{out_dir}/{name}" if name else f"{out_dir}/<task>-<config hash> (set name= to fix it)"
    return program.with_args(*extra), where


def anchor_pipeline_out_dir(program: Program, base: Path) -> tuple[Program, str | None]:
    """Make a pipeline's relative ``out_dir`` absolute against ``base`` (see the module doc).

    Args:
        program: The program; anything but ``pipeline ...`` is returned as it is.
        base: The directory relative paths mean (where the user typed the command).

    Returns:
        The program with ``out_dir=/abs`` appended where needed, and the pipeline's folder
        (None for other programs).
    """
    if not program.is_pipeline:
        return program, None
    data, overrides = _yaml_and_overrides(program)
    out_dir = str(data.get("out_dir", PIPELINE_OUT_DIR))
    for item in overrides:
        key, _, value = item.partition("=")
        out_dir = value if key == "out_dir" else out_dir
    if Path(out_dir).is_absolute():
        return program, out_dir
    out_dir = str((base / out_dir).resolve())
    return program.with_args(f"out_dir={out_dir}"), out_dir


def ray_entrypoint(options: RayOptions, program: Program) -> list[str]:
    """The job's entrypoint: ``launch local`` (torchrun) for a trainer run, else the program."""
    if program.distributed:
        local = ["python", "-m", "launch", "local", f"--nproc={options.nproc}"]
        return [*local, "--", program.module, *program.args]
    return program.python_argv()


def ray_submit_command(options: RayOptions, program: Program, submission_id: str) -> list[str]:
    """``ray job submit --no-wait ...`` for ``program`` (the job id chosen up front)."""
    cmd = [
        "ray",
        "job",
        "submit",
        f"--address={ray_address(options.address)}",
        f"--working-dir={Path(options.working_dir).resolve()}",
        f"--submission-id={submission_id}",
        "--no-wait",
    ]
    if options.cpus:
        cmd.append(f"--entrypoint-num-cpus={options.cpus:g}")
    if options.gpus:
        cmd.append(f"--entrypoint-num-gpus={options.gpus:g}")
    return [*cmd, "--", *ray_entrypoint(options, program)]


def ray_job_command(action: str, job_id: str, address: str = "") -> list[str]:
    """``ray job status|logs|stop JOB --address ADDR``."""
    return ["ray", "job", action, job_id, f"--address={ray_address(address)}"]


def run_ray(options: RayOptions, program: Program, dry_run: bool = False) -> int:
    """Submit ``program`` as a Ray job (or print the command); prints the job id.

    Args:
        options: The target's options.
        program: A trainer run, a tune search or any ``python`` command.
        dry_run: Print the command and submit nothing.

    Returns:
        The exit status of ``ray job submit`` (0 for a dry run).
    """
    run_dir = pipeline_dir = None
    if options.anchor_paths:
        program, run_dir = anchor_fit_paths(program, Path.cwd())
        program, pipeline_dir = anchor_pipeline_out_dir(program, Path.cwd())
    label = (program.module or "python").replace(".", "-")
    job_id = (
        options.submission_id
        or f"srmri-{label}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    )
    cmd = ray_submit_command(options, program, job_id)
    if dry_run:
        print(quote(cmd), flush=True)
        return 0
    print(f"$ {quote(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stdout + done.stderr, file=sys.stderr)
        return done.returncode
    address = ray_address(options.address)
    print(f"submitted Ray job {job_id} to {address}", file=sys.stderr)
    if run_dir is not None:
        print(f"run directory: {run_dir} (on the node that runs the job)", file=sys.stderr)
    elif pipeline_dir is not None:
        print(f"pipeline folder: {pipeline_dir} (its report.html at the end)", file=sys.stderr)
    elif program.module == "tune":
        where = "experiment.storage/name of its config; the job log ends with it"
        print(f"results: the search's experiment folder ({where})", file=sys.stderr)
    status = f"python -m launch status {job_id} --address {address}"
    logs = f"python -m launch logs {job_id} --address {address}"
    print(f"status: {status}   logs: {logs}", file=sys.stderr)
    print(job_id, flush=True)
    return 0
