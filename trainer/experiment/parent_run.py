"""The pipeline's MLflow parent run: its training stages are child runs, its report is logged.

With the pipeline's ``logging.mlflow_uri`` set, rank 0 opens one parent run (recorded in
``OUT/mlflow.json``; a re-run of the same stages continues it), and every training stage's
config gets the pipeline's logging section with the parent's id and the stage's name, so that
``fit`` logs the stage as a child run. The parent holds the pipeline's settings (no paths),
the shard set's id and, at the end, the report. A parent that cannot be reached costs one
warning and turns tracking off for every stage.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from srmri.fingerprint import fingerprint
from trainer.config import LoggingConfig, TrainConfig
from trainer.experiment.config import PipelineConfig
from trainer.tracking import RUN_RECORD, Tracker

__all__ = ["log_report", "open_parent_run", "stage_logging", "tracked_stage"]

PARENT_RUN_NAME = "pipeline"


def open_parent_run(
    cfg: PipelineConfig, out: Path, dataset_id: str, stage_fingerprints: list[str], is_main: bool
) -> Tracker:
    """Open (or continue) the pipeline's parent run on rank 0; off elsewhere or when unset.

    Args:
        cfg: The pipeline config.
        out: Its ``out_dir``.
        dataset_id: The data stage's shard set.
        stage_fingerprints: Every stage's fingerprint: the parent run of a pipeline is continued
            only when its stages are the same.
        is_main: Whether this is rank 0.

    Returns:
        The parent run's tracker.
    """
    log = cfg.logging
    if not (is_main and log.mlflow_uri):
        return Tracker("")
    tracker = Tracker.start(
        log.mlflow_uri,
        log.mlflow_experiment,
        out / RUN_RECORD,
        run_name=log.mlflow_run_name or PARENT_RUN_NAME,
        parent=log.mlflow_parent_run,
        made_by=fingerprint(stage_fingerprints),
        may_continue=True,
        tags={"srmri.kind": "pipeline", "srmri.dataset_id": dataset_id},
    )
    tracker.log_params(
        {
            "arms": json.dumps(cfg.arms),
            "seeds": json.dumps(cfg.seeds),
            "enhance_batch": str(cfg.enhance_batch),
            "data.source": cfg.data.source,
            "data.dataset_id": dataset_id,
            "report.bootstrap": str(cfg.report.bootstrap),
            "report.pairs": json.dumps(cfg.report.pairs),
        }
    )
    return tracker


def stage_logging(cfg: PipelineConfig, parent: Tracker) -> LoggingConfig | None:
    """The logging section every training stage gets: None when the pipeline sets none (the
    stage configs' own apply), tracking off when the parent run is off (rank 0 warned once)."""
    if not cfg.logging.mlflow_uri:
        return None
    if not parent.active:
        return LoggingConfig()
    return dataclasses.replace(cfg.logging, mlflow_parent_run=parent.run_id)


def tracked_stage(run_cfg: TrainConfig, logging: LoggingConfig | None, stage: str) -> TrainConfig:
    """``run_cfg`` logging as the child run ``stage`` of the pipeline (unchanged when None)."""
    if logging is None:
        return run_cfg
    named = dataclasses.replace(logging, mlflow_run_name=stage) if logging.mlflow_uri else logging
    return dataclasses.replace(run_cfg, logging=named)


def log_report(parent: Tracker, out: Path) -> None:
    """Log the report (HTML, JSON results, markdown summary and its figures) to the parent."""
    parent.log_files([out / "report.html", out / "results.json", out / "report.md"])
    parent.log_files(sorted((out / "report_files").glob("*.png")), "report_files")
