"""``python -m launch slurm`` against a real Slurm cluster on this machine (tests/slurm_cluster.py).

The cluster is installed and started once per session (one node, then two nodes for the last
test). Where Slurm cannot be installed (not root, no package access) the tests skip and say
why; under CI (``CI=true``) that is a failure instead.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import make_shard_set
from slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster, wait_for_job

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # one epoch of 96 training samples, batch 2, on 2 ranks
IN_CI = os.environ.get("CI", "").lower() == "true"


class ClusterSwitch:
    """The session's cluster; ``ensure(two_nodes)`` restarts it in the other shape if needed."""

    def __init__(self) -> None:
        self.cluster: SlurmCluster | None = None
        self.two_nodes = False

    def ensure(self, two_nodes: bool) -> SlurmCluster:
        if self.cluster is not None and self.two_nodes == two_nodes:
            return self.cluster
        self.stop()
        try:
            self.cluster = start_cluster(two_nodes=two_nodes)
        except SlurmUnavailable as exc:
            if IN_CI:
                pytest.fail(f"CI must run the Slurm tests, but Slurm cannot be installed: {exc}")
            pytest.skip(f"Slurm cannot be installed here: {exc}")
        self.two_nodes = two_nodes
        return self.cluster

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


@pytest.fixture(scope="session")
def slurm() -> Iterator[ClusterSwitch]:
    switch = ClusterSwitch()
    yield switch
    switch.stop()


@dataclass
class Work:
    """Shared inputs: the shard set and a folder for runs and logs."""

    data: Path
    base: Path


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Work:
    base = tmp_path_factory.mktemp("launch_slurm")
    make_shard_set(base / "data", {"train": [48, 48], "val": [8, 8], "test": [4]}, size=32)
    return Work(base / "data", base)


def fit_args(work: Work, name: str) -> list[str]:
    """A tiny 2-rank CPU run: one epoch of 24 steps, deterministic, nothing saved mid-epoch."""
    return [
        "fit",
        "--config",
        str(ROOT / "configs/debug.yaml"),
        f"data.root={work.data}",
        f"out_dir={work.base / 'runs'}",
        f"name={name}",
        "data.batch_size=2",
        "train.epochs=1",
        "train.max_steps_per_epoch=null",
        "train.deterministic=true",
    ]


