"""The pipeline's report: ``results.json``, a self-contained ``report.html`` and ``report.md``.

Everything is read back from the run directories the pipeline wrote (test predictions, metrics,
learning curves, the SR run's examples), so the report can be rebuilt without training. The
test split's key hash must equal the one recorded at ingest, or no report is written.

For checking a reproduction the report states the shard set's ``dataset_id`` and, per run (the
SR network and every classifier), the pipeline stage's fingerprint (from ``stages.json``: its
config and its upstream stages') and the sha256 of its weights (:func:`weights_sha256`): the
fp32 state dict that :func:`trainer.export.load_fp32_weights` reads from the checkpoint the test
split was scored with (the SR run's: the checkpoint enhance used, its best else newest), i.e.
exactly the tensors ``trainer export`` writes, EMA weights where the run kept an EMA.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq

from shards.format import DatasetIndex
from shards.split import keys_hash
from shards.writer import GROUP_SAMPLE, read_manifest_rows
from srmri.atomic import write_text
from trainer.config import TrainConfig
from trainer.experiment.config import (
    SR_RUN_NAME,
    PipelineConfig,
    arm_run_dir,
    data_dir,
    read_stages,
    sr_run_dir,
)
from trainer.experiment.stats import PairedComparison, compare_arms, mean_std
from trainer.rundir import eval_dir_of, eval_metrics_path, predictions_path

__all__ = [
    "ArmResults",
    "ReportError",
    "ReportProtocol",
    "Results",
    "RunProvenance",
    "SRSummary",
    "build_report",
    "collect",
    "weights_sha256",
]

SUMMARY = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece")
MeanStd = tuple[float, float]


class ReportError(RuntimeError):
    """The runs cannot be reported honestly (e.g. the test split moved)."""


@dataclass
class ArmResults:
    """One arm's test results over its seeds.

    Attributes:
        seeds: The seeds its classifiers were trained with.
        summary: Metric (one of ``SUMMARY``) -> (mean, sd) over seeds.
        per_class: Class -> ``precision``/``recall``/``f1`` -> (mean, sd) over seeds.
        per_seed: Per seed, in ``seeds`` order, the ``SUMMARY`` metrics.
    """

    seeds: list[int]
    summary: dict[str, MeanStd]
    per_class: dict[str, dict[str, MeanStd]]
    per_seed: list[dict[str, float]]


@dataclass
class ReportProtocol:
    """How the numbers were obtained, stated in the report.

    Attributes:
        seeds: Classifier seeds per arm.
        split: Which split was scored and how it is protected.
        ci: How the confidence intervals were computed (and what was resampled).
        test: The significance test and its multiplicity correction.
    """

    seeds: list[int]
    split: str
    ci: str
    test: str


@dataclass
class SRSummary:
    """The SR stage in the report.

    Attributes:
        scale: Upsampling factor.
        arch: SR network architecture.
        preset: Its size preset.
        best: The SR run's best validation metrics (``sr_psnr``, ``bicubic_ssim``, ...).
        epochs: Epochs it trained for.
    """

    scale: int
    arch: str
    preset: str
    best: dict[str, float]
    epochs: int | None


@dataclass
class RunProvenance:
    """What made one run's weights, for checking a reproduction.

    Attributes:
        stage: Its pipeline stage (``sr``, ``classify/hr-seed0``, ...).
        run: Its run directory's name.
        fingerprint: The stage's fingerprint recorded in ``stages.json`` ("" if none was).
        checkpoint: The checkpoint the weights were read from (its folder name).
        weights_sha256: :func:`weights_sha256` of that checkpoint's fp32 weights.
    """

    stage: str
    run: str
    fingerprint: str
    checkpoint: str
    weights_sha256: str


@dataclass
class Results:
    """Everything the report states; ``results.json`` is :meth:`to_json` of it.

    Attributes:
        classes: Class names in label order.
        test_samples: Test samples each classifier was scored on.
        test_keys_sha256: Hash of the test keys (equal to the one recorded at ingest).
        dataset_id: Id of the shard set.
        arms: Arm -> its results, in the config's arm order.
        comparisons: The paired comparisons of ``report.pairs`` that could be made.
        protocol: How the numbers were obtained.
        sr: The SR stage, or None when no SR arm ran.
        data_fingerprint: The data stage's fingerprint ("" until :func:`build_report` sets it).
        provenance: Per run, its fingerprint and weights hash (set by :func:`build_report`).
        confusion: Arm -> confusion matrix summed over seeds (for the figure; not serialised).
        runs: Arm -> its run directories, one per seed (for the figures; not serialised).
    """

    classes: list[str]
    test_samples: int
    test_keys_sha256: str
    dataset_id: str
    arms: dict[str, ArmResults]
    comparisons: list[PairedComparison]
    protocol: ReportProtocol
    sr: SRSummary | None = None
    data_fingerprint: str = ""
    provenance: list[RunProvenance] = field(default_factory=list)
    confusion: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    runs: dict[str, list[Path]] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The serialised fields as plain data, in the order ``results.json`` lists them."""
        return {
            "classes": self.classes,
            "test_samples": self.test_samples,
            "test_keys_sha256": self.test_keys_sha256,
            "dataset_id": self.dataset_id,
            "arms": {arm: asdict(r) for arm, r in self.arms.items()},
            "comparisons": [asdict(c) for c in self.comparisons],
            "protocol": asdict(self.protocol),
            "sr": None if self.sr is None else asdict(self.sr),
            "data_fingerprint": self.data_fingerprint,
            "runs": [asdict(p) for p in self.provenance],
        }


