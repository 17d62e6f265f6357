"""Command line: ``python -m launch TARGET [options] [--dry-run] -- ARGS`` and job commands.

Targets: ``local`` (torchrun here), ``deepspeed`` (the DeepSpeed launcher over a hostfile),
``slurm`` (an sbatch script, one torchrun per node), ``ray`` (a Ray job). ARGS after ``--`` are
those of ``python -m trainer`` (or ``tune ...``, ``pipeline ...``, ``python ...``).
``status|logs|cancel JOB`` follow a submitted job: a number is a Slurm job, a pipeline's
out_dir holding ``slurm-dag.json`` the Slurm jobs of its stages, anything else a Ray job (at
``--address``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from launch.deepspeed_host import DeepSpeedOptions, run_deepspeed
from launch.local import LocalOptions, run_local
from launch.program import parse_program
from launch.ray_job import RayOptions, ray_job_command, run_ray
from launch.slurm import SlurmOptions, run_slurm
from launch.slurm_jobs import DAG_FILE
from launch.slurm_pipeline import dag_args, run_slurm_pipeline
from srmri.config import ConfigError, config_from_dict

__all__ = ["main"]

T = TypeVar("T")
_SLURM_JOB = re.compile(r"^\d+(_\d+)?$")
_SLURM_HELP = """Render and sbatch a script with one torchrun per node.

`-- pipeline --config F [key=value ...]` (without --stage) submits the pipeline as a DAG: one
job per stage not done yet (the data stage always), chained with --dependency=afterok and
--kill-on-invalid-dep=yes, so that a failed stage cancels its dependants. SR training and
enhance run on all --nodes; each classifier and its test evaluation on one node, and since the
classifiers of the arms and seeds are independent they run in parallel; data and report run as
one process on one node. `status OUT`, `logs OUT` and `cancel OUT` follow the DAG recorded in
OUT/slurm-dag.json (OUT: the pipeline's out_dir). Running the command again submits only the
stages not done under their fingerprint.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="target", required=True)

    local = sub.add_parser("local", help="torchrun on this machine")
    local.add_argument("--nproc", type=int, help="ranks (default: one per GPU, at least 1)")
    local.add_argument("--port", type=int, help="rendezvous port (default: a free one)")

    ds = sub.add_parser("deepspeed", help="the deepspeed launcher with a hostfile")
    ds.add_argument("--hosts", help="h1:SLOTS,h2:SLOTS (default: the Slurm allocation)")
    ds.add_argument("--slots", type=int, help="slots per Slurm host (default: its GPUs)")
    ds.add_argument("--hostfile", help="where to write the hostfile")
    ds.add_argument("--nproc", type=int, help="ranks on this machine without a host list")
    ds.add_argument("--port", type=int, help="master port (default: a free one)")

    sl = sub.add_parser(
        "slurm",
        help="render and sbatch a multi-node torchrun script (a pipeline: a DAG of jobs)",
        description=_SLURM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    slurm_flags = [
        ("--nodes", int, "nodes; one torchrun each (default 1; a pipeline's SR and enhance)"),
        ("--gpus-per-node", int, "#SBATCH --gpus-per-node (default: none)"),
        ("--nproc-per-node", int, "ranks per node (default: GPUs per node, at least 1)"),
        ("--cpus-per-task", int, "#SBATCH --cpus-per-task: CPUs of a node's torchrun"),
        ("--mem", str, "#SBATCH --mem per node, e.g. 64G"),
        ("--time", str, "#SBATCH --time, e.g. 04:00:00"),
        ("--partition", str, "#SBATCH --partition"),
        ("--account", str, "#SBATCH --account"),
        ("--qos", str, "#SBATCH --qos"),
        ("--job-name", str, "#SBATCH --job-name (default srmri)"),
        ("--signal", str, "pre-emption warning SIG@SECONDS (default USR1@90; '' disables)"),
        ("--port", int, "rendezvous port (default: 20000 + job id mod 20000; stage i: P+i)"),
        ("--output-dir", str, "script and log folder (default runs/slurm)"),
        ("--workdir", str, "#SBATCH --chdir (default: this directory)"),
    ]
    for flag, kind, text in slurm_flags:
        sl.add_argument(flag, type=kind, help=text)
    sl.add_argument("--setup", action="append", help="environment set-up line (repeatable)")
    sl.add_argument("--extra", action="append", help="another #SBATCH option, verbatim")
    sl.add_argument("--no-requeue", dest="requeue", action="store_false", default=None)

    ray = sub.add_parser("ray", help="ray job submit to a Ray cluster")
    ray.add_argument("--address", help="dashboard address (default: $RAY_ADDRESS or local)")
    ray.add_argument("--working-dir", help="directory shipped with the job (default: .)")
    ray.add_argument("--nproc", type=int, help="ranks of a trainer run (default: 1)")
    ray.add_argument("--cpus", type=float, help="CPUs reserved for the entrypoint")
    ray.add_argument("--gpus", type=float, help="GPUs reserved for the entrypoint")
    ray.add_argument("--submission-id", help="job id to use")
    ray.add_argument("--no-anchor-paths", dest="anchor_paths", action="store_false", default=None)

    for target in (local, ds, sl, ray):
        target.add_argument("--dry-run", action="store_true", help="print, submit nothing")

    for name, what in [("status", "state of"), ("logs", "log of"), ("cancel", "cancel")]:
        job = sub.add_parser(
            name, help=f"{what} a Slurm job (number), a pipeline's Slurm DAG (OUT) or a Ray job"
        )
        job.add_argument("job")
        job.add_argument("--address", default="", help="Ray dashboard address (Ray jobs)")
        if name == "logs":
            job.add_argument("--output-dir", default="runs/slurm", help="Slurm log folder")
            job.add_argument("--tail", type=int, default=0, help="last N lines only")
    return parser


def _options(cls: type[T], args: argparse.Namespace) -> T:
    """Build a typed options dataclass from the parsed flags that were given (and check it)."""
    given: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f.name, None)
        if value is not None:
            given[f.name] = value
    return config_from_dict(cls, given)


