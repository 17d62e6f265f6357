"""Pictures of a run a person would rather look at than read: curves, confusion matrix, SR crops.

matplotlib with the Agg backend (no display needed); each figure is written to a temporary file
beside the target and renamed into place, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: servers and workers have no display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from srmri.atomic import atomic_path

__all__ = ["plot_confusion", "plot_curves", "plot_sr_examples"]

# Keys of a history row that are bookkeeping, not curves (and suffixes of such keys).
_NOT_CURVES = {"epoch", "step", "time", "elapsed", "samples", "n"}
_NOT_CURVE_SUFFIXES = ("_n", "_time", "_s", "_seconds", "_samples", "_step", "_epoch")
_PREFERRED_METRICS = ("accuracy", "macro_f1", "roc_auc", "ece", "psnr", "ssim")
# Display names for the SR panels, in the order they are shown when present.
_SR_ORDER = ("lr", "bicubic", "zero_fill", "sr", "hr")
_SR_TITLES = {"lr": "LR", "bicubic": "bicubic", "zero_fill": "zero-filled", "sr": "SR", "hr": "HR"}


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically (temp file + rename) and close it."""
    p = Path(path)
    try:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return p


def _is_lr_key(key: str) -> bool:
    return key == "lr" or key.endswith("_lr") or key.startswith("lr_") or key == "learning_rate"


def plot_curves(
    history: Sequence[Mapping[str, float]],
    path: str | Path,
    metrics: Sequence[str] | None = None,
) -> Path:
    """Plot losses, validation metrics and the learning rate per epoch.

    Args:
        history: One mapping per epoch, e.g. ``{"epoch": 3, "train_loss": .., "val_loss": ..,
            "val_accuracy": .., "lr": ..}``. Keys containing ``loss`` go to the loss panel, ``lr``
            (or ``*_lr``) to the learning-rate panel, other numbers to the metrics panel.
        path: Output PNG.
        metrics: Keys for the metrics panels; None: the headline scores present (accuracy,
            balanced accuracy, macro F1, ROC-AUC, ECE, PSNR, SSIM), else every other number.
            Scores within [0, 1] share one panel, the others get a second one.

    Returns:
        The written path.
    """
    keys: list[str] = []
    for row in history:
        keys += [
            k
            for k, v in row.items()
            if k not in keys and isinstance(v, int | float) and not isinstance(v, bool)
        ]
    keys = [k for k in keys if k not in _NOT_CURVES and not k.endswith(_NOT_CURVE_SUFFIXES)]
    loss_keys = [k for k in keys if "loss" in k]
    lr_keys = [k for k in keys if _is_lr_key(k)]
    if metrics is None:
        others = [k for k in keys if k not in loss_keys and k not in lr_keys]
        # The headline metrics when present (macro recall equals balanced accuracy, and
        # macro precision adds a line that tells little); every other number otherwise.
        preferred = [k for k in others if k.endswith(_PREFERRED_METRICS)]
        metric_keys = preferred or others
    else:
        metric_keys = list(metrics)
    x = [row.get("epoch", i + 1) for i, row in enumerate(history)]

    def in_unit_range(key: str) -> bool:
        values = [float(row[key]) for row in history if key in row]
        return all(0.0 <= v <= 1.0 for v in values if math.isfinite(v))

    # Scores in [0, 1] share a panel; others (PSNR in dB, counts) get their own scale.
    unit = [k for k in metric_keys if in_unit_range(k)]
    wide = [k for k in metric_keys if k not in unit]
    panels = [
        ("loss", loss_keys),
        ("metrics", unit),
        ("metrics", wide),
        ("learning rate", lr_keys),
    ]
    panels = [(title, ks) for title, ks in panels if ks]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 3.8))
    axes = np.atleast_1d(axes)
    if not panels:
        axes[0].text(0.5, 0.5, "no history yet", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (title, ks) in zip(axes, panels):
        for k in ks:
            y = [float(row.get(k, math.nan)) for row in history]
            ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if title == "learning rate" and all(
            float(row.get(k, 0)) > 0 for row in history for k in ks if k in row
        ):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(
    matrix: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], path: str | Path
) -> Path:
    """Draw the confusion matrix twice: raw counts and normalised per true class (recall).

    Args:
        matrix: C x C counts, rows the true class, columns the predicted one.
        class_names: C names.
        path: Output PNG.

    Returns:
        The written path.
    """
    cm = np.asarray(matrix, dtype=np.int64)
    c = len(class_names)
    if cm.shape != (c, c):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({c}, {c})")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = max(4.0, 0.9 * c + 2.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    for ax, data, title, fmt in (
        (axes[0], cm, f"counts (n={int(cm.sum())})", "d"),
        (axes[1], norm, "normalised by true class", ".2f"),
    ):
        vmax = float(data.max()) if data.size and data.max() > 0 else 1.0
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        for i in range(c):
            for j in range(c):
                val = data[i, j]
                # White text on dark cells, black on light ones.
                color = "white" if val > 0.55 * vmax else "black"
                ax.text(j, i, format(val, fmt), ha="center", va="center", color=color, fontsize=9)
        ax.set_xticks(range(c), class_names, rotation=35, ha="right")
        ax.set_yticks(range(c), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse <= 1e-10 else 10 * math.log10(1.0 / mse)


def plot_sr_examples(
    rows: Sequence[Mapping[str, np.ndarray]],
    path: str | Path,
    reference: str = "hr",
    diff_of: str = "sr",
) -> Path:
    """A grid of SR examples: one row per example, one column per named image.

    Args:
        rows: Mappings of name -> 2-D array in [0, 1], e.g. ``lr``, ``bicubic``, ``zero_fill``,
            ``sr``, ``hr`` (shown in that order, other names after). Each panel the size of the
            reference is captioned with its PSNR against it (whole crop, data range 1).
        path: Output PNG.
        reference: Name of the ground-truth image.
        diff_of: Name of the image whose absolute difference to the reference is added as the
            last column (skipped when either is missing).

    Returns:
        The written path.
    """
    if not rows:
        raise ValueError("plot_sr_examples needs at least one row")
    names: list[str] = [n for n in _SR_ORDER if any(n in r for r in rows)]
    names += [n for r in rows for n in r if n not in names]
    names = list(dict.fromkeys(names))
    with_diff = any(reference in r and diff_of in r for r in rows)
    ncols = len(names) + int(with_diff)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(2.3 * ncols, 2.5 * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        ref = row.get(reference)
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.set_axis_off()
            if name not in row:
                continue
            img = np.asarray(row[name], dtype=np.float32)
            if img.ndim != 2:
                raise ValueError(f"plot_sr_examples: '{name}' in row {r} is not 2-D: {img.shape}")
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            title = _SR_TITLES.get(name, name)
            if ref is not None and name != reference and img.shape == np.shape(ref):
                title += f"\n{_psnr(img, np.asarray(ref)):.2f} dB"
            elif name == reference:
                title += "\nreference"
            elif ref is not None:
                title += f"\n{img.shape[1]}x{img.shape[0]} px"
            ax.set_title(title, fontsize=9)
        if with_diff:
            ax = axes[r, -1]
            ax.set_axis_off()
            if ref is not None and diff_of in row:
                diff = np.abs(np.asarray(row[diff_of], np.float32) - np.asarray(ref, np.float32))
                vmax = max(float(diff.max()), 1e-6)
                im = ax.imshow(diff, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
                ax.set_title(f"|{_SR_TITLES.get(diff_of, diff_of)} - HR|", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
