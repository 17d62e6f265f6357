"""MLflow tracking against a real ``mlflow server`` and a real ``file:`` store.

A tiny ``trainer fit`` (``test_resnet``, 32 px, 3 steps an epoch) logs to a server started on a
free loopback port; its params, metrics (with their steps) and artifacts are read back through
``MlflowClient``. A ``file:`` store gets the same checks, plus a resumed run continuing its
MLflow run. A server killed mid-run, and one that never answers, each cost one warning, never
the run. A one-arm, one-seed pipeline logs its training stage as a child of its parent run and
the report to the parent. (Tune trials are checked in ``tests/test_tune.py``.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import TINY_SGD_RUN, make_shard_set

from srmri.ports import free_port
from trainer.config import load_train_config
from trainer.loop import fit
from trainer.tracking import RUN_RECORD, bounded_http

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3  # optimizer steps per epoch of the tiny run (train.max_steps_per_epoch)


class Server:
    """An ``mlflow server`` process with a file backend store and artifact root in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"http://127.0.0.1:{free_port()}"
        self.store = root / "store"
        root.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 refuses a file backend otherwise
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job-runner processes
        }
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port]
        cmd += ["--backend-store-uri", str(self.store), "--workers", "1"]
        cmd += ["--artifacts-destination", str(root / "artifacts")]
        self.log = root / "server.log"
        with self.log.open("w") as out:
            # its own session: stop() ends the server and the uvicorn worker it starts
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_healthy(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server not up in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # the uvicorn worker shares the group; it may outlive its parent for a moment
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Two servers, started together: one for the checks, one to be killed mid-run."""
    root = tmp_path_factory.mktemp("mlflow")
    started = {name: Server(root / name) for name in ("live", "doomed")}
    try:
        for server in started.values():
            server.wait_healthy()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mlflow-shards") / "toy"
    make_shard_set(root, {"train": [16, 16], "val": [8], "test": [4]}, size=32)
    return root


def _cfg(shards: Path, out: Path, *overrides: str) -> Any:
    items = [*TINY_SGD_RUN, f"data.root={shards}", f"out_dir={out}", "name=tiny"]
    items += ["train.epochs=2", "train.log_every=1", f"train.max_steps_per_epoch={STEPS}"]
    return load_train_config(None, [*items, *overrides])


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str) -> list[Any]:
    with bounded_http():  # a file: store needs MLFLOW_ALLOW_FILE_STORE
        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id]) if found is not None else []


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    with bounded_http():
        return [(m.step, m.value) for m in _client(uri).get_metric_history(run_id, key)]


def _check_logged(uri: str, run: Any, tmp: Path, shards: Path, epochs: int = 2) -> None:
    """Params, metrics with their steps, artifacts, and no local path anywhere in them."""
    from shards.format import read_index

    params, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert params["optim.lr"] == "0.05" and params["model.name"] == "test_resnet"
    assert params["data.dataset_id"] == read_index(shards).dataset_id
    assert tags["srmri.dataset_id"] == params["data.dataset_id"]
    for key in ("out_dir", "data.root", "data.sr_root", "train.resume", "logging.mlflow_uri"):
        assert key not in params, key
    assert not [v for v in [*params.values(), *tags.values()] if str(tmp) in v or "/" in v]
    steps = list(range(1, STEPS * epochs + 1))
    assert [s for s, _ in _history(uri, run.info.run_id, "train/loss")] == steps
    assert [s for s, _ in _history(uri, run.info.run_id, "train/lr")] == steps
    val = _history(uri, run.info.run_id, "epoch/val_accuracy")
    assert [s for s, _ in val] == [STEPS * (e + 1) for e in range(epochs)]
    metrics = json.loads((tmp / "tiny" / "metrics.json").read_text())
    assert val[-1][1] == pytest.approx(metrics["final"]["accuracy"])
    assert run.data.metrics["best/val_accuracy"] == pytest.approx(metrics["best"]["accuracy"])
    with bounded_http():
        client = _client(uri)
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert names == {"config.yaml", "metrics.json", "curves.png", "confusion_val.png"}
        got = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp / "dl")))
        shared = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp / "dl")))
    text = got.read_text()
    assert str(shards) not in text and str(tmp) not in text
    config = yaml.safe_load(text)
    assert config["data"]["root"] == "<local path: not logged>" and config["optim"]["lr"] == 0.05
    summary = json.loads(shared.read_text())
    assert "run_dir" not in summary and summary["steps"] == STEPS * epochs


def test_fit_logs_params_metrics_and_artifacts_to_a_server(
    servers: dict[str, Server], shards: Path, tmp_path: Path
) -> None:
    url = servers["live"].url
    fit(_cfg(shards, tmp_path, f"logging.mlflow_uri={url}", "logging.mlflow_experiment=server"))
    (run,) = _runs(url, "server")
    _check_logged(url, run, tmp_path, shards)
    record = json.loads((tmp_path / "tiny" / RUN_RECORD).read_text())
    assert record["run_id"] == run.info.run_id and record["uri"] == url


def test_file_store_logs_and_a_resumed_run_continues_its_mlflow_run(
    shards: Path, tmp_path: Path
) -> None:
    uri = f"file:{tmp_path / 'mlruns'}"
    logging = (f"logging.mlflow_uri={uri}", "logging.mlflow_experiment=local")
    fit(_cfg(shards, tmp_path, *logging, "train.epochs=1"))
    (first,) = _runs(uri, "local")
    assert first.info.status == "FINISHED"
    # resumed from its epoch-end checkpoint with one more epoch: the same MLflow run goes on
    fit(_cfg(shards, tmp_path, *logging, "train.epochs=2"))
    (run,) = _runs(uri, "local")
    assert run.info.run_id == first.info.run_id
    _check_logged(uri, run, tmp_path, shards)
    assert run.data.params["train.epochs"] == "1"  # MLflow params never change ...
    assert run.data.tags["resumed.train.epochs"] == "2"  # ... the resumed value is a tag
    # starting over is another run
    fit(_cfg(shards, tmp_path, *logging, "train.resume=never"))
    runs = _runs(uri, "local")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: MLflow tracking")]


def test_a_server_killed_mid_run_costs_one_warning_not_the_run(
    servers: dict[str, Server], shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    doomed = servers["doomed"]

    def kill_after_first_epoch(row: dict[str, Any], checkpoint: Path) -> None:
        if row["epoch"] == 0:
            doomed.stop(signal.SIGKILL)

    start = time.monotonic()
    cfg = _cfg(shards, tmp_path, f"logging.mlflow_uri={doomed.url}", "train.epochs=3")
    summary = fit(cfg, on_epoch_end=kill_after_first_epoch)
    elapsed = time.monotonic() - start
    assert summary["epochs_run"] == 3 and summary["steps"] == 3 * STEPS
    assert json.loads((tmp_path / "tiny" / "metrics.json").read_text())["epochs_run"] == 3
    (warning,) = _warnings(capfd.readouterr().err)
    assert doomed.url in warning and "logging.mlflow_uri" in warning
    assert elapsed < 60, f"a dead server stalled the run for {elapsed:.0f} s"
    # what reached the server before it died is in its backend store, unfinished
    (run,) = _runs(f"file:{doomed.store}", "srmri")
    assert run.info.status == "RUNNING"
    val = _history(f"file:{doomed.store}", run.info.run_id, "epoch/val_accuracy")
    assert [s for s, _ in val] == [STEPS]


def test_an_unreachable_server_at_the_start_warns_and_trains(
    shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    summary = fit(_cfg(shards, tmp_path, f"logging.mlflow_uri={url}"))
    assert time.monotonic() - start < 60
    assert summary["epochs_run"] == 2
    (warning,) = _warnings(capfd.readouterr().err)
    assert url in warning and "server is up" in warning
    assert not (tmp_path / "tiny" / RUN_RECORD).exists()


def test_bounded_http_sets_short_retries_only_inside_and_keeps_the_users(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "9")
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    with bounded_http():
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() <= 2
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 9
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 7  # MLflow's default again
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "9"


def test_pipeline_stages_are_child_runs_and_the_report_is_logged_to_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shards.format import read_index
    from trainer.experiment.config import load_pipeline_config, read_stages
    from trainer.experiment.pipeline import plan_pipeline, run_pipeline

    monkeypatch.setenv("SRMRI_SECRET_FILE", str(tmp_path / "secret.key"))
    monkeypatch.chdir(ROOT)
    uri, out = f"file:{tmp_path / 'mlruns'}", tmp_path / "out"
    doc = {
        "out_dir": str(out),
        "data": {
            "source": "synth",
            "synth": {"n": 48, "seed": 0, "slices_per_subject": 2},
            "preprocess": {"size": 32},
            "workers": 1,
        },
        "sr": {"config": ""},
        "classify": {
            "config": str(ROOT / "configs" / "debug.yaml"),
            "overrides": [
                "train.epochs=1",
                "train.max_steps_per_epoch=2",
                "data.batch_size=4",
                "model.name=test_resnet",
            ],
        },
        "arms": ["hr"],
        "seeds": [0],
        "report": {"bootstrap": 20, "gradcam_per_class": 0},
        "logging": {"mlflow_uri": uri, "mlflow_experiment": "pipe"},
    }
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(doc))
    run_pipeline(load_pipeline_config(str(config), []))
    runs = {r.info.run_name: r for r in _runs(uri, "pipe")}
    assert set(runs) == {"pipeline", "classify/hr-seed0"}
    parent, child = runs["pipeline"], runs["classify/hr-seed0"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "mlflow.parentRunId" not in parent.data.tags
    assert {parent.info.status, child.info.status} == {"FINISHED"}
    assert child.data.params["data.dataset_id"] == read_index(out / "data").dataset_id
    assert _history(uri, child.info.run_id, "epoch/val_accuracy")
    with bounded_http():
        names = {a.path for a in _client(uri).list_artifacts(parent.info.run_id)}
    assert {"report.html", "results.json", "report.md"} <= names
    # the tracking URI is no part of any stage's fingerprint
    untracked = load_pipeline_config(str(config), ["logging.mlflow_uri=''"])
    plan = plan_pipeline(untracked, read_index(out / "data").dataset_id)
    recorded = read_stages(out)
    assert {s.name: s.fingerprint for s in plan.stages} == {
        name: r.fingerprint for name, r in recorded.items()
    }
