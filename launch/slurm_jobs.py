"""``python -m launch status|logs|cancel JOB`` for Slurm jobs: squeue, scontrol, scancel.

``scontrol show job`` knows a job while it is queued or running and for a few minutes after
(MinJobAge); after that the log is still found in the output folder by its ``-JOBID.out`` name.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SlurmJob", "cancel_job", "find_log", "print_logs", "print_status", "show_job"]


@dataclass(frozen=True)
class SlurmJob:
    """What ``scontrol show job`` says about a job.

    Attributes:
        job_id: The job id.
        name: Job name.
        state: JobState (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...).
        reason: Why it waits or how it ended (None when nothing to say).
        restarts: How often it was requeued.
        nodes: Its node list (empty while pending).
        exit_code: ``status:signal`` of the batch script.
        stdout: Path of its log.
    """

    job_id: str
    name: str
    state: str
    reason: str
    restarts: int
    nodes: str
    exit_code: str
    stdout: str


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def show_job(job_id: str) -> SlurmJob | None:
    """Parse ``scontrol show job -o JOB``; None when Slurm no longer knows the job."""
    done = _run(["scontrol", "show", "job", "-o", job_id])
    if done.returncode != 0 or not done.stdout.strip():
        return None
    fields: dict[str, str] = {}
    for token in done.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    nodes = fields.get("NodeList", "")
    return SlurmJob(
        job_id=fields.get("JobId", job_id),
        name=fields.get("JobName", ""),
        state=fields.get("JobState", "UNKNOWN"),
        reason=fields.get("Reason", "None"),
        restarts=int(fields.get("Restarts", "0") or 0),
        nodes="" if nodes == "(null)" else nodes,
        exit_code=fields.get("ExitCode", ""),
        stdout=fields.get("StdOut", ""),
    )


def find_log(job_id: str, output_dir: str | Path = "runs/slurm") -> Path | None:
    """The job's log: scontrol's StdOut, else ``OUTPUT_DIR/*-JOBID.out``."""
    job = show_job(job_id)
    if job is not None and job.stdout and Path(job.stdout).is_file():
        return Path(job.stdout)
    matches = sorted(Path(output_dir).glob(f"*-{job_id}.out"))
    return matches[0] if matches else None


def print_status(job_id: str) -> int:
    """Print the job's queue line (squeue) and state (scontrol); 1 when the job is unknown."""
    queued = _run(["squeue", "-h", "-j", job_id, "-o", "%i %j %T %M %R"]).stdout.strip()
    job = show_job(job_id)
    if job is None and not queued:
        print(f"Slurm job {job_id}: unknown (finished long ago, or never existed)")
        return 1
    if queued:
        print(f"squeue: {queued}")
    if job is not None:
        print(
            f"job {job.job_id} ({job.name}): {job.state}, reason {job.reason}, "
            f"restarts {job.restarts}, nodes {job.nodes or '-'}, exit {job.exit_code}, "
            f"log {job.stdout}"
        )
    return 0


def print_logs(job_id: str, output_dir: str | Path = "runs/slurm", tail: int = 0) -> int:
    """Print the job's log (its last ``tail`` lines when > 0); 1 when no log is found."""
    log = find_log(job_id, output_dir)
    if log is None:
        print(f"no log for Slurm job {job_id} (looked at scontrol and {output_dir}/*-{job_id}.out)")
        return 1
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(lines[-tail:] if tail > 0 else lines))
    return 0


def cancel_job(job_id: str) -> int:
    """``scancel JOB``; returns its exit status (its error printed)."""
    done = _run(["scancel", job_id])
    if done.returncode != 0:
        print(f"scancel {job_id}: {done.stderr.strip()}")
    else:
        print(f"cancelled Slurm job {job_id}")
    return done.returncode
