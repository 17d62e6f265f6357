"""The pipeline's report: ``results.json``, a self-contained ``report.html`` and ``report.md``.

Everything is read back from the run directories the pipeline wrote (test predictions, metrics,
learning curves, the SR run's examples), so the report can be rebuilt without training. The
test split's key hash must equal the one recorded at ingest, or no report is written.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq

from shards.format import DatasetIndex
from shards.inspect import read_manifest_rows
from shards.split import keys_hash
from trainer.config import TrainConfig
from trainer.experiment.config import arm_run_name
from trainer.experiment.stats import compare_arms, mean_std

if TYPE_CHECKING:
    from trainer.experiment.config import PipelineConfig

__all__ = ["ReportError", "build_report"]

SUMMARY = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece")


class ReportError(RuntimeError):
    """The runs cannot be reported honestly (e.g. the test split moved)."""


def _arm_runs(cfg: PipelineConfig, out: Path) -> dict[str, list[Path]]:
    return {arm: [out / "runs" / arm_run_name(arm, s) for s in cfg.seeds] for arm in cfg.arms}


def _predictions(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    table = pq.read_table(run / "eval-test" / "predictions_test.parquet").to_pydict()
    order = np.argsort(table["key"])
    keys = [table["key"][i] for i in order]
    return keys, np.asarray(table["label"])[order], np.asarray(table["pred"])[order]


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


def _curves_png(runs: dict[str, list[Path]], path: Path) -> Path:
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


def _confusions_png(conf: dict[str, np.ndarray], classes: list[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, len(conf), figsize=(3.6 * len(conf), 3.4), squeeze=False)
    for ax, (arm, m) in zip(axes[0], conf.items()):
        norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(f"{arm} (all seeds)", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true", fontsize=8)
    return _figure(path, fig)


def _groups(data_root: Path, keys: list[str]) -> list[str] | None:
    """Patient group per test key, or None when no patient id exists (groups are per key)."""
    group = {r.key: r.group for r in read_manifest_rows(data_root) if r.status == "ok"}
    out = [group.get(k, "") for k in keys]
    return None if all(g.startswith("k") for g in out) else out


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def collect(cfg: PipelineConfig, out: Path, index: DatasetIndex) -> dict[str, Any]:
    """Read every arm's test results and compute the statistics of the report."""
    runs = _arm_runs(cfg, out)
    classes = list(index.classes)
    arms: dict[str, Any] = {}
    correct: dict[str, np.ndarray] = {}
    conf: dict[str, np.ndarray] = {}
    keys_ref: list[str] | None = None
    for arm, dirs in runs.items():
        metrics = [json.loads((d / "eval-test" / "metrics_test.json").read_text()) for d in dirs]
        rows = []
        for d in dirs:
            keys, labels, preds = _predictions(d)
            if keys_hash(keys) != index.test_keys_sha256:
                raise ReportError(
                    f"{d}: its test keys hash to {keys_hash(keys)[:12]}…, but ingest recorded "
                    f"{index.test_keys_sha256[:12]}… for the test split; not reporting"
                )
            keys_ref = keys_ref or keys
            rows.append(labels == preds)
        correct[arm] = np.stack(rows)
        conf[arm] = np.sum([np.asarray(m["confusion_matrix"]) for m in metrics], axis=0)
        summary = {k: mean_std([m[k] for m in metrics]) for k in SUMMARY}
        per_class = {
            c: {
                s: mean_std([m["per_class"][c][s] for m in metrics])
                for s in ("precision", "recall", "f1")
            }
            for c in classes
        }
        arms[arm] = {"seeds": cfg.seeds, "summary": summary, "per_class": per_class,
                     "per_seed": [{k: m[k] for k in SUMMARY} for m in metrics]}  # fmt: skip
    groups = _groups(out / "data", keys_ref or [])
    comparisons = compare_arms(correct, cfg.report.pairs, groups, n_boot=cfg.report.bootstrap)
    return {
        "classes": classes,
        "test_samples": len(keys_ref or []),
        "test_keys_sha256": index.test_keys_sha256,
        "dataset_id": index.dataset_id,
        "arms": arms,
        "comparisons": [asdict(c) for c in comparisons],
        "protocol": {
            "seeds": cfg.seeds,
            "split": "test (fixed at ingest; key hash checked)",
            "ci": f"95% percentile bootstrap, {cfg.report.bootstrap} replicates, resampling "
            + ("patients" if groups is not None else "samples"),
            "test": "exact McNemar per seed, Holm-adjusted across all pairs and seeds",
        },
        "_confusion": conf,
        "_runs": runs,
    }


def _sr_section(out: Path, sr_cfg: TrainConfig | None) -> dict[str, Any] | None:
    if sr_cfg is None:
        return None
    metrics = json.loads((out / "runs" / "sr" / "metrics.json").read_text())
    return {"scale": sr_cfg.sr.scale, "arch": sr_cfg.sr.arch, "preset": sr_cfg.sr.preset,
            "best": metrics.get("best", {}), "epochs": metrics.get("epochs_run")}  # fmt: skip


