"""The pipeline's report: ``results.json``, a self-contained ``report.html`` and ``report.md``.

Everything is read back from the run directories the pipeline wrote (test predictions, metrics,
learning curves, the SR run's examples), so the report can be rebuilt without training. The
test split's key hash must equal the one recorded at ingest, or no report is written.

For checking a reproduction the report states the shard set's ``dataset_id`` and, per run (the
SR network and every classifier), the pipeline stage's fingerprint (from ``stages.json``: its
config and its upstream stages') and the sha256 of its weights (:func:`weights_sha256`): the
fp32 state dict that :func:`trainer.weights.load_fp32_weights` reads from the checkpoint the test
split was scored with (the SR run's: the checkpoint enhance used, its best else newest), i.e.
exactly the tensors ``trainer export`` writes, EMA weights where the run kept an EMA.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from trainer.experiment.pages import confusions_png, curves_png, write_html, write_md
from trainer.experiment.results import (
    SUMMARY,
    ArmResults,
    ReportProtocol,
    Results,
    RunProvenance,
    SRSummary,
)
from trainer.experiment.stats import compare_arms, mean_std
from trainer.rundir import eval_dir_of, eval_metrics_path, predictions_path

__all__ = [
    "ArmResults",
    "ReportError",
    "ReportProtocol",
    "Results",
    "RunProvenance",
    "SRSummary",
    "arm_correctness",
    "build_report",
    "collect",
    "report_pairs",
    "weights_sha256",
]

# The arm every default comparison is made against: the low-resolution input without help.
BASELINE_ARM = "lr"


class ReportError(RuntimeError):
    """The runs cannot be reported honestly (e.g. the test split moved)."""


def report_pairs(arms: Sequence[str], pairs: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """The paired comparisons the report makes: ``report.pairs``, then unpaired arms minus lr.

    An arm that no pair names (``lr|sr`` under pairs written before it existed) would get its
    row in the arms table and no comparison at all: it is compared with the ``lr`` baseline,
    the comparison every default pair makes. Arms a pair names are left as configured.

    Args:
        arms: The pipeline's arms, in order.
        pairs: The configured ``(a, b)`` pairs (reported as ``a - b``).

    Returns:
        The configured pairs, then ``(arm, "lr")`` for each other arm no pair names (none
        when the ``lr`` arm did not run).
    """
    out = [(str(a), str(b)) for a, b in pairs]
    named = {arm for pair in out for arm in pair}
    if BASELINE_ARM not in arms:
        return out
    return out + [(a, BASELINE_ARM) for a in arms if a != BASELINE_ARM and a not in named]


def _arm_runs(cfg: PipelineConfig, out: Path) -> dict[str, list[Path]]:
    return {arm: [arm_run_dir(out, arm, s) for s in cfg.seeds] for arm in cfg.arms}


def _predictions(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    table = pq.read_table(predictions_path(eval_dir_of(run, "test"), "test")).to_pydict()
    order = np.argsort(table["key"])
    keys = [table["key"][i] for i in order]
    return keys, np.asarray(table["label"])[order], np.asarray(table["pred"])[order]


def _content_order(data_root: Path, keys: list[str]) -> tuple[np.ndarray, list[str] | None]:
    """The test samples in content order, and their patient groups named by content.

    Keys and patient pseudonyms of a real source are keyed hashes of the local ingest secret;
    a bootstrap over samples or groups sorted by them would give another interval on every
    machine. Samples are ordered by their pixels' sha256 and each group is named by the least
    sha256 among its test samples, as ``shards.split`` orders groups.

    Args:
        data_root: The shard set (its manifest).
        keys: The test keys, in the order of the correctness arrays.

    Returns:
        ``(order, groups)``: the permutation of ``keys`` into content order, and the group of
        each sample in that order (None when no patient id exists: groups are per sample).
    """
    rows = {r.key: r for r in read_manifest_rows(data_root) if r.status == "ok"}
    found = [rows.get(k) for k in keys]
    content = [(r.sha256 if r is not None else "", k) for r, k in zip(found, keys)]
    order = np.asarray(sorted(range(len(keys)), key=content.__getitem__), dtype=np.int64)
    if all(r is not None and r.group_kind == GROUP_SAMPLE for r in found):
        return order, None
    names = [r.group if r is not None else "" for r in found]
    least: dict[str, str] = {}
    for name, (sha, _) in zip(names, content):
        least[name] = min(least.get(name, sha), sha)
    return order, [least[names[i]] for i in order]


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


def arm_correctness(
    runs: Mapping[str, Sequence[Path]], out: Path, index: DatasetIndex
) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """Every arm's per-seed test correctness in content order, and the sample groups.

    What the report's paired statistics resample (and ``trainer.experiment.study`` too).

    Args:
        runs: Arm -> its run directories, one per seed.
        out: The pipeline's output folder (its shard set names the groups).
        index: The index of that shard set.

    Returns:
        ``(correct, groups)``: arm -> bool ``[n_seeds, n_test]`` over the test samples in
        content order (:func:`_content_order`), and the patient group of each of them (None
        when no patient id exists).

    Raises:
        ReportError: If a run's test keys do not hash to the value recorded at ingest.
    """
    correct: dict[str, np.ndarray] = {}
    keys_ref: list[str] | None = None
    for arm, dirs in runs.items():
        keys, correct[arm] = _correctness(list(dirs), index)
        keys_ref = keys_ref or keys
    order, groups = _content_order(data_dir(out), keys_ref or [])
    return {arm: c[:, order] for arm, c in correct.items()}, groups


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
    conf: dict[str, np.ndarray] = {}
    for arm, dirs in runs.items():
        files = [eval_metrics_path(eval_dir_of(d, "test"), "test") for d in dirs]
        metrics = [json.loads(f.read_text()) for f in files]
        conf[arm] = np.sum([np.asarray(m["confusion_matrix"]) for m in metrics], axis=0)
        arms[arm] = _arm_results(cfg, classes, metrics)
    correct, groups = arm_correctness(runs, out, index)
    pairs = report_pairs(cfg.arms, cfg.report.pairs)
    comparisons = compare_arms(correct, pairs, groups, n_boot=cfg.report.bootstrap)
    resampled = "patients" if groups is not None else "samples"
    protocol = ReportProtocol(
        seeds=cfg.seeds,
        split="test (fixed at ingest; key hash checked)",
        ci=f"95% percentile bootstrap, {cfg.report.bootstrap} replicates, resampling {resampled}",
        test="exact McNemar per seed, Holm-adjusted across all pairs and seeds",
    )
    return Results(
        classes=classes,
        source=cfg.data.source,
        train_samples=index.num_samples("train"),
        test_samples=next(iter(correct.values())).shape[1] if correct else 0,
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
        state: Name -> tensor, e.g. from :func:`trainer.weights.load_fp32_weights` or the
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
    from trainer.weights import load_fp32_weights

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
        "Learning curves": curves_png(res.runs, files / "curves.png"),
        "Confusion matrices": confusions_png(res.confusion, res.classes, files / "confusion.png"),
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
    write_html(out / "report.html", res, figs)
    write_md(out / "report.md", res, figs, out)
    return out / "report.html"