def launch(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m launch ARGV`` as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "launch", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def submit(work: Work, name: str, *options: str, program: list[str] | None = None) -> str:
    """Submit through ``launch slurm`` and return the job id it prints."""
    setup = f"source {Path(sys.executable).parent}/activate"
    done = launch(
        "slurm",
        "--job-name",
        name,
        "--output-dir",
        str(work.base / "slurm"),
        "--setup",
        setup,
        *options,
        "--",
        *(program or fit_args(work, name)),
    )
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip()
    assert job.isdigit(), done.stdout
    assert f"submitted Slurm job {job}" in done.stderr
    return job


def log_of(work: Work, name: str, job: str) -> Path:
    return work.base / "slurm" / f"{name}-{job}.out"


def final_weights(run_dir: Path) -> dict:
    from trainer.checkpoint import latest_checkpoint
    from trainer.weights import load_fp32_weights

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return load_fp32_weights(ckpt, use_ema=False)


def assert_finished_run(run_dir: Path) -> None:
    assert (run_dir / "metrics.json").is_file(), f"no metrics.json in {run_dir}"
    assert list((run_dir / "checkpoints").glob("step-*/complete.json")), "no checkpoint"


@pytest.fixture(scope="session")
def reference_job(slurm: ClusterSwitch, work: Work) -> str:
    """An uninterrupted 2-process run on one node (also the pre-emption test's reference)."""
    slurm.ensure(two_nodes=False)
    return submit(work, "ref", "--nproc-per-node", "2")


def test_two_process_run_on_one_node(slurm: ClusterSwitch, work: Work, reference_job: str) -> None:
    state = wait_for_job(reference_job, timeout=300)
    log = log_of(work, "ref", reference_job).read_text()
    assert state == "COMPLETED", log[-3000:]
    assert_finished_run(work.base / "runs" / "ref")
    status = launch("status", reference_job)
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "restarts 0" in status.stdout
    logs = launch("logs", reference_job, "--output-dir", str(work.base / "slurm"))
    assert logs.returncode == 0 and f"launch: job {reference_job} restart 0" in logs.stdout
    assert f"step={STEPS}" in logs.stdout  # 24 steps of 96 samples, batch 2: 2 ranks ran


def test_status_logs_and_cancel(slurm: ClusterSwitch, work: Work) -> None:
    slurm.ensure(two_nodes=False)
    program = ["python", "-c", "import time; print('sleeper up', flush=True); time.sleep(120)"]
    job = submit(work, "sleeper", program=program)
    end = time.monotonic() + 120
    log = log_of(work, "sleeper", job)
    while time.monotonic() < end and not (log.is_file() and "sleeper up" in log.read_text()):
        time.sleep(0.5)
    status = launch("status", job)
    assert status.returncode == 0 and "RUNNING" in status.stdout, status.stdout
    logs = launch("logs", job, "--tail", "1")
    assert logs.stdout.strip() == "sleeper up"
    cancel = launch("cancel", job)
    assert cancel.returncode == 0 and f"cancelled Slurm job {job}" in cancel.stdout
    assert wait_for_job(job, timeout=60) == "CANCELLED"
    assert launch("status", "999999").returncode == 1


def _loop_honours_preemption() -> bool:
    """Whether trainer/loop.py uses trainer.preempt yet (the lead integrates it)."""
    spec = importlib.util.find_spec("trainer.loop")
    return spec is not None and "preempt" in Path(str(spec.origin)).read_text()


_PROGRESS = re.compile(r"epoch 0: (\d+)/" + str(STEPS) + r" \(")  # one line per log interval


@pytest.mark.xfail(
    not _loop_honours_preemption(), reason="awaiting loop integration", run=False, strict=True
)
def test_preempted_job_requeues_and_resumes_to_the_same_weights(
    slurm: ClusterSwitch, work: Work, reference_job: str
) -> None:
    slurm.ensure(two_nodes=False)
    job = submit(work, "pre", "--nproc-per-node", "2")
    log = log_of(work, "pre", job)
    end = time.monotonic() + 240
    while time.monotonic() < end:  # signal once a few steps have run
        done = [int(s) for s in _PROGRESS.findall(log.read_text())] if log.is_file() else []
        if done and max(done) >= 3:
            break
        assert subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
        time.sleep(0.2)
    sent = subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=False)
    assert sent.returncode == 0
    state = wait_for_job(job, timeout=300)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "launch: SIGUSR1, forwarding to the step" in text
    assert f"requeueing job {job}" in text and f"launch: job {job} restart 1" in text
    resumed = [int(s) for s in re.findall(r"resumed from .*\(epoch 0, step (\d+)\)", text)]
    assert resumed and 0 < resumed[-1] < STEPS, "the requeued job did not resume mid-epoch"
    assert_finished_run(work.base / "runs" / "pre")
    assert wait_for_job(reference_job, timeout=300) == "COMPLETED"
    ref, pre = final_weights(work.base / "runs" / "ref"), final_weights(work.base / "runs" / "pre")
    assert ref.keys() == pre.keys()
    for key in ref:
        assert (ref[key] - pre[key]).abs().max().item() <= 1e-6, key


def test_two_process_run_across_two_nodes(slurm: ClusterSwitch, work: Work) -> None:
    slurm.ensure(two_nodes=True)
    job = submit(work, "two", "--nodes", "2", "--nproc-per-node", "1")
    state = wait_for_job(job, timeout=300)
    text = log_of(work, "two", job).read_text()
    assert state == "COMPLETED", text[-3000:]
    assert f"launch: job {job} restart 0 on n[1-2], rendezvous 127.0.0.1:" in text
    assert_finished_run(work.base / "runs" / "two")
