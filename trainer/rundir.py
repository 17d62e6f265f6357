"""The run directory's human-facing files, written by rank 0 only.

``config.yaml`` (resolved config), ``metrics.json`` (final and best validation metrics),
``metrics.csv`` (one row per epoch), ``tb/`` (TensorBoard scalars), ``predictions.parquet``
(key, label, predicted class and one probability column per class), and PNGs of the learning
curves and confusion matrix (drawn by ``trainer.plots``). With ``logging.mlflow_uri`` set, the
scalars, the summary and the figures also go to an MLflow run (:mod:`trainer.shared_run`).

``.lock`` is held by the run writing the directory (:func:`locked_run_dir`): a second ``fit``
on the same directory fails at once, naming the holder, instead of interleaving checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import json
import math
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from srmri import atomic
from srmri.config import ConfigError, save_config
from srmri.distributed import all_gather_objects
from trainer.tracking import Tracker

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.resume import RunIdentity

__all__ = [
    "LOCK_FILE",
    "RunDir",
    "RunDirInUse",
    "RunLock",
    "eval_dir_of",
    "eval_metrics_path",
    "locked_run_dir",
    "make_run_dir",
    "predictions_path",
    "scalars",
    "write_json",
    "write_predictions",
]


LOCK_FILE = ".lock"


class RunDirInUse(RuntimeError):
    """Another process holds the run directory's lock; the message names it."""


def make_run_dir(path: Path) -> None:
    """Create the run directory ``out_dir/name`` (and its parents) if missing.

    Raises:
        srmri.config.ConfigError: Naming the path when it or a folder above it is a file.
    """
    for at in (path, *path.parents):
        if at.exists() and not at.is_dir():
            key = "name" if at == path else "out_dir"
            raise ConfigError(f"{key}: {at} is a file, not a folder (run directory {path})")
    path.mkdir(parents=True, exist_ok=True)


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``RUN/.lock`` that names its holder.

    The holder writes its pid, host and start time into the file. The kernel drops a flock when
    its process dies however it dies (SIGKILL, OOM, a node reboot), so a stale file never
    blocks the next run; only the text naming the last holder stays behind.

    Args:
        run_dir: The run directory (must exist).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now or fail; nothing else in the run directory is touched.

        Raises:
            RunDirInUse: Naming the pid, host and start time of the holder.
        """
        # No O_TRUNC: the holder's record must survive a failed attempt.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirInUse(self._in_use_message()) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # before unlocking: a later holder's record is never cut
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def _in_use_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        pid = holder.get("pid", "?")
        host = holder.get("host", "?")
        since = holder.get("since", "?")
        return (
            f"{self.run_dir} is in use by pid {pid} on {host} since {since}; "
            "wait for it or use another name="
        )

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked_run_dir(path: Path, is_main: bool) -> Iterator[None]:
    """Create ``path`` and hold its lock for the block (collective: every rank calls it).

    Rank 0 creates the directory and takes the lock; every rank learns the outcome, so a
    refused run fails on all ranks at once instead of leaving the others waiting for rank 0.
    The lock is released when the block ends, on an exception too.

    Args:
        path: The run directory.
        is_main: Whether this is rank 0.

    Raises:
        RunDirInUse: When another process holds the lock.
        srmri.config.ConfigError: When ``path`` or a folder above it is a file.
    """
    lock = RunLock(path)
    error: Exception | None = None
    if is_main:
        try:
            make_run_dir(path)
            lock.acquire()
        except (RunDirInUse, ConfigError, OSError) as exc:
            error = exc
    errors = [e for e in all_gather_objects(error) if e is not None]
    if errors:
        lock.release()
        raise error if error is not None else errors[0]
    try:
        yield
    finally:
        lock.release()


def eval_dir_of(run_dir: Path, split: str) -> Path:
    """Where ``trainer evaluate`` writes a split's results by default: ``RUN/eval-<split>``."""
    return Path(run_dir) / f"eval-{split}"


def eval_metrics_path(folder: Path, split: str) -> Path:
    """The metrics file an evaluation of ``split`` writes into ``folder``."""
    return Path(folder) / f"metrics_{split}.json"


