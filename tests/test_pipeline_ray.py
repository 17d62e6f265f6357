"""The pipeline's Ray executor on a real Ray cluster (a head and a worker of 1 CPU each).

One smoke pipeline (four arms, one seed) runs as Ray tasks with its SR run folder taken by a
file: the SR stage fails, the stages that read it are not started, the hr and lr classifiers
finish (at the same time). With the file gone it is finished as a Ray job (``launch ray``),
and its results and fingerprints are compared with a serial run of the same config.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray_cluster import ENV, RayCluster, launch, submit, wait_ray_job

from trainer.experiment.config import read_stages
from trainer.experiment.pipeline import load_pipeline_config, main, plan_pipeline

ROOT = Path(__file__).resolve().parent.parent
SMOKE = "configs/pipeline-smoke.yaml"
# Not the defaults, so that a switch that does nothing fails its test.
RESOURCES = ["executor.resources.classify.cpus=0.5", "executor.resources.evaluate.ranks=2"]
SMALL = ["arms=[hr,sr]", "seeds=[0]"]
SR_READERS = ["enhance", "classify/sr-seed0", "evaluate/sr-seed0"]
SR_READERS += ["classify/lr-sr-seed0", "evaluate/lr-sr-seed0", "report"]


def pipeline(out: Path, *words: str) -> subprocess.CompletedProcess[str]:
    """``srmri pipeline --config SMOKE out_dir=OUT WORDS`` from the checkout, as a user runs it."""
    cmd = [sys.executable, "-m", "launch.cli", "pipeline", "--config", SMOKE, f"out_dir={out}"]
    return subprocess.run(
        [*cmd, *words], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )


def _journal(out: Path) -> dict:
    return json.loads((out / "executor.json").read_text())


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "out"
    done = pipeline(out, "seeds=[0]", *RESOURCES)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def failed_run(ray_cluster: RayCluster, tmp_path_factory) -> dict:
    """The pipeline with its SR run folder taken by a file: the SR stage fails."""
    out = tmp_path_factory.mktemp("ray") / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "sr").write_text("not a folder\n")
    flags = ["executor.kind=ray", "--address", ray_cluster.gcs_address]
    done = pipeline(out, "seeds=[0]", *RESOURCES, *flags)
    return {"out": out, "done": done, "journal": _journal(out), "stages": read_stages(out)}


@pytest.fixture(scope="module")
def job_run(ray_cluster: RayCluster, failed_run: dict) -> dict:
    """The failed pipeline finished by a Ray job, with what made it fail removed."""
    out = failed_run["out"]
    (out / "runs" / "sr").unlink()
    argv = ["--working-dir", str(ROOT), "--", "pipeline", "--config", SMOKE, f"out_dir={out}"]
    job, told = submit(ROOT, ray_cluster, *argv, "seeds=[0]", *RESOURCES, "--executor", "ray")
    state = wait_ray_job(ray_cluster, job, timeout=900)
    logs = launch(ROOT, "logs", job, "--address", ray_cluster.address).stdout
    return {"out": out, "state": state, "told": told, "logs": logs, "journal": _journal(out)}


def _overlap(journal: dict, kind: str) -> float:
    """The longest time two stages of ``kind`` ran at the same time (negative: never)."""
    ran = [s for s in journal["stages"].values() if s["kind"] == kind and "start" in s]
    spans = [(s["start"], s["end"]) for s in ran]
    pairs = itertools.combinations(spans, 2)
    return max((min(a[1], b[1]) - max(a[0], b[0]) for a, b in pairs), default=-1.0)


def _port(address: str) -> str:
    return address.rsplit(":", 1)[1]


def test_a_failed_stage_stops_what_reads_it(failed_run: dict) -> None:
    done, journal, out = failed_run["done"], failed_run["journal"], failed_run["out"]
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    log = out / "logs" / "sr.log"
    assert f"stage failed: sr (log {log})" in done.stderr and log.is_file()
    assert "[pipeline] sr: FAILED (exit 2)" in done.stdout  # its run folder is a file
    status = {name: s["status"] for name, s in journal["stages"].items()}
    finished = ["data", "classify/hr-seed0", "evaluate/hr-seed0"]
    finished += ["classify/lr-seed0", "evaluate/lr-seed0"]  # they do not read sr
    assert status == {
        "sr": "failed",
        **dict.fromkeys(finished, "done"),
        **dict.fromkeys(SR_READERS, "not started"),
    }
    assert set(failed_run["stages"]) == {"sr", *finished}  # nothing else ever started
    assert not (out / "report.html").exists()
    for name in finished:
        assert f"[pipeline] {name}: done in " in done.stdout
        assert (out / "logs" / f"{name}.log").is_file()
    assert _overlap(journal, "classify") > 1.0  # hr and lr trained at the same time


def test_executor_settings_reach_ray(ray_cluster: RayCluster, failed_run: dict) -> None:
    journal = failed_run["journal"]
    # --address: that cluster (Ray names its head by another interface), not a local Ray
    assert _port(journal["cluster"]) == str(ray_cluster.gcs_port)
    stages = {n: s for n, s in journal["stages"].items() if s["status"] == "done"}
    for name, stage in stages.items():
        want = 0.5 if stage["kind"] == "classify" else 1.0
        assert stage["assigned"] == {"CPU": want}, name  # what Ray granted the task
        assert stage["resources"]["cpus"] == want
    evaluate = stages["evaluate/hr-seed0"]
    assert "--nproc-per-node=2" in evaluate["command"] and evaluate["resources"]["ranks"] == 2
    assert "torch.distributed.run" not in " ".join(stages["classify/hr-seed0"]["command"])
    # the data stage runs once whatever the ranks: a stage on rank 0 alone gets no torchrun
    assert "torch.distributed.run" not in " ".join(stages["data"]["command"])


def test_the_pipeline_as_a_ray_job_finishes_the_failed_one(
    ray_cluster: RayCluster, job_run: dict
) -> None:
    out, journal = job_run["out"], job_run["journal"]
    assert f"pipeline folder: {out}" in job_run["told"]
    assert job_run["state"] == "SUCCEEDED", job_run["logs"][-3000:]
    assert f"[pipeline] report: {out / 'report.html'}" in job_run["logs"]
    assert (out / "report.html").is_file()
    assert _port(journal["cluster"]) == str(ray_cluster.gcs_port)  # the job's own cluster
    assert yaml.safe_load((out / "pipeline.yaml").read_text())["executor"]["kind"] == "ray"
    status = {name: s["status"] for name, s in journal["stages"].items()}
    for name in ("classify/hr-seed0", "evaluate/hr-seed0", "classify/lr-seed0"):
        assert status[name] == "done before", name  # finished by the failed run
    assert {status[name] for name in ["data", "sr", *SR_READERS]} == {"done"}
    assert _overlap(journal, "classify") > 1.0  # sr and lr+sr


def test_ray_run_gives_the_serial_results(serial_run: Path, job_run: dict) -> None:
    out = job_run["out"]
    serial, parallel = (json.loads((o / "results.json").read_text()) for o in (serial_run, out))
    assert serial["dataset_id"] == parallel["dataset_id"]
    for arm, result in serial["arms"].items():
        got = [s["accuracy"] for s in parallel["arms"][arm]["per_seed"]]
        assert got == [s["accuracy"] for s in result["per_seed"]], arm
    want = {name: r.fingerprint for name, r in read_stages(serial_run).items()}
    assert {name: r.fingerprint for name, r in read_stages(out).items()} == want
    assert not (serial_run / "executor.json").exists()  # the serial executor is the default


def test_a_gpu_request_no_node_can_hold_is_refused(ray_cluster: RayCluster, tmp_path: Path) -> None:
    gpu = "executor.resources.sr.gpus=1"
    address = ["--executor", "ray", "--address", ray_cluster.gcs_address]
    refused = pipeline(tmp_path / "out", *SMALL, gpu, *address)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "executor.resources.sr.gpus: a sr stage asks for 1 GPUs" in refused.stderr
    assert not (tmp_path / "out" / "stages.json").exists()  # refused before any stage ran


def test_executor_keys_change_no_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    base = load_pipeline_config(SMOKE, [f"out_dir={tmp_path}"])
    other = load_pipeline_config(
        SMOKE,
        [f"out_dir={tmp_path}", "executor.kind=ray", "executor.address=h:1", *RESOURCES],
    )
    for a, b in zip(plan_pipeline(base, "set").stages, plan_pipeline(other, "set").stages):
        assert a.fingerprint == b.fingerprint, a.name


def test_bad_executor_settings_name_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    for words, key in [
        (["executor.resources.classify.ranks=0"], "executor.resources.classify.ranks"),
        (["executor.resources.report.ranks=2"], "executor.resources.report.ranks"),
        (["executor.resources.sr.ranks=2", "executor.resources.sr.gpus=1"], "sr.gpus"),
        (["--address", "http://127.0.0.1:8265"], "executor.address"),
        (["executor.kind=slurmm"], "executor.kind"),
    ]:
        status = main(["--config", SMOKE, f"out_dir={tmp_path}", *words, "--plan"])
        err = capsys.readouterr().err
        assert status == 2 and key in err, (words, err)


def test_launch_ray_anchors_a_pipelines_out_dir(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch.commands import main as launch_main

    monkeypatch.chdir(ROOT)
    words = ["pipeline", "--config", SMOKE, "--executor", "ray"]
    assert launch_main(["ray", "--dry-run", "--", *words]) == 0
    out = capsys.readouterr().out.strip()
    # relative, it would be the job's temporary copy of the project: made absolute where typed
    assert out.endswith(
        f"-- python -m launch.cli {' '.join(words)} out_dir={ROOT}/runs/pipeline-smoke"
    )
    assert launch_main(["ray", "--dry-run", "--", *words, "out_dir=/abs/x"]) == 0
    assert capsys.readouterr().out.strip().endswith("out_dir=/abs/x")
