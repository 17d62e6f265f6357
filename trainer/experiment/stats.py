"""Statistics for comparing input arms on the same test samples.

Paired comparisons use the per-sample correctness of two arms on identical test keys:
- the accuracy difference with a paired bootstrap confidence interval that resamples patients
  (clusters) where a patient id exists, else samples, the same resample for every seed;
- an exact McNemar test per seed (statsmodels), with Holm correction across all tests.

Across several splits of the same slices (``trainer.experiment.study``):
- a hierarchical bootstrap that resamples splits, then each split's patients, then its seeds;
- a linear mixed model of the per-run differences with a random intercept per split.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

__all__ = [
    "McNemarResult",
    "MixedModelFit",
    "PairedComparison",
    "compare_arms",
    "hierarchical_bootstrap",
    "holm_adjust",
    "mcnemar_exact",
    "mean_std",
    "mixed_intercept",
    "paired_bootstrap",
]


@dataclass
class McNemarResult:
    """Exact McNemar test of two classifiers on the same samples.

    Attributes:
        only_a: Samples arm a got right and arm b wrong.
        only_b: Samples arm b got right and arm a wrong.
        pvalue: Two-sided exact p-value.
    """

    only_a: int
    only_b: int
    pvalue: float


@dataclass
class PairedComparison:
    """Arm ``a`` against arm ``b`` over seeds on the same test keys.

    Attributes:
        a: The first arm.
        b: The arm it is compared with.
        diff: Mean over seeds of accuracy(a) - accuracy(b).
        ci_low: Lower bound of the paired bootstrap interval of ``diff``.
        ci_high: Upper bound of it.
        resampled: What the bootstrap resamples: ``patients`` or ``samples``.
        mcnemar: One exact McNemar test per seed.
        pvalues_holm: Their p-values, Holm-adjusted across every pair and seed.
    """

    a: str
    b: str
    diff: float
    ci_low: float
    ci_high: float
    resampled: str
    mcnemar: list[McNemarResult]
    pvalues_holm: list[float]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """Exact (binomial) McNemar test on paired correctness vectors.

    Args:
        correct_a: Bool per sample: arm a classified it correctly.
        correct_b: Same for arm b, on the same samples in the same order.

    Returns:
        The discordant counts and the two-sided exact p-value.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    result = mcnemar(table, exact=True)
    return McNemarResult(only_a=table[0][1], only_b=table[1][0], pvalue=float(result.pvalue))