def predictions_path(folder: Path, split: str, is_val: bool = False) -> Path:
    """Per-sample predictions of ``split`` in ``folder`` (the validation split's keeps the
    plain name a run directory has always promised: ``predictions.parquet``)."""
    return Path(folder) / ("predictions.parquet" if is_val else f"predictions_{split}.parquet")


def scalars(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite-or-nan numeric entries of a results dict, with an optional key prefix."""
    out = {}
    for k, v in results.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[f"{prefix}{k}"] = float(v)
    return out


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON atomically, NaN and infinities as null.

    Args:
        path: Output file.
        data: What to write.

    Returns:
        The written path.
    """
    atomic.write_json(path, _clean(data))
    return path


def write_predictions(
    path: Path, rows: Sequence[tuple[str, int, list[float]]], classes: Sequence[str]
) -> Path:
    """Write per-sample predictions as parquet: key, label, pred and ``prob_<class>`` columns.

    Args:
        path: Output file.
        rows: ``(key, label, probabilities)`` per sample.
        classes: Class names (one probability column each).

    Returns:
        The written path.
    """
    columns: dict[str, Any] = {
        "key": pa.array([r[0] for r in rows], pa.string()),
        "label": pa.array([int(r[1]) for r in rows], pa.int64()),
        "pred": pa.array([max(range(len(r[2])), key=r[2].__getitem__) for r in rows], pa.int64()),
    }
    for i, name in enumerate(classes):
        columns[f"prob_{name}"] = pa.array([float(r[2][i]) for r in rows], pa.float32())
    table = pa.table(columns).replace_schema_metadata({"classes": json.dumps(list(classes))})
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


class RunDir:
    """Rank 0's writer of a run directory; on other ranks every method does nothing.

    Args:
        path: The run directory.
        is_main: Whether this process writes (rank 0).
        tensorboard: Also log TensorBoard scalars under ``path/tb``.
    """

    def __init__(self, path: Path, is_main: bool, tensorboard: bool = True) -> None:
        self.path = path
        self.is_main = is_main
        self._tb: Any = None
        self.tracker = Tracker("")  # off until start_tracking
        if is_main:
            path.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(path / "tb"))

    @property
    def checkpoints(self) -> Path:
        """The run's checkpoint folder."""
        return self.path / "checkpoints"

    def save_config(self, cfg: Any) -> None:
        """Write the resolved config as ``config.yaml``."""
        if self.is_main:
            save_config(cfg, self.path / "config.yaml")

    def start_tracking(self, cfg: TrainConfig, identity: RunIdentity | None, resumed: bool) -> None:
        """Open the run's MLflow run when ``logging.mlflow_uri`` is set (rank 0).

        Args:
            cfg: The run's resolved config.
            identity: What made the run (its data set ids are logged instead of paths).
            resumed: Whether the run resumed from a checkpoint (it continues its MLflow run).
        """
        if self.is_main and cfg.logging.mlflow_uri:
            from trainer.shared_run import track_training

            self.tracker = track_training(cfg, self.path, identity, resumed)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars (and MLflow metrics) at a global step."""
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        self.tracker.log_metrics(step, values)

    def write_history(self, history: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.csv`` (every epoch's row; columns are the union) and the curves."""
        if not self.is_main or not history:
            return
        fields: list[str] = []
        for row in history:
            fields += [k for k in row if k not in fields]
        with atomic.atomic_path(self.path / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)
        from trainer.plots import plot_curves

        plot_curves(history, self.path / "curves.png")

    def write_metrics(self, data: dict[str, Any]) -> None:
        """Write ``metrics.json``."""
        if self.is_main:
            write_json(self.path / "metrics.json", data)
        if self.tracker.active:
            from trainer.shared_run import log_summary

            log_summary(self.tracker, _clean(data))

    def close(self) -> None:
        """Flush TensorBoard; log the figures to MLflow and end its run as finished."""
        if self.tracker.active:
            from trainer.shared_run import finish_training

            finish_training(self.tracker, self.path)
        self._close_tb()

    def abort(self, exc: BaseException) -> None:
        """Close after ``exc`` ended the run: its MLflow run ends as failed (or killed)."""
        if self.tracker.active:
            from trainer.shared_run import end_status

            self.tracker.finish(end_status(exc))
        self._close_tb()

    def _close_tb(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
