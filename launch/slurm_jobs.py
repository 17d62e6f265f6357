"""``python -m launch status|logs|cancel JOB`` for Slurm jobs: squeue, scontrol, scancel.

``scontrol show job`` knows a job while it is queued or running and for a few minutes after
(MinJobAge); after that the log is still found in the output folder by its ``-JOBID.out`` name.
``status|logs|cancel OUT`` do the same for every job of a pipeline submitted as a DAG
(:mod:`launch.slurm_pipeline`, recorded in ``OUT/slurm-dag.json``); once Slurm has forgotten a
job, the stage's state comes from the pipeline's own record, ``OUT/stages.json``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DAG_FILE",
    "SlurmJob",
    "cancel_dag",
    "cancel_job",
    "find_log",
    "is_active",
    "print_dag_logs",
    "print_dag_status",
    "print_logs",
    "print_status",
    "read_dag",
    "show_job",
]

DAG_FILE = "slurm-dag.json"
# States of a job that is still queued, running, or on its way back into the queue.
_ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESIZING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
}


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
        dependency: What it waits for (``afterok:12(unfulfilled)``; ``(null)`` when nothing).
        start_time: When it (last) started, ``YYYY-MM-DDTHH:MM:SS`` (``Unknown`` before).
        end_time: When it ended (or is expected to).
    """

    job_id: str
    name: str
    state: str
    reason: str
    restarts: int
    nodes: str
    exit_code: str
    stdout: str
    dependency: str = ""
    start_time: str = ""
    end_time: str = ""


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
        dependency=fields.get("Dependency", ""),
        start_time=fields.get("StartTime", ""),
        end_time=fields.get("EndTime", ""),
    )


def is_active(job: SlurmJob) -> bool:
    """Whether the job is still queued or running (or being requeued)."""
    return job.state in _ACTIVE


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


def _print_tail(log: Path, tail: int) -> None:
    """Print ``log`` (its last ``tail`` lines when > 0)."""
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(lines[-tail:] if tail > 0 else lines))


def print_logs(job_id: str, output_dir: str | Path = "runs/slurm", tail: int = 0) -> int:
    """Print the job's log (its last ``tail`` lines when > 0); 1 when no log is found."""
    log = find_log(job_id, output_dir)
    if log is None:
        print(f"no log for Slurm job {job_id} (looked at scontrol and {output_dir}/*-{job_id}.out)")
        return 1
    _print_tail(log, tail)
    return 0


def cancel_job(job_id: str) -> int:
    """``scancel JOB``; returns its exit status (its error printed)."""
    done = _run(["scancel", job_id])
    if done.returncode != 0:
        print(f"scancel {job_id}: {done.stderr.strip()}")
    else:
        print(f"cancelled Slurm job {job_id}")
    return done.returncode


def read_dag(out: str | Path) -> dict[str, Any] | None:
    """The DAG recorded in ``OUT/slurm-dag.json``, or None when there is none."""
    path = Path(out) / DAG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _forgotten_state(out: Path, name: str, entry: dict[str, Any]) -> tuple[str, str]:
    """State and reason of a stage whose job Slurm no longer knows: from ``stages.json``."""
    # Imported here: it pulls in torch, which a status of jobs that Slurm knows does not need.
    from trainer.experiment.config import read_stages

    record = read_stages(out).get(name)
    planned = entry.get("fingerprint", "")
    if record is None or (planned and record.fingerprint != planned):
        return "not run", "Slurm has forgotten the job; stages.json has no record of this run"
    if record.status == "done":
        return "done", "Slurm has forgotten the job; stages.json says done"
    return "started", "Slurm has forgotten the job; it never finished (see its log)"


def _dag_rows(out: Path, dag: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """One row per stage: stage, job, state, restarts, reason."""
    rows = []
    for name, entry in dag["stages"].items():
        if entry["job"] == "done":
            rows.append((name, "-", "done before", "-", "skipped: done under its fingerprint"))
            continue
        job = show_job(entry["job"])
        if job is not None:
            rows.append((name, job.job_id, job.state, str(job.restarts), job.reason))
        else:
            state, reason = _forgotten_state(out, name, entry)
            rows.append((name, entry["job"], state, "?", reason))
    return rows


def _missing_dag(out: Path) -> int:
    print(f"no Slurm DAG in {out} (no {DAG_FILE}): give a job id or a pipeline's out_dir")
    return 1


def print_dag_status(out: str | Path) -> int:
    """Print a table of every stage of the DAG in ``out``; 1 when there is none."""
    out = Path(out)
    dag = read_dag(out)
    if dag is None:
        return _missing_dag(out)
    print(f"pipeline {out}: {' '.join([dag['config'], *dag['overrides']])}")
    rows = [("stage", "job", "state", "restarts", "reason"), *_dag_rows(out, dag)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[4])
    return 0


def print_dag_logs(out: str | Path, tail: int = 0) -> int:
    """Print the log of every job of the DAG in ``out`` (last ``tail`` lines when > 0)."""
    out = Path(out)
    dag = read_dag(out)
    if dag is None:
        return _missing_dag(out)
    for name, entry in dag["stages"].items():
        if entry["job"] == "done":
            continue
        log = find_log(entry["job"], dag["output_dir"])
        print(f"===== {name} (job {entry['job']}): {log or 'no log yet'}")
        if log is not None:
            _print_tail(log, tail)
    return 0


def cancel_dag(out: str | Path) -> int:
    """``scancel`` every job of the DAG in ``out`` that is still queued or running."""
    out = Path(out)
    dag = read_dag(out)
    if dag is None:
        return _missing_dag(out)
    jobs = [e["job"] for e in dag["stages"].values() if e["job"] != "done"]
    live = [j for j in jobs if (job := show_job(j)) is not None and is_active(job)]
    if not live:
        print(f"no job of the DAG in {out} is queued or running")
        return 0
    done = _run(["scancel", *live])
    if done.returncode != 0:
        print(f"scancel {' '.join(live)}: {done.stderr.strip()}")
    else:
        print(f"cancelled Slurm jobs {' '.join(live)}")
    return done.returncode
