"""Results of a search, finished or not: ``results.parquet``, ``best.yaml``, a summary table, PNGs.

Everything is read from the experiment folder (each trial's ``result.json`` and Ray Tune's saved
experiment state), so ``tune report`` works without Ray running, during a search or after it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from srmri.atomic import atomic_path
from srmri.config import config_from_dict, config_to_dict, save_config
from trainer.config import TrainConfig
from tune.experiment import Prepared, load_experiment
from tune.space import set_dotted, trial_run_dir

__all__ = ["best_trial", "collect", "summary_table", "write_best", "write_outputs"]

# Ray Tune bookkeeping that says nothing about the trial's quality.
_DROP = {
    "config",
    "date",
    "hostname",
    "node_ip",
    "pid",
    "timestamp",
    "checkpoint_dir_name",
    "done",
    "experiment_tag",
    "trial_id",
    "iterations_since_restore",
    "time_since_restore",
    "should_checkpoint",
}


def _statuses(experiment_dir: Path) -> dict[str, dict[str, Any]]:
    """trial id -> status, failures, config from Ray's saved state (empty before its first save)."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(experiment_dir))
    except Exception:  # no state written yet (a search that just started)
        return {}
    return {
        t.trial_id: {
            "status": t.status,
            "num_failures": t.num_failures,
            "config": t.config,
            "path": Path(t.path) if t.path else None,
        }
        for t in analysis.trials
    }


def _read_results(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a trial's ``result.json`` (a half-written last line is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _epoch_rows(folder: Path) -> list[dict[str, Any]]:
    """One dict per epoch of a trial: the trainer's ``metrics.csv`` joined with Tune's results.

    The trainer's history is the record of what was trained (a retried trial's history comes
    back with its checkpoint, while Ray rewrites ``result.json`` when it restores a trial);
    Tune's rows add iteration and timing, and stand in where no history was written.
    """
    reported = {int(r["epoch"]): r for r in _read_results(folder / "result.json") if "epoch" in r}
    history_file = trial_run_dir(folder) / "metrics.csv"
    history: list[dict[str, Any]] = []
    if history_file.is_file() and history_file.stat().st_size:
        history = pd.read_csv(history_file).to_dict("records")
    epochs = {int(h["epoch"]): h for h in history}
    rows = []
    for epoch in sorted(set(epochs) | set(reported)):
        row = dict(reported.get(epoch, {}))
        row.update(epochs.get(epoch, {}))
        row["epoch"] = epoch
        rows.append(row)
    return rows


def collect(prep: Prepared) -> pd.DataFrame:
    """One row per trial and reported epoch: trial id, status, searched values, metrics.

    Args:
        prep: The experiment (see :func:`tune.experiment.load_experiment`).

    Returns:
        The rows, with ``stopped_early`` true for a trial ended before its last epoch.
    """
    d = prep.experiment_dir
    known = _statuses(d)
    folders = {p.parent.name: p.parent for p in d.glob("*/params.json")}
    for trial_id, info in known.items():
        if info["path"] is not None:
            folders[trial_id] = info["path"]
    rows: list[dict[str, Any]] = []
    for trial_id, folder in sorted(folders.items()):
        info = known.get(trial_id, {})
        params = info.get("config")
        if params is None and (folder / "params.json").is_file():
            params = json.loads((folder / "params.json").read_text())
        params = params or {}
        epochs = int(params.get("train.epochs", prep.base.train.epochs))
        results = _epoch_rows(folder)
        last = max((int(r.get("epoch", -1)) for r in results), default=-1)
        status = info.get("status", "UNKNOWN")
        for r in results or [{}]:  # a trial that never reported still gets a row (its status)
            row: dict[str, Any] = {
                "trial_id": trial_id,
                "status": status,
                "num_failures": int(info.get("num_failures", 0)),
            }
            # The values this epoch was trained with: PBT changes a trial's config mid-run, and
            # Tune records the config of every report; the final config stands in otherwise.
            now = r.get("config") if isinstance(r.get("config"), dict) else params
            row.update({k: now.get(k, params.get(k)) for k in prep.space})
            row.update({k: v for k, v in r.items() if k not in _DROP and _scalar(v)})
            row["stopped_early"] = status == "TERMINATED" and last + 1 < epochs
            rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        if "epoch" not in frame:
            frame["epoch"] = pd.NA
        frame = frame.sort_values(["trial_id", "epoch"], kind="stable")
    return frame.reset_index(drop=True)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def best_trial(frame: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The row (trial and epoch) with the best value of ``metric``; None if nothing reported."""
    if frame.empty or metric not in frame:
        return None
    values = pd.to_numeric(frame[metric], errors="coerce")
    if values.notna().sum() == 0:
        return None
    return frame.loc[values.idxmax() if mode == "max" else values.idxmin()]


def write_best(prep: Prepared, best: pd.Series, path: Path) -> Path:
    """Write the best trial's full trainer config (base plus its values) for ``trainer fit``."""
    data = config_to_dict(prep.base)
    for key in prep.space:
        value = best[key]
        if hasattr(value, "item"):  # numpy scalar from the frame -> plain Python
            value = value.item()
        set_dotted(data, key, value)
    return save_config(config_from_dict(TrainConfig, data), path)


def summary_table(frame: pd.DataFrame, prep: Prepared) -> pd.DataFrame:
    """One line per trial: status, epochs, best and last metric, searched values (best first)."""
    if frame.empty:
        return frame
    m = prep.metric
    rows = []
    for trial_id, g in frame.groupby("trial_id", sort=False):
        values = pd.to_numeric(g[m], errors="coerce") if m in g else pd.Series([math.nan])
        best = values.max() if prep.mode == "max" else values.min()
        rows.append(
            {
                "trial_id": trial_id,
                "status": g["status"].iloc[-1],
                "failures": int(g["num_failures"].iloc[-1]),
                "epochs": len(g),
                "stopped_early": bool(g["stopped_early"].iloc[-1]),
                f"best {m}": best,
                f"last {m}": values.iloc[-1],
                **{k: g[k].iloc[-1] for k in prep.space},
            }
        )
    table = pd.DataFrame(rows)
    return table.sort_values(f"best {m}", ascending=prep.mode != "max", na_position="last")


def write_outputs(experiment_dir: str | Path, quiet: bool = False) -> pd.DataFrame:
    """Write ``results.parquet``, ``best.yaml`` and the PNGs; print the summary table.

    Args:
        experiment_dir: The experiment folder.
        quiet: Do not print the table.

    Returns:
        The per-trial summary table.
    """
    from tune.plots import plot_metric_curves, plot_metric_vs_keys

    prep = load_experiment(experiment_dir)
    d = prep.experiment_dir
    frame = collect(prep)
    with atomic_path(d / "results.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    table = summary_table(frame, prep)
    best = best_trial(frame, prep.metric, prep.mode)
    if best is not None:
        write_best(prep, best, d / "best.yaml")
        plot_metric_curves(frame, prep.metric, d / "metric_per_epoch.png")
        plot_metric_vs_keys(table, prep, d)
    if not quiet:
        with pd.option_context("display.width", 200, "display.max_columns", 50):
            print(table.to_string(index=False) if not table.empty else "no results yet")
        if best is not None:
            print(
                f"best: trial {best['trial_id']} {prep.metric}={best[prep.metric]:.4g} "
                f"(epoch {best.get('epoch')}); config {d / 'best.yaml'}"
            )
        print(f"results: {d / 'results.parquet'}")
    return table
