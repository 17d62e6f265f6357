"""The study as markdown, for RESULTS.md (:mod:`trainer.experiment.study`).

The tables in the pre-registered order: inputs, primary comparisons (with the mixed model
beside them), per-split intervals, McNemar per run, every arm, SR quality per split.
"""

from __future__ import annotations

from srmri.markdown import md_table
from trainer.experiment.stats import MixedModelFit
from trainer.experiment.study_stats import Study

__all__ = ["study_markdown"]


def _span(low: float | None, high: float | None) -> str:
    return "—" if low is None or high is None else f"[{low:+.3f}, {high:+.3f}]"


def _mixed_cells(fit: MixedModelFit) -> list[str]:
    """Estimate, interval and status of the mixed model; a failed fit says so in each cell."""
    if fit.estimate is None:
        return ["not fitted", "—", fit.status]
    return [f"{fit.estimate:+.3f}", _span(fit.ci_low, fit.ci_high), fit.status]


def _inputs(study: Study) -> str:
    rows = [
        [
            s.label,
            f"`{s.dataset_id}`",
            f"`{s.data_fingerprint[:16]}`",
            f"`{s.test_keys_sha256[:16]}`",
            f"`{s.report_fingerprint[:16]}`",
            str(s.test_samples),
            s.resampled,
        ]
        for s in study.splits
    ]
    header = ["split", "dataset_id", "data fingerprint", "test keys", "report", "test", "groups"]
    return md_table(header, rows)


def _primary(study: Study) -> str:
    rows = [
        [
            f"{c.a} − {c.b}",
            f"{c.diff:+.3f}",
            _span(c.ci_low, c.ci_high),
            c.verdict,
            *_mixed_cells(c.mixed),
        ]
        for c in study.comparisons
    ]
    header = ["comparison", "mean diff", "hierarchical 95%", "verdict", "mixed model", "95%", "fit"]
    return md_table(header, rows)


def _mixed_notes(study: Study) -> list[str]:
    """Every comparison's mixed-model notes, so that a singular or failed fit is never hidden."""
    out = []
    for c in study.comparisons:
        fit = c.mixed
        variances = (
            f"split variance {fit.group_var:.3g}, residual {fit.residual_var:.3g}"
            if fit.group_var is not None and fit.residual_var is not None
            else "no variances"
        )
        notes = "; ".join(n.rstrip(".") for n in fit.notes) if fit.notes else "no warnings"
        out.append(f"- {c.a} − {c.b}: {fit.status} ({variances}); {notes}.")
    return out


def _per_split(study: Study) -> str:
    rows = [
        [f"{c.a} − {c.b}", p.split, f"{p.diff:+.3f}", _span(p.ci_low, p.ci_high)]
        for c in study.comparisons
        for p in c.per_split
    ]
    return md_table(["comparison", "split", "diff", "95% (test patients)"], rows)


def _mcnemar(study: Study) -> str:
    rows = [
        [
            f"{c.a} − {c.b}",
            r.split,
            str(r.seed),
            f"{r.diff:+.3f}",
            str(r.only_a),
            str(r.only_b),
            f"{r.pvalue:.3g}",
            f"{r.pvalue_holm:.3g}",
        ]
        for c in study.comparisons
        for r in c.runs
    ]
    header = ["comparison", "split", "seed", "diff", "only a", "only b", "p", "p (Holm)"]
    return md_table(header, rows)


def _arms(study: Study) -> str:
    rows = [
        [
            r.arm,
            str(r.runs),
            f"{r.accuracy[0]:.3f} ± {r.accuracy[1]:.3f}",
            f"{r.balanced_accuracy[0]:.3f} ± {r.balanced_accuracy[1]:.3f}",
        ]
        for r in study.arm_table
    ]
    return md_table(["arm", "runs", "accuracy", "balanced accuracy"], rows)


def _sr(study: Study) -> str:
    methods = ("sr", "bicubic", "zero_fill")
    rows = [
        [r.split, r.arch, str(r.epochs)]
        + [f"{r.psnr[m]:.2f}" for m in methods]
        + [f"{r.ssim[m]:.4f}" for m in methods]
        for r in study.sr_table
    ]
    header = ["split", "SR model", "epochs", "PSNR SR", "bicubic", "zero-filled"]
    return md_table([*header, "SSIM SR", "bicubic", "zero-filled"], rows)


def study_markdown(study: Study) -> str:
    """The study's markdown section.

    Args:
        study: The computed study.

    Returns:
        Markdown text: one heading, then the tables with the notes each needs.
    """
    n_splits, n_seeds = len(study.splits), len(study.seeds)
    parts = [
        f"## Study: {n_splits} splits x {n_seeds} model seeds",
        "",
        "Inputs (one pipeline folder per split; fingerprints shortened, the JSON has them whole):",
        "",
        _inputs(study),
        "",
        "### Comparisons across splits (primary)",
        "",
        _primary(study),
        "",
        f"Mean paired difference in test accuracy over the {n_splits * n_seeds} (split, seed) "
        f"runs. Hierarchical percentile bootstrap, {study.bootstrap} replicates (seed "
        f"{study.seed}): resamples the {n_splits} splits, then each split's test patients, "
        f"then its {n_seeds} model seeds. With {n_splits} splits the across-split interval is "
        "coarse: the split level has only that many values to resample. Verdict as "
        "pre-registered: helps if the interval lies above zero, hurts if below, else cannot tell.",
        "",
        "Mixed model (statsmodels MixedLM, REML): per-run accuracy difference ~ 1 with a random "
        "intercept per split; Wald 95% interval (normal quantile, optimistic with few splits).",
        "",
        *_mixed_notes(study),
        "",
        "### Per split",
        "",
        _per_split(study),
        "",
        f"As each split's report computes it: percentile bootstrap over that split's test "
        f"patients, seeds averaged per slice, {study.split_bootstrap} replicates.",
        "",
        "### McNemar per run",
        "",
        _mcnemar(study),
        "",
        "Exact McNemar per (split, seed) run (seed s of each arm); Holm-adjusted within each "
        "comparison.",
        "",
        f"### Every arm (mean ± sd over {n_splits * n_seeds} (split, seed) runs)",
        "",
        _arms(study),
        "",
    ]
    if study.sr_table:
        parts += [
            "### SR quality per split (validation slices)",
            "",
            _sr(study),
            "",
        ]
    return "\n".join(parts)