def _dag_command(args: argparse.Namespace) -> int:
    """``status|logs|cancel OUT`` for the Slurm jobs of a pipeline's DAG."""
    from launch import slurm_jobs

    if args.target == "status":
        return slurm_jobs.print_dag_status(args.job)
    if args.target == "logs":
        return slurm_jobs.print_dag_logs(args.job, args.tail)
    return slurm_jobs.cancel_dag(args.job)


def _job_command(args: argparse.Namespace) -> int:
    import subprocess

    # A folder (a pipeline's out_dir) rather than a job: the DAG, or a message that there is none.
    if (Path(args.job) / DAG_FILE).is_file() or "/" in args.job or Path(args.job).is_dir():
        return _dag_command(args)
    if _SLURM_JOB.match(args.job):
        from launch import slurm_jobs

        if args.target == "status":
            return slurm_jobs.print_status(args.job)
        if args.target == "logs":
            return slurm_jobs.print_logs(args.job, args.output_dir, args.tail)
        return slurm_jobs.cancel_job(args.job)
    action = {"status": "status", "logs": "logs", "cancel": "stop"}[args.target]
    return subprocess.run(ray_job_command(action, args.job, args.address), check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m launch ...``; returns the exit status (2 on bad options)."""
    words = list(sys.argv[1:] if argv is None else argv)
    split = words.index("--") if "--" in words else len(words)
    options_words, program_words = words[:split], words[split + 1 :]
    args = _parser().parse_args(options_words)
    try:
        if args.target in ("status", "logs", "cancel"):
            return _job_command(args)
        program = parse_program(program_words)
        if args.target == "local":
            return run_local(_options(LocalOptions, args), program, args.dry_run)
        if args.target == "deepspeed":
            return run_deepspeed(_options(DeepSpeedOptions, args), program, args.dry_run)
        if args.target == "slurm":
            pipeline = dag_args(program)
            if pipeline is not None:  # one job per stage, chained by their dependencies
                return run_slurm_pipeline(_options(SlurmOptions, args), pipeline, args.dry_run)
            return run_slurm(_options(SlurmOptions, args), program, args.dry_run)
        return run_ray(_options(RayOptions, args), program, args.dry_run)
    except (ConfigError, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"launch {args.target}: error: {exc}", file=sys.stderr)
        return 2
