"""What of a training run is shared with MLflow: params, config, summary and figures, no paths.

Rank 0 of a run with ``logging.mlflow_uri`` set logs the resolved config as dotted params, the
TensorBoard scalars as metrics at their optimizer step (``train/loss``, ``train/lr``,
``epoch/val_accuracy``, ...), a shareable ``config.yaml`` at the start, and at the end
``metrics.json``, its best values (``best/val_*``) and the curves and confusion PNGs.

Privacy: no filesystem path reaches the tracking store. :data:`PATH_KEYS` are left out of the
params and replaced in the shared ``config.yaml``; the shard set's ``dataset_id`` (and the SR
set's) stands in for ``data.root``, and ``metrics.json`` goes without its ``run_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from srmri.config import config_to_dict
from srmri.fingerprint import flatten
from trainer.tracking import RUN_RECORD, Tracker

if TYPE_CHECKING:
    from trainer.config import TrainConfig
    from trainer.resume import RunIdentity

__all__ = [
    "NOT_LOGGED",
    "PATH_KEYS",
    "end_status",
    "finish_training",
    "log_summary",
    "shareable_config",
    "track_training",
    "training_params",
]

# Config keys that hold a filesystem path or location (``train.resume`` may be a checkpoint
# path, a ``file:`` tracking URI is one): never logged.
PATH_KEYS = (
    "out_dir",
    "data.root",
    "data.sr_root",
    "model.pretrained_path",
    "train.resume",
    "logging.mlflow_uri",
)
NOT_LOGGED = "<local path: not logged>"


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict | tuple) else str(value)


def training_params(cfg: TrainConfig, identity: RunIdentity | None) -> dict[str, str]:
    """The config as dotted params, without paths or the logging section; the data set ids."""
    params = {
        k: _param_value(v)
        for k, v in flatten(cfg).items()
        if k not in PATH_KEYS and not k.startswith("logging.")
    }
    if identity is not None:
        params["data.dataset_id"] = identity.dataset_id
        if identity.sr_dataset:
            params["data.sr_dataset"] = identity.sr_dataset
    return params


def shareable_config(cfg: TrainConfig, identity: RunIdentity | None) -> str:
    """``config.yaml`` as the run wrote it, with every :data:`PATH_KEYS` value replaced."""
    data = config_to_dict(cfg)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        section = data
        for part in parents:
            section = section.get(part, {})
        if section.get(leaf):
            section[leaf] = NOT_LOGGED
    dataset = identity.dataset_id if identity is not None else "?"
    head = (
        f"# The run's config.yaml as logged to MLflow: local paths left out ({NOT_LOGGED});\n"
        f"# trained on the shard set with dataset_id {dataset}.\n"
    )
    return head + yaml.safe_dump(data, sort_keys=False)


def track_training(
    cfg: TrainConfig, run_dir: Path, identity: RunIdentity | None, resumed: bool
) -> Tracker:
    """Open the MLflow run of a training run and log its params (call on rank 0 only).

    Args:
        cfg: The run's resolved config (``logging.mlflow_uri`` set).
        run_dir: Its run directory (holds :data:`RUN_RECORD`).
        identity: What the run's checkpoints record about what made them (data set ids).
        resumed: Whether the run resumed from a checkpoint: then it continues its MLflow run.

    Returns:
        The tracker (off if the store could not be reached).
    """
    log = cfg.logging
    tags = {"srmri.task": cfg.task, "srmri.run": run_dir.name}
    if identity is not None:
        tags |= {"srmri.config_fingerprint": identity.config_fingerprint}
        tags |= {"srmri.dataset_id": identity.dataset_id}
    tracker = Tracker.start(
        log.mlflow_uri,
        log.mlflow_experiment,
        run_dir / RUN_RECORD,
        run_name=log.mlflow_run_name or run_dir.name,
        parent=log.mlflow_parent_run,
        made_by=identity.dataset_id if identity is not None else "",
        may_continue=resumed,
        tags=tags,
    )
    tracker.log_params(training_params(cfg, identity))
    tracker.log_text(shareable_config(cfg, identity), "config.yaml")
    return tracker


def log_summary(tracker: Tracker, summary: dict[str, Any]) -> None:
    """``metrics.json`` (without its ``run_dir``) as an artifact, its best values as metrics.

    Args:
        tracker: The run's tracker.
        summary: What ``metrics.json`` holds, NaN already written as None.
    """
    shared = {k: v for k, v in summary.items() if k != "run_dir"}
    tracker.log_text(json.dumps(shared, indent=1), "metrics.json")
    best = summary.get("best") or {}
    values = {
        f"best/val_{k}": float(v)
        for k, v in best.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    tracker.log_metrics(int(summary.get("steps") or 0), values)


def finish_training(tracker: Tracker, run_dir: Path) -> None:
    """Log the run directory's curves and validation confusion PNGs, then end the run."""
    tracker.log_files([run_dir / "curves.png", *sorted(run_dir.glob("confusion_*.png"))])
    tracker.finish("FINISHED")


def end_status(exc: BaseException) -> str:
    """The MLflow status of a run that ended with ``exc``: KILLED for an interrupt or a
    pre-emption exit (it will be resumed), FAILED otherwise."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"
