"""``model_card.md`` of an exported model: data, training, test results, intended use, limits.

Everything the card states comes from the export's ``model.json`` description, the run's own
test evaluation (``RUN/eval-test``) and, for a run the pipeline made, the pipeline's
``results.json`` (``OUT/results.json`` for a run in ``OUT/runs/``). The card names no path,
patient id or header value: only ids, fingerprints, class names and numbers.

Intervals: ``trainer evaluate`` records point estimates only, so the card computes 95%
intervals from the test predictions (``predictions_test.parquet``): the Wilson score interval
for accuracy (closed form), and a percentile bootstrap (2000 resamples of the test slices with
replacement, numpy seed 0, slices taken in (label, prediction) order so the interval does not
depend on the keys, which are keyed hashes of the local ingest secret) for balanced accuracy and
macro-F1. Both treat slices as independent; slices of one patient are not, so the intervals are
too narrow when patients contribute several slices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from srmri.markdown import md_cell
from trainer.checkpoint import CheckpointInfo
from trainer.input_kind import INPUT_KINDS

__all__ = ["BOOTSTRAP_RESAMPLES", "render_card", "test_results", "wilson_interval"]

BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``correct / n`` (n > 0), by statsmodels."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(correct, n, alpha=0.05, method="wilson")
    return float(low), float(high)


# Our own rather than sklearn's balanced_accuracy_score + f1_score: measured 0.10 ms against
# 9.8 ms a resample of 400 slices, i.e. 0.2 s against 20 s for the card's 2,000 resamples; the
# values agree with sklearn's (tests/test_model_folder.py).
def _macro_scores(labels: np.ndarray, preds: np.ndarray, k: int) -> tuple[float, float]:
    """Balanced accuracy and macro-F1 over the classes present in ``labels``."""
    recalls, f1s = [], []
    for c in range(k):
        true, hit = labels == c, preds == c
        if not true.any():
            continue
        tp = float(np.sum(true & hit))
        recalls.append(tp / true.sum())
        f1s.append(2 * tp / (true.sum() + hit.sum()))
    return float(np.mean(recalls)), float(np.mean(f1s))


def _bootstrap(labels: np.ndarray, preds: np.ndarray, k: int) -> dict[str, tuple[float, float]]:
    order = np.lexsort((preds, labels))
    labels, preds = labels[order], preds[order]
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(labels), size=(BOOTSTRAP_RESAMPLES, len(labels)))
    scores = np.array([_macro_scores(labels[i], preds[i], k) for i in draws])
    low, high = np.percentile(scores, [2.5, 97.5], axis=0)
    return {
        "balanced_accuracy": (float(low[0]), float(high[0])),
        "macro_f1": (float(low[1]), float(high[1])),
    }


def test_results(run_dir: Path, ckpt: CheckpointInfo, classes: list[str]) -> dict[str, Any]:
    """The run's test metrics of the exported checkpoint, with 95% intervals.

    Args:
        run_dir: The classifier's run directory.
        ckpt: The exported checkpoint.
        classes: Its classes, in output order.

    Returns:
        ``{"status": "ok", "n", "metrics": {name: value}, "intervals": {name: (lo, hi)}}``,
        or ``{"status": "absent" | "other_checkpoint", "detail": text}``.

    Raises:
        ValueError: Naming a test evaluation file that cannot be read.
    """
    import pyarrow.parquet as pq

    from trainer.rundir import eval_dir_of, eval_metrics_path, predictions_path

    folder = eval_dir_of(run_dir, "test")
    metrics_file = eval_metrics_path(folder, "test")
    preds_file = predictions_path(folder, "test")
    if not (metrics_file.is_file() and preds_file.is_file()):
        return {"status": "absent", "detail": "the run has no test evaluation"}
    try:
        metrics = json.loads(metrics_file.read_text())
        table = pq.read_table(preds_file, columns=["label", "pred"]).to_pydict()
    except (ValueError, OSError) as exc:
        raise ValueError(f"{metrics_file.parent}: unreadable test evaluation ({exc})") from exc
    scored = Path(str(metrics.get("checkpoint", ""))).name
    if scored != ckpt.path.name:
        return {
            "status": "other_checkpoint",
            "detail": f"the run's test evaluation scored {scored or 'an unnamed checkpoint'}, "
            f"not the exported {ckpt.path.name}",
        }
    labels, preds = np.asarray(table["label"]), np.asarray(table["pred"])
    n = len(labels)
    names = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece")
    values = {k: metrics.get(k) for k in names}
    intervals: dict[str, tuple[float, float]] = {}
    if n:
        intervals["accuracy"] = wilson_interval(int(np.sum(labels == preds)), n)
        intervals.update(_bootstrap(labels, preds, len(classes)))
    return {"status": "ok", "n": n, "metrics": values, "intervals": intervals}


def _pipeline_results(run_dir: Path, ckpt: CheckpointInfo) -> tuple[str, dict[str, Any] | None]:
    """The pipeline's ``results.json`` for the run, or why there is none to state."""
    out = run_dir.parent.parent
    if run_dir.parent.name != "runs" or not (out / "stages.json").is_file():
        return "The run did not come from the pipeline (no `stages.json` above it).", None
    path = out / "results.json"
    if not path.is_file():
        return "The run came from a pipeline whose report (`results.json`) is absent.", None
    try:
        results = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    runs = [r for r in results.get("runs", []) if r.get("run") == run_dir.name]
    if results.get("dataset_id") != ckpt.dataset_id or not any(
        r.get("checkpoint") == ckpt.path.name for r in runs
    ):
        return (
            "The pipeline's `results.json` reports other weights or another data set than "
            "the exported checkpoint's; its comparison is not stated here.",
            None,
        )
    return "", results


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}"


