"""Statistics for comparing input arms on the same test samples.

Paired comparisons use the per-sample correctness of two arms on identical test keys:
- the accuracy difference with a paired bootstrap confidence interval that resamples patients
  (clusters) where a patient id exists, else samples, the same resample for every seed;
- an exact McNemar test per seed (statsmodels), with Holm correction across all tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

__all__ = [
    "McNemarResult",
    "PairedComparison",
    "compare_arms",
    "holm_adjust",
    "mcnemar_exact",
    "mean_std",
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
    if groups is None:
        labels = np.arange(per_sample.size)
    else:
        _, labels = np.unique(np.asarray(groups), return_inverse=True)
    n_clusters = int(labels.max()) + 1
    sums = np.bincount(labels, weights=per_sample, minlength=n_clusters)
    sizes = np.bincount(labels, minlength=n_clusters).astype(np.float64)
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
