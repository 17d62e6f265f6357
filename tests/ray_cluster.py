"""A real local Ray cluster for tests: a head and a worker node on loopback, stopped by pid.

The cluster follows shared/recipes/local-cluster.md (``RAY_AUTH_MODE=disabled`` for every
process), with its own temp folder and ports so that it cannot meet another Ray on this
machine, and it is stopped by the pids of its own processes rather than ``ray stop --force``
(which would end every Ray process of the machine, other people's included). Plain functions
(with the ``launch ray`` job helpers) and one dataclass, no pytest: ``conftest.py`` wraps them
in the session fixture ``ray_cluster``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from srmri.ports import free_port

__all__ = [
    "ENV",
    "TEMP_DIR",
    "RayCluster",
    "launch",
    "start_ray",
    "stop_ray",
    "submit",
    "wait_ray_job",
]

# Short: Ray's socket paths have a length limit.
TEMP_DIR = Path(f"/tmp/rl{os.getpid()}")
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    # One pseudonym key for the cluster's processes (Ray jobs and tasks get the cluster's
    # environment, not the submitter's) and the tests' own runs: their data sets agree.
    "SRMRI_SECRET_FILE": str(TEMP_DIR.with_name(f"{TEMP_DIR.name}-secret.key")),
}
ENV.pop("RAY_ADDRESS", None)
_END = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class RayCluster:
    """A running head + worker cluster: its dashboard address and what identifies its processes.

    Attributes:
        address: The dashboard's ``http://127.0.0.1:PORT`` (what ``ray job submit`` takes).
        temp_dir: The head's temp folder.
        gcs_port: The head's GCS port (``127.0.0.1:PORT`` is what ``ray.init`` takes).
    """

    address: str
    temp_dir: Path
    gcs_port: int

    @property
    def worker_temp_dir(self) -> Path:
        """The worker node's own temp folder (see :func:`start_ray`)."""
        return self.temp_dir.with_name(f"{self.temp_dir.name}w")

    @property
    def gcs_address(self) -> str:
        """``127.0.0.1:PORT`` of the head's GCS."""
        return f"127.0.0.1:{self.gcs_port}"


def _cluster_pids(cluster: RayCluster) -> list[int]:
    """Pids of the cluster's processes: those naming its temp dir or GCS port, and descendants."""
    gcs = re.compile(rf"127\.0\.0\.1:{cluster.gcs_port}\b")
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        temp_dirs = (str(cluster.temp_dir), str(cluster.worker_temp_dir))
        if any(d in cmdline for d in temp_dirs) or gcs.search(cmdline):
            roots.add(int(proc.name))
    found = set(roots)
    grew = True
    while grew:
        kids = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= kids
        grew = bool(kids)
    found.discard(os.getpid())
    return sorted(found)


def stop_ray(cluster: RayCluster) -> None:
    """SIGTERM then SIGKILL the cluster's own processes, by pid."""
    for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.5)):
        pids = _cluster_pids(cluster)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if pids:
            time.sleep(pause)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    shutil.rmtree(cluster.worker_temp_dir, ignore_errors=True)
    Path(ENV["SRMRI_SECRET_FILE"]).unlink(missing_ok=True)


def _ray(*args: str) -> None:
    done = subprocess.run(["ray", *args], env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def start_ray() -> RayCluster:
    """Start a head and a worker node of 1 CPU each; stop it with :func:`stop_ray`.

    Returns:
        The cluster (also when starting failed half-way: stop it all the same).

    Raises:
        AssertionError: A ``ray start`` failed (the cluster is stopped first).
    """
    temp_dir = TEMP_DIR
    gcs, dash = free_port(), free_port()
    cluster = RayCluster(f"http://127.0.0.1:{dash}", temp_dir, gcs)
    common = [
        "--num-cpus=1",
        "--disable-usage-stats",
        "--object-store-memory=300000000",
        "--node-ip-address=127.0.0.1",
    ]
    try:
        _ray(
            "start",
            "--head",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            *common,
        )
        # A temp folder of its own: sharing the head's, a Ray job's working directory (unpacked
        # to one path for both nodes) vanished under the job's driver once it called ray.init
        # (Ray 2.60; the other node's runtime-env agent deleting its "own" copy, it seems).
        _ray(
            "start",
            f"--address=127.0.0.1:{gcs}",
            f"--temp-dir={cluster.worker_temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}",
            *common,
        )
    except BaseException:
        stop_ray(cluster)
        raise
    return cluster


def launch(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m launch ARGV`` in ``cwd`` as a user would."""
    cmd = [sys.executable, "-m", "launch", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=120)


def submit(cwd: Path, cluster: RayCluster, *argv: str) -> tuple[str, str]:
    """Submit through ``launch ray``; returns the job id (stdout) and what it told the user."""
    done = launch(cwd, "ray", "--address", cluster.address, *argv)
    assert done.returncode == 0, done.stdout + done.stderr
    job = done.stdout.strip()
    assert job.startswith("srmri-") and f"submitted Ray job {job}" in done.stderr, done.stderr
    return job, done.stderr


def wait_ray_job(cluster: RayCluster, job: str, timeout: float = 300) -> str:
    """Poll the job's status every 0.5 s; returns the final status name."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.address)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = str(client.get_job_status(job)).split(".")[-1]
        if status in _END:
            return status
        time.sleep(0.5)
    raise TimeoutError(f"Ray job {job} not finished after {timeout:.0f} s")
