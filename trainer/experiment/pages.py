"""The report's pages: figures, tables, ``report.html`` (self-contained) and ``report.md``.

Both pages open with the same plain-language summary (:mod:`trainer.experiment.summary`), then
give the tables, the figures and the provenance of every run.
"""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from srmri.atomic import write_text
from srmri.markdown import md_table
from trainer.experiment.results import SUMMARY, Results
from trainer.experiment.summary import summary_sentences

__all__ = ["confusions_png", "curves_png", "write_html", "write_md"]


def _history(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as fh:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(fh)
        ]


def _figure(path: Path, fig: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def curves_png(runs: dict[str, list[Path]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, dirs in runs.items():
        hists = [_history(d) for d in dirs]
        n = min(len(h) for h in hists)
        if n == 0:
            continue
        for ax, key in zip(axes, ("train_loss", "val_balanced_accuracy")):
            vals = np.array([[h[i].get(key, np.nan) for i in range(n)] for h in hists])
            ax.plot(range(n), np.nanmean(vals, axis=0), marker="o", label=arm)
            ax.set_title(f"{key} (mean over seeds)")
            ax.set_xlabel("epoch")
    axes[0].legend()
    return _figure(path, fig)


def confusions_png(conf: dict[str, np.ndarray], classes: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(conf), figsize=(3.6 * len(conf), 3.4), squeeze=False)
    for ax, (arm, m) in zip(axes[0], conf.items()):
        norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(f"{arm} (all seeds)", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true", fontsize=8)
    return _figure(path, fig)


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _fmt(ms: tuple[float, float], seeds: int) -> str:
    # One seed has no spread: show the value alone rather than a made-up "± 0.000".
    return f"{ms[0]:.3f} ± {ms[1]:.3f}" if seeds > 1 else f"{ms[0]:.3f}"


Table = list[list[str]]


def _tables(res: Results) -> tuple[Table, Table, Table]:
    """The arms, comparisons and SR tables, header row first."""
    arms = [["arm", *SUMMARY]] + [
        [a, *(_fmt(v.summary[k], len(v.seeds)) for k in SUMMARY)] for a, v in res.arms.items()
    ]
    comps = [["comparison", "Δ accuracy", "95% CI", "McNemar p per seed (Holm)"]]
    for c in res.comparisons:
        comps.append(
            [
                f"{c.a} − {c.b}",
                f"{c.diff:+.3f}",
                f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
                ", ".join(f"{p:.3g}" for p in c.pvalues_holm),
            ]
        )
    sr = [["method", "PSNR (dB)", "SSIM"]]
    if res.sr:
        best = res.sr.best
        for m in ("sr", "bicubic", "zero_fill"):
            sr.append(
                [
                    m,
                    f"{best.get(f'{m}_psnr', float('nan')):.2f}",
                    f"{best.get(f'{m}_ssim', float('nan')):.4f}",
                ]
            )
    return arms, comps, sr


def _runs_table(res: Results) -> Table:
    """One row per run: its stage fingerprint, checkpoint and weights hash (full hex)."""
    rows = [["run", "stage fingerprint", "checkpoint", "weights sha256"]]
    rows += [[p.run, p.fingerprint or "-", p.checkpoint, p.weights_sha256] for p in res.provenance]
    return rows


def _provenance_text(res: Results) -> str:
    return (
        f"Data set id {res.dataset_id}; data stage fingerprint {res.data_fingerprint or '-'}. "
        "A stage fingerprint covers its config and its upstream stages'; the weights hash is "
        "trainer.experiment.report.weights_sha256 of the checkpoint's fp32 weights."
    )


def _html_table(rows: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = [
    "<!doctype html><html><head><meta charset='utf-8'><title>srmri report</title><style>",
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}",
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}",
    "th{background:#eef}img{max-width:100%}",
    ".summary{font-size:1.1em;background:#f6f8fa;border-left:4px solid #58a;padding:.2em 1em}",
    "</style></head><body>",
]


def write_html(path: Path, res: Results, figs: dict[str, Path]) -> None:
    arms, comps, sr = _tables(res)
    p = res.protocol
    parts = [
        *_STYLE,
        "<h1>Does super-resolution help? srmri report</h1>",
        "<div class='summary'>",
        *(f"<p>{html.escape(line)}</p>" for line in summary_sentences(res)),
        "</div>",
        "<h2>Set-up</h2>",
        f"<p>{res.test_samples} test samples, classes {', '.join(res.classes)}; "
        f"seeds {p.seeds}; split: {html.escape(p.split)}.</p>",
        "<h2>Arms (test split, mean ± sd over seeds)</h2>",
        _html_table(arms),
        "<h2>Paired comparisons</h2>",
        _html_table(comps),
        f"<p>{html.escape(p.ci)}; {html.escape(p.test)}.</p>",
    ]
    if res.sr:
        parts += [
            f"<h2>Super-resolution (x{res.sr.scale}, validation slices)</h2>",
            _html_table(sr),
        ]
    for title, fig in figs.items():
        parts += [f"<h2>{html.escape(title)}</h2>", _img_tag(fig)]
    parts += [
        "<h2>Runs (for checking a reproduction)</h2>",
        f"<p>{html.escape(_provenance_text(res))}</p>",
        f"<div style='font-family:monospace;font-size:11px'>{_html_table(_runs_table(res))}</div>",
        "</body></html>",
    ]
    write_text(path, "\n".join(parts))


def _md_table(rows: Table) -> str:
    return md_table(rows[0], rows[1:])


def write_md(path: Path, res: Results, figs: dict[str, Path], out: Path) -> None:
    arms, comps, sr = _tables(res)
    p = res.protocol
    parts = [
        "# Does super-resolution help? srmri report",
        "",
        " ".join(summary_sentences(res)),
        "",
        "## Set-up",
        "",
        f"{res.test_samples} test samples; seeds {p.seeds}; split: {p.split}.",
        "",
        "## Arms (test split, mean ± sd over seeds)",
        "",
        _md_table(arms),
        "",
        "## Paired comparisons",
        "",
        _md_table(comps),
        "",
        f"{p.ci}; {p.test}.",
        "",
    ]
    if res.sr:
        parts += [f"## Super-resolution (x{res.sr.scale})", "", _md_table(sr), ""]
    for title, fig in figs.items():
        parts += [f"## {title}", "", f"![{title}]({fig.relative_to(out).as_posix()})", ""]
    parts += [
        "## Runs (for checking a reproduction)",
        "",
        _provenance_text(res),
        "",
        _md_table(_runs_table(res)),
        "",
    ]
    write_text(path, "\n".join(parts))
