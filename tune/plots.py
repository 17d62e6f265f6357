"""Pictures of a search: the metric per epoch of every trial, and the metric against each key."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt
import pandas as pd

from tune.experiment import Prepared

__all__ = ["plot_metric_curves", "plot_metric_vs_keys"]


def plot_metric_curves(frame: pd.DataFrame, metric: str, path: Path) -> Path:
    """Metric against epoch, one line per trial; trials stopped early are dashed.

    Args:
        frame: ``results.parquet`` rows.
        metric: Column to draw.
        path: Output PNG.

    Returns:
        The written path.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial_id, g in frame.groupby("trial_id"):
        stopped = bool(g["stopped_early"].iloc[-1])
        x = g["epoch"]
        ax.plot(
            x,
            g[metric],
            marker="o",
            ms=3,
            ls="--" if stopped else "-",
            label=f"{trial_id}{' (stopped)' if stopped else ''}",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch, all trials")
    ax.grid(alpha=0.3)
    if frame["trial_id"].nunique() <= 20:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_vs_keys(table: pd.DataFrame, prep: Prepared, folder: Path) -> list[Path]:
    """One PNG per searched key: each trial's best metric against the trial's value of the key.

    Args:
        table: The per-trial summary (see :func:`tune.results.summary_table`).
        prep: The experiment (space, metric).
        folder: Where ``metric_vs_<key>.png`` files go.

    Returns:
        The written paths.
    """
    column = f"best {prep.metric}"
    out = []
    for key, spec in prep.space.items():
        fig, ax = plt.subplots(figsize=(5.5, 4))
        values = table[key]
        if spec.kind in ("choice", "grid"):
            labels = [str(v) for v in dict.fromkeys(spec.choice or spec.grid or [])]
            pos = {label: i for i, label in enumerate(labels)}
            ax.scatter([pos.get(str(v), -1) for v in values], table[column])
            ax.set_xticks(range(len(labels)), labels, rotation=20)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            ax.scatter(pd.to_numeric(values), table[column])
            if spec.kind == "loguniform":
                ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"metric_vs_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out
