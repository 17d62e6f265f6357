"""The MLflow run a training run or a pipeline logs to, off for good after its first failure.

A :class:`Tracker` opens (or continues) one MLflow run and logs params, tags, metrics and
artifacts to it through ``mlflow.tracking.MlflowClient``. A record file (``RUN/mlflow.json``)
names the run, so that a resumed run continues its MLflow run instead of starting a second one.

Tracking never costs the run it tracks: MLflow's HTTP client retries for minutes by default, so
every call here runs with a few seconds of retries at most (:func:`bounded_http`), and the first
failure (a server that is down or goes away, a store that cannot be written) prints one warning
naming the URI and turns the tracker off. ``mlflow`` is imported only when a tracker starts.
What a training run logs, without paths, is :mod:`trainer.shared_run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from srmri import atomic

__all__ = ["RUN_RECORD", "Tracker", "bounded_http"]

RUN_RECORD = "mlflow.json"

# A few seconds at most per call (MLflow's defaults: 7 retries, backoff factor 2, 120 s
# timeout, i.e. minutes of a stalled run per call). ``MLFLOW_ALLOW_FILE_STORE``: MLflow 3
# refuses ``file:`` stores unless it is set, and the user asked for one.
_BOUNDED_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
    "MLFLOW_ALLOW_FILE_STORE": "true",
}

T = TypeVar("T")


@contextlib.contextmanager
def bounded_http() -> Iterator[None]:
    """MLflow calls inside the block retry for a few seconds at most.

    The variables are set only for the block and only where the user has not set them (their
    own values win), so nothing else in the process sees them.
    """
    added = [k for k in _BOUNDED_HTTP if k not in os.environ]
    os.environ.update({k: _BOUNDED_HTTP[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class Tracker:
    """One MLflow run; after its first failed call every method does nothing.

    Open one with :meth:`start` (or :func:`trainer.shared_run.track_training`); one that
    could not start comes back off, so callers never test for None.

    Args:
        uri: The tracking URI (named in the warning).
        client: An ``mlflow.tracking.MlflowClient`` for it, or None (off).
        run_id: The MLflow run, or "" (off).
    """

    def __init__(self, uri: str, client: Any = None, run_id: str = "") -> None:
        self.uri = uri
        self.client = client
        self.run_id = run_id
        self.continued = False  # whether start() continued a recorded run

    @property
    def active(self) -> bool:
        """Whether calls still reach the tracking store."""
        return self.client is not None and bool(self.run_id)

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        record: Path,
        *,
        run_name: str,
        parent: str = "",
        made_by: str = "",
        may_continue: bool = False,
        tags: dict[str, str] | None = None,
    ) -> Tracker:
        """Open (or continue) the MLflow run recorded in ``record``; off after a failure.

        Args:
            uri: Tracking URI.
            experiment: MLflow experiment name (created when missing).
            record: The JSON file naming the run (``RUN/mlflow.json``).
            run_name: Name of a new run.
            parent: Run id to nest a new run under ("" for none).
            made_by: What the run logs (a data set id, a fingerprint); a recorded run is
                continued only under the same value.
            may_continue: Whether the recorded run may be continued (a resumed run); otherwise
                a new run replaces the record.
            tags: Tags set on the run.

        Returns:
            The tracker (off when the store could not be reached; the warning is printed).
        """
        tracker = cls(uri)
        with bounded_http():
            try:
                from mlflow.tracking import MlflowClient

                tracker.client = MlflowClient(tracking_uri=uri)
                exp_id = _experiment_id(tracker.client, experiment)
                if may_continue:
                    tracker.run_id = _continued_run(tracker.client, record, uri, exp_id, made_by)
                tracker.continued = bool(tracker.run_id)
                if tracker.continued:
                    tracker.client.update_run(tracker.run_id, status="RUNNING")
                else:
                    run_tags = {
                        **(tags or {}),
                        **({"mlflow.parentRunId": parent} if parent else {}),
                    }
                    run = tracker.client.create_run(exp_id, tags=run_tags, run_name=run_name)
                    tracker.run_id = run.info.run_id
                    entry = {"uri": uri, "experiment_id": exp_id, "run_id": tracker.run_id}
                    atomic.write_json(record, {**entry, "made_by": made_by})
                if tags and tracker.continued:
                    tracker.set_tags(tags)
            except Exception as exc:  # any failure of the store: warn, never fail the run
                tracker._fail(exc)
        return tracker

    def _fail(self, exc: BaseException) -> None:
        self.client, self.run_id = None, ""
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(
            f"warning: MLflow tracking at {self.uri} failed ({type(exc).__name__}: {detail}); "
            "tracking is off for the rest of this run, whose run directory keeps every log. "
            "Check that the tracking server is up and reachable, or unset logging.mlflow_uri",
            file=sys.stderr,
            flush=True,
        )

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args)`` against the store, or nothing when off; the first failure turns it off."""
        if not self.active:
            return None
        with bounded_http():
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                self._fail(exc)
                return None

    def log_params(self, params: dict[str, str]) -> None:
        """Log params; a continued run gets only new keys, changed values as ``resumed.KEY``
        tags (MLflow refuses to change a param)."""
        if not self.active:
            return
        from mlflow.entities import Param, RunTag

        old: dict[str, str] = {}
        if self.continued:
            run = self._call(self.client.get_run, self.run_id)
            old = dict(run.data.params) if run is not None else {}
        new = [Param(k, v) for k, v in params.items() if k not in old]
        changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in old and old[k] != v]
        self._call(self.client.log_batch, self.run_id, params=new, tags=changed)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the run."""
        if self.active:
            from mlflow.entities import RunTag

            self._call(
                self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]
            )

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """Metrics at a step (one request)."""
        if self.active and values:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
            self._call(self.client.log_batch, self.run_id, metrics=metrics)

    def log_text(self, text: str, name: str) -> None:
        """A text artifact (``name`` inside the run's artifacts)."""
        self._call(lambda: self.client.log_text(self.run_id, text, name))

    def log_files(self, paths: list[Path], folder: str | None = None) -> None:
        """Files as artifacts (those that exist), optionally under ``folder``."""
        for path in paths:
            if path.is_file():
                self._call(lambda p=path: self.client.log_artifact(self.run_id, str(p), folder))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED); the tracker is off afterwards."""
        if self.active:
            self._call(self.client.set_terminated, self.run_id, status)
        self.client, self.run_id = None, ""


def _experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing (concurrent trials may race to)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return str(client.create_experiment(name))
        except Exception:
            found = client.get_experiment_by_name(name)  # another trial created it first
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise RuntimeError(f"MLflow experiment {name!r} is deleted; restore it or rename it")
    return str(found.experiment_id)


def _continued_run(client: Any, record: Path, uri: str, exp_id: str, made_by: str) -> str:
    """The recorded run id when it belongs to this store, experiment and maker, else ""."""
    try:
        entry = json.loads(record.read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(entry, dict):
        return ""
    same = (entry.get("uri"), entry.get("experiment_id"), entry.get("made_by")) == (
        uri,
        exp_id,
        made_by,
    )
    if not same or not entry.get("run_id"):
        return ""
    try:
        run = client.get_run(str(entry["run_id"]))
    except Exception:  # deleted, or another store at the same URI: start a new run
        return ""
    return run.info.run_id if run.info.lifecycle_stage == "active" else ""
