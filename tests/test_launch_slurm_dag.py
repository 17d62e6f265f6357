"""``launch slurm -- pipeline``: the smoke pipeline as a DAG of Slurm jobs on a real local cluster.

One DAG (data, SR, enhance, the ``lr`` and ``sr`` classifiers and their evaluations, report) is
shared by the module: it runs beside a serial run of the same config, one of its classifier
jobs is pre-empted while it trains, and its results must equal the serial run's. A second,
smaller DAG has a classifier that fails. The cluster is the session's one when
test_launch_slurm.py left it running (either shape serves: every job here asks for one node),
else one started here. The dry-run test needs no cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from slurm_cluster import STATE, SlurmUnavailable, start_cluster, wait_for_job

from launch.commands import main
from launch.slurm_jobs import DAG_FILE, SlurmJob, is_active, show_job
from trainer.experiment.config import read_stages

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "pipeline-smoke.yaml"
IN_CI = os.environ.get("CI", "").lower() == "true"
# The smoke classifier over its whole epoch (8 steps, not 4: a pre-emption lands mid-epoch),
# with deterministic kernels so that the resumed classifier matches the serial run's.
CLASSIFY = [
    "train.epochs=1",
    "train.max_steps_per_epoch=null",
    "data.num_workers=0",
    "model.name=resnet10t",
    "train.deterministic=true",
]
_PROGRESS = re.compile(r"epoch 0: (\d+)/\d+ \(")
Done = subprocess.CompletedProcess[str]
# A dry run prints each script under a line naming its stage and its file.
_SCRIPTS = re.compile(r"# ===== stage (\S+): \S+ =====\n(.*?)(?=# ===== |\Z)", re.S)


def overrides(out: Path, arms: str = "[lr,sr]", classify: list[str] = CLASSIFY) -> list[str]:
    """The smoke pipeline made smaller: one seed, two arms, a short bootstrap."""
    return [
        f"out_dir={out}",
        "seeds=[0]",
        f"arms={arms}",
        f"classify.overrides=[{','.join(classify)}]",
        "report.bootstrap=50",
    ]


def test_dry_run_prints_one_script_per_stage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the jobs' working directory, where the config's paths resolve
    out = tmp_path / "out"
    argv = ["slurm", "--nodes", "2", "--nproc-per-node", "2", "--job-name", "p", "--dry-run"]
    argv += ["--output-dir", str(tmp_path / "slurm"), "--", "pipeline", "--config", str(SMOKE)]
    assert main([*argv, f"out_dir={out}", "seeds=[0]"]) == 0
    printed = capsys.readouterr().out
    scripts = dict(_SCRIPTS.findall(printed))
    arms = ["hr", "lr", "sr", "lr-sr"]
    names = ["data", "sr", "enhance"]
    names += [f"{k}/{a}-seed0" for a in arms for k in ("classify", "evaluate")] + ["report"]
    assert list(scripts) == names
    deps = {
        "sr": "afterok:<data>",
        "enhance": "afterok:<data>:<sr>",
        "classify/hr-seed0": "afterok:<data>",
        "evaluate/hr-seed0": "afterok:<data>:<classify/hr-seed0>",
        "classify/sr-seed0": "afterok:<data>:<sr>:<enhance>",
        "evaluate/sr-seed0": "afterok:<data>:<sr>:<enhance>:<classify/sr-seed0>",
    }
    for name, script in scripts.items():
        lines = script.splitlines()
        dep = [line.split("=", 1)[1] for line in lines if line.startswith("#SBATCH --dependency")]
        if name == "data":
            assert dep == []
        else:  # everything reads the data set
            assert len(dep) == 1 and dep[0].startswith("afterok:<data>"), name
        if name in deps:
            assert dep == [deps[name]], name
        assert ("#SBATCH --kill-on-invalid-dep=yes" in lines) == (name != "data"), name
        assert f"#SBATCH --job-name=p-{name.replace('/', '-')}" in lines
        nodes = 2 if name in ("sr", "enhance") else 1
        assert f"#SBATCH --nodes={nodes}" in lines, name
        ranks = name not in ("data", "report")  # trains, enhances or evaluates on every rank
        assert ("--rdzv-backend=c10d" in script) == ranks, name
        assert any(line.startswith("#SBATCH --requeue") for line in lines) == ranks, name
        assert f"--stage {name}" in script and "--expect-dataset-id" not in script
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    report = next(line for line in scripts["report"].splitlines() if "--dependency" in line)
    assert set(re.findall(r"<([^>]+)>", report)) == set(names[:-1])
    assert not tmp_path.joinpath("slurm").exists() and not (out / DAG_FILE).exists()


def test_the_pipeline_words_are_read_by_the_pipelines_parser(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    argv = ["slurm", "--dry-run", "--output-dir", str(tmp_path), "--", "pipeline"]
    with pytest.raises(SystemExit):  # the pipeline's own error, before any script
        main([*argv, "--config", str(SMOKE), "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, f"out_dir={tmp_path}"])
    assert "--config" in capsys.readouterr().err
    # One stage, or a pipeline that schedules itself with Ray, is one job, not a DAG.
    for extra in (["--stage", "data"], ["--executor", "ray"]):
        assert main([*argv, "--config", str(SMOKE), *extra]) == 0
        printed = capsys.readouterr().out
        assert "# ===== stage" not in printed and printed.count("#SBATCH --job-name") == 1
        assert " ".join(extra) in printed


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """The running session cluster, or one started (and stopped) by this module."""
    if _alive(STATE / "slurmctld.pid"):
        yield
        return
    try:
        started = start_cluster(two_nodes=False)
    except SlurmUnavailable as exc:
        if IN_CI:
            pytest.fail(f"CI must run the Slurm tests, but Slurm cannot be installed: {exc}")
        pytest.skip(f"Slurm cannot be installed here: {exc}")
    yield
    started.stop()


@dataclass
class Work:
    """Where this module's runs go, and the environment every run and job gets."""

    base: Path
    env: dict[str, str]

    def launch(self, *argv: str) -> Done:
        """``python -m launch ARGV`` from the project root, as a user would run it."""
        cmd = [sys.executable, "-m", "launch", *argv]
        run = subprocess.run
        return run(cmd, capture_output=True, text=True, cwd=ROOT, env=self.env, timeout=300)

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """``python -m launch ARGV`` in the background, its output captured."""
        cmd = [sys.executable, "-m", "launch", *argv]
        pipe = subprocess.PIPE
        return subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, cwd=ROOT, env=self.env)

    def words(self, name: str, overrides: list[str]) -> list[str]:
        """``launch`` words submitting the smoke pipeline as jobs named ``name-<stage>``."""
        setup = f"source {Path(sys.executable).parent}/activate"
        slurm = ["slurm", "--job-name", name, "--output-dir", str(self.base / "slurm")]
        return [*slurm, "--setup", setup, "--", "pipeline", "--config", str(SMOKE), *overrides]

    def log(self, name: str, stage: str, job: str) -> Path:
        return self.base / "slurm" / f"{name}-{stage.replace('/', '-')}-{job}.out"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Work:
    base = tmp_path_factory.mktemp("slurm_dag")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SRMRI_SECRET_FILE": str(base / "secret.key")}
    return Work(base, env)


