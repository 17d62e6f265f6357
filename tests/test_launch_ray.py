"""``python -m launch ray`` against a real Ray cluster: a head and a worker node on loopback.

The cluster is the session fixture ``ray_cluster`` (conftest.py, tests/ray_cluster.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_shard_set
from ray_cluster import RayCluster, launch, submit, wait_ray_job

ROOT = Path(__file__).resolve().parents[1]


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
