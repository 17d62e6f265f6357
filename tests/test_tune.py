"""Hyperparameter search end to end on a real local Ray (2 CPUs) with tiny trainer runs.

Every trial trains timm's ``test_resnet`` on 32 px toy slices for a few steps per epoch. The
tests cover: ASHA over optimizer, schedule and augmentation (weak trials stopped early), a trial
that crashes once (a flaky shard server) retried from its checkpoint, a killed driver resumed with
``tune resume``, ``best.yaml`` through ``trainer fit``, a 2-worker DDP trial through Ray Train,
and bad search spaces rejected before Ray starts.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray
import yaml
from helpers import make_shard_set

from srmri.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        RAY_AUTH_MODE="disabled",
    )
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Iterator[None]:
    # Ray's workers inherit the driver's environment: one thread each on two shared cores.
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAY_AUTH_MODE")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards") / "toy"
    make_shard_set(root, {"train": [16, 16], "val": [8], "test": [4]}, size=32)
    return root


@pytest.fixture
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _write_search(
    tmp: Path,
    root: str,
    space: dict[str, Any],
    trainer: dict[str, Any] | None = None,
    **search: Any,
) -> Path:
    """A base trainer YAML (tiny, CPU, fp32) and a search YAML over it; returns the search."""
    base = {
        "task": "classify",
        "out_dir": str(tmp / "best-runs"),
        "name": "best",
        "data": {"root": root, "batch_size": 8, "num_workers": 0},
        "model": {"name": "test_resnet"},
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
        "sched": {"name": "cosine"},
        "train": {"epochs": 3, "max_steps_per_epoch": 2, "device": "cpu", "log_every": 1},
        "checkpoint": {"keep_last": 1, "keep_best": 0},
    }
    for key, value in (trainer or {}).items():
        section, leaf = key.split(".")
        base.setdefault(section, {})[leaf] = value
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    doc = {
        "base": {"config": "base.yaml"},
        "space": space,
        "experiment": {"name": "exp", "storage": str(tmp / "exps")},
        **search,
    }
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _results(experiment: Path) -> pd.DataFrame:
    return pd.read_parquet(experiment / "results.parquet")


# ------------------------------------------------------------------ bad spaces, before any trial

BAD_SPACES = [
    (
        {"optim.lrr": {"choice": [0.1]}},
        r"space.optim.lrr.*unknown key 'optim.lrr'.*did you mean 'lr'",
    ),
    ({"optim.name": {"choice": []}}, r"space.optim.name.choice: is empty"),
    ({"optim.lr": {"uniform": [-0.1, 0.1]}}, r"space.optim.lr.*-0.1.*optim.lr: must be positive"),
    ({"optim.lr": {"uniform": [0.1, 0.01]}}, r"space.optim.lr.uniform: low 0.1 must be below"),
    ({"optim.lr": {"loguniform": [0.0, 0.1]}}, r"space.optim.lr.loguniform: bounds must be > 0"),
    ({"optim.name": {"choice": ["adamw", "lion"]}}, r"'lion' is not one of 'adamw', 'adam'"),
    ({"optim.lr": {"choice": ["fast"]}}, r"space.optim.lr.*expected a number"),
    ({"train.epochs": {"uniform": [1, 5]}}, r"space.train.epochs: uniform draws floats.*int"),
    ({"optim": {"choice": [1]}}, r"space.optim: is a section"),
    ({"out_dir": {"choice": ["x"]}}, r"space.out_dir: set by the search itself"),
    ({"optim.lr": {"choice": [0.1], "uniform": [0.1, 0.2]}}, r"give exactly one of"),
]


@pytest.mark.parametrize(("space", "message"), BAD_SPACES)
def test_bad_space_is_rejected_before_any_trial(
    tmp_path: Path, shards: Path, space: dict[str, Any], message: str
) -> None:
    from tune.config import load_search_config
    from tune.search import run_search

    path = _write_search(tmp_path, str(shards), space)
    with pytest.raises(ConfigError, match=message):
        run_search(load_search_config(path))
    assert not ray.is_initialized()
    assert not (tmp_path / "exps").exists()


def test_cli_reports_bad_space_with_exit_status_2(
    tmp_path: Path, shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tune.cli import main

    path = _write_search(tmp_path, str(shards), {"sched.nam": {"choice": ["cosine"]}})
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "did you mean 'name'" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "exps").exists()


def test_search_settings_are_checked(tmp_path: Path, shards: Path) -> None:
    from tune.config import load_search_config
    from tune.experiment import prepare

    ok = {"optim.lr": {"grid": [0.1, 0.01]}}
    path = _write_search(tmp_path, str(shards), ok, search={"name": "optuna"})
    with pytest.raises(ConfigError, match=r"grid values need search\.name=random"):
        load_search_config(path)
    path = _write_search(tmp_path, str(shards), ok, resources={"cpus": 1, "gpus": -1})
    with pytest.raises(ConfigError, match=r"resources\.gpus: must be >= 0"):
        load_search_config(path)
    path = _write_search(tmp_path, str(shards), {"optim.lr": {"choice": ["1e-3"]}})
    prep = prepare(load_search_config(path, ["scheduler.name=fifo", "train.epochs=5"]))
    assert prep.space["optim.lr"].choice == [0.001]  # coerced to the trainer's type
    assert prep.base.train.epochs == 5  # a trainer override from the command line
    assert (prep.metric, prep.mode) == ("val_accuracy", "max")


# ---------------------------------------------------------------------------------- ASHA search


@pytest.fixture(scope="module")
def asha_experiment(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """4 trials: two learn (lr 3e-3), two cannot (lr 1e-7); ASHA on validation loss."""
    from tune.config import load_search_config
    from tune.search import run_search

    tmp = tmp_path_factory.mktemp("asha")
    space = {
        "optim.lr": {"grid": [0.003, 1.0e-7]},
        "optim.name": {"choice": ["adamw", "adam"]},
        "sched.name": {"choice": ["cosine", "step", "plateau"]},
        "augment.enabled": {"choice": [True, False]},
        "augment.rotation.degrees": {"uniform": [0.0, 15.0]},
    }
    path = _write_search(
        tmp,
        str(shards),
        space,
        trainer={"train.epochs": 4},
        metric="val_loss",
        mode="min",
        num_samples=2,
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return run_search(load_search_config(path))
    finally:
        ray.shutdown()


def test_asha_search_stops_weak_trials(asha_experiment: Path) -> None:
    frame = _results(asha_experiment)
    assert frame["trial_id"].nunique() == 4
    assert set(frame["status"]) == {"TERMINATED"}
    for column in ("optim.lr", "optim.name", "sched.name", "augment.enabled", "val_loss", "epoch"):
        assert column in frame
    epochs = frame.groupby("trial_id")["epoch"].agg(["count", "max"])
    assert (epochs["count"] == epochs["max"] + 1).all()  # one row per epoch, none repeated
    stopped = frame.groupby("trial_id")["stopped_early"].last()
    assert stopped.any() and not stopped.all()
    assert epochs["count"].max() == 4 and epochs["count"].min() < 4
    weak = frame[frame["optim.lr"] < 1e-6].groupby("trial_id")["epoch"].count()
    strong = frame[frame["optim.lr"] > 1e-3].groupby("trial_id")["epoch"].count()
    assert weak.min() < strong.max()
    best = yaml.safe_load((asha_experiment / "best.yaml").read_text())
    assert best["optim"]["lr"] == pytest.approx(0.003)
    for png in ("metric_per_epoch.png", "metric_vs_optim.lr.png", "metric_vs_sched.name.png"):
        assert (asha_experiment / png).stat().st_size > 1000


def test_report_and_best_yaml_round_trip_through_trainer_fit(asha_experiment: Path) -> None:
    from tune.cli import main

    assert main(["report", str(asha_experiment)]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "fit", "--config", str(asha_experiment / "best.yaml")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((asha_experiment / "best.yaml").read_text())
    run = Path(best["out_dir"]) / best["name"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text()) == best


# ------------------------------------------------------------------ a trial that crashes once


class _FlakyShards(http.server.SimpleHTTPRequestHandler):
    """Serves a shard set; the second request for the validation shard gets a 404."""

    val_requests = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        if "val-" in self.path:
            with self.lock:
                type(self).val_requests += 1
                fail = type(self).val_requests == 2
            if fail:
                self.send_error(404, "flaky server")
                return
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


def test_trial_that_crashes_once_is_retried_from_its_checkpoint(
    tmp_path: Path, shards: Path, local_ray: None
) -> None:
    from tune.config import load_search_config
    from tune.search import run_search

    handler = functools.partial(_FlakyShards, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        path = _write_search(
            tmp_path,
            url,
            {"optim.name": {"choice": ["adamw"]}},
            trainer={"logging.mlflow_uri": f"file:{tmp_path / 'mlruns'}"},
            num_samples=1,
            max_failures=1,
            scheduler={"name": "fifo"},
        )
        experiment = run_search(load_search_config(path))
    finally:
        server.shutdown()
    assert _FlakyShards.val_requests >= 3  # epoch 0 served, epoch 1 failed, retry served
    frame = _results(experiment)
    assert list(frame["status"].unique()) == ["TERMINATED"]
    assert list(frame["num_failures"].unique()) == [1]
    assert list(frame["epoch"]) == [0, 1, 2]  # epoch 0 was not trained again
    history = pd.read_csv(experiment / frame["trial_id"][0] / "run" / "metrics.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    # the trial is one MLflow run, named by its trial id under the search's experiment name:
    # the retry continued the run the crash left behind instead of starting a second one
    from mlflow.tracking import MlflowClient

    from trainer.tracking import bounded_http

    with bounded_http():
        client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
        found = client.get_experiment_by_name("exp")
        (run,) = client.search_runs([found.experiment_id])
        vals = [m.step for m in client.get_metric_history(run.info.run_id, "epoch/val_loss")]
    assert run.info.run_name == frame["trial_id"][0] and run.info.status == "FINISHED"
    assert vals == [2, 4, 6]  # one validation per epoch (2 steps each), none logged twice


# ---------------------------------------------------------------------------------- Optuna TPE


def test_optuna_tpe_search_proposes_trials_in_the_space(
    tmp_path: Path, shards: Path, local_ray: None
) -> None:
    from tune.config import load_search_config
    from tune.experiment import prepare
    from tune.search import _search_alg, run_search

    path = _write_search(
        tmp_path,
        str(shards),
        {
            "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
            "sched.name": {"choice": ["cosine", "step"]},
        },
        trainer={"train.epochs": 1},
        num_samples=3,
        scheduler={"name": "fifo"},
        search={"name": "optuna", "seed": 0},
    )
    search = load_search_config(path)
    sampler = _search_alg(prepare(search))._sampler
    assert type(sampler).__name__ == "TPESampler"
    frame = _results(run_search(search))
    assert frame["trial_id"].nunique() == 3 and set(frame["status"]) == {"TERMINATED"}
    assert frame["optim.lr"].between(1.0e-4, 1.0e-2).all() and frame["optim.lr"].nunique() == 3
    assert set(frame["sched.name"]) <= {"cosine", "step"}


# ------------------------------------------------------------------------------ PBT mutations


def _params(trial_dir: Path) -> dict[str, Any]:
    return json.loads((trial_dir / "params.json").read_text())


def test_pbt_mutations_take_effect_in_the_exploiting_trial(
    tmp_path: Path, shards: Path, local_ray: None
) -> None:
    # A PBT exploit restores the donor's checkpoint under a mutated LR: the trainer must train
    # with the mutated value, not with the LR saved in the donor's optimizer state.
    from tune.config import load_search_config
    from tune.search import run_search

    path = _write_search(
        tmp_path,
        str(shards),
        {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
        trainer={"sched.name": "constant", "train.epochs": 5},
        metric="val_loss",
        mode="min",
        num_samples=2,
        scheduler={
            "name": "pbt",
            "perturbation_interval": 1,
            "quantile_fraction": 0.5,
            "synch": True,
        },
        search={"name": "random", "seed": 3},
    )
    experiment = run_search(load_search_config(path))
    assert set(_results(experiment)["status"]) == {"TERMINATED"}
    # Ray's PBT log: [target, donor, target iter, donor iter, donor config, new config].
    exploits = [
        json.loads(line) for line in (experiment / "pbt_global.txt").read_text().splitlines()
    ]
    assert exploits, "PBT never exploited"
    mutated = {round(e[5]["optim.lr"], 12) for e in exploits}
    initial = set()
    trained = set()
    for trial in experiment.glob("*/result.json"):
        # A trial restored from a finished donor reports nothing more, and Ray truncates its
        # result.json on restore: its starting config is then in Ray's params.json.
        lines = trial.read_text().splitlines()
        first = json.loads(lines[0])["config"] if lines else _params(trial.parent)
        initial.add(round(first["optim.lr"], 12))
        history = pd.read_csv(trial.parent / "run" / "metrics.csv")
        trained |= {round(v, 12) for v in history["lr"]}  # constant schedule: LR = config's
    # Every epoch trained with a configured LR, and the mutated ones were really used (resuming
    # from the donor's checkpoint without re-applying the config would train with the donor's).
    assert trained <= initial | mutated, (trained, initial, mutated)
    assert trained & (mutated - initial), (trained, initial, mutated)


# ------------------------------------------------------------ killed driver, then `tune resume`


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_killed_driver_resumes_without_redoing_finished_trials(
    tmp_path: Path, shards: Path
) -> None:
    space = {"optim.lr": {"grid": [0.003, 0.001]}}
    path = _write_search(
        tmp_path, str(shards), space, num_samples=1, max_concurrent=1, scheduler={"name": "fifo"}
    )
    experiment = tmp_path / "exps" / "exp"
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 (closed below)
    driver = subprocess.Popen(
        [sys.executable, "-m", "tune", "run", "--config", str(path)],
        cwd=ROOT,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and driver.poll() is None:
            counts = sorted((_lines(p) for p in experiment.glob("*/result.json")), reverse=True)
            if len(counts) >= 2 and counts[0] == 3 and counts[1] >= 1:
                break  # one trial finished, the next one has reported an epoch
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
        log.close()
    before = {p.parent.name: _lines(p) for p in experiment.glob("*/result.json")}
    finished = [t for t, n in before.items() if n == 3]
    assert finished
    proc = subprocess.run(
        [sys.executable, "-m", "tune", "resume", str(experiment)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    frame = _results(experiment)
    assert frame["trial_id"].nunique() == 2
    assert set(frame["status"]) == {"TERMINATED"}
    for trial_id, g in frame.groupby("trial_id"):
        assert sorted(set(g["epoch"])) == [0, 1, 2], trial_id
    for trial_id in finished:  # kept as they were: no epoch trained or reported again
        assert _lines(experiment / trial_id / "result.json") == 3
        assert len(pd.read_csv(experiment / trial_id / "run" / "metrics.csv")) == 3


# ------------------------------------------- `tune resume` after the folder's files were edited


def test_resume_refuses_an_edited_search_space_or_base(
    tmp_path: Path, shards: Path, local_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from tune.cli import main
    from tune.config import load_search_config
    from tune.experiment import check_inputs, load_experiment
    from tune.search import resume_search, run_search

    path = _write_search(
        tmp_path,
        str(shards),
        {"optim.lr": {"choice": [0.003]}},
        trainer={"train.epochs": 1},
        num_samples=1,
        scheduler={"name": "fifo"},
    )
    experiment = run_search(load_search_config(path))
    search_file, base_file = experiment / "search.yaml", experiment / "base.yaml"
    search_text, base_text = search_file.read_text(), base_file.read_text()
    # An edited space: Ray would keep sampling the recorded one.
    doc = yaml.safe_load(search_text)
    doc["space"]["optim.lr"]["choice"] = [0.01]
    search_file.write_text(yaml.safe_dump(doc))
    with pytest.raises(
        ConfigError, match=r"search\.yaml.*\n.*space\.optim\.lr\.choice: \[0\.003\] -> \[0\.01\]"
    ):
        resume_search(experiment)
    assert main(["resume", str(experiment)]) == 2
    assert "space.optim.lr.choice" in capsys.readouterr().err
    # An edited base: the unfinished trials would train under it, the finished ones did not.
    search_file.write_text(search_text)
    doc = yaml.safe_load(base_text)
    doc["optim"]["weight_decay"] = 0.1
    base_file.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"base\.yaml.*\n.*optim\.weight_decay: 0\.0 -> 0\.1"):
        resume_search(experiment)
    # The folder as it was recorded passes (test_killed_driver_... resumes such a folder).
    base_file.write_text(base_text)
    check_inputs(load_experiment(experiment))


# ------------------------------------------------------------------ 2-worker DDP via TorchTrainer


def test_two_worker_ddp_trial_runs_through_torch_trainer(
    tmp_path: Path, shards: Path, local_ray: None
) -> None:
    from tune.config import load_search_config
    from tune.search import run_search

    path = _write_search(
        tmp_path,
        str(shards),
        {"optim.name": {"choice": ["adamw"]}},
        trainer={"train.epochs": 2},
        num_samples=1,
        scheduler={"name": "fifo"},
        resources={"cpus": 1, "gpus": 0, "workers": 2},
    )
    experiment = run_search(load_search_config(path))
    frame = _results(experiment)
    assert list(frame["status"].unique()) == ["TERMINATED"]
    assert list(frame["epoch"]) == [0, 1]
    run = experiment / frame["trial_id"][0] / "run"
    marker = json.loads(next((run / "checkpoints").glob("step-*/complete.json")).read_text())
    assert marker["world_size"] == 2 and marker["backend"] == "ddp"
    assert list((run / "checkpoints").glob("step-*/rank-00001.pt"))