def jobs_of(out: Path) -> dict[str, str]:
    """Stage -> job id (or "done") from ``OUT/slurm-dag.json``."""
    dag = json.loads((out / DAG_FILE).read_text())
    return {name: entry["job"] for name, entry in dag["stages"].items()}


@dataclass
class Dag:
    """A submitted DAG and what scontrol showed of its jobs.

    Slurm forgets a job MinJobAge (300 s) after it ended, which a loaded machine can exceed
    within one DAG: its jobs are polled while it runs and the last sight of each is kept, and
    ``launch status OUT`` runs as soon as the report leaves the queue.
    """

    name: str
    out: Path
    submitted: Done
    jobs: dict[str, str]
    pending: dict[str, SlurmJob | None]
    final: dict[str, SlurmJob] = field(default_factory=dict)
    status: subprocess.Popen[str] | None = None

    def poll(self) -> None:
        for stage, job in self.jobs.items():
            found = show_job(job)
            if found is not None:
                self.final[stage] = found

    @property
    def ended(self) -> bool:
        return "report" in self.final and not is_active(self.final["report"])

    def status_rows(self) -> dict[str, list[str]]:
        """``launch status OUT`` as it was when the report left the queue: stage -> words."""
        assert self.status is not None
        printed, _ = self.status.communicate(timeout=300)
        assert self.status.returncode == 0, printed
        print(printed)  # what a user sees (pytest -s)
        return {line.split()[0]: line.split() for line in printed.splitlines()[2:]}