def _channel_words(images: list[str]) -> str:
    """The input's channels in words: ``one greyscale channel`` or each channel's image."""
    if len(images) == 1:
        return "one greyscale channel"
    named = ", ".join(f"{i}: the {image.upper()} image" for i, image in enumerate(images))
    return f"{len(images)} greyscale channels ({named})"


def _arms_lines(run_dir: Path, ckpt: CheckpointInfo) -> list[str]:
    why, results = _pipeline_results(run_dir, ckpt)
    if results is None:
        return [why]
    lines = ["| arm | seeds | accuracy | balanced accuracy | macro-F1 |", "|---|---|---|---|---|"]
    for arm, r in results.get("arms", {}).items():
        s = r.get("summary", {})
        cells = [
            f"{_fmt(s.get(m, [None])[0])} ± {_fmt(s.get(m, [0, None])[1])}"
            for m in ("accuracy", "balanced_accuracy", "macro_f1")
        ]
        lines.append(f"| {md_cell(arm)} | {len(r.get('seeds', []))} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| comparison | accuracy difference | 95% CI | resampled | Holm p |",
        "|---|---|---|---|---|",
    ]
    for c in results.get("comparisons", []):
        holm = ", ".join(f"{p:.3g}" for p in c.get("pvalues_holm", []))
        lines.append(
            f"| {md_cell(c['a'])} − {md_cell(c['b'])} | {_fmt(c['diff'])} | [{_fmt(c['ci_low'])}, "
            f"{_fmt(c['ci_high'])}] | {c.get('resampled', '?')} | {holm} |"
        )
    return lines


def _test_lines(test: dict[str, Any]) -> list[str]:
    if test["status"] != "ok":
        return [
            f"No test metrics are stated: {test['detail']} (run `python -m trainer "
            "evaluate --checkpoint RUN --split test` before exporting)."
        ]
    lines = [
        f"Test split, {test['n']} slices. 95% intervals: see *Method* below.",
        "",
        "| metric | value | 95% interval |",
        "|---|---|---|",
    ]
    for name, value in test["metrics"].items():
        lo_hi = test["intervals"].get(name)
        ci = f"[{_fmt(lo_hi[0])}, {_fmt(lo_hi[1])}]" if lo_hi else "not computed"
        lines.append(f"| {name} | {_fmt(value)} | {ci} |")
    return lines


def render_card(spec: dict[str, Any], run_dir: Path, ckpt: CheckpointInfo) -> str:
    """The model card's markdown.

    Args:
        spec: The export's description (``model.json`` without its file hashes).
        run_dir: The classifier's run directory (test evaluation, pipeline results).
        ckpt: The exported checkpoint.

    Returns:
        The card's text.
    """
    data, train = spec["data"], spec["training"]
    counts = data.get("class_counts") or {}
    count_lines = [
        f"- {split}: " + ", ".join(f"{c} {n}" for c, n in per.items())
        for split, per in counts.items()
    ] or ["- per-class counts not recorded"]
    synthetic = data.get("source") == "synth"
    kind = {
        True: "synthetic (generated phantoms, not patients)",
        False: f"real scans ({data.get('source')})"
        if data.get("source")
        else "not recorded in the data set's index: treat it as unverified",
    }[synthetic]
    sr = spec.get("sr")
    chans = int(spec.get("in_chans", 1))
    images = spec["input"].get("channel_images") or [spec["input"]["kind"]]
    sections = [
        f"# Model card: {spec['model']} brain tumour slice classifier ({spec['inputs']} input)",
        "",
        "## Model",
        f"- Architecture: timm `{spec['model']}`, {chans} input channel{'s' * (chans > 1)}, "
        f"{len(spec['classes'])} outputs: {', '.join(spec['classes'])} (in this order)",
        f"- Input: {spec['input']['kind']} input, {spec['input']['size']}×{spec['input']['size']}"
        f" px, {_channel_words(images)} in [0, 1], after the training set's preprocessing",
        f"- Bundled SR model: {sr['model_id']} (it runs first on the LR input)"
        if sr
        else "- No SR model needed",
        f"- Weights sha256: {spec['weights_sha256']} (step {train['step']}, "
        f"{train['weights']} weights)",
        "",
        "## Data",
        f"- Data set id: {data['dataset_id']}",
        f"- Data: {kind}",
        *count_lines,
        "",
        "## Training",
        f"- Training config fingerprint: {train['config_fingerprint']}",
        f"- Data set fingerprint: {data.get('fingerprint') or 'not recorded'}",
        "",
        "## Test results",
        *_test_lines(spec["test"]),
        "",
        "## Arms comparison",
        *_arms_lines(run_dir, ckpt),
        "",
        "## Intended use",
        "Research on super-resolution and brain tumour classification from MRI: reproducing and "
        f"comparing the input arms ({', '.join(INPUT_KINDS)}) on 2-D axial slices. Not for "
        "diagnosis, triage or any decision about a patient.",
        "",
        "## Limits",
        f"- Trained and tested on {'synthetic' if synthetic else 'the data set above'} data; "
        "performance on other scanners, sequences, sites or populations is unknown.",
        "- Slice-level: each 2-D slice is classified alone; a volume's row is the mean of its "
        "slices, not a patient-level diagnosis.",
        "- Greyscale MRI slices only; colour photographs are refused, other modalities "
        "(CT, X-ray) are not detected.",
        "- Not a medical device; not cleared or approved for clinical use.",
        "",
        "## Method",
        "Accuracy: Wilson score interval. Balanced accuracy, macro-F1: percentile bootstrap "
        f"({BOOTSTRAP_RESAMPLES} resamples of the test slices, seed 0). Slices are treated as "
        "independent, so the intervals are too narrow where one patient gives several slices.",
        "",
    ]
    return "\n".join(sections)