def build_report(
    cfg: PipelineConfig, out: Path, index: DatasetIndex, sr_cfg: TrainConfig | None
) -> Path:
    """Write ``results.json``, ``report.html`` (self-contained) and ``report.md`` into ``out``.

    Raises:
        ReportError: If a run's test keys do not hash to the value recorded at ingest.
    """
    from trainer.experiment.gradcam import gradcam_png

    res = collect(cfg, out, index)
    files = out / "report_files"
    files.mkdir(exist_ok=True)
    figs = {
        "Learning curves": _curves_png(res["_runs"], files / "curves.png"),
        "Confusion matrices": _confusions_png(
            res.pop("_confusion"), res["classes"], files / "confusion.png"
        ),
    }
    sr = _sr_section(out, sr_cfg)
    res["sr"] = sr
    sr_png = out / "runs" / "sr" / "sr_examples_val.png"
    if sr is not None and sr_png.is_file():
        figs["SR examples (held-out slices: LR, bicubic, zero-filled, SR, HR)"] = sr_png
    runs = res.pop("_runs")
    arm = cfg.arms[0]
    cam = gradcam_png(
        runs[arm][0], out / "data", files / "gradcam.png", cfg.report.gradcam_per_class
    )
    if cam is not None:
        figs[f"Grad-CAM, last ResNet stage ({arm} arm, seed {cfg.seeds[0]})"] = cam
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    _write_html(out / "report.html", res, figs)
    _write_md(out / "report.md", res, figs, out)
    return out / "report.html"


def _fmt(ms: tuple[float, float], seeds: int) -> str:
    # One seed has no spread: show the value alone rather than a made-up "± 0.000".
    return f"{ms[0]:.3f} ± {ms[1]:.3f}" if seeds > 1 else f"{ms[0]:.3f}"


def _tables(res: dict[str, Any]) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    arms = [["arm", *SUMMARY]] + [
        [a, *(_fmt(v["summary"][k], len(v["seeds"])) for k in SUMMARY)]
        for a, v in res["arms"].items()
    ]
    comps = [["comparison", "Δ accuracy", "95% CI", "McNemar p per seed (Holm)"]]
    for c in res["comparisons"]:
        ps = ", ".join(f"{p:.3g}" for p in c["pvalues_holm"])
        comps.append(
            [
                f"{c['a']} − {c['b']}",
                f"{c['diff']:+.3f}",
                f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]",
                ps,
            ]
        )
    sr = [["method", "PSNR (dB)", "SSIM"]]
    if res.get("sr"):
        best = res["sr"]["best"]
        for m in ("sr", "bicubic", "zero_fill"):
            sr.append(
                [
                    m,
                    f"{best.get(f'{m}_psnr', float('nan')):.2f}",
                    f"{best.get(f'{m}_ssim', float('nan')):.4f}",
                ]
            )
    return arms, comps, sr


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _write_html(path: Path, res: dict[str, Any], figs: dict[str, Path]) -> None:
    arms, comps, sr = _tables(res)
    p = res["protocol"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>srmri report</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}",
        "th{background:#eef}img{max-width:100%}</style></head><body>",
        "<h1>Does super-resolution help? srmri report</h1>",
        f"<p>{res['test_samples']} test samples, classes {', '.join(res['classes'])}; "
        f"seeds {p['seeds']}; split: {html.escape(p['split'])}.</p>",
        "<h2>Arms (test split, mean ± sd over seeds)</h2>", _html_table(arms),
        "<h2>Paired comparisons</h2>", _html_table(comps),
        f"<p>{html.escape(p['ci'])}; {html.escape(p['test'])}.</p>",
    ]  # fmt: skip
    if res.get("sr"):
        parts += [
            f"<h2>Super-resolution (x{res['sr']['scale']}, validation slices)</h2>",
            _html_table(sr),
        ]
    for title, fig in figs.items():
        parts += [f"<h2>{html.escape(title)}</h2>", _img_tag(fig)]
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def _md_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _write_md(path: Path, res: dict[str, Any], figs: dict[str, Path], out: Path) -> None:
    arms, comps, sr = _tables(res)
    p = res["protocol"]
    parts = [
        "# Does super-resolution help? srmri report", "",
        f"{res['test_samples']} test samples; seeds {p['seeds']}; split: {p['split']}.", "",
        "## Arms (test split, mean ± sd over seeds)", "", _md_table(arms), "",
        "## Paired comparisons", "", _md_table(comps), "", f"{p['ci']}; {p['test']}.", "",
    ]  # fmt: skip
    if res.get("sr"):
        parts += [f"## Super-resolution (x{res['sr']['scale']})", "", _md_table(sr), ""]
    for title, fig in figs.items():
        parts += [f"## {title}", "", f"![{title}]({fig.relative_to(out).as_posix()})", ""]
    path.write_text("\n".join(parts))