def submit_dag(work: Work, name: str, words: list[str]) -> Dag:
    """Submit, then read the jobs back at once: the dependants still wait, as submitted."""
    done = work.launch(*work.words(name, words))
    assert done.returncode == 0, done.stderr
    out = Path(words[0].removeprefix("out_dir="))
    jobs = jobs_of(out)
    return Dag(name, out, done, jobs, {stage: show_job(job) for stage, job in jobs.items()})


def _training(log: Path) -> bool:
    """Whether the classifier's log shows two optimizer steps of its epoch."""
    steps = [int(s) for s in _PROGRESS.findall(log.read_text())] if log.is_file() else []
    return bool(steps) and max(steps) >= 2


def _follow(work: Work, dags: list[Dag], preempt: str, timeout: float = 1200) -> bool:
    """Poll every DAG to its end; pre-empt the first DAG's ``preempt`` stage while it trains."""
    main = dags[0]
    log = work.log(main.name, preempt, main.jobs[preempt])
    sent, polled, end = False, 0.0, time.monotonic() + timeout
    while time.monotonic() < end and any(d.status is None for d in dags):
        if not sent and _training(log):
            signal = ["scancel", "--signal=USR1", "--batch", main.jobs[preempt]]
            sent = subprocess.run(signal, check=False).returncode == 0
        if time.monotonic() - polled > 2:
            polled = time.monotonic()
            for dag in (d for d in dags if d.status is None):
                dag.poll()
                if dag.ended:
                    dag.status = work.popen("status", str(dag.out))
        time.sleep(0.2)
    assert all(d.status is not None for d in dags), f"the DAGs did not end in {timeout:.0f} s"
    return sent


@dataclass
class Runs:
    """The module's runs: the smoke DAG, a DAG whose classifier fails, and the serial run."""

    main: Dag
    fail: Dag
    serial: Path
    serial_rc: int
    preempted: str
    signalled: bool


# The classifier pre-empted: it waits for the data stage only, so it trains beside SR.
PREEMPTED = "classify/lr-seed0"
# A model name the config accepts and timm does not: the classifier fails when it is built.
BROKEN = [*CLASSIFY[:3], "model.name=no-such-model"]


@pytest.fixture(scope="module")
def runs(cluster: None, work: Work) -> Runs:
    main = submit_dag(work, "dag", overrides(work.base / "dag"))
    fail = submit_dag(work, "fail", overrides(work.base / "fail", "[hr]", BROKEN))
    serial = work.base / "serial"
    cmd = [sys.executable, "-m", "launch.cli", "pipeline", "--config", str(SMOKE)]
    with (work.base / "serial.log").open("w") as log:
        proc = subprocess.Popen(
            [*cmd, *overrides(serial)], cwd=ROOT, env=work.env, stdout=log, stderr=log
        )
        signalled = _follow(work, [main, fail], PREEMPTED)
        serial_rc = proc.wait(timeout=900)
    return Runs(main, fail, serial, serial_rc, PREEMPTED, signalled)


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


# Its setup runs the shared DAGs: about 4 minutes on an idle 2-core machine (every job starts a
# Python that imports torch and timm), more than the 600 s default beside other work.
@pytest.mark.timeout(1500)
def test_dag_reaches_the_report_in_dependency_order(runs: Runs) -> None:
    dag = runs.main
    assert {j.state for j in dag.final.values()} == {"COMPLETED"}, dag.final
    assert (dag.out / "report.html").is_file()
    assert dag.submitted.stdout.split() == [w for kv in dag.jobs.items() for w in kv]
    recorded = json.loads((dag.out / DAG_FILE).read_text())["stages"]
    assert dag.pending["data"] is not None and dag.pending["data"].dependency in ("", "(null)")
    for name, entry in recorded.items():
        assert Path(entry["script"]).is_file()
        if name == "data":
            continue
        pending = dag.pending[name]
        assert pending is not None and pending.state == "PENDING", (name, pending)
        upstream = {dag.jobs[u] for u in entry["upstream"]}
        assert set(re.findall(r"afterok:(\d+)", pending.dependency)) == upstream, name
        for u in entry["upstream"]:  # Slurm started it only after every upstream job ended
            assert _time(dag.final[name].start_time) >= _time(dag.final[u].end_time), (name, u)


def _accuracies(out: Path) -> dict[str, list[float]]:
    res = json.loads((out / "results.json").read_text())
    return {arm: [s["accuracy"] for s in a["per_seed"]] for arm, a in res["arms"].items()}