def holm_adjust(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (statsmodels ``multipletests``)."""
    if not pvalues:
        return []
    return [float(p) for p in multipletests(list(pvalues), method="holm")[1]]


def _cluster_sums(diff: np.ndarray, groups: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per seed the summed difference of each cluster, and the clusters' sample counts.

    Args:
        diff: Per-sample values ``[n_seeds, n_samples]``.
        groups: Cluster (patient) per sample; None makes every sample its own cluster.

    Returns:
        ``(sums [n_seeds, n_clusters], sizes [n_clusters])``, clusters in sorted name order.
    """
    if groups is None:
        labels = np.arange(diff.shape[1])
    else:
        _, labels = np.unique(np.asarray(groups), return_inverse=True)
    n_clusters = int(labels.max()) + 1
    sums = np.stack([np.bincount(labels, weights=row, minlength=n_clusters) for row in diff])
    return sums, np.bincount(labels, minlength=n_clusters).astype(np.float64)


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    groups: Sequence[str] | None = None,
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Accuracy difference a - b with a percentile bootstrap CI, resampling clusters.

    Args:
        correct_a: Correctness ``[n_seeds, n_samples]`` (or ``[n_samples]``) of arm a.
        correct_b: Same shape for arm b, same sample order.
        groups: Patient (cluster) per sample; None resamples samples.
        n_boot: Bootstrap replicates.
        confidence: Two-sided coverage of the interval.
        seed: Seed of the resampling.

    Returns:
        (observed difference, lower bound, upper bound), the difference averaged over seeds.
    """
    a = np.atleast_2d(np.asarray(correct_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(correct_b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"arms have different shapes {a.shape} and {b.shape}")
    per_sample = (a - b).mean(axis=0)  # seed-averaged difference of each sample
    sums, sizes = _cluster_sums(per_sample[None, :], groups)
    sums = sums[0]
    n_clusters = sizes.size
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    # Ratio estimator: resampled total difference over resampled sample count.
    boots = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return float(per_sample.mean()), float(lo), float(hi)


def compare_arms(
    correct: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    groups: Sequence[str] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
) -> list[PairedComparison]:
    """All paired comparisons, with McNemar p-values Holm-adjusted across pairs and seeds.

    Args:
        correct: Arm name -> correctness ``[n_seeds, n_samples]`` on the same sorted keys.
        pairs: (a, b) arm pairs to compare; pairs with a missing arm are skipped.
        groups: Patient per sample, or None.
        n_boot: Bootstrap replicates.
        seed: Seed of the resampling.

    Returns:
        One :class:`PairedComparison` per available pair.
    """
    out: list[PairedComparison] = []
    for a, b in pairs:
        if a not in correct or b not in correct:
            continue
        ca, cb = np.atleast_2d(correct[a]), np.atleast_2d(correct[b])
        diff, lo, hi = paired_bootstrap(ca, cb, groups, n_boot=n_boot, seed=seed)
        tests = [mcnemar_exact(x, y) for x, y in zip(ca, cb)]
        resampled = "patients" if groups is not None else "samples"
        out.append(
            PairedComparison(
                a=a,
                b=b,
                diff=diff,
                ci_low=lo,
                ci_high=hi,
                resampled=resampled,
                mcnemar=tests,
                pvalues_holm=[],
            )
        )
    adjusted = holm_adjust([t.pvalue for c in out for t in c.mcnemar])
    k = 0
    for c in out:
        c.pvalues_holm = adjusted[k : k + len(c.mcnemar)]
        k += len(c.mcnemar)
    return out


# Replicates drawn at once by the hierarchical bootstrap: bounds its memory (replicates x
# patients counts) on large test splits; the draws, hence the interval, do not depend on it.
_BOOT_CHUNK = 2000


def _split_replicates(
    sums: np.ndarray, sizes: np.ndarray, rng: np.random.Generator, n_boot: int
) -> np.ndarray:
    """One split's difference under ``n_boot`` resamples of its patients and its seeds.

    Args:
        sums: Per seed the summed per-sample difference of each patient ``[n_seeds, n_pat]``.
        sizes: Samples per patient ``[n_pat]``.
        rng: The resampling's generator.
        n_boot: Replicates.

    Returns:
        ``[n_boot]``: per replicate, the mean over its resampled seeds of the difference over
        its resampled patients' samples (a ratio: resampled total over resampled count).
    """
    n_seeds, n_pat = sums.shape
    out = np.empty(n_boot)
    for start in range(0, n_boot, _BOOT_CHUNK):
        n = min(_BOOT_CHUNK, n_boot - start)
        # How often each seed and each patient is drawn: multinomial counts are exactly the
        # counts of drawing that many with replacement, without the index arrays.
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n)
        pat_counts = rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=n)
        total = np.einsum("bs,sk,bk->b", seed_counts, sums, pat_counts) / n_seeds
        out[start : start + n] = total / (pat_counts @ sizes)
    return out


def hierarchical_bootstrap(
    diffs: Sequence[np.ndarray],
    groups: Sequence[Sequence[str] | None],
    n_boot: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Paired difference across splits with a three-level percentile bootstrap interval.

    Each replicate draws the splits with replacement; every drawn split (a split drawn twice
    is resampled twice, independently) then draws its patients and its seeds with replacement
    and gives the mean over those seeds of the difference over those patients' samples. The
    replicate is the mean over the drawn splits: each split weighs the same, as each is one
    draw of "who is in the test set".

    Args:
        diffs: Per split the paired per-sample difference ``[n_seeds, n_samples]`` (e.g.
            ``correct_a - correct_b``, seed ``i`` of a with seed ``i`` of b).
        groups: Per split the patient of each sample, or None (each sample its own).
        n_boot: Bootstrap replicates.
        confidence: Two-sided coverage of the interval.
        seed: Seed of the resampling.

    Returns:
        (observed difference, lower bound, upper bound): the observed difference is the mean
        over splits of each split's seed-averaged difference, i.e. the mean over the (split,
        seed) runs when every split has the same seeds.

    Raises:
        ValueError: If no split is given, or the groups do not match the splits.
    """
    if not diffs or len(diffs) != len(groups):
        raise ValueError(f"need one group list per split, got {len(diffs)} and {len(groups)}")
    parts = [
        _cluster_sums(np.atleast_2d(np.asarray(d, np.float64)), g) for d, g in zip(diffs, groups)
    ]
    observed = float(np.mean([s.sum() / (s.shape[0] * z.sum()) for s, z in parts]))
    rng = np.random.default_rng(seed)
    n_splits = len(parts)
    picks = rng.integers(0, n_splits, size=(n_boot, n_splits))
    total = np.zeros(n_boot)
    for slot in range(n_splits):
        # Every split is resampled for every slot so that each drawn copy is independent.
        for j, (sums, sizes) in enumerate(parts):
            inner = _split_replicates(sums, sizes, rng, n_boot)
            total += np.where(picks[:, slot] == j, inner, 0.0)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(total / n_splits, [alpha, 1.0 - alpha])
    return observed, float(lo), float(hi)


@dataclass
class MixedModelFit:
    """A linear mixed model ``value ~ 1`` with a random intercept per group.

    Attributes:
        status: ``fitted``; ``singular`` (a variance estimated at zero: between groups, so
            the fit is that of independent runs, or within them); ``not converged``; or
            ``failed`` (no estimate).
        estimate: The fixed intercept (the mean), None when failed.
        ci_low: Lower bound of its Wald interval (normal quantile), None when failed.
        ci_high: Upper bound of it.
        group_var: Variance of the random intercept, None when failed.
        residual_var: Variance within groups, None when failed.
        notes: Why the status is not ``fitted``, and statsmodels' own warnings, verbatim.
    """

    status: str
    estimate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    group_var: float | None = None
    residual_var: float | None = None
    notes: list[str] = field(default_factory=list)


# A variance below this fraction of the total is taken as estimated at zero (singular fit):
# statsmodels stops short of exactly zero, at about 1e-4 of the total with 3 groups of 3.
_SINGULAR = 1e-3


def _fit_status(
    group_var: float, residual_var: float, converged: bool, said: Sequence[str]
) -> tuple[str, str]:
    """Status and explanation of a finished fit from its variances and statsmodels' warnings."""
    total = group_var + residual_var
    if not converged:
        return "not converged", "the optimiser did not converge; the numbers are its last step"
    # statsmodels warns "on the boundary" on most fits with few groups, so that warning alone
    # decides nothing; a Hessian that is not positive definite means the fit is degenerate.
    if group_var <= _SINGULAR * total or any("not positive definite" in m for m in said):
        return "singular", (
            "the between-split variance is estimated at zero (singular fit): the interval "
            "treats every run as independent and ignores variation between splits"
        )
    if residual_var <= _SINGULAR * total:
        return "singular", "the within-split variance is estimated at zero (singular fit)"
    return "fitted", ""


def mixed_intercept(
    values: Sequence[float], groups: Sequence[object], confidence: float = 0.95
) -> MixedModelFit:
    """Fit ``value ~ 1`` with a random intercept per group (statsmodels ``MixedLM``, REML).

    Args:
        values: One value per run (e.g. its accuracy difference).
        groups: The group (split) of each run.
        confidence: Two-sided coverage of the intercept's interval.

    Returns:
        The fit; a fit that cannot be made is returned with status ``failed`` and the reason
        in ``notes``, never raised, so that the caller reports it.
    """
    from statsmodels.regression.mixed_linear_model import MixedLM

    y = np.asarray(values, dtype=np.float64)
    labels = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    if np.unique(labels).size < 2:
        return MixedModelFit("failed", notes=["fewer than two groups: no random intercept"])
    if np.ptp(y) == 0:
        return MixedModelFit("failed", notes=["every value is the same: no variance to model"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = MixedLM(y, np.ones((y.size, 1)), groups=labels).fit(reml=True)
            low, high = (float(v) for v in fit.conf_int(alpha=1.0 - confidence)[0])
        except (np.linalg.LinAlgError, ValueError) as exc:
            return MixedModelFit("failed", notes=[f"statsmodels: {exc}"])
    said = list(dict.fromkeys(f"statsmodels: {w.message}" for w in caught))
    estimate = float(fit.fe_params[0])
    group_var, residual_var = float(np.asarray(fit.cov_re)[0, 0]), float(fit.scale)
    if not all(np.isfinite([estimate, low, high])):
        return MixedModelFit("failed", notes=["the fit gave no finite interval", *said])
    status, why = _fit_status(group_var, residual_var, bool(fit.converged), said)
    notes = [why, *said] if why else said
    return MixedModelFit(
        status,
        estimate=estimate,
        ci_low=low,
        ci_high=high,
        group_var=group_var,
        residual_var=residual_var,
        notes=notes,
    )
