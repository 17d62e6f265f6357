"""``python -m launch ray`` against a real Ray cluster: a head and a worker node on loopback.

The cluster follows shared/recipes/local-cluster.md (``RAY_AUTH_MODE=disabled`` for every
process), with its own temp folder and ports so that it cannot meet another Ray on this
machine, and it is stopped by the pids of its own processes rather than ``ray stop --force``
(which would end every Ray process of the machine, other people's included).
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port, make_shard_set

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
}
ENV.pop("RAY_ADDRESS", None)
_END = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class RayCluster:
    """A running head + worker cluster: its dashboard address and what identifies its processes."""

    address: str
    temp_dir: Path
    gcs_port: int


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
        if str(cluster.temp_dir) in cmdline or gcs.search(cmdline):
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


def _ray(*args: str) -> None:
    done = subprocess.run(["ray", *args], env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    if shutil.which("ray", path=ENV["PATH"]) is None:
        pytest.fail("the ray command is missing: install ray[default] (pyproject lists it)")
    temp_dir = Path(f"/tmp/rl{os.getpid()}")  # short: Ray's socket paths have a length limit
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
        _ray(
            "start",
            f"--address=127.0.0.1:{gcs}",
            f"--dashboard-agent-listen-port={free_port()}",
            *common,
        )
        yield cluster
    finally:
        stop_ray(cluster)


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


def test_two_process_trainer_run_lands_where_the_user_is_told(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    make_shard_set(tmp_path / "data", {"train": [16, 16], "val": [8, 8]}, size=32)
    # Relative paths, as a user types them: launch makes them absolute and prints the run dir.
    job, told = submit(
        tmp_path,
        ray_cluster,
        "--working-dir",
        str(ROOT),
        "--nproc",
        "2",
        "--",
        "fit",
        "--config",
        str(ROOT / "configs/debug.yaml"),
        "data.root=data",
        "out_dir=results",
        "name=rayfit",
    )
    run_dir = tmp_path / "results" / "rayfit"
    assert f"run directory: {run_dir} " in told
    state = wait_ray_job(ray_cluster, job)
    logs = launch(tmp_path, "logs", job, "--address", ray_cluster.address)
    assert state == "SUCCEEDED", logs.stdout[-3000:]
    assert "torchrun --nnodes=1 --nproc-per-node=2" in logs.stdout
    assert "step=2," in logs.stdout  # 32 samples, batch 8, 2 ranks: 2 steps an epoch
    assert (run_dir / "metrics.json").is_file()
    assert list((run_dir / "checkpoints").glob("step-*/complete.json"))


def test_tiny_script_job_status_and_logs(ray_cluster: RayCluster, tmp_path: Path) -> None:
    (tmp_path / "hello_job.py").write_text(
        "import pathlib, sys\n"
        "pathlib.Path(sys.argv[1]).write_text('hello from a Ray job')\n"
        "print('wrote', sys.argv[1])\n"
    )
    out = tmp_path / "out.txt"
    job, _ = submit(
        tmp_path, ray_cluster, "--working-dir", ".", "--", "python", "-m", "hello_job", str(out)
    )
    assert wait_ray_job(ray_cluster, job) == "SUCCEEDED"
    assert out.read_text() == "hello from a Ray job"
    status = launch(tmp_path, "status", job, "--address", ray_cluster.address)
    assert status.returncode == 0 and f"Job '{job}' succeeded" in status.stdout + status.stderr
    logs = launch(tmp_path, "logs", job, "--address", ray_cluster.address)
    assert f"wrote {out}" in logs.stdout


def test_stop_a_running_ray_job(ray_cluster: RayCluster, tmp_path: Path) -> None:
    job, _ = submit(
        tmp_path,
        ray_cluster,
        "--working-dir",
        ".",
        "--",
        "python",
        "-c",
        "import time; time.sleep(120)",
    )
    stop = launch(tmp_path, "cancel", job, "--address", ray_cluster.address)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert wait_ray_job(ray_cluster, job, timeout=60) == "STOPPED"


def test_tune_search_as_a_ray_job(ray_cluster: RayCluster, tmp_path: Path) -> None:
    pytest.importorskip("tune.cli", reason="tune/ is not written yet: enable with tune.cli")
    space = ROOT / "configs" / "tune-debug.yaml"
    if not space.is_file():
        pytest.fail(f"tune exists but its tiny search config {space} does not")
    make_shard_set(tmp_path / "data", {"train": [16, 16], "val": [8, 8]}, size=32)
    job, _ = submit(
        tmp_path,
        ray_cluster,
        "--working-dir",
        str(ROOT),
        "--",
        "tune",
        "run",
        "--config",
        "configs/tune-debug.yaml",
        f"data.root={tmp_path / 'data'}",
        "num_samples=2",
        f"experiment.storage={tmp_path / 'tune'}",
    )
    state = wait_ray_job(ray_cluster, job, timeout=400)
    logs = launch(tmp_path, "logs", job, "--address", ray_cluster.address)
    assert state == "SUCCEEDED", logs.stdout[-3000:]
    assert list((tmp_path / "tune").rglob("results.parquet")), "no results table"