def _leaves(tree: object, path: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _leaves(sub, f"{path}[{i}]").items()}
    return {path: tree}


def test_dag_results_equal_a_serial_run(runs: Runs) -> None:
    dag = runs.main
    assert runs.serial_rc == 0, (runs.serial.parent / "serial.log").read_text()[-3000:]
    assert _accuracies(dag.out) == _accuracies(runs.serial)
    ours, theirs = read_stages(dag.out), read_stages(runs.serial)
    assert {n: r.fingerprint for n, r in ours.items()} == {
        n: r.fingerprint for n, r in theirs.items()
    }
    assert {r.status for r in ours.values()} == {"done"}
    a = _leaves(json.loads((dag.out / "results.json").read_text()))
    b = _leaves(json.loads((runs.serial / "results.json").read_text()))
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print("results.json values that differ between the DAG and the serial run:", differ)
    assert not [k for k in differ if "weights_sha256" in k or "accuracy" in k]


def test_a_preempted_classifier_requeues_and_resumes(runs: Runs, work: Work) -> None:
    assert runs.signalled, f"{runs.preempted} ended before it could be pre-empted"
    job = runs.main.final[runs.preempted]
    assert job.state == "COMPLETED" and job.restarts >= 1
    text = work.log(runs.main.name, runs.preempted, job.job_id).read_text()
    assert "launch: SIGUSR1, forwarding to the step" in text
    assert f"requeueing job {job.job_id}" in text
    assert "resumed from" in text  # the requeued stage continued from the pre-emption checkpoint


def test_status_of_the_dag(runs: Runs, work: Work) -> None:
    dag = runs.main
    rows = dag.status_rows()
    assert set(rows) == set(dag.jobs)
    for name, row in rows.items():
        # Slurm may have forgotten the first jobs by the end: stages.json then says done
        assert row[1] == dag.jobs[name] and row[2] in ("COMPLETED", "done"), row
    assert rows["report"][2] == "COMPLETED" and rows[runs.preempted][3] in ("1", "2", "?")
    assert main(["status", str(dag.out / "nothing")]) == 1


def test_rerun_submits_only_the_data_stage(
    runs: Runs, work: Work, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process (torch is loaded already), with the environment the first submission had.
    for key in ("OMP_NUM_THREADS", "SRMRI_SECRET_FILE"):
        monkeypatch.setenv(key, work.env[key])
    monkeypatch.chdir(ROOT)
    dag = runs.main
    before = read_stages(dag.out)
    dataset_id = json.loads((dag.out / "results.json").read_text())["dataset_id"]
    words = work.words(dag.name, overrides(dag.out))
    assert main(["slurm", "--dry-run", *words[1:]]) == 0  # the same command, dry first
    dry = capsys.readouterr().out
    assert dry.count("# ===== stage ") == 1 and "# ===== stage data:" in dry
    assert f"--expect-dataset-id {dataset_id}" in dry
    assert main(words) == 0
    again = capsys.readouterr()
    assert "every stage but data is done" in again.err
    jobs = jobs_of(dag.out)
    assert again.out.split() == ["data", jobs["data"]]
    assert {job for name, job in jobs.items() if name != "data"} == {"done"}
    assert wait_for_job(jobs["data"], timeout=600) == "COMPLETED"
    assert read_stages(dag.out) == before
    assert main(["status", str(dag.out)]) == 0
    assert capsys.readouterr().out.count("done before") == len(jobs) - 1


def test_a_failed_stage_cancels_its_dependants(runs: Runs, work: Work) -> None:
    dag = runs.fail
    assert list(dag.jobs) == ["data", "classify/hr-seed0", "evaluate/hr-seed0", "report"]
    states = [dag.final[n].state for n in dag.jobs]
    assert states == ["COMPLETED", "FAILED", "CANCELLED", "CANCELLED"], dag.final
    log = work.log(dag.name, "classify/hr-seed0", dag.jobs["classify/hr-seed0"]).read_text()
    assert "no-such-model" in log
    rows = dag.status_rows()
    assert rows["classify/hr-seed0"][2:] == ["FAILED", "0", "NonZeroExitCode"]
    for name in ("evaluate/hr-seed0", "report"):
        assert rows[name][2:] == ["CANCELLED", "0", "DependencyNeverSatisfied"], rows