def _arm_runs(cfg: PipelineConfig, out: Path) -> dict[str, list[Path]]:
    return {arm: [arm_run_dir(out, arm, s) for s in cfg.seeds] for arm in cfg.arms}


def _predictions(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    table = pq.read_table(predictions_path(eval_dir_of(run, "test"), "test")).to_pydict()
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
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_title(f"{arm} (all seeds)", fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true", fontsize=8)
    return _figure(path, fig)


def _groups(data_root: Path, keys: list[str]) -> list[str] | None:
    """Patient group per test key, or None when no patient id exists (groups are per key)."""
    rows = {r.key: r for r in read_manifest_rows(data_root) if r.status == "ok"}
    found = [rows.get(k) for k in keys]
    if all(r is not None and r.group_kind == GROUP_SAMPLE for r in found):
        return None
    return [r.group if r is not None else "" for r in found]


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _arm_results(
    cfg: PipelineConfig, classes: list[str], metrics: list[dict[str, Any]]
) -> ArmResults:
    """Mean and sd over seeds of one arm's test metrics (``metrics_test.json`` per seed)."""
    per_class = {
        c: {
            s: mean_std([m["per_class"][c][s] for m in metrics])
            for s in ("precision", "recall", "f1")
        }
        for c in classes
    }
    return ArmResults(
        seeds=cfg.seeds,
        summary={k: mean_std([m[k] for m in metrics]) for k in SUMMARY},
        per_class=per_class,
        per_seed=[{k: m[k] for k in SUMMARY} for m in metrics],
    )


def _correctness(dirs: list[Path], index: DatasetIndex) -> tuple[list[str], np.ndarray]:
    """The sorted test keys and per-seed correctness ``[n_seeds, n_keys]`` of one arm.

    Raises:
        ReportError: If a run's test keys do not hash to the value recorded at ingest.
    """
    keys: list[str] = []
    rows = []
    for d in dirs:
        keys, labels, preds = _predictions(d)
        if keys_hash(keys) != index.test_keys_sha256:
            raise ReportError(
                f"{d}: its test keys hash to {keys_hash(keys)[:12]}…, but ingest recorded "
                f"{index.test_keys_sha256[:12]}… for the test split; not reporting"
            )
        rows.append(labels == preds)
    return keys, np.stack(rows)


def collect(cfg: PipelineConfig, out: Path, index: DatasetIndex) -> Results:
    """Read every arm's test results and compute the statistics of the report.

    Args:
        cfg: The pipeline config (arms, seeds, report settings).
        out: The pipeline's output folder.
        index: The index of the pipeline's shard set.

    Returns:
        The results, without the SR section (:func:`build_report` adds it).

    Raises:
        ReportError: If a run's test keys do not hash to the value recorded at ingest.
    """
    runs = _arm_runs(cfg, out)
    classes = list(index.classes)
    arms: dict[str, ArmResults] = {}
    correct: dict[str, np.ndarray] = {}
    conf: dict[str, np.ndarray] = {}
    keys_ref: list[str] | None = None
    for arm, dirs in runs.items():
        files = [eval_metrics_path(eval_dir_of(d, "test"), "test") for d in dirs]
        metrics = [json.loads(f.read_text()) for f in files]
        keys, correct[arm] = _correctness(dirs, index)
        keys_ref = keys_ref or keys
        conf[arm] = np.sum([np.asarray(m["confusion_matrix"]) for m in metrics], axis=0)
        arms[arm] = _arm_results(cfg, classes, metrics)
    groups = _groups(data_dir(out), keys_ref or [])
    comparisons = compare_arms(correct, cfg.report.pairs, groups, n_boot=cfg.report.bootstrap)
    resampled = "patients" if groups is not None else "samples"
    protocol = ReportProtocol(
        seeds=cfg.seeds,
        split="test (fixed at ingest; key hash checked)",
        ci=f"95% percentile bootstrap, {cfg.report.bootstrap} replicates, resampling {resampled}",
        test="exact McNemar per seed, Holm-adjusted across all pairs and seeds",
    )
    return Results(
        classes=classes,
        test_samples=len(keys_ref or []),
        test_keys_sha256=index.test_keys_sha256,
        dataset_id=index.dataset_id,
        arms=arms,
        comparisons=comparisons,
        protocol=protocol,
        confusion=conf,
        runs=runs,
    )


def _sr_section(out: Path, sr_cfg: TrainConfig | None) -> SRSummary | None:
    if sr_cfg is None:
        return None
    metrics = json.loads((sr_run_dir(out) / "metrics.json").read_text())
    return SRSummary(
        scale=sr_cfg.sr.scale,
        arch=sr_cfg.sr.arch,
        preset=sr_cfg.sr.preset,
        best=metrics.get("best", {}),
        epochs=metrics.get("epochs_run"),
    )


def weights_sha256(state: Mapping[str, Any]) -> str:
    """The sha256 of a state dict's weights, as ``results.json`` records it per run.

    Keys are taken in sorted order; for each, the JSON text ``[key, shape]`` then the tensor's
    values as contiguous little-endian float32 bytes are hashed.

    Args:
        state: Name -> tensor, e.g. from :func:`trainer.export.load_fp32_weights` or the
            ``model.safetensors`` that ``trainer export`` writes.

    Returns:
        A hex sha256.
    """
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(json.dumps([key, list(tensor.shape)]).encode())
        digest.update(tensor.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def _run_provenance(stage: str, run: Path, fingerprint: str) -> RunProvenance:
    """Fingerprint and weights hash of one run (its scored checkpoint, else its best/newest)."""
    from trainer.checkpoint import resolve_checkpoint
    from trainer.export import load_fp32_weights

    scored = eval_metrics_path(eval_dir_of(run, "test"), "test")
    name = json.loads(scored.read_text()).get("checkpoint") if scored.is_file() else None
    # The scored checkpoint by its folder name: the path recorded may be relative to another cwd.
    ckpt = resolve_checkpoint(run / "checkpoints" / Path(name).name if name else run)
    return RunProvenance(
        stage=stage,
        run=run.name,
        fingerprint=fingerprint,
        checkpoint=ckpt.path.name,
        weights_sha256=weights_sha256(load_fp32_weights(ckpt)),
    )


def _provenance(res: Results, out: Path) -> list[RunProvenance]:
    """Every run of the report: the SR network (when reported), then each classifier."""
    stages = read_stages(out)

    def fp(name: str) -> str:
        record = stages.get(name)
        return record.fingerprint if record is not None else ""

    found = [_run_provenance(SR_RUN_NAME, sr_run_dir(out), fp(SR_RUN_NAME))] if res.sr else []
    for dirs in res.runs.values():
        found += [_run_provenance(f"classify/{d.name}", d, fp(f"classify/{d.name}")) for d in dirs]
    return found


def build_report(
    cfg: PipelineConfig, out: Path, index: DatasetIndex, sr_cfg: TrainConfig | None
) -> Path:
    """Write ``results.json``, ``report.html`` (self-contained) and ``report.md`` into ``out``.

    Args:
        cfg: The pipeline config.
        out: The pipeline's output folder (the runs are read from it, the report written to it).
        index: The index of the pipeline's shard set.
        sr_cfg: The SR stage's trainer config, or None when no SR arm ran.

    Returns:
        The path of ``report.html``.

    Raises:
        ReportError: If a run's test keys do not hash to the value recorded at ingest.
    """
    from trainer.experiment.gradcam import gradcam_png

    res = collect(cfg, out, index)
    files = out / "report_files"
    files.mkdir(exist_ok=True)
    figs = {
        "Learning curves": _curves_png(res.runs, files / "curves.png"),
        "Confusion matrices": _confusions_png(res.confusion, res.classes, files / "confusion.png"),
    }
    res.sr = _sr_section(out, sr_cfg)
    data_stage = read_stages(out).get("data")
    res.data_fingerprint = data_stage.fingerprint if data_stage is not None else ""
    res.provenance = _provenance(res, out)
    sr_png = sr_run_dir(out) / "sr_examples_val.png"
    if res.sr is not None and sr_png.is_file():
        figs["SR examples (held-out slices: LR, bicubic, zero-filled, SR, HR)"] = sr_png
    arm = cfg.arms[0]
    cam = gradcam_png(
        res.runs[arm][0], data_dir(out), files / "gradcam.png", cfg.report.gradcam_per_class
    )
    if cam is not None:
        figs[f"Grad-CAM, last ResNet stage ({arm} arm, seed {cfg.seeds[0]})"] = cam
    write_text(out / "results.json", json.dumps(res.to_json(), indent=1, default=float))
    _write_html(out / "report.html", res, figs)
    _write_md(out / "report.md", res, figs, out)
    return out / "report.html"


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
    "th{background:#eef}img{max-width:100%}</style></head><body>",
]


def _write_html(path: Path, res: Results, figs: dict[str, Path]) -> None:
    arms, comps, sr = _tables(res)
    p = res.protocol
    parts = [
        *_STYLE,
        "<h1>Does super-resolution help? srmri report</h1>",
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
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _write_md(path: Path, res: Results, figs: dict[str, Path], out: Path) -> None:
    arms, comps, sr = _tables(res)
    p = res.protocol
    parts = [
        "# Does super-resolution help? srmri report",
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
